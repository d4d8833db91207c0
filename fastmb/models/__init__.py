"""MobileNet V1, V2 and V3 builders whose depthwise stages and SE blocks are fastmb's fused
modules; V2 and V3 keep torchvision's signatures and state_dict keys."""

from fastmb.models.mobilenet_v1 import MobileNetV1, mobilenet_v1
from fastmb.models.mobilenet_v2 import MobileNetV2, mobilenet_v2
from fastmb.models.mobilenet_v3 import MobileNetV3, mobilenet_v3_large, mobilenet_v3_small

__all__ = [
    "MobileNetV1",
    "MobileNetV2",
    "MobileNetV3",
    "mobilenet_v1",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
]
