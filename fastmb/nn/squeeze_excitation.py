"""SqueezeExcitation: a drop-in for torchvision.ops.SqueezeExcitation."""

from torch import Tensor, nn

from fastmb.ops.activations import ACTIVATIONS, GATES
from fastmb.ops.common import check_choice, check_tensor, integer, symbolic
from fastmb.ops.inverted_residual import own_hooks
from fastmb.ops.packing import plain_1x1_conv
from fastmb.ops.squeeze_excitation import run_squeeze_excitation


class SqueezeExcitation(nn.Module):
    """``x * gate(fc2(activation(fc1(mean_hw(x)))))`` as one fused op.

    ``fc1`` and ``fc2`` are 1x1 ``Conv2d`` layers with bias, named as in torchvision's
    ``SqueezeExcitation``, whose state_dict loads unchanged. The default gate is hardsigmoid,
    as in MobileNetV3 (torchvision's own default is sigmoid).
    """

    def __init__(
        self, input_channels: int, squeeze_channels: int, activation: str = "relu", gate: str = "hardsigmoid"
    ) -> None:
        super().__init__()
        input_channels = integer("input_channels", input_channels, 1)
        squeeze_channels = integer("squeeze_channels", squeeze_channels, 1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        self.gate = check_choice("gate", gate, GATES)

    @classmethod
    def from_modules(
        cls, fc1: nn.Conv2d, fc2: nn.Conv2d, activation: str = "relu", gate: str = "hardsigmoid"
    ) -> "SqueezeExcitation":
        """The fused module around existing 1x1 conv layers `fc1` and `fc2`, which it shares."""
        for name, fc in (("fc1", fc1), ("fc2", fc2)):
            plain = isinstance(fc, nn.Conv2d) and fc.kernel_size == (1, 1) and fc.stride == (1, 1) and fc.padding == (0, 0)
            if not plain or fc.groups != 1:
                raise ValueError(f"{name} must be a 1x1 nn.Conv2d with stride 1, no padding and one group, got {fc!r}")
        if (fc2.in_channels, fc2.out_channels) != (fc1.out_channels, fc1.in_channels):
            raise ValueError(f"fc2 must map fc1's {fc1.out_channels} outputs back to its {fc1.in_channels} inputs, got {fc2!r}")
        module = cls(fc1.in_channels, fc1.out_channels, activation, gate)
        module.fc1, module.fc2 = fc1, fc2
        return module

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, gate={self.gate!r}"

    def forward(self, x: Tensor) -> Tensor:
        fc1, fc2 = self.fc1, self.fc2
        if symbolic(x) or own_hooks(fc1) or own_hooks(fc2) or not (plain_1x1_conv(fc1) and plain_1x1_conv(fc2)):
            # the modules themselves: a trace records them, hooks run, a changed conv computes as it is
            scale = fc2(ACTIVATIONS[self.activation].forward(fc1(x.mean((2, 3), keepdim=True))))
            return x * GATES[self.gate].forward(scale)
        # The parameters were checked when built; only x is new.
        check_tensor("x", x, 4)
        if x.shape[1] != fc1.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels but this SqueezeExcitation has {fc1.in_channels}")
        return run_squeeze_excitation(
            x, fc1.weight.flatten(1), fc1.bias, fc2.weight.flatten(1), fc2.bias, self.activation, self.gate
        )
