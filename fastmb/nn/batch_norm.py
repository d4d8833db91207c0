"""nn.BatchNorm2d's running-statistics bookkeeping, and nn.SyncBatchNorm's synchronised batch
statistics, for the fused modules that replace them."""

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastmb.ops.common import frozen_batch_norm, update_running_stats


class BatchNormStep(NamedTuple):
    """What nn.BatchNorm2d.forward hands F.batch_norm for one call."""

    running_mean: Tensor | None  # None: not tracked (training without track_running_stats)
    running_var: Tensor | None
    use_batch_stats: bool  # normalise with the batch's statistics (training, or no running ones)
    momentum: float  # the running statistics' averaging factor


def batch_norm_step(bn: nn.Module) -> BatchNormStep:
    """nn.BatchNorm2d.forward's rules for one call of `bn`, counting the batch in
    num_batches_tracked as it does (momentum=None: a cumulative average); a FrozenBatchNorm2d's
    (its running statistics, always)."""
    # Buffers straight from the module's dict: nn.Module's attribute lookup would cost more than
    # the rest of this, on every call of every fused layer.
    buffers = bn._buffers
    if frozen_batch_norm(bn):  # the running statistics, in training too, and never updated
        return BatchNormStep(buffers["running_mean"], buffers["running_var"], False, 0.0)
    training, momentum = bn.training, bn.momentum
    factor = 0.0 if momentum is None else momentum
    tracked = buffers.get("num_batches_tracked")
    if training and bn.track_running_stats and tracked is not None:
        tracked.add_(1)
        factor = 1.0 / float(tracked) if momentum is None else momentum
    mean, var = buffers.get("running_mean"), buffers.get("running_var")
    keep_running = not training or bn.track_running_stats
    return BatchNormStep(mean if keep_running else None, var if keep_running else None, training or (mean is None and var is None), factor)


def synchronised(bn: nn.Module) -> bool:
    """Whether `bn` is an nn.SyncBatchNorm whose batch statistics span several processes now."""
    if not isinstance(bn, nn.SyncBatchNorm) or not (bn.training and dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(bn.process_group or dist.group.WORLD) > 1


class _AllGather(torch.autograd.Function):
    """Each process's tensor, stacked in rank order; the backward sums the gathered gradient over
    the processes (every one's loss depends on every rank's input) and keeps this rank's row."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, tensor.contiguous(), group=group)
        return torch.stack(gathered)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def _merged_moments(gathered: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's merge (no sum of squares) of per-process rows [mean (C), biased variance (C),
    count]: the group's mean, biased variance and total count."""
    counts, means, variances = gathered[:, -1:], gathered[:, :channels], gathered[:, channels : 2 * channels]
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    return mean, (counts * (variances + (means - mean) ** 2)).sum(0) / total, total


def merge_group_statistics(mean: Tensor, var: Tensor, count: int, group) -> tuple[Tensor, Tensor, int]:
    """The process group's batch mean and biased variance, and its total count, from every
    process's (count, mean, biased variance), merged in double."""
    local = torch.cat([mean.double(), var.double(), mean.new_full((1,), count, dtype=torch.float64)])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    global_mean, global_var, total = _merged_moments(torch.stack(gathered), mean.shape[0])
    return global_mean.to(mean.dtype), global_var.to(var.dtype), int(total.item())


def synced_batch_norm(z: Tensor, bn: nn.SyncBatchNorm, step: BatchNormStep) -> Tensor:
    """batch_norm(z) in training with the statistics of the whole batch across `bn`'s process
    group, as nn.SyncBatchNorm computes them but on any device and backend (gloo on the CPU
    included): each process's count, mean and biased variance, gathered and merged with Chan's
    formula (no sum of squares), differentiably, so the backward's sums are synchronised too.
    Updates the running statistics with the global mean and unbiased variance."""
    group = bn.process_group or dist.group.WORLD
    channels = z.shape[1]
    var, mean = torch.var_mean(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z, dim=(0, 2, 3), correction=0)
    count = mean.new_full((1,), z.numel() // max(channels, 1))
    gathered = _AllGather.apply(torch.cat([mean, var, count]), group)  # [processes][2C + 1]
    global_mean, global_var, total = _merged_moments(gathered, channels)
    if step.running_mean is not None:
        update_running_stats(step.running_mean, step.running_var, global_mean, global_var, total, step.momentum)
    scale = torch.rsqrt(global_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -global_mean * scale + (bn.bias if bn.bias is not None else 0)
    return z * scale[:, None, None].to(z.dtype) + shift[:, None, None].to(z.dtype)
