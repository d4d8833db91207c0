"""fastmb: fast MobileNets for PyTorch through fused depthwise-conv + BatchNorm + activation
and squeeze-and-excitation kernels (reference, CPU, CUDA and Triton backends)."""

from fastmb import nn, ops
from fastmb.dispatch import backends, set_backend, use_backend

__version__ = "0.1.0"

__all__ = ["backends", "nn", "ops", "set_backend", "use_backend"]
