"""torchvision's inverted-residual blocks (MobileNetV2, MobileNetV3) after fastmb.convert has
fused their layers: only the class changes, to a subclass whose forward runs the whole block as
one native call in eval on the CPU (fastmb/ops/inverted_residual.py) and torchvision's forward
otherwise. Imported by fastmb.convert only when torchvision is installed."""

from torch import Tensor, nn
from torchvision.models import mobilenetv2, mobilenetv3

from fastmb.ops.inverted_residual import block_layers, run_fused_block


class FusedInvertedResidualV2(mobilenetv2.InvertedResidual):
    def forward(self, x: Tensor) -> Tensor:
        fused = run_fused_block(self, self.conv, self.use_res_connect, x)
        return fused if fused is not None else super().forward(x)


class FusedInvertedResidualV3(mobilenetv3.InvertedResidual):
    def forward(self, x: Tensor) -> Tensor:
        fused = run_fused_block(self, self.block, self.use_res_connect, x)
        return fused if fused is not None else super().forward(x)


_FUSED = {mobilenetv2.InvertedResidual: (FusedInvertedResidualV2, "conv"), mobilenetv3.InvertedResidual: (FusedInvertedResidualV3, "block")}


def fuse_block(module: nn.Module) -> str | None:
    """Swaps the class of a torchvision InvertedResidual whose layers fastmb.convert fused for its
    fused subclass: None when swapped or not such a block, else why it cannot be."""
    fused = _FUSED.get(type(module))
    if fused is None:
        return None
    fused_class, layers_name = fused
    if block_layers(list(getattr(module, layers_name).children()), module.use_res_connect) is None:
        return "its layers are not expand -> depthwise -> SE -> project with batch norms fastmb fuses"
    module.__class__ = fused_class
    return None
