"""SqueezeExcitation: a drop-in for torchvision.ops.SqueezeExcitation."""

from torch import Tensor, nn

from fastmb.ops.activations import ACTIVATIONS, GATES, activation_name, gate_name
from fastmb.ops.common import check_choice, check_tensor, integer, symbolic
from fastmb.ops.inverted_residual import own_hooks
from fastmb.ops.packing import plain_1x1_conv
from fastmb.ops.squeeze_excitation import run_squeeze_excitation


class SqueezeExcitation(nn.Module):
    """``x * gate(fc2(activation(fc1(mean_hw(x)))))`` as one fused op.

    The children are torchvision's ``SqueezeExcitation``'s (``avgpool``, ``fc1`` and ``fc2``, 1x1
    ``Conv2d`` layers with bias, ``activation``, ``scale_activation``), so its state_dict loads
    unchanged and code that hooks or swaps them finds them. ``activation`` and ``gate`` are given
    as registry names; ``gate`` is also the name of what ``scale_activation`` computes, and
    setting it replaces that child. The default gate is hardsigmoid, as in MobileNetV3
    (torchvision's own default is sigmoid). Children fastmb does not fuse, or hooked ones, are
    called as they are.
    """

    def __init__(
        self, input_channels: int, squeeze_channels: int, activation: str = "relu", gate: str = "hardsigmoid"
    ) -> None:
        super().__init__()
        input_channels = integer("input_channels", input_channels, 1)
        squeeze_channels = integer("squeeze_channels", squeeze_channels, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = ACTIVATIONS[check_choice("activation", activation, ACTIVATIONS)].make_module(inplace=False)
        self.gate = gate

    @classmethod
    def from_modules(
        cls,
        fc1: nn.Conv2d,
        fc2: nn.Conv2d,
        activation: nn.Module | str = "relu",
        gate: nn.Module | str = "hardsigmoid",
        avgpool: nn.Module | None = None,
    ) -> "SqueezeExcitation":
        """The fused module around existing 1x1 conv layers `fc1` and `fc2` and, where given as
        modules, the `activation`, `gate` and `avgpool` modules, which it shares (fastmb.convert
        passes torchvision's, so hooks on them still run)."""
        for name, fc in (("fc1", fc1), ("fc2", fc2)):
            plain = isinstance(fc, nn.Conv2d) and fc.kernel_size == (1, 1) and fc.stride == (1, 1) and fc.padding == (0, 0)
            if not plain or fc.groups != 1:
                raise ValueError(f"{name} must be a 1x1 nn.Conv2d with stride 1, no padding and one group, got {fc!r}")
        if (fc2.in_channels, fc2.out_channels) != (fc1.out_channels, fc1.in_channels):
            raise ValueError(f"fc2 must map fc1's {fc1.out_channels} outputs back to its {fc1.in_channels} inputs, got {fc2!r}")
        names = (
            activation_name(activation) if isinstance(activation, nn.Module) else activation,
            gate_name(gate) if isinstance(gate, nn.Module) else gate,
        )
        if None in names:
            raise ValueError(f"activation and gate must be ones fastmb fuses, got {activation!r} and {gate!r}")
        module = cls(fc1.in_channels, fc1.out_channels, *names)
        module.fc1, module.fc2 = fc1, fc2
        if isinstance(activation, nn.Module):
            module.activation = activation
        if isinstance(gate, nn.Module):
            module.scale_activation = gate
        if avgpool is not None:
            module.avgpool = avgpool
        return module

    @property
    def gate(self) -> str | None:
        """The registry name of what ``scale_activation`` computes, or None when fastmb does not fuse it."""
        return gate_name(self._modules.get("scale_activation"))

    @gate.setter
    def gate(self, name: str) -> None:
        self.scale_activation = GATES[check_choice("gate", name, GATES)].module()

    def __setstate__(self, state: dict) -> None:
        # pickled before the pool, activation and gate were children: their registry names
        names = [state.pop(key) if isinstance(state.get(key), str) else None for key in ("activation", "gate")]
        super().__setstate__(state)
        if names[0] is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.activation = ACTIVATIONS[names[0]].make_module(inplace=False)
            self.gate = names[1]

    def forward(self, x: Tensor) -> Tensor:
        names = fused_activations(self)
        if names is None or symbolic(x) or any(own_hooks(child) for child in self._modules.values()):
            # torchvision's computation with the modules: a trace records them, hooks run, a changed layer computes as it is
            return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x
        # The parameters were checked when built; only x is new.
        check_tensor("x", x, 4)
        fc1, fc2 = self.fc1, self.fc2
        if x.shape[1] != fc1.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels but this SqueezeExcitation has {fc1.in_channels}")
        return run_squeeze_excitation(x, fc1.weight.flatten(1), fc1.bias, fc2.weight.flatten(1), fc2.bias, *names)


def fused_activations(se: SqueezeExcitation) -> tuple[str, str] | None:
    """(activation, gate) registry names of what `se`'s children compute, or None when the fused op
    would compute something else: a child swapped for one it does not fuse or removed, a pool
    that is not a global average, an FC layer that is not a plain 1x1 conv."""
    children = se._modules
    pool = children.get("avgpool")
    names = activation_name(children.get("activation")), gate_name(children.get("scale_activation"))
    if None in names or len(children) != 5 or type(pool) is not nn.AdaptiveAvgPool2d or pool.output_size not in (1, (1, 1)):
        return None
    return names if plain_1x1_conv(children.get("fc1")) and plain_1x1_conv(children.get("fc2")) else None
