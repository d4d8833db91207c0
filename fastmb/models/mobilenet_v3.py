"""MobileNetV3-Large and -Small (Howard et al. 2019, Tables 1 and 2) in torchvision's
configuration and state_dict layout, with fused depthwise stages and SE blocks."""

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from torch import Tensor, nn

from fastmb.models.layers import build_with_weights, depthwise_stage, init_weights, make_divisible, use_channels_last
from fastmb.nn import ConvBNAct, SqueezeExcitation
from fastmb.ops.classifier_head import forward_with_fused_head
from fastmb.ops.inverted_residual import FusedBlock, block_plan, replayed_forward, run_fused_block


class InvertedResidualConfig:
    """One row of Tables 1 and 2: a bottleneck block ("bneck")."""

    def __init__(
        self,
        input_channels: int,
        kernel: int,
        expanded_channels: int,
        out_channels: int,
        use_se: bool,
        activation: str,  # "RE" (ReLU) or "HS" (h-swish), the paper's notation
        stride: int,
        dilation: int,
        width_mult: float,
    ) -> None:
        self.input_channels = self.adjust_channels(input_channels, width_mult)
        self.kernel = kernel
        self.expanded_channels = self.adjust_channels(expanded_channels, width_mult)
        self.out_channels = self.adjust_channels(out_channels, width_mult)
        self.use_se = use_se
        self.use_hs = activation == "HS"
        self.stride = stride
        self.dilation = dilation

    @staticmethod
    def adjust_channels(channels: int, width_mult: float) -> int:
        return make_divisible(channels * width_mult, 8)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (fused DWConvBNAct) -> SE (fused) -> project (1x1, linear)."""

    def __init__(
        self,
        cnf: InvertedResidualConfig,
        norm_layer: Callable[[int], nn.Module],
        se_layer: Callable[[int, int], nn.Module] = SqueezeExcitation,
    ) -> None:
        super().__init__()
        if not (1 <= cnf.stride <= 2):
            raise ValueError("illegal stride value")
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        activation = "hardswish" if cnf.use_hs else "relu"
        layers: list[nn.Module] = []
        if cnf.expanded_channels != cnf.input_channels:
            layers.append(ConvBNAct(cnf.input_channels, cnf.expanded_channels, 1, activation=activation, norm_layer=norm_layer))
        stride = 1 if cnf.dilation > 1 else cnf.stride
        layers.append(depthwise_stage(cnf.expanded_channels, cnf.kernel, stride, cnf.dilation, activation, norm_layer))
        if cnf.use_se:
            layers.append(se_layer(cnf.expanded_channels, make_divisible(cnf.expanded_channels // 4, 8)))
        layers.append(ConvBNAct(cnf.expanded_channels, cnf.out_channels, 1, norm_layer=norm_layer))
        self.block = nn.Sequential(*layers)
        self.out_channels = cnf.out_channels
        self._is_cn = cnf.stride > 1

    def fused_plan(self) -> FusedBlock | None:
        return block_plan(self, self.block, self.use_res_connect)

    def forward(self, x: Tensor) -> Tensor:
        fused = run_fused_block(self, self.block, self.use_res_connect, x)  # eval on the CPU: one native call
        if fused is not None:
            return fused
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


class MobileNetV3(nn.Module):
    """MobileNetV3 with torchvision's constructor arguments and state_dict keys."""

    def __init__(
        self,
        inverted_residual_setting: list[InvertedResidualConfig],
        last_channel: int,
        num_classes: int = 1000,
        block: Callable[..., nn.Module] | None = None,
        norm_layer: Callable[[int], nn.Module] | None = None,
        dropout: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not inverted_residual_setting:
            raise ValueError("The inverted_residual_setting should not be empty")
        if not (
            isinstance(inverted_residual_setting, Sequence)
            and all(isinstance(s, InvertedResidualConfig) for s in inverted_residual_setting)
        ):
            raise TypeError("The inverted_residual_setting should be List[InvertedResidualConfig]")
        block = block or InvertedResidual
        norm_layer = norm_layer or partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)

        first = inverted_residual_setting[0].input_channels
        layers: list[nn.Module] = [ConvBNAct(3, first, 3, stride=2, activation="hardswish", norm_layer=norm_layer)]
        layers += [block(cnf, norm_layer) for cnf in inverted_residual_setting]
        last_in = inverted_residual_setting[-1].out_channels
        layers.append(ConvBNAct(last_in, 6 * last_in, 1, activation="hardswish", norm_layer=norm_layer))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(6 * last_in, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )
        init_weights(self)
        use_channels_last(self)

    def forward(self, x: Tensor) -> Tensor:
        # eval on the CPU: the last conv, the pooling and the classifier as one native call
        replayed = replayed_forward(self, x)
        return replayed if replayed is not None else forward_with_fused_head(self, x, self.features, self.avgpool, self.classifier)


def _mobilenet_v3_conf(
    arch: str, width_mult: float = 1.0, reduced_tail: bool = False, dilated: bool = False, **kwargs: Any
) -> tuple[list[InvertedResidualConfig], int]:
    reduce_divider = 2 if reduced_tail else 1
    dilation = 2 if dilated else 1
    bneck_conf = partial(InvertedResidualConfig, width_mult=width_mult)
    adjust_channels = partial(InvertedResidualConfig.adjust_channels, width_mult=width_mult)

    if arch == "mobilenet_v3_large":
        # input, kernel, expanded, output, SE, activation, stride, dilation
        inverted_residual_setting = [
            bneck_conf(16, 3, 16, 16, False, "RE", 1, 1),
            bneck_conf(16, 3, 64, 24, False, "RE", 2, 1),  # C1
            bneck_conf(24, 3, 72, 24, False, "RE", 1, 1),
            bneck_conf(24, 5, 72, 40, True, "RE", 2, 1),  # C2
            bneck_conf(40, 5, 120, 40, True, "RE", 1, 1),
            bneck_conf(40, 5, 120, 40, True, "RE", 1, 1),
            bneck_conf(40, 3, 240, 80, False, "HS", 2, 1),  # C3
            bneck_conf(80, 3, 200, 80, False, "HS", 1, 1),
            bneck_conf(80, 3, 184, 80, False, "HS", 1, 1),
            bneck_conf(80, 3, 184, 80, False, "HS", 1, 1),
            bneck_conf(80, 3, 480, 112, True, "HS", 1, 1),
            bneck_conf(112, 3, 672, 112, True, "HS", 1, 1),
            bneck_conf(112, 5, 672, 160 // reduce_divider, True, "HS", 2, dilation),  # C4
            bneck_conf(160 // reduce_divider, 5, 960 // reduce_divider, 160 // reduce_divider, True, "HS", 1, dilation),
            bneck_conf(160 // reduce_divider, 5, 960 // reduce_divider, 160 // reduce_divider, True, "HS", 1, dilation),
        ]
        last_channel = adjust_channels(1280 // reduce_divider)  # C5
    elif arch == "mobilenet_v3_small":
        inverted_residual_setting = [
            bneck_conf(16, 3, 16, 16, True, "RE", 2, 1),  # C1
            bneck_conf(16, 3, 72, 24, False, "RE", 2, 1),  # C2
            bneck_conf(24, 3, 88, 24, False, "RE", 1, 1),
            bneck_conf(24, 5, 96, 40, True, "HS", 2, 1),  # C3
            bneck_conf(40, 5, 240, 40, True, "HS", 1, 1),
            bneck_conf(40, 5, 240, 40, True, "HS", 1, 1),
            bneck_conf(40, 5, 120, 48, True, "HS", 1, 1),
            bneck_conf(48, 5, 144, 48, True, "HS", 1, 1),
            bneck_conf(48, 5, 288, 96 // reduce_divider, True, "HS", 2, dilation),  # C4
            bneck_conf(96 // reduce_divider, 5, 576 // reduce_divider, 96 // reduce_divider, True, "HS", 1, dilation),
            bneck_conf(96 // reduce_divider, 5, 576 // reduce_divider, 96 // reduce_divider, True, "HS", 1, dilation),
        ]
        last_channel = adjust_channels(1024 // reduce_divider)  # C5
    else:
        raise ValueError(f"Unsupported model type {arch}")
    return inverted_residual_setting, last_channel


def _build(arch: str, weights_enum: str, weights: Any, progress: bool, kwargs: dict) -> MobileNetV3:
    setting, last_channel = _mobilenet_v3_conf(arch, **kwargs)
    for key in ("width_mult", "reduced_tail", "dilated"):
        kwargs.pop(key, None)
    return build_with_weights(partial(MobileNetV3, setting, last_channel), weights_enum, weights, progress, kwargs)


def mobilenet_v3_large(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> MobileNetV3:
    """MobileNetV3-Large; `weights` takes torchvision's MobileNet_V3_Large_Weights (or a name).
    Keyword arguments: width_mult, reduced_tail, dilated, and MobileNetV3's."""
    return _build("mobilenet_v3_large", "MobileNet_V3_Large_Weights", weights, progress, kwargs)


def mobilenet_v3_small(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> MobileNetV3:
    """MobileNetV3-Small; `weights` takes torchvision's MobileNet_V3_Small_Weights (or a name).
    Keyword arguments: width_mult, reduced_tail, dilated, and MobileNetV3's."""
    return _build("mobilenet_v3_small", "MobileNet_V3_Small_Weights", weights, progress, kwargs)
