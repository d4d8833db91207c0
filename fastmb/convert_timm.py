"""fastmb.convert's timm recogniser: timm's MobileNet-family blocks (EfficientNet, MobileNetV3/V4,
MNASNet, FBNet, LCNet, TinyNet) run their depthwise stages, pointwise and full conv layers and
SE blocks on fastmb's fused paths.

A recognised block keeps its children, so every state_dict key, hook point and feature_info stays;
only its class changes, to a subclass of timm's whose forward is the same sequence with each conv +
BatchNormAct2d pair fused. Which pairs fuse, and with which activation, is read off the modules as
they are at each call (stage_plan, _se_plan; the kept plans of whole blocks, stems and heads are
made again when a module they read changes), so a norm's activation or an SE gate swapped after
conversion is computed. Imported by fastmb.convert only when a model holds timm modules."""

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from timm import layers as timm_layers
from timm.layers import BatchNormAct2d, Conv2dSame, ConvNormAct
from timm.layers.squeeze_excite import SEModule
from timm.models import _efficientnet_blocks as blocks
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from torch import Tensor, nn

from fastmb.convert import fusion_blocker
from fastmb.nn.batch_norm import synchronised
from fastmb.nn.conv_bn_act import run_conv_bn_act_modules
from fastmb.nn.dwconv_bn_act import run_dwconv_bn_act_modules
from fastmb.ops.activations import activation_name, gate_name
from fastmb.ops.common import batch_norm_channels, runs_composite, symbolic, timm_frozen_batch_norm
from fastmb.ops.classifier_head import NATIVE as HEAD_NATIVE
from fastmb.ops.classifier_head import FusedHead, HeadLinear
from fastmb.ops.inverted_residual import (
    NATIVE,
    BlockLayers,
    ConvBN,
    FusedBlock,
    FusedStem,
    Program,
    SEParts,
    block_slots,
    calls_needed,
    fused_block,
    global_hooks,
    has_hooks,
    memoized_forward,
    replayed_forward,
    module_tree_slots,
    run_layers,
    stem_conv,
)
from fastmb.ops.packing import (
    Slot,
    cached_plan,
    depthwise_conv,
    hook_slots,
    mode_slots,
    plain_1x1_conv,
    pointwise_conv,
    structure_slots,
)
from fastmb.ops.squeeze_excitation import run_squeeze_excitation

_LAYER_SCALE = getattr(timm_layers, "LayerScale2d", None)  # MobileNetV4 hybrids' layer scale
# Classifiers: nn.Linear, and timm's subclass (the same product; it casts the bias for TorchScript).
_LINEARS = (nn.Linear, *((timm_layers.Linear,) if hasattr(timm_layers, "Linear") else ()))

# A plan entry: (kind, activation name); kind "depthwise" (the fused op), "conv" (ConvBNAct's
# paths: folded in eval, the memory-saving batch norm in training) or "modules" (timm's own).
Plan = tuple[str, str | None]


def stage_plan(conv: nn.Module, bn: nn.Module) -> tuple[Plan, str | None]:
    """How the pair conv -> bn runs, and why not fused when it is not (None too when there is
    no pair: a model without a head conv)."""
    if isinstance(conv, nn.Identity) and isinstance(bn, nn.Identity):
        return ("modules", None), None
    frozen = timm_frozen_batch_norm(bn)  # freeze_batch_norm_2d's: an eval BatchNormAct2d, in training too
    if not isinstance(bn, BatchNormAct2d) and not frozen:
        return ("modules", None), f"norm {type(bn).__name__} is not a BatchNormAct2d"
    if type(conv) not in (nn.Conv2d, Conv2dSame):
        return ("modules", None), f"conv {type(conv).__name__} is not an nn.Conv2d"
    children = bn._modules  # not bn.act: nn.Module.__getattr__ costs 0.4 us a child, and this runs every call
    if not isinstance(children["drop"], nn.Identity):
        return ("modules", None), f"the norm's drop is {type(children['drop']).__name__}"
    if not frozen and not bn.track_running_stats:
        return ("modules", None), "the batch norm keeps no running statistics"
    reason = fusion_blocker(conv, bn, children["act"])
    if reason is not None:
        return ("modules", None), reason
    act = activation_name(children["act"])
    if conv.groups == conv.in_channels == conv.out_channels:
        return ("depthwise", act), None
    return ("conv", act), None


def same_padding(conv: nn.Conv2d, x: Tensor) -> list[int]:
    """[top, bottom, left, right]: the padding timm's Conv2dSame adds to x (TensorFlow's SAME,
    the extra row and column at the bottom and right)."""
    sides = []
    for size, k, s, d in zip(x.shape[2:], conv.kernel_size, conv.stride, conv.dilation):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        sides += [total // 2, total - total // 2]
    return sides


def run_stage(block: nn.Module, conv_name: str, bn_name: str, x: Tensor) -> Tensor:
    conv, bn = block._modules[conv_name], block._modules[bn_name]
    if symbolic(x) or global_hooks() or calls_needed([conv, bn]):  # the modules: a trace, hooks (their own: calls_needed), ...
        return bn(conv(x))
    kind, act = stage_plan(conv, bn)[0]
    if kind == "depthwise" and depthwise_conv(conv, (nn.Conv2d, Conv2dSame)):
        padding = same_padding(conv, x) if type(conv) is Conv2dSame else None
        return run_dwconv_bn_act_modules(x, conv, bn, act, padding)
    if kind == "conv" and not synchronised(bn) and not torch.compiler.is_compiling() and not runs_composite(x):
        padded = x
        if type(conv) is Conv2dSame and not bn.training:  # eval convolves with the folded weight, not through the module
            top, bottom, left, right = same_padding(conv, x)
            padded = F.pad(x, [left, right, top, bottom])
        y = run_conv_bn_act_modules(padded, conv, bn, bn.act)
        if y is not None:
            return y
    return bn(conv(x))


def _se_parts(se: nn.Module) -> SEParts | None | bool:
    """The fused SE's layers, None for no SE, False for an SE the op cannot run."""
    if isinstance(se, nn.Identity):
        return None
    if type(se) not in (FusedSqueezeExcite, FusedSEModule):
        return False
    names = _se_plan(se)[0]
    if names is None:
        return False
    parts = SEParts(*_se_fcs(se), *names)
    return parts if plain_1x1_conv(parts.fc1) and plain_1x1_conv(parts.fc2) else False


def _as_block_layers(expand, depthwise, project, se: nn.Module, residual: bool) -> BlockLayers | None:
    """BlockLayers from (conv, bn, plan entry) stages, expand or depthwise None where the block has
    none (not both): 1x1 conv -> depthwise (zero padding, or Conv2dSame's, computed per input) ->
    SE -> 1x1 conv (with its activation, as in depthwise-separable blocks); else None."""
    stages = [stage for stage in (expand, depthwise, project) if stage is not None]
    kinds = ["conv"] * (expand is not None) + ["depthwise"] * (depthwise is not None) + ["conv"]
    if len(stages) < 2 or [plan[0] for _, _, plan in stages] != kinds:
        return None
    expand, depthwise, project = (None if stage is None else ConvBN(stage[0], stage[1], stage[2][1]) for stage in (expand, depthwise, project))
    dw = depthwise.conv if depthwise is not None else None
    if dw is not None and not depthwise_conv(dw, (nn.Conv2d, Conv2dSame)):
        return None
    if not all(pointwise_conv(s.conv) for s in (expand, project) if s is not None):
        return None
    se_parts = _se_parts(se)
    if se_parts is False:
        return None
    padding_of = (lambda x: same_padding(dw, x)) if type(dw) is Conv2dSame else None
    return BlockLayers(expand, depthwise, se_parts, project, residual, padding_of)


def _block_layers(block: nn.Module) -> BlockLayers | None:
    """An InvertedResidual or DepthwiseSeparableConv (its STAGES: expansion first when there are
    three) as BlockLayers, without space-to-depth or anti-aliasing; else None."""
    if getattr(block, "conv_s2d", None) is not None or not isinstance(getattr(block, "aa", nn.Identity()), nn.Identity):
        return None
    pairs = [(block._modules[conv], block._modules[bn]) for conv, bn in block.STAGES]
    stages = [(conv, bn, stage_plan(conv, bn)[0]) for conv, bn in pairs]
    return _as_block_layers(*([None] * (3 - len(stages)) + stages), block.se, block.has_skip)


def _universal_block_layers(block: nn.Module) -> BlockLayers | None:
    """A MobileNetV4 UniversalInvertedResidual without an end depthwise conv as BlockLayers from
    its fused ConvNormActs: the inverted-bottleneck, ExtraDW, ConvNext and FFN kinds (a start
    depthwise conv runs first, as the plan's prologue; without a middle one the op gets an
    identity), a layer scale folded into the projection; else None."""
    layer_scale = block._modules["layer_scale"]
    if isinstance(layer_scale, nn.Identity):
        layer_scale = None
    elif _LAYER_SCALE is None or type(layer_scale) is not _LAYER_SCALE:
        return None
    if not isinstance(block._modules["dw_end"], nn.Identity):
        return None
    prologue = block._modules["dw_start"]
    if isinstance(prologue, nn.Identity):
        prologue = None
    elif type(prologue) is not FusedConvNormAct or stage_plan(prologue.conv, prologue.bn)[0][0] != "depthwise":
        return None
    stages = []
    for name in ("pw_exp", "dw_mid", "pw_proj"):
        layer = block._modules[name]
        if name == "dw_mid" and isinstance(layer, nn.Identity):
            stages.append(None)
            continue
        if type(layer) is not FusedConvNormAct or not isinstance(getattr(layer, "aa", None) or nn.Identity(), nn.Identity):
            return None
        stages.append((layer.conv, layer.bn, stage_plan(layer.conv, layer.bn)[0]))
    layers = _as_block_layers(*stages, block.se, block.has_skip)
    if layers is None or (layer_scale is not None and layers.project.activation != "identity"):
        return None  # the layer scale folds into the projection only when nothing comes between them
    return replace(layers, prologue=prologue, layer_scale=layer_scale)


def _block_plan(block: nn.Module, layers_of) -> FusedBlock | None:
    """The block's FusedBlock, or None: layers_of(block) says what the op runs (BlockLayers) or
    None; the plan is kept on the block while its layers stay the same (block_slots)."""
    return cached_plan(block, "_fastmb_fused", lambda: block_slots(block, block), lambda: fused_block(block, layers_of(block)))


def _run_fused_block(block: nn.Module, x: Tensor, layers_of) -> Tensor | None:
    """The whole block as one native call in eval on the CPU, or None (the caller runs its
    stages)."""
    if not NATIVE or block.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    plan = _block_plan(block, layers_of)
    return plan(x) if plan is not None else None


class FusedDepthwiseSeparableConv(blocks.DepthwiseSeparableConv):
    STAGES = (("conv_dw", "bn1"), ("conv_pw", "bn2"))

    def fused_plan(self) -> FusedBlock | None:  # for run_layers
        return _block_plan(self, _block_layers)

    def forward(self, x: Tensor) -> Tensor:
        fused = _run_fused_block(self, x, _block_layers)  # eval on the CPU
        if fused is not None:
            return fused
        shortcut = x
        if getattr(self, "conv_s2d", None) is not None:
            x = self.bn_s2d(self.conv_s2d(x))
        x = self.aa(run_stage(self, "conv_dw", "bn1", x))
        x = run_stage(self, "conv_pw", "bn2", self.se(x))
        return self.drop_path(x) + shortcut if self.has_skip else x


class FusedInvertedResidual(blocks.InvertedResidual):
    STAGES = (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3"))

    def fused_plan(self) -> FusedBlock | None:  # for run_layers
        return _block_plan(self, _block_layers)

    def forward(self, x: Tensor) -> Tensor:
        fused = _run_fused_block(self, x, _block_layers)  # eval on the CPU
        if fused is not None:
            return fused
        shortcut = x
        if getattr(self, "conv_s2d", None) is not None:
            x = self.bn_s2d(self.conv_s2d(x))
        x = run_stage(self, "conv_pw", "bn1", x)
        x = self.aa(run_stage(self, "conv_dw", "bn2", x))
        x = run_stage(self, "conv_pwl", "bn3", self.se(x))
        return self.drop_path(x) + shortcut if self.has_skip else x


class FusedEdgeResidual(blocks.EdgeResidual):
    STAGES = (("conv_exp", "bn1"), ("conv_pwl", "bn2"))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.aa(run_stage(self, "conv_exp", "bn1", x))
        x = run_stage(self, "conv_pwl", "bn2", self.se(x))
        return self.drop_path(x) + shortcut if self.has_skip else x


class FusedConvBnAct(blocks.ConvBnAct):
    STAGES = (("conv", "bn1"),)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.aa(run_stage(self, "conv", "bn1", x))
        return self.drop_path(x) + shortcut if self.has_skip else x


_UNIVERSAL = getattr(blocks, "UniversalInvertedResidual", None)  # MobileNetV4's, timm >= 1.0

if _UNIVERSAL is not None:

    class FusedUniversalInvertedResidual(_UNIVERSAL):
        """Its ConvNormActs are fused on their own; the inverted-bottleneck kind also runs whole."""

        STAGES = ()

        def fused_plan(self) -> FusedBlock | None:  # for run_layers
            return _block_plan(self, _universal_block_layers)

        def forward(self, x: Tensor) -> Tensor:
            fused = _run_fused_block(self, x, _universal_block_layers)  # eval on the CPU
            return fused if fused is not None else super().forward(x)


class FusedConvNormAct(ConvNormAct):
    STAGES = (("conv", "bn"),)

    def forward(self, x: Tensor) -> Tensor:
        x = run_stage(self, "conv", "bn", x)
        aa = getattr(self, "aa", None)
        return aa(x) if aa is not None else x


class PooledConv2d(nn.Conv2d):
    """A 1x1 conv that runs on the pooled features, one pixel per image (timm MobileNetV3/V4's
    conv_head): there one GEMM. oneDNN's conv took 0.5 ms forward, and 5.3 forward and backward,
    for 16 images of 960 -> 1280 channels, where the GEMM took 0.33 and 1.4 (2 threads)."""

    def forward(self, x: Tensor) -> Tensor:
        if symbolic(x) or x.dim() != 4 or x.shape[2:] != (1, 1):
            return super().forward(x)
        return F.linear(x.flatten(1), self.weight.flatten(1), self.bias)[:, :, None, None]


def _runs_as_gemm_on_a_pixel(conv: nn.Module) -> bool:
    """Whether PooledConv2d's GEMM computes `conv` on a 1x1 input: a plain 1x1 conv, no padding
    (the output stays one pixel whatever the stride and dilation), no groups."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.padding == (0, 0)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


class FusedEfficientNet(EfficientNet):
    """The stem (3x3 conv + BN + activation) and the head (1x1 conv + BN + activation) fused; in
    eval on the CPU the head conv, the pooling and the classifier are one native call
    (fastmb::classifier_head)."""

    STAGES = (("conv_stem", "bn1"), ("conv_head", "bn2"))

    def forward_features(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing:
            return super().forward_features(x)
        return run_stage(self, "conv_head", "bn2", self.blocks(run_stage(self, "conv_stem", "bn1", x)))

    def forward(self, x: Tensor) -> Tensor:
        replayed = replayed_forward(self, x)
        return replayed if replayed is not None else memoized_forward(self, (), x, self._forward)

    def _forward(self, x: Tensor, program: Program) -> Tensor:
        head = _head_plan(self, _efficientnet_head)
        if head is None:
            return super().forward(x)
        x = run_layers([_Stem(self), *_blocks_in_order(self.blocks)], x, program)
        logits = head(x, program)
        return logits if logits is not None else self.forward_head(run_stage(self, "conv_head", "bn2", x))


class FusedMobileNetV3(MobileNetV3):
    """The stem fused; the head runs after the pooling, on one pixel: its conv as a GEMM
    (PooledConv2d). In eval on the CPU the last block's 1x1 conv, the pooling, the head conv
    (with its norm folded) and the classifier are one native call (fastmb::classifier_head)."""

    STAGES = (("conv_stem", "bn1"),)

    def forward_features(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing:
            return super().forward_features(x)
        return self.blocks(run_stage(self, "conv_stem", "bn1", x))

    def forward(self, x: Tensor) -> Tensor:
        replayed = replayed_forward(self, x)
        return replayed if replayed is not None else memoized_forward(self, (), x, self._forward)

    def _forward(self, x: Tensor, program: Program) -> Tensor:
        head = _head_plan(self, _mobilenetv3_head)
        if head is None:
            return super().forward(x)
        layers = _blocks_in_order(self.blocks)
        x = run_layers([_Stem(self), *layers[:-1]], x, program)
        logits = head(x, program)
        return logits if logits is not None else self.forward_head(layers[-1](x))


class _Stem:
    """A converted model's conv_stem and bn1 as run_layers's first layer: called, it runs them;
    its fused_stem() lets run_layers compute the stem inside the first block's op."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, x: Tensor) -> Tensor:
        return run_stage(self.model, "conv_stem", "bn1", x)

    def fused_stem(self) -> FusedStem | None:
        """The stem's plan, kept on the model; None where it runs as its modules (not fused,
        Conv2dSame's input-dependent padding, hooks)."""
        model = self.model
        conv, bn = model._modules["conv_stem"], model._modules["bn1"]
        if stage_plan(conv, bn)[0][0] != "conv" or has_hooks(conv) or has_hooks(bn) or has_hooks(bn.act):
            return None

        def build() -> FusedStem | None:
            activation = activation_name(bn.act)  # the module's now (structure_slots: a swapped one builds again)
            return FusedStem(ConvBN(conv, bn, activation)) if activation is not None and stem_conv(conv) else None

        def slots() -> list[Slot]:
            held = [(model._modules, "conv_stem"), (model._modules, "bn1")]
            return held + structure_slots([conv, bn]) + module_tree_slots(conv) + module_tree_slots(bn)

        return cached_plan(model, "_fastmb_stem", slots, build)


def _blocks_in_order(blocks: nn.Module) -> list[nn.Module]:
    """The blocks a timm model's `blocks` (a Sequential of stage Sequentials) runs, in order."""
    return [block for stage in blocks._modules.values() for block in (stage._modules.values() if type(stage) is nn.Sequential else (stage,))]


def _head_plan(model: nn.Module, plan_head) -> FusedHead | None:
    """The FusedHead of a converted timm model in eval on the CPU without autograd, or None:
    plan_head(model) -> (the modules it is built from, a function building it, or None), kept
    on the model while those modules stay the same. None too while `blocks` or a stage has hooks:
    the fused forward runs the blocks one by one, past those containers."""
    if not HEAD_NATIVE or model.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if has_hooks(model.blocks) or any(has_hooks(stage) for stage in model.blocks._modules.values()):
        return None
    modules, build = plan_head(model)
    fused = [module for module in modules if module is not None]

    def slots() -> list[Slot]:  # with what the forward reads: the model's layers, the blocks' order, their containers' hooks
        stages = list(model.blocks._modules.values())
        containers = [model, model.blocks, *stages]
        held = structure_slots([*containers, *(child for module in fused for child in module.modules())])
        hooks = [slot for container in containers[1:] for slot in hook_slots(container)]
        return held + mode_slots([model]) + hooks + [slot for module in fused for slot in module_tree_slots(module)]

    return cached_plan(model, "_fastmb_head", slots, lambda: build() if not calls_needed(fused) else None)


def _average_pooling(global_pool: nn.Module) -> bool:
    """A SelectAdaptivePool2d averaging each channel to one value."""
    pool = getattr(global_pool, "pool", None)
    return getattr(global_pool, "pool_type", None) == "avg" and type(pool) is nn.AdaptiveAvgPool2d and pool.output_size in (1, (1, 1))


def _classifier(classifier: nn.Module) -> list[HeadLinear] | None:
    """The classifier as the op's linear layers: [] for none (nn.Identity), else None."""
    if type(classifier) in _LINEARS and classifier.bias is not None:
        return [HeadLinear(classifier, None, "identity")]
    return [] if isinstance(classifier, nn.Identity) else None


def _efficientnet_head(model: FusedEfficientNet):
    """conv_head + bn2 (a fused 1x1 conv), the pooling and a linear classifier."""
    modules = (model.conv_head, model.bn2, model.global_pool, model.classifier)

    def build() -> FusedHead | None:
        kind, activation = stage_plan(model.conv_head, model.bn2)[0]
        linears = _classifier(model.classifier)
        if kind != "conv" or not pointwise_conv(model.conv_head) or not _average_pooling(model.global_pool) or not linears:
            return None
        return FusedHead(ConvBN(model.conv_head, model.bn2, activation), linears, [])

    return modules, build


def _mobilenetv3_head(model: FusedMobileNetV3):
    """The last block (a 1x1 ConvBnAct without skip), the pooling, the head conv (PooledConv2d)
    with a BatchNormAct2d or nothing after it, the activation, then the classifier."""
    stage = next(reversed(model.blocks._modules.values()), None)
    last = next(reversed(stage._modules.values()), None) if type(stage) is nn.Sequential else stage
    norm_head = model._modules.get("norm_head")  # None before timm had it
    modules = (last, model.global_pool, model.conv_head, norm_head, model.act2, model.flatten, model.classifier)

    def build() -> FusedHead | None:
        if type(last) is not FusedConvBnAct or last.has_skip or not isinstance(getattr(last, "aa", nn.Identity()), nn.Identity):
            return None
        kind, activation = stage_plan(last.conv, last.bn1)[0]
        if kind != "conv" or not pointwise_conv(last.conv) or not _average_pooling(model.global_pool):
            return None
        if type(model.conv_head) is not PooledConv2d or type(model.flatten) is not nn.Flatten:
            return None
        norm, head_activation = None, activation_name(model.act2)
        frozen = timm_frozen_batch_norm(norm_head)
        if type(norm_head) is BatchNormAct2d or frozen:
            norm_activation = activation_name(norm_head.act)
            affine = frozen or norm_head.affine
            plain = affine and norm_head.running_var is not None and isinstance(norm_head.drop, nn.Identity)
            channels = batch_norm_channels(norm_head)
            if not plain or norm_activation is None or head_activation != "identity" or channels != model.conv_head.out_channels:
                return None
            norm, head_activation = norm_head, norm_activation
        elif not (norm_head is None or isinstance(norm_head, nn.Identity)) or head_activation is None:
            return None
        classifier = _classifier(model.classifier)
        if classifier is None:
            return None
        return FusedHead(ConvBN(last.conv, last.bn1, activation), [HeadLinear(model.conv_head, norm, head_activation), *classifier], [])

    return modules, build


def _squeeze_excitation(module: nn.Module, x: Tensor, fc1: nn.Conv2d, fc2: nn.Conv2d) -> Tensor | None:
    """The SE block as the fused op, or None where timm's forward runs: on a torch.fx Proxy, while
    a module in it needs its call (hooks, parametrizations), an FC conv is no longer a plain 1x1,
    or the activation or gate was swapped for one fastmb does not fuse."""
    if symbolic(x) or calls_needed(module.children()) or not (plain_1x1_conv(fc1) and plain_1x1_conv(fc2)):
        return None
    names = _se_plan(module)[0]  # the activation and gate modules as they are now
    if names is None:
        return None
    return run_squeeze_excitation(x, fc1.weight.flatten(1), fc1.bias, fc2.weight.flatten(1), fc2.bias, *names)


class FusedSqueezeExcite(blocks.SqueezeExcite):
    def forward(self, x: Tensor) -> Tensor:
        y = _squeeze_excitation(self, x, self.conv_reduce, self.conv_expand)
        return y if y is not None else super().forward(x)


class FusedSEModule(SEModule):
    def forward(self, x: Tensor) -> Tensor:
        y = _squeeze_excitation(self, x, self.fc1, self.fc2)
        return y if y is not None else super().forward(x)


_FUSED_BLOCKS = {
    blocks.DepthwiseSeparableConv: FusedDepthwiseSeparableConv,
    blocks.InvertedResidual: FusedInvertedResidual,
    blocks.EdgeResidual: FusedEdgeResidual,
    blocks.ConvBnAct: FusedConvBnAct,
    ConvNormAct: FusedConvNormAct,
    EfficientNet: FusedEfficientNet,
    MobileNetV3: FusedMobileNetV3,
}
if _UNIVERSAL is not None:
    _FUSED_BLOCKS[_UNIVERSAL] = FusedUniversalInvertedResidual


def _se_fcs(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A timm SE block's two FC layers (SqueezeExcite's or SEModule's names)."""
    if isinstance(module, blocks.SqueezeExcite):
        return module.conv_reduce, module.conv_expand
    return module.fc1, module.fc2


def _se_plan(module: nn.Module) -> tuple[tuple[str, str] | None, str | None]:
    """(activation, gate) for a timm SE block (converted or not), or why it does not fuse."""
    fc1, fc2 = _se_fcs(module)
    if isinstance(module, blocks.SqueezeExcite):
        act, gate = module.act1, module.gate
    else:
        if not isinstance(module.bn, nn.Identity) or module.add_maxpool:
            return None, "an SEModule with a norm or max-pool"
        act, gate = module.act, module.gate
    names = activation_name(act), gate_name(gate)
    if None in names:
        return None, f"activation {type(act).__name__} or gate {type(gate).__name__} is not one fastmb fuses"
    if fc1.bias is None or fc2.bias is None or type(fc1) is not nn.Conv2d or type(fc2) is not nn.Conv2d:
        return None, "an fc layer is not a 1x1 nn.Conv2d with a bias"
    return names, None


def convert_block(module: nn.Module, swapped, skipped) -> bool:
    """Swaps a timm block's class for its fused subclass (counting in `swapped` the stages and SE
    blocks fused, in `skipped` the reasons for the rest); False if `module` is no timm block."""
    if type(module) in (blocks.SqueezeExcite, SEModule):
        reason = _se_plan(module)[1]
        if reason is not None:
            skipped[f"SE block: {reason}"] += 1
            return True
        module.__class__ = FusedSqueezeExcite if type(module) is blocks.SqueezeExcite else FusedSEModule
        swapped["SE blocks"] += 1
        return True
    fused_class = _FUSED_BLOCKS.get(type(module))
    if fused_class is None:
        return False
    for conv_name, bn_name in fused_class.STAGES:
        (kind, _), reason = stage_plan(module._modules[conv_name], module._modules[bn_name])
        if reason is not None:
            skipped[f"{type(module).__name__}.{conv_name}: {reason}"] += 1
        elif kind != "modules":
            swapped["depthwise stages" if kind == "depthwise" else "conv layers"] += 1
    module.__class__ = fused_class
    if fused_class is FusedMobileNetV3 and _runs_as_gemm_on_a_pixel(module.conv_head):
        module.conv_head.__class__ = PooledConv2d
        swapped["head convs on the pooled pixel, as a GEMM"] += 1
    return True
