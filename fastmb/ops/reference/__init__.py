"""The reference backend: each fused op written with plain PyTorch ops, forward and backward
(explicit formulas, no autograd inside). It runs on any device and is the oracle every other
backend is tested against."""

from fastmb.ops.reference import dwconv_bn_act, squeeze_excitation  # noqa: F401
