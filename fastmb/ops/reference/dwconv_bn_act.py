"""Reference depthwise conv + BatchNorm + activation, forward and backward."""

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmb.ops import schemas
from fastmb.ops.activations import activation_backward, activation_forward
from fastmb.ops.common import autocast_off, bn_affine, compute_dtype, new_output


def _per_channel(v: Tensor) -> Tensor:
    return v[:, None, None]


def _padded(x: Tensor, padding: list[int]) -> tuple[Tensor, list[int]]:
    """x and the conv's padding: [top, bottom, left, right], which conv2d does not take, as an
    explicit zero pad of x."""
    if len(padding) == 2:
        return x, padding
    top, bottom, left, right = padding
    return F.pad(x, (left, right, top, bottom)), [0, 0]


def _conv(x: Tensor, weight: Tensor, stride, padding, dilation) -> Tensor:
    x, padding = _padded(x, padding)
    return F.conv2d(x, weight, None, stride, padding, dilation, groups=x.shape[1])


def forward(
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
    training: bool,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    dtype = compute_dtype(x.dtype)
    with autocast_off(x.device.type):
        z = _conv(x.to(dtype), weight.to(dtype), stride, padding, dilation)
        c = z.shape[1]
        if not training:
            mean, var = running_mean.to(dtype), running_var.to(dtype)
        elif z.numel() == 0:
            mean, var = z.new_zeros(c), z.new_ones(c)
        else:
            var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
        gamma, beta = bn_affine(bn_weight, bn_bias, mean)
        scale = gamma * torch.rsqrt(var + eps)
        u = z * _per_channel(scale) + _per_channel(beta - mean * scale)
        y = new_output(z.shape, x)
        y.copy_(activation_forward(activation, u))
    return y, mean.clone(), var.clone()


def backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    eps: float,
    training: bool,
    activation: str,
    output_mask: list[bool],
    batch_sums: Tensor | None = None,
    batch_count: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dtype = mean.dtype
    with autocast_off(x.device.type):
        x_, weight_ = x.to(dtype), weight.to(dtype)
        x_padded, conv_padding = _padded(x_, padding)  # once, for the conv and its backward
        z = _conv(x_padded, weight_, stride, conv_padding, dilation)
        gamma, beta = bn_affine(bn_weight, bn_bias, mean)
        invstd = torch.rsqrt(var + eps)
        x_hat = (z - _per_channel(mean)) * _per_channel(invstd)
        grad_u = activation_backward(activation, grad_y.to(dtype), x_hat * _per_channel(gamma) + _per_channel(beta))
        grad_beta = grad_u.sum(dim=(0, 2, 3))
        grad_gamma = (grad_u * x_hat).sum(dim=(0, 2, 3))
        grad_z = grad_u
        sum_gu, sum_gu_xhat, count = grad_beta, grad_gamma, z.numel() // max(z.shape[1], 1)
        if batch_sums is not None:  # the whole batch's, across processes
            sum_gu, sum_gu_xhat, count = batch_sums[0].to(dtype), batch_sums[1].to(dtype), batch_count
        if training and count > 0:
            # BN's batch statistics depend on z: remove the mean of grad_u and its
            # projection on x_hat.
            grad_z = grad_u - _per_channel(sum_gu / count) - x_hat * _per_channel(sum_gu_xhat / count)
        grad_z = grad_z * _per_channel(gamma * invstd)
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_z, x_padded, weight_, None, stride, conv_padding, dilation, False, [0, 0], x.shape[1],
            [output_mask[0], output_mask[1], False],
        )
        if output_mask[0] and len(padding) == 4:
            grad_x = grad_x[:, :, padding[0] : padding[0] + x.shape[2], padding[2] : padding[2] + x.shape[3]]

    affine_dtype = bn_weight.dtype if bn_weight is not None else dtype
    outputs = [x.new_empty(0), weight.new_empty(0), mean.new_empty(0, dtype=affine_dtype), mean.new_empty(0, dtype=affine_dtype)]
    if output_mask[0]:
        outputs[0] = new_output(x.shape, x)
        outputs[0].copy_(grad_x)
    if output_mask[1]:
        outputs[1] = grad_weight.to(weight.dtype).contiguous()
    if output_mask[2]:
        outputs[2] = grad_gamma.to(affine_dtype)
        outputs[3] = grad_beta.to(affine_dtype)
    return tuple(outputs)


def composite(
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
    """The op as the eager modules compute it, in differentiable PyTorch ops and no custom op:
    what ONNX export, torch.func transforms, forward-mode AD and double backward run. Updates
    the running statistics (when given, in training) as F.batch_norm does."""
    z = _conv(x, weight, stride, padding, dilation)
    return activation_forward(activation, F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps))


forward_op = torch.library.custom_op(
    "fastmb::dwconv_bn_act_reference", forward, mutates_args=(), schema=schemas.DWCONV_BN_ACT
)
backward_op = torch.library.custom_op(
    "fastmb::dwconv_bn_act_backward_reference",
    backward,
    mutates_args=(),
    schema=schemas.DWCONV_BN_ACT_BACKWARD,
)
