"""Activation and gate functions by name, with the exact derivatives PyTorch uses (the
reference backend differentiates through these, so its gradients match eager bit for bit in
the boundary cases: relu at 0, hardswish at +-3, relu6 at 0 and 6)."""

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("hardswish", "relu", "relu6", "identity")
GATES = ("hardsigmoid", "sigmoid")


def activation_forward(name: str, u: Tensor) -> Tensor:
    if name == "hardswish":
        return F.hardswish(u)
    if name == "relu":
        return F.relu(u)
    if name == "relu6":
        return F.relu6(u)
    return u


def activation_backward(name: str, grad: Tensor, u: Tensor) -> Tensor:
    """d act(u)/du * grad, with u the activation's input."""
    if name == "hardswish":
        return torch.ops.aten.hardswish_backward(grad, u)
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, u, 0)
    if name == "relu6":
        return torch.ops.aten.hardtanh_backward(grad, u, 0.0, 6.0)
    return grad


def gate_forward(name: str, a: Tensor) -> Tensor:
    return F.hardsigmoid(a) if name == "hardsigmoid" else torch.sigmoid(a)


def gate_backward(name: str, grad: Tensor, a: Tensor) -> Tensor:
    """d gate(a)/da * grad, with a the gate's input."""
    if name == "hardsigmoid":
        return torch.ops.aten.hardsigmoid_backward(grad, a)
    return torch.ops.aten.sigmoid_backward(grad, torch.sigmoid(a))
