"""Building blocks shared by the MobileNet builders."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmb.nn import DWConvBNAct

ACTIVATION_MODULES: dict[str, type[nn.Module]] = {"hardswish": nn.Hardswish, "relu": nn.ReLU, "relu6": nn.ReLU6}


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Rounds a channel count to a multiple of `divisor`, never more than 10% down
    (the TensorFlow MobileNet rule, as in torchvision)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) + norm + optional activation: children "0", "1", "2", the layout of
    torchvision's Conv2dNormActivation, so state_dicts match key for key.

    In eval mode without autograd, a BatchNorm2d is folded into the convolution's weight and
    bias (recomputed only when a parameter or statistic changes), which removes the batch
    norm's pass over the output: most of MobileNet's remaining memory traffic.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        activation: str = "identity",
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        layers = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False),
            norm_layer(out_channels),
        ]
        if activation != "identity":
            layers.append(ACTIVATION_MODULES[activation](inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels
        self._folded: tuple | None = None  # (key, weight, bias)

    def _folded_conv(self) -> tuple[Tensor, Tensor]:
        conv, bn = self[0], self[1]
        tensors = (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._folded is None or self._folded[0] != key:
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            weight = conv.weight * scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype)
            bias = (bn.bias - bn.running_mean * scale).to(conv.weight.dtype)
            self._folded = (key, weight, bias)
        return self._folded[1], self._folded[2]

    def forward(self, x: Tensor) -> Tensor:
        conv, bn = self[0], self[1]
        foldable = (
            not self.training
            and not torch.is_grad_enabled()
            and type(bn) is nn.BatchNorm2d
            and bn.affine
            and bn.running_var is not None
            and not torch.compiler.is_compiling()
        )
        if not foldable:
            return super().forward(x)
        weight, bias = self._folded_conv()
        y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return self[2](y) if len(self) == 3 else y


def depthwise_stage(
    channels: int,
    kernel_size: int,
    stride: int,
    dilation: int,
    activation: str,
    norm_layer: Callable[[int], nn.Module],
) -> nn.Module:
    """The fused DWConvBNAct when `norm_layer` makes a BatchNorm2d (the only norm fastmb fuses),
    else the unfused equivalent with the same keys."""
    norm = norm_layer(channels)
    if type(norm) is not nn.BatchNorm2d or not norm.affine:
        return ConvBNAct(channels, channels, kernel_size, stride, channels, dilation, activation, norm_layer)
    return DWConvBNAct(channels, kernel_size, stride, dilation, activation, eps=norm.eps, momentum=norm.momentum)


def init_weights(model: nn.Module) -> None:
    """torchvision's MobileNet initialisation."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)


def build_with_weights(build: Callable[..., nn.Module], enum_name: str, weights, progress: bool, kwargs: dict) -> nn.Module:
    """`build(**kwargs)`, loaded with torchvision's pretrained `weights` when given: a member of
    torchvision's enum `enum_name` or its name ("IMAGENET1K_V1", "DEFAULT"). torchvision
    downloads them; num_classes follows the weights, as in torchvision."""
    if weights is None:
        return build(**kwargs)
    try:
        import torchvision.models
    except ImportError as error:
        raise ImportError("loading pretrained weights needs torchvision: pip install torchvision") from error
    weights = getattr(torchvision.models, enum_name).verify(weights)
    num_classes = len(weights.meta["categories"])
    if kwargs.setdefault("num_classes", num_classes) != num_classes:
        raise ValueError(f"num_classes={kwargs['num_classes']} does not match the {num_classes} classes of {weights}")
    model = build(**kwargs)
    model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
    return model
