"""Fused depthwise conv + BatchNorm + activation: the public function, its argument checks,
and the fake implementation and autograd formula shared by every backend's operator."""

import numbers
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from fastmb import dispatch
from fastmb.ops import reference
from fastmb.ops.activations import ACTIVATIONS
from fastmb.ops.common import (
    autocast_dtype,
    check_bool,
    check_choice,
    check_optional_vector,
    check_same_device,
    check_tensor,
    compute_dtype,
    conv_output_shape,
    conv_padding,
    differentiable_grads,
    new_output,
    padding_sides,
    pair,
    real,
    register_backends,
    runs_composite,
    update_running_stats,
)

OP = "dwconv_bn_act"


def dwconv_bn_act(
    x: Tensor,
    weight: Tensor,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | None = None,
    dilation: int | Sequence[int] = 1,
    eps: float = 1e-5,
    momentum: float = 0.1,
    training: bool = False,
    activation: str = "hardswish",
) -> Tensor:
    """act(batch_norm(depthwise_conv2d(x, weight))) in one fused op.

    Same semantics as ``nn.Conv2d(C, C, k, stride, padding, dilation, groups=C, bias=False)``
    followed by ``F.batch_norm(..., training, momentum, eps)`` and the activation:
    ``training=True`` normalises with the batch statistics and updates ``running_mean`` and
    ``running_var`` in place (if given) with factor ``momentum``; ``training=False`` uses the
    running statistics. ``padding=None`` means "same" padding, ``(k - 1) // 2 * dilation``;
    ``padding=(top, bottom, left, right)`` pads the sides unequally (timm's ``Conv2dSame``).
    Under autocast, x and weight are cast like ``conv2d``'s inputs; the output keeps x's
    memory format.
    """
    check_tensor("x", x, 4)
    check_tensor("weight", weight, 4)
    channels = x.shape[1]
    if weight.shape[0] != channels or weight.shape[1] != 1 or min(weight.shape[2:]) < 1:
        raise ValueError(
            f"weight must be depthwise, of shape (C, 1, kH, kW) with C = x.shape[1] = {channels} and kH, kW >= 1; "
            f"got {tuple(weight.shape)}"
        )
    what = f"one per channel of x, which has {channels}"
    for name, vector in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean), ("running_var", running_var)):
        check_optional_vector(name, vector, channels, what)
    check_same_device(x, weight=weight, bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean, running_var=running_var)
    training = check_bool("training", training)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    check_choice("activation", activation, ACTIVATIONS)
    eps = real("eps", eps, 0.0)
    if training and (isinstance(momentum, bool) or not isinstance(momentum, numbers.Real)):
        raise TypeError(
            f"momentum must be a number, got {momentum!r} (for a cumulative average pass "
            "1 / num_batches_tracked, as nn.BatchNorm2d does)"
        )
    stride = pair("stride", stride, 1)
    dilation = pair("dilation", dilation, 1)
    if padding is None:
        padding = [(k - 1) // 2 * d for k, d in zip(weight.shape[2:], dilation)]
    padding = conv_padding("padding", padding)
    return run_dwconv_bn_act(
        x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, eps, momentum, training, activation
    )


def run_dwconv_bn_act(
    x: Tensor,
    weight: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    eps: float,
    momentum: float,
    training: bool,
    activation: str,
) -> Tensor:
    """dwconv_bn_act after its argument checks (fastmb.nn.DWConvBNAct's parameters are known
    good): autocast, the output size, the backend's operator, the running statistics."""
    cast_to = autocast_dtype(x.device.type)
    if cast_to is not None:
        x, weight = x.to(cast_to), weight.to(cast_to)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}; they must match")
    shape = conv_output_shape(x, weight, stride, padding, dilation)
    if shape[2] <= 0 or shape[3] <= 0:
        raise ValueError(
            f"the output would be empty: x of spatial size {tuple(x.shape[2:])} with a "
            f"{tuple(weight.shape[2:])} kernel, stride {stride}, padding {padding}, dilation {dilation}"
        )
    values_per_channel = shape[0] * shape[2] * shape[3]
    if training and values_per_channel == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")

    args = (x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, float(eps), bool(training), activation)
    if runs_composite(x, weight, bn_weight, bn_bias) or dispatch.runs_pytorch(OP, x.device.type, args):
        return reference.dwconv_bn_act.composite(
            x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, eps, momentum, training, activation
        )
    y, mean, var = dispatch.call(dispatch.select(OP, x.device.type, args), args)
    if training and running_mean is not None and values_per_channel > 0:
        update_running_stats(running_mean, running_var, mean, var, values_per_channel, momentum)
    return y


class _SyncedDWConvBNAct(torch.autograd.Function):
    """dwconv_bn_act in training with a batch norm synchronised over a process group, on the
    backend's fused operators: a statistics pass (the training forward, its output unused), the
    group's statistics (Chan's merge of every process's), a normalise pass (the forward with those
    statistics); backward: the sums of dL/du and dL/du * x_hat (the eval backward's BN grads),
    all-reduced, then dL/dx and dL/dw from the group's sums (batch_sums). The BN affine grads are
    this process's own, as DDP expects."""

    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, kernel, conv, eps, activation, group):
        from fastmb.nn.batch_norm import merge_group_statistics

        _, mean, var = kernel.forward(x, weight, bn_weight, bn_bias, None, None, *conv, eps, True, activation)
        shape = conv_output_shape(x, weight, *conv)
        mean, var, total = merge_group_statistics(mean, var, shape[0] * shape[2] * shape[3], group)
        y = kernel.forward(x, weight, bn_weight, bn_bias, mean, var, *conv, eps, False, activation)[0]
        ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, var)
        ctx.kernel, ctx.arguments, ctx.group, ctx.total = kernel, (*conv, eps), group, total
        ctx.activation = activation
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var, total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var, _grad_total):
        x, weight, bn_weight, bn_bias, mean, var = ctx.saved_tensors
        args = (x, weight, bn_weight, bn_bias, mean, var, *ctx.arguments)
        _, _, sum_gu_xhat, sum_gu = ctx.kernel.backward(grad_y, *args, False, ctx.activation, [False, False, True])
        sums = torch.stack([sum_gu, sum_gu_xhat]).double()
        dist.all_reduce(sums, group=ctx.group)
        needs = ctx.needs_input_grad
        grad_x, grad_weight, _, _ = ctx.kernel.backward(grad_y, *args, True, ctx.activation, [needs[0], needs[1], False], sums, ctx.total)
        return (grad_x if needs[0] else None, grad_weight if needs[1] else None, sum_gu_xhat if needs[2] else None,
                sum_gu if needs[3] else None, None, None, None, None, None)  # fmt: skip


def run_synced_dwconv_bn_act(
    x: Tensor, weight: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None, running_mean: Tensor | None,
    running_var: Tensor | None, conv: tuple[list[int], list[int], list[int]], eps: float, momentum: float, activation: str, group,
) -> Tensor:  # fmt: skip
    """dwconv_bn_act in training with the batch statistics of `group`'s whole batch (an
    nn.SyncBatchNorm's), on the fused operators of the backend the inputs select; updates the
    running statistics with the group's mean and unbiased variance."""
    args = (x, weight, bn_weight, bn_bias, None, None, *conv, float(eps), True, activation)
    kernel = dispatch.select_kernel(OP, x.device.type, args)
    y, mean, var, total = _SyncedDWConvBNAct.apply(x, weight, bn_weight, bn_bias, kernel, conv, float(eps), activation, group)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, total, momentum)
    return y


def _cuda_supports(x: Tensor, weight: Tensor, bn_weight, bn_bias, running_mean, running_var, stride, padding, *args) -> bool:
    """What fastmb._C's CUDA kernels take: square 3/5/7 kernels, float32/16 and bfloat16, and
    pixel counts (input and padded) that index in 32 bits (offsets are 64-bit)."""
    k = weight.shape[2]
    n, c, h, w = x.shape
    top, bottom, left, right = padding_sides(padding)
    padded_pixels = n * (h + top + bottom) * (w + left + right)
    return (
        x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and k == weight.shape[3]
        and k in (3, 5, 7)
        and padded_pixels < 2**31
        and c < 2**21
    )


def _fake_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, eps, training, activation):
    stats = x.new_empty(x.shape[1], dtype=compute_dtype(x.dtype))
    return new_output(conv_output_shape(x, weight, stride, padding, dilation), x), stats, torch.empty_like(stats)


def _fake_backward(
    grad_y, x, weight, bn_weight, bn_bias, mean, var, stride, padding, dilation, eps, training, activation, output_mask, batch_sums=None,
    batch_count=0,
):
    affine_dtype = bn_weight.dtype if bn_weight is not None else mean.dtype
    affine = mean.new_empty(x.shape[1] if output_mask[2] else 0, dtype=affine_dtype)
    return (
        new_output(x.shape, x) if output_mask[0] else x.new_empty(0),
        weight.new_empty(weight.shape if output_mask[1] else 0),
        affine,
        torch.empty_like(affine),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bn_weight, bn_bias, _, _, stride, padding, dilation, eps, training, activation = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, var)
    ctx.arguments = (stride, padding, dilation, eps, training, activation)


def register_operators(forward_op, backward_op, fake: bool = True) -> None:
    """Registers the fake implementations (unless the operators bring theirs, as triton_op
    does) and the autograd formula of one backend's pair of operators (forward, backward)
    with the schemas of fastmb/ops/schemas.py."""
    if fake:
        torch.library.register_fake(forward_op, _fake_forward)
        torch.library.register_fake(backward_op, _fake_backward)

    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, bn_weight, bn_bias, mean, var = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: a backward that is itself differentiable
            stride, padding, dilation, eps, training, activation = ctx.arguments
            running = (None, None) if training else (mean, var)  # training: the batch statistics, from x
            grads = differentiable_grads(
                lambda *inputs: reference.dwconv_bn_act.composite(*inputs, *running, stride, padding, dilation, eps, 0.0, training, activation),
                (x, weight, bn_weight, bn_bias), needs[:4], grad_y,
            )
            return (*grads, *([None] * 8))
        mask = [needs[0], needs[1], needs[2] or needs[3]]
        grad_x, grad_weight, grad_bn_weight, grad_bn_bias = backward_op(
            grad_y, x, weight, bn_weight, bn_bias, mean, var, *ctx.arguments, mask
        )
        return (
            grad_x if needs[0] else None,
            grad_weight if needs[1] else None,
            grad_bn_weight if needs[2] else None,
            grad_bn_bias if needs[3] else None,
            *([None] * 8),
        )

    dispatch.register_autograd(forward_op, backward, _setup_context)


register_backends(OP, register_operators, (reference.dwconv_bn_act.forward_op, reference.dwconv_bn_act.backward_op), _cuda_supports)
