"""The one registry of activation and gate names: for each, the torch.nn module it stands for,
the code the compiled and Triton kernels know it by (csrc/activations.h, kernels/common.py),
and its formulas with the exact derivatives PyTorch uses (the reference backend differentiates
through these, so its gradients match eager bit for bit at the kinks: relu at 0, hardswish at
+-3, relu6 at 0 and 6). Modules, convert, the kernels, the CLI and the tests all read it."""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Activation:
    """An elementwise activation act(u)."""

    name: str
    module: type[nn.Module]  # the torch.nn module it replaces
    code: int  # fastmb::Activation in csrc/activations.h; the Triton kernels' ACT
    forward: Callable[[Tensor], Tensor]
    backward: Callable[[Tensor, Tensor], Tensor]  # (grad, u) -> d act(u)/du * grad
    # act applied in place to a tensor the caller owns, or None when the module has no inplace form
    in_place: Callable[[Tensor], Tensor] | None = None
    # whether backward needs u (eager's module then saves its input for backward)
    saves_input: bool = True
    # the module's attributes that tell this activation from others of its class (GELU's approximate)
    module_kwargs: dict[str, object] = field(default_factory=dict, hash=False)

    def make_module(self, inplace: bool = True) -> nn.Module:
        """The torch.nn module, in place where it can be (as torchvision builds them) unless told not."""
        if inplace and self.in_place is not None:
            return self.module(inplace=True, **self.module_kwargs)
        return self.module(**self.module_kwargs)

    def matches(self, module: nn.Module) -> bool:
        """Whether `module` (of this activation's class) computes this activation."""
        return all(getattr(module, key) == value for key, value in self.module_kwargs.items())


@dataclass(frozen=True)
class Gate:
    """The squeeze-and-excitation gate on the excitation's logits."""

    name: str
    module: type[nn.Module]
    code: int  # fastmb::Gate in csrc/activations.h
    forward: Callable[[Tensor], Tensor]
    backward: Callable[[Tensor, Tensor], Tensor]  # (grad, a) -> d gate(a)/da * grad


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation(
            "hardswish", nn.Hardswish, 0, F.hardswish, torch.ops.aten.hardswish_backward, lambda y: F.hardswish(y, inplace=True)
        ),
        Activation(
            "relu", nn.ReLU, 1, F.relu, lambda grad, u: torch.ops.aten.threshold_backward(grad, u, 0), lambda y: F.relu(y, inplace=True),
            # relu's gradient is read off its output (eager saves that), so it keeps nothing extra
            saves_input=False,
        ),
        Activation(
            "relu6",
            nn.ReLU6,
            2,
            F.relu6,
            lambda grad, u: torch.ops.aten.hardtanh_backward(grad, u, 0.0, 6.0),
            lambda y: F.relu6(y, inplace=True),
        ),
        Activation("identity", nn.Identity, 3, lambda u: u, lambda grad, u: grad, saves_input=False),
        Activation("silu", nn.SiLU, 4, F.silu, torch.ops.aten.silu_backward, lambda y: F.silu(y, inplace=True)),
        Activation("gelu", nn.GELU, 5, F.gelu, torch.ops.aten.gelu_backward, module_kwargs={"approximate": "none"}),
        Activation(
            "gelu_tanh",
            nn.GELU,
            6,
            lambda u: F.gelu(u, approximate="tanh"),
            lambda grad, u: torch.ops.aten.gelu_backward(grad, u, approximate="tanh"),
            module_kwargs={"approximate": "tanh"},
        ),
    )
}

GATES: dict[str, Gate] = {
    g.name: g
    for g in (
        Gate("hardsigmoid", nn.Hardsigmoid, 0, F.hardsigmoid, torch.ops.aten.hardsigmoid_backward),
        Gate("sigmoid", nn.Sigmoid, 1, torch.sigmoid, lambda grad, a: torch.ops.aten.sigmoid_backward(grad, torch.sigmoid(a))),
    )
}

_ACTIVATIONS_BY_MODULE: dict[type[nn.Module], list[Activation]] = {}
for _activation in ACTIVATIONS.values():
    _ACTIVATIONS_BY_MODULE.setdefault(_activation.module, []).append(_activation)
_GATE_BY_MODULE = {g.module: g.name for g in GATES.values()}


# timm's own activation and gate classes (timm.layers.activations*), by class name, whose
# forward computes the named activation.
_TIMM_ACTIVATIONS = {
    "Swish": "silu", "SwishMe": "silu", "HardSwish": "hardswish", "HardSwishMe": "hardswish", "GELU": "gelu", "GELUTanh": "gelu_tanh",
}
_TIMM_GATES = {"Sigmoid": "sigmoid", "HardSigmoid": "hardsigmoid", "HardSigmoidMe": "hardsigmoid"}


def _timm_name(module: nn.Module, table: dict[str, str]) -> str | None:
    cls = type(module)
    if not cls.__module__.startswith("timm.layers.activations"):
        return None
    return table.get(cls.__name__)


def activation_name(module: nn.Module | None) -> str | None:
    """The registry's name for activation module `module` (None: "identity"), or None if it has none."""
    if module is None:
        return "identity"
    for candidate in _ACTIVATIONS_BY_MODULE.get(type(module), ()):
        if candidate.matches(module):
            return candidate.name
    return _timm_name(module, _TIMM_ACTIVATIONS)


def gate_name(module: nn.Module) -> str | None:
    return _GATE_BY_MODULE.get(type(module)) or _timm_name(module, _TIMM_GATES)


def activation_forward(name: str, u: Tensor) -> Tensor:
    return ACTIVATIONS[name].forward(u)


def activation_backward(name: str, grad: Tensor, u: Tensor) -> Tensor:
    """d act(u)/du * grad, with u the activation's input."""
    return ACTIVATIONS[name].backward(grad, u)


def gate_forward(name: str, a: Tensor) -> Tensor:
    return GATES[name].forward(a)


def gate_backward(name: str, grad: Tensor, a: Tensor) -> Tensor:
    """d gate(a)/da * grad, with a the gate's input."""
    return GATES[name].backward(grad, a)
