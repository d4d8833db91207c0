"""Fused squeeze-and-excitation: the public function, its argument checks, and the fake
implementation and autograd formula shared by every backend's operator."""

import torch
from torch import Tensor

from fastmb import dispatch
from fastmb.ops import reference
from fastmb.ops.activations import ACTIVATIONS, GATES
from fastmb.ops.common import (
    check_choice,
    check_optional_vector,
    check_same_device,
    check_tensor,
    compute_dtype,
    differentiable_grads,
    register_backends,
    runs_composite,
)

OP = "squeeze_excitation"


def _as_matrix(name: str, weight: Tensor, rows: int | None, cols: int | None, what: str) -> Tensor:
    """A 1x1 conv weight (out, in, 1, 1) or linear weight (out, in), as an (out, in) matrix."""
    check_tensor(name, weight, (2, 4))
    if weight.dim() == 4 and weight.shape[2:] != (1, 1):
        raise ValueError(f"{name} must be a 1x1 convolution weight, got shape {tuple(weight.shape)}")
    if (rows is not None and weight.shape[0] != rows) or (cols is not None and weight.shape[1] != cols):
        raise ValueError(f"{name} must have shape ({rows or 'S'}, {cols or 'S'}[, 1, 1]) ({what}), got {tuple(weight.shape)}")
    return weight.flatten(1)


def squeeze_excitation(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    *,
    activation: str = "relu",
    gate: str = "hardsigmoid",
) -> Tensor:
    """torchvision's SqueezeExcitation in one fused op:
    ``x * gate(fc2(activation(fc1(x.mean((2, 3))))))``.

    fc weights are 1x1 conv weights (S, C, 1, 1) / (C, S, 1, 1) or matrices (S, C) / (C, S).
    They may be fp32 while x is fp16/bf16 (the FC layers compute in fp32); the output has x's
    dtype and memory format.
    """
    check_tensor("x", x, 4)
    channels = x.shape[1]
    w1 = _as_matrix("fc1_weight", fc1_weight, None, channels, f"x has {channels} channels")
    squeeze = w1.shape[0]
    w2 = _as_matrix("fc2_weight", fc2_weight, channels, squeeze, f"fc1_weight has {squeeze} outputs, x {channels} channels")
    check_optional_vector("fc1_bias", fc1_bias, squeeze, "one per fc1 output")
    check_optional_vector("fc2_bias", fc2_bias, channels, "one per channel of x")
    check_same_device(x, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("gate", gate, GATES)

    return run_squeeze_excitation(x, w1, fc1_bias, w2, fc2_bias, activation, gate)


def run_squeeze_excitation(
    x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None, activation: str, gate: str
) -> Tensor:
    """squeeze_excitation after its argument checks, fc weights as (out, in) matrices."""
    args = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate)
    if runs_composite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
        return reference.squeeze_excitation.composite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate)
    if dispatch.runs_pytorch(OP, x.device.type, args):  # as torchvision's module computes it, in x's dtype
        return reference.squeeze_excitation.composite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate, x.dtype)
    return dispatch.call(dispatch.select(OP, x.device.type, args), args)[0]


def _cuda_supports(x: Tensor, *args) -> bool:
    """What fastmb._C's CUDA kernels take: float32/16 and bfloat16, pixel counts within 32 bits."""
    n, c, h, w = x.shape
    return x.dtype in (torch.float32, torch.float16, torch.bfloat16) and n * h * w < 2**31 and c < 2**21


# Outputs of x's shape are laid out like x (torch.empty_like), as eager's element-wise ops do.
def _fake_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate):
    return torch.empty_like(x), x.new_empty(x.shape[:2], dtype=compute_dtype(x.dtype))


def _fake_backward(grad_y, x, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate):
    def bias_grad(bias, weight):  # shaped like the bias, typed like it (or the weight if None)
        return weight.new_empty(weight.shape[0], dtype=(bias if bias is not None else weight).dtype)

    return (
        torch.empty_like(x),
        torch.empty_like(fc1_weight),
        bias_grad(fc1_bias, fc1_weight),
        torch.empty_like(fc2_weight),
        bias_grad(fc2_bias, fc2_weight),
    )


def _setup_context(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, output[1], fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    ctx.arguments = (activation, gate)


def register_operators(forward_op, backward_op, fake: bool = True) -> None:
    """Registers the fake implementations (unless the operators bring theirs, as triton_op
    does) and the autograd formula of one backend's pair of operators (forward, backward)
    with the schemas of fastmb/ops/schemas.py."""
    if fake:
        torch.library.register_fake(forward_op, _fake_forward)
        torch.library.register_fake(backward_op, _fake_backward)

    def backward(ctx, grad_y, _grad_pooled):
        x, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a backward that is itself differentiable
            grads = differentiable_grads(
                lambda *inputs: reference.squeeze_excitation.composite(*inputs, *ctx.arguments),
                (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias), ctx.needs_input_grad[:5], grad_y,
            )
            return (*grads, None, None)
        grads = backward_op(grad_y, x, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *ctx.arguments)
        return (*(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad)), None, None)

    dispatch.register_autograd(forward_op, backward, _setup_context)


register_backends(OP, register_operators, (reference.squeeze_excitation.forward_op, reference.squeeze_excitation.backward_op), _cuda_supports)
