"""Reference squeeze-and-excitation (torchvision's), forward and backward."""

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmb.ops import schemas
from fastmb.ops.activations import activation_backward, activation_forward, gate_backward, gate_forward
from fastmb.ops.common import autocast_off, compute_dtype


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def excitation(
    pooled: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None, activation: str, gate: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The FC layers on the (N, C) means, in their dtype: (pre_activation, hidden, pre_gate, scale).
    Shared with the Triton backend (the C++ backends have the same in csrc/squeeze_excitation_fc)."""
    dtype = pooled.dtype
    pre_activation = F.linear(pooled, fc1_weight.to(dtype), _cast(fc1_bias, dtype))
    hidden = activation_forward(activation, pre_activation)
    pre_gate = F.linear(hidden, fc2_weight.to(dtype), _cast(fc2_bias, dtype))
    return pre_activation, hidden, pre_gate, gate_forward(gate, pre_gate)


def excitation_backward(
    grad_scale: Tensor, pooled: Tensor, fc: tuple[Tensor, ...], parameters: tuple[Tensor | None, ...], activation: str, gate: str
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """From dL/dscale and excitation()'s results `fc`: dL/dpooled, and the grads of `parameters`
    (fc1 weight and bias, fc2 weight and bias), typed like them (a missing bias: like its weight)."""
    fc1_weight, fc1_bias, fc2_weight, fc2_bias = parameters
    pre_activation, hidden, pre_gate, _ = fc
    dtype = pooled.dtype
    grad_pre_gate = gate_backward(gate, grad_scale, pre_gate)
    grad_pre_activation = activation_backward(activation, grad_pre_gate @ fc2_weight.to(dtype), pre_activation)

    def like(grad: Tensor, param: Tensor | None, fallback: Tensor) -> Tensor:
        return grad.to((param if param is not None else fallback).dtype)

    return grad_pre_activation @ fc1_weight.to(dtype), (
        like(grad_pre_activation.t() @ pooled, fc1_weight, fc1_weight),
        like(grad_pre_activation.sum(0), fc1_bias, fc1_weight),
        like(grad_pre_gate.t() @ hidden, fc2_weight, fc2_weight),
        like(grad_pre_gate.sum(0), fc2_bias, fc2_weight),
    )


def forward(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    activation: str,
    gate: str,
) -> tuple[Tensor, Tensor]:
    dtype = compute_dtype(x.dtype)
    with autocast_off(x.device.type):
        x_ = x.to(dtype)
        pooled = x_.mean(dim=(2, 3))
        scale = excitation(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate)[3]
        y = torch.empty_like(x)
        y.copy_(x_ * scale[:, :, None, None])
    return y, pooled


def backward(
    grad_y: Tensor,
    x: Tensor,
    pooled: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    activation: str,
    gate: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with autocast_off(x.device.type):
        grad, x_ = grad_y.to(pooled.dtype), x.to(pooled.dtype)
        # Recompute the two tiny FC layers from the saved per-(n, c) means.
        fc = excitation(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate)
        grad_scale = (grad * x_).sum(dim=(2, 3))
        parameters = (fc1_weight, fc1_bias, fc2_weight, fc2_bias)
        grad_pooled, grad_parameters = excitation_backward(grad_scale, pooled, fc, parameters, activation, gate)
        spatial = x.shape[2] * x.shape[3]
        grad_x = torch.empty_like(x)
        grad_x.copy_(grad * fc[3][:, :, None, None] + (grad_pooled / max(spatial, 1))[:, :, None, None])
    return (grad_x, *grad_parameters)


def composite(
    x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None, activation: str, gate: str,
    dtype: torch.dtype | None = None,
) -> Tensor:  # fmt: skip
    """The op as torchvision's module computes it (in `dtype`, by default the compute dtype), in
    differentiable PyTorch ops and no custom op: what ONNX export, torch.func transforms,
    forward-mode AD and double backward run, and "auto" where PyTorch measured faster."""
    x_ = x.to(dtype or compute_dtype(x.dtype))
    scale = excitation(x_.mean(dim=(2, 3)), fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate)[3]
    return (x_ * scale[:, :, None, None]).to(x.dtype)


forward_op = torch.library.custom_op(
    "fastmb::squeeze_excitation_reference", forward, mutates_args=(), schema=schemas.SQUEEZE_EXCITATION
)
backward_op = torch.library.custom_op(
    "fastmb::squeeze_excitation_backward_reference",
    backward,
    mutates_args=(),
    schema=schemas.SQUEEZE_EXCITATION_BACKWARD,
)
