"""torchvision's MobileNetV2 and MobileNetV3 after fastmb.convert has fused their layers: only
classes change, to subclasses whose forward runs each inverted-residual block as one native
call (fastmb/ops/inverted_residual.py), and the model's last conv, pooling and classifier as
another (fastmb/ops/classifier_head.py), in eval on the CPU; torchvision's forward otherwise.
Imported by fastmb.convert only when torchvision is installed."""

from torch import Tensor, nn
from torchvision.models import mobilenetv2, mobilenetv3

from fastmb.ops.classifier_head import forward_with_fused_head
from fastmb.ops.inverted_residual import FusedBlock, block_layers, block_plan, run_fused_block


class FusedInvertedResidualV2(mobilenetv2.InvertedResidual):
    def fused_plan(self) -> FusedBlock | None:
        return block_plan(self, self.conv, self.use_res_connect)

    def forward(self, x: Tensor) -> Tensor:
        fused = run_fused_block(self, self.conv, self.use_res_connect, x)
        return fused if fused is not None else super().forward(x)


class FusedInvertedResidualV3(mobilenetv3.InvertedResidual):
    def fused_plan(self) -> FusedBlock | None:
        return block_plan(self, self.block, self.use_res_connect)

    def forward(self, x: Tensor) -> Tensor:
        fused = run_fused_block(self, self.block, self.use_res_connect, x)
        return fused if fused is not None else super().forward(x)


class FusedMobileNetV2(mobilenetv2.MobileNetV2):
    def forward(self, x: Tensor) -> Tensor:
        return forward_with_fused_head(self, x, self.features, None, self.classifier)


class FusedMobileNetV3(mobilenetv3.MobileNetV3):
    def forward(self, x: Tensor) -> Tensor:
        return forward_with_fused_head(self, x, self.features, self.avgpool, self.classifier)


_BLOCKS = {mobilenetv2.InvertedResidual: (FusedInvertedResidualV2, "conv"), mobilenetv3.InvertedResidual: (FusedInvertedResidualV3, "block")}
_MODELS = {mobilenetv2.MobileNetV2: FusedMobileNetV2, mobilenetv3.MobileNetV3: FusedMobileNetV3}


def fuse(module: nn.Module) -> str | None:
    """Swaps the class of a torchvision InvertedResidual whose layers fastmb.convert fused, or of
    a MobileNetV2/V3, for its fused subclass: None when swapped or not such a module, else why
    it cannot be."""
    if type(module) in _MODELS:
        module.__class__ = _MODELS[type(module)]  # the head is checked on each call
        return None
    fused = _BLOCKS.get(type(module))
    if fused is None:
        return None
    fused_class, layers_name = fused
    if block_layers(list(getattr(module, layers_name).children()), module.use_res_connect) is None:
        return "its layers are not expand -> depthwise -> SE -> project with batch norms fastmb fuses"
    module.__class__ = fused_class
    return None
