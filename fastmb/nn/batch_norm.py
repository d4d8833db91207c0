"""nn.BatchNorm2d's running-statistics bookkeeping, for the fused modules that replace it."""

from typing import NamedTuple

from torch import Tensor, nn


class BatchNormStep(NamedTuple):
    """What nn.BatchNorm2d.forward hands F.batch_norm for one call."""

    running_mean: Tensor | None  # None: not tracked (training without track_running_stats)
    running_var: Tensor | None
    use_batch_stats: bool  # normalise with the batch's statistics (training, or no running ones)
    momentum: float  # the running statistics' averaging factor


def batch_norm_step(bn: nn.BatchNorm2d) -> BatchNormStep:
    """nn.BatchNorm2d.forward's rules for one call of `bn`, counting the batch in
    num_batches_tracked as it does (momentum=None: a cumulative average)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_running = not bn.training or bn.track_running_stats
    return BatchNormStep(
        bn.running_mean if keep_running else None, bn.running_var if keep_running else None, use_batch_stats, momentum
    )
