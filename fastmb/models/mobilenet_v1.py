"""MobileNetV1 (Howard et al. 2017, Table 1): a 3x3 stride-2 stem, 13 depthwise-separable
blocks, global average pooling and a classifier; BatchNorm and ReLU after every conv.

Table 1 lists the last depthwise conv with stride 2, a known typo: the feature map is already
7x7 and stays so, as in every released implementation. Width multiplier alpha scales every
layer's channels (`width_mult`); resolution multiplier rho is the input size.
"""

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fastmb.models.layers import depthwise_stage, init_weights, make_divisible, use_channels_last
from fastmb.nn import ConvBNAct
from fastmb.ops.inverted_residual import (
    FusedBlock,
    Program,
    block_plan,
    has_hooks,
    memoized_forward,
    replayed_forward,
    run_fused_block,
    run_layers,
)
from fastmb.ops.packing import hook_slots, structure_slots

# Table 1 as (stride of the depthwise conv, output channels of the pointwise conv).
DEPTHWISE_SEPARABLE_SETTING = [
    (1, 64),
    (2, 128),
    (1, 128),
    (2, 256),
    (1, 256),
    (2, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (2, 1024),
    (1, 1024),  # "s2" in the paper's table: a typo
]


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv + BN + activation (fused), then pointwise 1x1 conv + BN + activation;
    in eval on the CPU the two as one fastmb::inverted_residual call (no expansion, the
    activation in the projection's epilogue), streamed band by band."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, activation: str, norm_layer: Callable[[int], nn.Module]
    ) -> None:
        super().__init__()
        self.dw = depthwise_stage(in_channels, 3, stride, 1, activation, norm_layer)
        self.pw = ConvBNAct(in_channels, out_channels, 1, activation=activation, norm_layer=norm_layer)
        self.out_channels = out_channels

    def fused_plan(self) -> FusedBlock | None:
        return block_plan(self, self, False)

    def forward(self, x: Tensor) -> Tensor:
        fused = run_fused_block(self, self, False, x)  # eval on the CPU: both convs as one native call
        return fused if fused is not None else self.pw(self.dw(x))


class MobileNetV1(nn.Module):
    """MobileNetV1. State_dict keys: features.0 (stem), features.1-13 (.dw, .pw), classifier.1;
    `from_timm_state_dict` maps timm's `mobilenetv1_100` keys onto them. The paper's activation
    is ReLU; timm's mobilenetv1_100 uses ReLU6 (`activation="relu6"`)."""

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        dropout: float = 0.2,
        norm_layer: Callable[[int], nn.Module] | None = None,
        round_nearest: int = 8,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        channels = make_divisible(32 * width_mult, round_nearest)
        features: list[nn.Module] = [ConvBNAct(3, channels, 3, stride=2, activation=activation, norm_layer=norm_layer)]
        for stride, out_channels in DEPTHWISE_SEPARABLE_SETTING:
            out_channels = make_divisible(out_channels * width_mult, round_nearest)
            features.append(DepthwiseSeparable(channels, out_channels, stride, activation, norm_layer))
            channels = out_channels
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(channels, num_classes))
        init_weights(self)
        use_channels_last(self)

    def forward(self, x: Tensor) -> Tensor:
        replayed = replayed_forward(self, x)
        if replayed is not None:
            return self.classifier(torch.flatten(self.avgpool(replayed), 1))
        features = self.features

        def run_features(x: Tensor, program: Program) -> Tensor:
            if has_hooks(features):
                return features(x)
            program.slots += structure_slots([features]) + hook_slots(features)  # the layers run_layers is given
            return run_layers(features._modules.values(), x, program)

        # in eval on the CPU the stem and the blocks go straight to the fused op (run_layers)
        x = memoized_forward(self, (features,), x, run_features)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


# timm's mobilenetv1_100: five stages of depthwise-separable blocks ("blocks.<stage>.<index>").
_TIMM_STAGE_DEPTHS = (1, 2, 2, 6, 2)
_TIMM_BLOCK_PARTS = {"conv_dw": "dw.0", "bn1": "dw.1", "conv_pw": "pw.0", "bn2": "pw.1"}


def timm_key_map() -> dict[str, str]:
    """timm `mobilenetv1_100` key prefix -> fastmb MobileNetV1 key prefix."""
    mapping = {"conv_stem": "features.0.0", "bn1": "features.0.1", "classifier": "classifier.1"}
    block = 1
    for stage, depth in enumerate(_TIMM_STAGE_DEPTHS):
        for index in range(depth):
            for theirs, ours in _TIMM_BLOCK_PARTS.items():
                mapping[f"blocks.{stage}.{index}.{theirs}"] = f"features.{block}.{ours}"
            block += 1
    return mapping


def from_timm_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Renames the keys of a timm `mobilenetv1_100` state_dict (conv_stem, bn1,
    blocks.s.i.conv_dw/bn1/conv_pw/bn2, classifier) to MobileNetV1's. Needs no timm. Load the
    result into `mobilenet_v1(activation="relu6")`, timm's activation."""
    prefixes = timm_key_map()
    renamed = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in prefixes:
            raise KeyError(f"{key!r} is not a key of timm's mobilenetv1_100")
        renamed[f"{prefixes[prefix]}.{leaf}"] = value
    return renamed


def mobilenet_v1(*, width_mult: float = 1.0, num_classes: int = 1000, dropout: float = 0.2, **kwargs: Any) -> MobileNetV1:
    """MobileNetV1 with width multiplier `width_mult` (the paper's alpha). There are no
    torchvision weights; timm's load through `fastmb.models.mobilenet_v1.from_timm_state_dict`."""
    return MobileNetV1(num_classes=num_classes, width_mult=width_mult, dropout=dropout, **kwargs)
