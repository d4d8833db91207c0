"""Fused ops as autograd-aware torch.library custom ops (namespace ``fastmb``), dispatched to
the backend chosen by fastmb.set_backend / fastmb.use_backend."""

from fastmb.ops.activations import ACTIVATIONS, GATES
from fastmb.ops.dwconv_bn_act import dwconv_bn_act
from fastmb.ops.squeeze_excitation import squeeze_excitation

__all__ = ["ACTIVATIONS", "GATES", "dwconv_bn_act", "squeeze_excitation"]
