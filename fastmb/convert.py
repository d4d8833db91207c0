"""fastmb.convert: swap, in place, what fastmb fuses in a model for its fused modules: depthwise
conv + BatchNorm + activation stages, other conv + BatchNorm (+ activation) layers, and SE
blocks. Parameters and buffers are shared, so every state_dict key stays as it was."""

import importlib.util
import logging
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from fastmb.models.layers import use_channels_last
from fastmb.nn import ConvBNAct, DWConvBNAct, SqueezeExcitation
from fastmb.ops.activations import activation_name, gate_name
from fastmb.ops.common import batch_norm_channels, frozen_batch_norm, fused_norm
from fastmb.ops.inverted_residual import own_hooks

logger = logging.getLogger("fastmb")


def _conv_bn_parts(module: nn.Module) -> tuple[nn.Conv2d, nn.Module, nn.Module | None] | str | None:
    """(conv, bn, activation or None) of a Sequential(Conv2d, BatchNorm2d, SyncBatchNorm or
    FrozenBatchNorm2d [, activation]), the layout of torchvision's Conv2dNormActivation; why not,
    for a Conv2dNormActivation with another norm; else None."""
    if type(module) not in (nn.Sequential, _torchvision_conv_norm_activation()) or len(module) not in (2, 3):
        return None
    if list(module._modules) != [str(i) for i in range(len(module))]:  # named children: the fused module would rename them
        return None
    conv, bn = module[0], module[1]
    if type(conv) is not nn.Conv2d:
        return None
    if not fused_norm(bn):
        # a norm of another kind, by its name (not all are _NormBase); without a norm
        # (norm_layer=None: the FPN's layers) the second child is the activation: nothing to report
        named_norm = "Norm" in type(bn).__name__ and type(module) is not nn.Sequential
        return f"norm {type(bn).__name__} is not a BatchNorm2d" if named_norm else None
    if batch_norm_channels(bn) != conv.out_channels:
        return None
    return conv, bn, module[2] if len(module) == 3 else None


def _as_dwconv_bn_act(conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: nn.Module | None) -> DWConvBNAct | str:
    """The fused depthwise stage sharing `conv` and `bn`, or why it cannot be."""
    if not conv.groups == conv.in_channels == conv.out_channels:
        return "not depthwise"
    reason = fusion_blocker(conv, bn, activation)
    return reason if reason is not None else DWConvBNAct.from_modules(conv, bn, activation)


def fusion_blocker(conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: nn.Module | None) -> str | None:
    """Why conv -> bn -> activation cannot run as a fused stage (the first reason), or None.
    (Converted timm blocks ask at every call: the reasons are formatted only when one holds.)"""
    if conv.bias is not None:
        return "the conv has a bias"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
    if not frozen_batch_norm(bn) and not bn.affine:
        return "the batch norm has no affine parameters"
    if activation_name(activation) is None:
        return f"activation {type(activation).__name__} is not one fastmb fuses"
    return None


def _as_squeeze_excitation(module: nn.Module) -> SqueezeExcitation | str | None:
    """The fused equivalent of a torchvision.ops.SqueezeExcitation, sharing its fc layers, or why
    it cannot be; None for any other module."""
    try:
        from torchvision.ops import SqueezeExcitation as TorchvisionSqueezeExcitation
    except ImportError:  # no torchvision, so no torchvision SE blocks to swap
        return None
    if type(module) is not TorchvisionSqueezeExcitation:
        return None
    names = activation_name(module.activation), gate_name(module.scale_activation)
    if None in names:
        return f"activation {type(module.activation).__name__} or gate {type(module.scale_activation).__name__} is not one fastmb fuses"
    if module.fc1.bias is None or module.fc2.bias is None:
        return "an fc layer has no bias"
    return SqueezeExcitation.from_modules(module.fc1, module.fc2, module.activation, module.scale_activation, module.avgpool)


def _torchvision_fuser():
    """fastmb.convert_torchvision's fuse, or None without torchvision."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    from fastmb.convert_torchvision import fuse

    return fuse


def _torchvision_conv_norm_activation() -> type | None:
    try:
        from torchvision.ops import Conv2dNormActivation
    except ImportError:
        return None
    return Conv2dNormActivation


@dataclass
class ConvertReport:
    """What fastmb.convert swapped (fused module or stage kind: count) and what it left (reason: count)."""

    swapped: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    channels_last: bool = False  # whether convert put the model's conv weights in channels_last

    def __str__(self) -> str:
        lines = [f"swapped {count} {kind}" for kind, count in self.swapped.items()]
        lines += [f"left {count} {reason}" for reason, count in self.skipped.items()]
        if self.channels_last:
            lines.append("put the conv weights in channels_last (channels_last=False keeps the model's layout)")
        return "\n".join(lines) or "nothing to swap"


def _timm_converter():
    """fastmb.convert_timm's convert_block, or None without timm."""
    if importlib.util.find_spec("timm") is None:
        return None
    from fastmb.convert_timm import convert_block

    return convert_block


def convert(model: nn.Module, *, report: bool = False, channels_last: bool = True) -> nn.Module | tuple[nn.Module, ConvertReport]:
    """Swaps, in place, what fastmb fuses. torchvision: every depthwise conv + BatchNorm2d +
    activation Sequential (Conv2dNormActivation) for a DWConvBNAct, every other conv +
    BatchNorm2d (+ activation) Sequential for a ConvBNAct, every SqueezeExcitation for fastmb's;
    then each MobileNetV2/V3 InvertedResidual so fused, and the MobileNetV2/V3 model itself, take
    a forward that runs the whole block, and the head (last conv, pooling, classifier), as one
    native call in eval on the CPU (fastmb/convert_torchvision.py; a block's output is then
    channels_last).
    timm: its MobileNet-family blocks (InvertedResidual, DepthwiseSeparableConv, EdgeResidual,
    ConvBnAct, ConvNormAct, SqueezeExcite, SEModule) and models (EfficientNet, MobileNetV3: stem
    and head) keep their children and take a forward that runs each conv + BatchNormAct2d pair
    and SE block fused (fastmb/convert_timm.py). Parameters
    and buffers are shared, so every state_dict key stays; training modes are kept.
    Where it swapped anything and `channels_last` holds, it then puts the model's 4-D
    parameters in channels_last (fastmb.models.layers.use_channels_last): an NCHW input then
    runs in the fast layout from the first conv on, and 4-D outputs come out channels_last.
    A torchvision layer with hooks of its own is left as it is (a new module would drop them).
    Logs (logger "fastmb") what it swapped, and what it left and why; returns `model`, or with
    report=True `(model, ConvertReport)`."""
    swapped: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    convert_timm_block = _timm_converter() if any(type(m).__module__.startswith("timm.") for m in model.modules()) else None
    torchvision_fuser = _torchvision_fuser()

    def fuse_torchvision(module: nn.Module) -> None:
        """A torchvision block or model whose layers are fused: its class swapped (one native
        call per block, and for the head, in eval)."""
        original = type(module)
        reason = torchvision_fuser(module) if torchvision_fuser is not None else None
        if reason is not None:
            skipped[f"{original.__name__}: {reason}"] += 1
        elif type(module) is not original:
            swapped[f"{original.__name__} (one native call in eval)"] += 1

    def fused_equivalent(module: nn.Module) -> nn.Module | None:
        se = _as_squeeze_excitation(module)
        if isinstance(se, str):
            skipped[f"SE block: {se}"] += 1
        if se is not None:
            return se if not isinstance(se, str) else None
        parts = _conv_bn_parts(module)
        if isinstance(parts, str):
            skipped[f"{type(module).__name__}: {parts}"] += 1
        if parts is None or isinstance(parts, str):
            return None
        fused = _as_dwconv_bn_act(*parts)
        if not isinstance(fused, str):
            return fused
        if fused != "not depthwise":
            skipped[f"depthwise stage: {fused}"] += 1
        return ConvBNAct.from_modules(*parts)

    def visit(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, (DWConvBNAct, ConvBNAct, SqueezeExcitation)):
                continue
            if convert_timm_block is not None and convert_timm_block(child, swapped, skipped):
                visit(child)  # an SE block or ConvNormActs inside
                continue
            fused = fused_equivalent(child)
            if fused is not None and own_hooks(child):  # the new module would not carry them
                skipped[f"{type(child).__name__} with hooks of its own"] += 1
                fused = None
            if fused is None:
                visit(child)
                fuse_torchvision(child)
                continue
            fused.train(child.training)
            setattr(parent, name, fused)
            swapped[type(fused).__name__] += 1

    if convert_timm_block is not None:
        convert_timm_block(model, swapped, skipped)  # a timm model's own stem and head
    visit(model)
    fuse_torchvision(model)
    if channels_last and swapped:
        use_channels_last(model)
    summary = ConvertReport(dict(swapped), dict(skipped), channels_last=channels_last and bool(swapped))
    for line in str(summary).splitlines():
        logger.info("fastmb.convert: %s", line)
    return (model, summary) if report else model
