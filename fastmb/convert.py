"""fastmb.convert: swap a model's depthwise conv+BN+activation stages and SE blocks for the
fused modules, in place."""

import logging

from torch import nn

from fastmb.nn import DWConvBNAct, SqueezeExcitation

logger = logging.getLogger("fastmb")

_ACTIVATIONS = {nn.Hardswish: "hardswish", nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Identity: "identity"}
_GATES = {nn.Hardsigmoid: "hardsigmoid", nn.Sigmoid: "sigmoid"}


def _as_dwconv_bn_act(module: nn.Module) -> DWConvBNAct | None:
    """The fused equivalent of a Sequential(depthwise Conv2d, BatchNorm2d[, activation]) —
    torchvision's Conv2dNormActivation — sharing its conv and BN modules, else None."""
    if not isinstance(module, nn.Sequential) or isinstance(module, DWConvBNAct) or len(module) not in (2, 3):
        return None
    conv, bn = module[0], module[1]
    activation = _ACTIVATIONS.get(type(module[2])) if len(module) == 3 else "identity"
    depthwise = (
        type(conv) is nn.Conv2d
        and conv.groups == conv.in_channels == conv.out_channels
        and conv.bias is None
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )
    if not depthwise or type(bn) is not nn.BatchNorm2d or bn.num_features != conv.out_channels or activation is None:
        return None
    return DWConvBNAct.from_modules(conv, bn, activation)


def _as_squeeze_excitation(module: nn.Module, torchvision_se: type | None) -> SqueezeExcitation | None:
    """The fused equivalent of a torchvision.ops.SqueezeExcitation, sharing its fc layers."""
    if torchvision_se is None or type(module) is not torchvision_se:
        return None
    names = _ACTIVATIONS.get(type(module.activation)), _GATES.get(type(module.scale_activation))
    fc1, fc2 = module.fc1, module.fc2
    if None in names or fc1.bias is None or fc2.bias is None:
        return None
    return SqueezeExcitation.from_modules(fc1, fc2, *names)


def convert(model: nn.Module) -> nn.Module:
    """Swaps, in place, every depthwise conv + BatchNorm2d + activation Sequential (torchvision's
    Conv2dNormActivation) and every torchvision SqueezeExcitation in `model` for fastmb's fused
    modules. Parameters and buffers are carried over (the same tensors); nothing else changes.
    Returns `model`."""
    try:
        from torchvision.ops import SqueezeExcitation as torchvision_se
    except ImportError:  # no torchvision, so no torchvision SE blocks to swap
        torchvision_se = None
    counts = {"depthwise": 0, "se": 0}

    def visit(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            fused = _as_dwconv_bn_act(child)
            kind = "depthwise"
            if fused is None:
                fused, kind = _as_squeeze_excitation(child, torchvision_se), "se"
            if fused is None:
                visit(child)
                continue
            fused.train(child.training)
            setattr(parent, name, fused)
            counts[kind] += 1

    visit(model)
    logger.info("fastmb.convert: swapped %d depthwise stages and %d SE blocks", counts["depthwise"], counts["se"])
    return model
