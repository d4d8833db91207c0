"""Reference squeeze-and-excitation (torchvision's), forward and backward."""

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmb.ops import schemas
from fastmb.ops.activations import activation_backward, activation_forward, gate_backward, gate_forward
from fastmb.ops.common import autocast_off, compute_dtype


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


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
        hidden = activation_forward(activation, F.linear(pooled, fc1_weight.to(dtype), _cast(fc1_bias, dtype)))
        scale = gate_forward(gate, F.linear(hidden, fc2_weight.to(dtype), _cast(fc2_bias, dtype)))
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
    dtype = pooled.dtype
    with autocast_off(x.device.type):
        grad, x_ = grad_y.to(dtype), x.to(dtype)
        w1, w2 = fc1_weight.to(dtype), fc2_weight.to(dtype)
        # Recompute the two tiny FC layers from the saved per-(n, c) means.
        pre_activation = F.linear(pooled, w1, _cast(fc1_bias, dtype))
        hidden = activation_forward(activation, pre_activation)
        pre_gate = F.linear(hidden, w2, _cast(fc2_bias, dtype))
        scale = gate_forward(gate, pre_gate)

        grad_pre_gate = gate_backward(gate, (grad * x_).sum(dim=(2, 3)), pre_gate)
        grad_pre_activation = activation_backward(activation, grad_pre_gate @ w2, pre_activation)
        grad_pooled = grad_pre_activation @ w1
        spatial = x.shape[2] * x.shape[3]
        grad_x = torch.empty_like(x)
        grad_x.copy_(grad * scale[:, :, None, None] + (grad_pooled / max(spatial, 1))[:, :, None, None])

    def like(grad_param: Tensor, param: Tensor | None, reference: Tensor) -> Tensor:
        return grad_param.to((param if param is not None else reference).dtype)

    return (
        grad_x,
        like(grad_pre_activation.t() @ pooled, fc1_weight, fc1_weight),
        like(grad_pre_activation.sum(0), fc1_bias, fc1_weight),
        like(grad_pre_gate.t() @ hidden, fc2_weight, fc2_weight),
        like(grad_pre_gate.sum(0), fc2_bias, fc2_weight),
    )


forward_op = torch.library.custom_op(
    "fastmb::squeeze_excitation_reference", forward, mutates_args=(), schema=schemas.SQUEEZE_EXCITATION
)
backward_op = torch.library.custom_op(
    "fastmb::squeeze_excitation_backward_reference",
    backward,
    mutates_args=(),
    schema=schemas.SQUEEZE_EXCITATION_BACKWARD,
)
