"""The shapes the benchmarks use: every depthwise stage and SE block of MobileNetV3-Large,
read off the model's configuration table."""

from dataclasses import dataclass

from fastmb.models.layers import make_divisible
from fastmb.models.mobilenet_v3 import _mobilenet_v3_conf
from fastmb.ops.common import conv_output_size


@dataclass(frozen=True)
class DepthwiseStage:
    channels: int
    kernel: int
    stride: int
    size: int  # input height and width
    activation: str

    @property
    def name(self) -> str:
        return f"C{self.channels}-k{self.kernel}-s{self.stride}-{self.size}x{self.size}-{self.activation}"


@dataclass(frozen=True)
class SEBlock:
    channels: int
    squeeze: int
    size: int

    @property
    def name(self) -> str:
        return f"C{self.channels}-S{self.squeeze}-{self.size}x{self.size}"


def mobilenet_v3_large_blocks(resolution: int = 224) -> tuple[list[DepthwiseStage], list[SEBlock]]:
    """The distinct depthwise stages and SE blocks of MobileNetV3-Large, in network order."""
    setting, _ = _mobilenet_v3_conf("mobilenet_v3_large")
    size = conv_output_size(resolution, 3, 2, 2, 1)  # after the stride-2 stem (padding 1 a side)
    stages, blocks = [], []
    for cnf in setting:
        stride = 1 if cnf.dilation > 1 else cnf.stride
        stage = DepthwiseStage(cnf.expanded_channels, cnf.kernel, stride, size, "hardswish" if cnf.use_hs else "relu")
        size = conv_output_size(size, cnf.kernel, stride, cnf.kernel // 2 * 2, 1)
        if stage not in stages:
            stages.append(stage)
        block = SEBlock(cnf.expanded_channels, make_divisible(cnf.expanded_channels // 4, 8), size)
        if cnf.use_se and block not in blocks:
            blocks.append(block)
    return stages, blocks
