"""Drop-in modules whose parameter and buffer names match the torchvision modules they replace."""

from fastmb.nn.conv_bn_act import ConvBNAct
from fastmb.nn.dwconv_bn_act import DWConvBNAct
from fastmb.nn.squeeze_excitation import SqueezeExcitation

__all__ = ["ConvBNAct", "DWConvBNAct", "SqueezeExcitation"]
