"""fastmb: fast MobileNets for PyTorch through fused depthwise-conv + BatchNorm + activation
and squeeze-and-excitation kernels (reference, CPU, CUDA and Triton backends)."""

from fastmb import nn, ops
from fastmb._extension import empty_cache
from fastmb.convert import ConvertReport, convert
from fastmb.dispatch import backends, set_backend, use_backend
from fastmb.freeze import freeze
from fastmb.models import (
    MobileNetV1,
    MobileNetV2,
    MobileNetV3,
    mobilenet_v1,
    mobilenet_v2,
    mobilenet_v3_large,
    mobilenet_v3_small,
)
from fastmb.profile import Profile, profile

__version__ = "0.1.0"

__all__ = [
    "ConvertReport",
    "MobileNetV1",
    "MobileNetV2",
    "MobileNetV3",
    "Profile",
    "backends",
    "convert",
    "empty_cache",
    "freeze",
    "mobilenet_v1",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "nn",
    "ops",
    "profile",
    "set_backend",
    "use_backend",
]
