"""MobileNetV2 (Sandler et al. 2018, Table 2), torchvision's layout and state_dict keys, with
every depthwise stage a fused DWConvBNAct."""

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from fastmb.models.layers import build_with_weights, depthwise_stage, init_weights, make_divisible, use_channels_last
from fastmb.nn import ConvBNAct
from fastmb.ops.classifier_head import forward_with_fused_head
from fastmb.ops.inverted_residual import FusedBlock, block_plan, replayed_forward, run_fused_block

# Table 2: expansion factor t, output channels c, repeats n, first stride s.
INVERTED_RESIDUAL_SETTING = [
    # t, c, n, s
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


class InvertedResidual(nn.Module):
    """Expand (1x1, ReLU6) -> depthwise 3x3 (ReLU6) -> linear bottleneck projection (1x1, BN)."""

    def __init__(
        self, inp: int, oup: int, stride: int, expand_ratio: int, norm_layer: Callable[[int], nn.Module] | None = None
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(inp, hidden_dim, kernel_size=1, activation="relu6", norm_layer=norm_layer))
        layers += [
            depthwise_stage(hidden_dim, 3, stride, 1, "relu6", norm_layer),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            norm_layer(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1

    def fused_plan(self) -> FusedBlock | None:
        return block_plan(self, self.conv, self.use_res_connect)

    def forward(self, x: Tensor) -> Tensor:
        fused = run_fused_block(self, self.conv, self.use_res_connect, x)  # eval on the CPU: one native call
        if fused is not None:
            return fused
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with torchvision's constructor arguments and state_dict keys."""

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        inverted_residual_setting: list[list[int]] | None = None,
        round_nearest: int = 8,
        block: Callable[..., nn.Module] | None = None,
        norm_layer: Callable[[int], nn.Module] | None = None,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        block = block or InvertedResidual
        norm_layer = norm_layer or nn.BatchNorm2d
        setting = inverted_residual_setting or INVERTED_RESIDUAL_SETTING
        if len(setting) == 0 or len(setting[0]) != 4:
            raise ValueError(f"inverted_residual_setting should be non-empty or a 4-element list, got {setting}")

        input_channel = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvBNAct(3, input_channel, stride=2, activation="relu6", norm_layer=norm_layer)]
        for t, c, n, s in setting:
            output_channel = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(block(input_channel, output_channel, s if i == 0 else 1, expand_ratio=t, norm_layer=norm_layer))
                input_channel = output_channel
        features.append(ConvBNAct(input_channel, self.last_channel, kernel_size=1, activation="relu6", norm_layer=norm_layer))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        init_weights(self)
        use_channels_last(self)

    def forward(self, x: Tensor) -> Tensor:
        # eval on the CPU: the last conv, the pooling and the classifier as one native call
        replayed = replayed_forward(self, x)
        return replayed if replayed is not None else forward_with_fused_head(self, x, self.features, None, self.classifier)


def mobilenet_v2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> MobileNetV2:
    """MobileNetV2; `weights` takes torchvision's MobileNet_V2_Weights (or a member's name)."""
    return build_with_weights(MobileNetV2, "MobileNet_V2_Weights", weights, progress, kwargs)
