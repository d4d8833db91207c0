"""A whole inverted-residual block as one native call (fastmb::inverted_residual): eval on the
CPU, float32, channels_last. The block's layers are kept as they are (their modules, keys and
training path unchanged); `FusedBlock` packs their weights for the op (batch norms folded, the
depthwise weight taps-major) and packs again whenever any parameter or buffer changes, so the
op never runs with stale weights. Anything the op does not cover returns None and the caller
runs its layers."""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks
from torch.utils import _python_dispatch

from fastmb import _extension, dispatch
from fastmb.ops.activations import activation_name
from fastmb.ops.common import conv_output_shape, padding_sides
from fastmb.ops.packing import (
    PackedArguments,
    Slot,
    Watch,
    bn_scale_shift,
    cached_plan,
    conv_bn_slots,
    eval_op_applies,
    fold_and_pack,
    hook_slots,
    plain_1x1_conv,
    plain_batch_norm,
    pointwise_conv,
    structure_slots,
)

NATIVE = _extension.has_kernel("inverted_residual", "CPU") and _extension.has_kernel("inverted_residual_chain", "CPU")
_OP = torch.ops.fastmb.inverted_residual.default if NATIVE else None
_CHAIN = torch.ops.fastmb.inverted_residual_chain.default if NATIVE else None


@dataclass(frozen=True)
class ConvBN:
    """A conv and the batch norm after it, with the activation's name ("identity" for none)."""

    conv: nn.Conv2d
    bn: nn.BatchNorm2d
    activation: str


@dataclass(frozen=True)
class SEParts:
    """An SE block's layers as the op reads them: its 1x1 FC layers and the registry names of its
    activation and gate."""

    fc1: nn.Conv2d
    fc2: nn.Conv2d
    activation: str
    gate: str


@dataclass(frozen=True)
class BlockLayers:
    """An inverted-residual block: [expand] -> [depthwise] -> [SE] -> project [* scale] [+ x]."""

    expand: ConvBN | None
    depthwise: ConvBN | None  # None (MobileNetV4's ConvNext and FFN blocks): the op gets an identity
    se: SEParts | None
    project: ConvBN
    residual: bool
    # The depthwise padding [top, bottom, left, right] for an input x, where it depends on x's size
    # (TensorFlow's SAME: timm's Conv2dSame); None: the conv's own.
    padding_of: Callable[[Tensor], list[int]] | None = None
    # A layer run on x before the op, keeping its shape (MobileNetV4's ExtraDW blocks open with a
    # depthwise conv); None: the op takes x. With a prologue the residual (x, not the prologue's
    # output) is added after the op.
    prologue: nn.Module | None = None
    # A per-channel scale of the projection's output (timm's LayerScale2d, its `gamma`), folded
    # into the projection's weights.
    layer_scale: nn.Module | None = None


def fastmb_module(module: nn.Module, cls: type) -> bool:
    """Whether `module` is a `cls` (a fastmb module) that computes what `cls` does: not a subclass
    with a forward of its own, which the ops would skip."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def conv_bn(module: nn.Module) -> ConvBN | None:
    """The (conv, bn, activation) of a fastmb ConvBNAct or DWConvBNAct with a plain batch norm."""
    from fastmb.nn import ConvBNAct, DWConvBNAct
    from fastmb.nn.dwconv_bn_act import fusable_children

    if fastmb_module(module, DWConvBNAct) and len(module) in (2, 3):
        conv, bn = module._modules["0"], module._modules["1"]
        act = activation_name(module._modules.get("2"))
        fusable = act is not None and fusable_children(conv, bn) and plain_batch_norm(bn, conv.out_channels)
        return ConvBN(conv, bn, act) if fusable else None
    if fastmb_module(module, ConvBNAct) and len(module) in (2, 3):
        conv, bn = module._modules["0"], module._modules["1"]
        act = activation_name(module._modules.get("2"))
        if act is None or type(conv) is not nn.Conv2d or conv.bias is not None or not plain_batch_norm(bn, conv.out_channels):
            return None
        return ConvBN(conv, bn, act)
    return None


def block_layers(layers: list[nn.Module], residual: bool) -> BlockLayers | None:
    """The block that `layers` (the children of a V2/V3 block's Sequential) make, or None when
    they are not one the op runs: a 1x1 expansion (ConvBNAct), a depthwise stage (DWConvBNAct,
    zero padding), an optional fastmb SqueezeExcitation with biases, a 1x1 projection (ConvBNAct,
    with an activation in depthwise-separable blocks, or Conv2d and BatchNorm2d)."""
    from fastmb.nn import DWConvBNAct, SqueezeExcitation
    from fastmb.nn.squeeze_excitation import fused_activations

    layers = list(layers)
    if len(layers) >= 2 and type(layers[-2]) is nn.Conv2d and plain_batch_norm(layers[-1], layers[-2].out_channels):
        project = ConvBN(layers[-2], layers[-1], "identity")
        layers = layers[:-2]
    elif layers:
        project = conv_bn(layers.pop())
    else:
        return None
    se = None
    if layers and fastmb_module(layers[-1], SqueezeExcitation):
        module = layers.pop()
        names = fused_activations(module)
        if names is None:
            return None
        se = SEParts(module.fc1, module.fc2, *names)
    depthwise = conv_bn(layers.pop()) if layers and fastmb_module(layers[-1], DWConvBNAct) else None
    expand = conv_bn(layers.pop()) if layers else None
    if layers or project is None or not pointwise_conv(project.conv) or depthwise is None:
        return None
    if expand is not None and not pointwise_conv(expand.conv):
        return None
    dw = depthwise.conv
    if dw.out_channels != project.conv.in_channels:  # zero padding: conv_bn's fusable_children
        return None
    if expand is not None and expand.conv.out_channels != dw.in_channels:
        return None
    fcs = (se.fc1, se.fc2) if se is not None else ()
    if not all(plain_1x1_conv(fc) and fc.bias is not None for fc in fcs) or (se is not None and se.fc1.in_channels != dw.out_channels):
        return None  # the op's SE: plain 1x1 FC layers with biases
    return BlockLayers(expand, depthwise, se, project, residual)


# Where the depthwise padding sits in FusedBlock's packed arguments (after x).
_PADDING = 7
# Tensors and settings per block in fastmb::inverted_residual_chain's lists (csrc/fastmb.cpp).
_CHAIN_TENSORS, _CHAIN_SETTINGS = 11, 9


class FusedBlock(PackedArguments):
    """The op's arguments for one block, packed from its layers' current parameters."""

    def __init__(self, layers: BlockLayers) -> None:
        super().__init__()
        self.layers = layers
        self._parts = [part for part in (layers.expand, layers.depthwise, layers.project) if part is not None]
        self._norms = [part.bn for part in self._parts]
        # Run only when all of these are in eval: a prologue in training would update its
        # statistics, and again on the stage path wherever the op then steps aside.
        self._modes = self._norms + ([layers.prologue] if layers.prologue is not None else [])
        self.in_channels = (layers.expand or layers.depthwise or layers.project).conv.in_channels
        self.out_channels = layers.project.conv.out_channels
        self._chained_from: tuple | None = None
        self._chained: tuple = ()

    def tensor_slots(self) -> list[tuple[dict, str]]:
        slots = [slot for part in self._parts for slot in conv_bn_slots(part.conv, part.bn)]
        se = self.layers.se
        if se is not None:
            slots += [(fc._parameters, name) for fc in (se.fc1, se.fc2) for name in ("weight", "bias")]
        if self.layers.layer_scale is not None:
            slots.append((self.layers.layer_scale._parameters, "gamma"))
        return slots

    def setting_slots(self) -> list[Slot]:
        depthwise = self.layers.depthwise
        geometry = [(depthwise.conv.__dict__, name) for name in ("stride", "padding", "dilation")] if depthwise is not None else []
        return [*((bn.__dict__, "eps") for bn in self._norms), *geometry]  # activations: structure_slots

    def modes(self) -> list[nn.Module]:
        return self._modes

    def pack(self) -> tuple:
        layers = self.layers
        expand = fold_and_pack(layers.expand.conv, layers.expand.bn) if layers.expand is not None else (None, None)
        expand_activation = layers.expand.activation if layers.expand is not None else "identity"
        if layers.depthwise is not None:
            dw = layers.depthwise.conv
            channels, kh, kw = dw.out_channels, *dw.kernel_size
            # taps-major storage, seen as (C, 1, kH, kW): the op reads it in place
            taps = dw.weight.float().reshape(channels, kh * kw).t().contiguous()
            scale, shift = bn_scale_shift(layers.depthwise.bn)
            dw_args = (taps.t().view(channels, 1, kh, kw), scale.float(), shift.float(), list(dw.stride), list(dw.padding), list(dw.dilation))
            dw_activation = layers.depthwise.activation
        else:  # an identity: a 1x1 depthwise conv of weight 1, one pass over the expanded rows in cache
            ones = torch.ones(layers.project.conv.in_channels)
            dw_args, dw_activation = (ones.view(-1, 1, 1, 1), ones, torch.zeros_like(ones), [1, 1], [0, 0], [1, 1]), "identity"
        se = layers.se
        if se is not None:
            se_args = (se.fc1.weight.float().flatten(1).contiguous(), se.fc1.bias.float().contiguous(),
                       se.fc2.weight.float().flatten(1).contiguous(), se.fc2.bias.float().contiguous(), se.activation, se.gate)  # fmt: skip
        else:
            se_args = (None, None, None, None, "relu", "hardsigmoid")
        layer_scale = layers.layer_scale.gamma if layers.layer_scale is not None else None
        project = fold_and_pack(layers.project.conv, layers.project.bn, layer_scale)
        residual = layers.residual and layers.prologue is None  # with a prologue, __call__ adds x
        return (*expand, expand_activation, *dw_args, dw_activation, *se_args, *project, residual, layers.project.activation)

    def __call__(self, x: Tensor) -> Tensor | None:
        """The block's output (channels_last) through the op, or None where the op does not
        apply (training, autograd, not a float32 CPU tensor, another backend chosen)."""
        if not NATIVE or not eval_op_applies(x, self.in_channels) or any(module.training for module in self._modes):
            return None
        prologue = self.layers.prologue
        if prologue is None:
            return self._run(x)
        y = self._run(prologue(x))
        return y.add_(x) if y is not None and self.layers.residual else y

    def _run(self, x: Tensor) -> Tensor | None:
        padding_of = self.layers.padding_of
        if padding_of is None:
            return self.run(_OP, x)
        padding = padding_of(x)

        def with_padding(x: Tensor, *arguments) -> Tensor:
            return _OP(x, *arguments[:_PADDING], padding, *arguments[_PADDING + 1 :])

        return self.run(with_padding, x)

    def direct_arguments(self) -> tuple | None:
        """The op's arguments when the op alone is the block (run_layers checks the input and
        what holds for the whole forward): its batch norms in eval, no prologue or
        input-dependent padding; else None."""
        layers = self.layers
        if layers.prologue is not None or layers.padding_of is not None:
            return None
        for module in self._modes:
            if module.training:
                return None
        return self.arguments()

    def chained(self, arguments: tuple) -> tuple[tuple, tuple, tuple]:
        """The block's part of fastmb::inverted_residual_chain's lists (tensors, settings, names)
        from its op arguments, made again only when they were packed again."""
        if self._chained_from is not arguments:
            (expand_weight, expand_bias, expand_activation, dw_weight, dw_scale, dw_shift, stride, padding, dilation, dw_activation,
             fc1_weight, fc1_bias, fc2_weight, fc2_bias, se_activation, se_gate, project_weight, project_bias, residual,
             project_activation) = arguments  # fmt: skip
            self._chained = (
                (expand_weight, expand_bias, dw_weight, dw_scale, dw_shift, fc1_weight, fc1_bias, fc2_weight, fc2_bias, project_weight, project_bias),
                (*stride, *padding_sides(padding), *dilation, int(residual)),
                (expand_activation, dw_activation, se_activation, se_gate, project_activation),
            )
            self._chained_from = arguments
        return self._chained

    def takes(self, x: Tensor) -> bool:
        """Whether the op takes x for this block: a float32 CPU tensor of its input channels."""
        return x.shape[1] == self.in_channels and x.dtype == torch.float32 and x.device.type == "cpu"

    def takes_a_stem(self, channels: int) -> bool:
        """Whether a stem of `channels` output channels may stand in for this block's expansion
        (the op's stem_* arguments): a block without one, and without both SE and a residual."""
        layers = self.layers
        return (
            channels == self.in_channels
            and layers.expand is None
            and layers.depthwise is not None
            and not (layers.se is not None and layers.residual)
        )


# Input channels up to which a conv counts as a stem: the op's stem computes it as patch GEMMs
# over C_in * kH * kW taps, made for RGB images.
_STEM_MAX_IN_CHANNELS = 4


class FusedStem(PackedArguments):
    """A stem (a full conv over an image, its batch norm and activation) packed as the op's
    stem_* arguments, so that the stem's output is computed as the next block reads it and never
    goes to memory."""

    def __init__(self, stem: ConvBN) -> None:
        super().__init__()
        self.stem = stem

    def tensor_slots(self) -> list[tuple[dict, str]]:
        return conv_bn_slots(self.stem.conv, self.stem.bn)

    def setting_slots(self) -> list[Slot]:
        conv = self.stem.conv.__dict__
        return [(self.stem.bn.__dict__, "eps"), (conv, "stride"), (conv, "padding"), (conv, "dilation")]  # the activation: structure_slots

    def modes(self) -> list[nn.Module]:
        return [self.stem.bn]

    def pack(self) -> tuple:
        conv, bn = self.stem.conv, self.stem.bn
        scale, shift = bn_scale_shift(bn)
        return (conv.weight.float().contiguous(), scale.float().contiguous(), shift.float().contiguous(), list(conv.stride),
                list(conv.padding), list(conv.dilation), self.stem.activation)  # fmt: skip

    def takes(self, x: Tensor) -> bool:
        return x.shape[1] == self.stem.conv.in_channels and not self.stem.bn.training


def stem_conv(conv: nn.Module) -> bool:
    """Whether the op can run `conv` as a stem: a plain nn.Conv2d without bias or groups, zero
    padding, a kernel above 1x1, over at most _STEM_MAX_IN_CHANNELS channels."""
    return (
        type(conv) is nn.Conv2d
        and conv.bias is None
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.in_channels <= _STEM_MAX_IN_CHANNELS
        and conv.kernel_size != (1, 1)
    )


def stem_plan(module: nn.Module) -> FusedStem | None:
    """The FusedStem of a ConvBNAct that is a stem (stem_conv, a plain batch norm), kept on it
    and rebuilt when its children change; None for anything else and a module with hooks."""
    fused_stem = getattr(module, "fused_stem", None)  # a stem run_layers is given by a model (timm's)
    if fused_stem is not None:
        return fused_stem()
    if not isinstance(module, nn.Sequential) or has_hooks(module):
        return None
    children = module._modules.values()

    def build() -> FusedStem | None:
        layers = conv_bn(module) if not calls_needed(children) else None
        return FusedStem(layers) if layers is not None and stem_conv(layers.conv) else None

    return cached_plan(module, "_fastmb_stem", lambda: structure_slots([module, *children]) + module_tree_slots(module), build)


def block_slots(block: nn.Module, layers: nn.Module) -> list[Slot]:
    """What a block's plan is made from besides its tensors and settings: its layers
    (structure_slots of `layers`, the Sequential or block holding them, and of every module
    below: timm's norms hold their activations a level down), the block's public attributes
    (training; use_res_connect, timm's has_skip), and module_tree_slots of the block."""
    attributes = block.__dict__
    public = [(attributes, name) for name in attributes if not name.startswith("_")]
    return structure_slots(list(layers.modules())) + public + module_tree_slots(block)


def fused_block(block: nn.Module, layers: BlockLayers | None) -> FusedBlock | None:
    """The plan of `block` made of `layers`; None without layers or while a module in the block
    needs its call (calls_needed: hooks, parametrizations)."""
    return FusedBlock(layers) if layers is not None and not calls_needed(block.children()) else None


def block_plan(module: nn.Module, layers: nn.Module, residual: bool) -> FusedBlock | None:
    """The FusedBlock of `module`'s block (the children of `layers`, plus x when `residual`), or
    None when the op cannot run it. Kept on `module`, rebuilt when its layers change
    (block_slots)."""
    build = lambda: fused_block(module, block_layers(list(layers._modules.values()), residual))  # noqa: E731
    return cached_plan(module, "_fastmb_fused", lambda: block_slots(module, layers), build, key=(residual,))


def run_fused_block(module: nn.Module, layers: nn.Module, residual: bool, x: Tensor) -> Tensor | None:
    """`module`'s block as one op call (block_plan), or None where it does not apply."""
    if not NATIVE or torch.is_grad_enabled() or module.training or torch.compiler.is_compiling():
        return None
    plan = block_plan(module, layers, residual)
    return plan(x) if plan is not None else None


def own_hooks(module: nn.Module) -> bool:
    """Whether `module` has hooks registered on it. Where a fused path does a module's work
    without calling it, these make it call the module; global hooks do not (the tools that
    register them, FlopCounterMode's module tracker, see the fused layers as they run)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def global_hooks() -> bool:
    """Whether module hooks are registered for every module (nn.modules.module's globals)."""
    return bool(
        module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks
        or module_hooks._global_backward_hooks or module_hooks._global_backward_pre_hooks
    )  # fmt: skip


def has_hooks(module: nn.Module) -> bool:
    """Whether calling `module` would run hooks (its own or global ones): the fused paths that
    skip a module call keep it instead."""
    return own_hooks(module) or global_hooks()


def needs_call(module: nn.Module) -> bool:
    """Whether a fused path must call `module` rather than do its work from its tensors: it has
    hooks of its own (a pruned conv's weight comes from its pre-hook), or parametrizations compute
    its tensors (weight_norm, spectral_norm, torch.nn.utils.parametrize), which are then not in
    its _parameters, where the packed paths read them. (parametrize registers them as the child
    `parametrizations`: looked up there, not by parametrize.is_parametrized's getattr, which
    raises and catches an AttributeError on every unparametrized module, 1.2 us a call.)"""
    return own_hooks(module) or "parametrizations" in module._modules


def calls_needed(modules: Iterable[nn.Module]) -> bool:
    """Whether one of `modules` or a module below one needs_call: a fused path that does their
    work without calling them steps aside."""
    return any(needs_call(child) for module in modules for child in module.modules())


def module_tree_slots(module: nn.Module) -> list[Slot]:
    """What a plan made from `module` depends on besides its tensors: hook_slots of the module and
    every module below it, and where the settings of the convs among them are held (a conv's
    stride or padding set after a plan was made from it makes the plan again, and checks it)."""
    modules = list(module.modules())
    settings = [(m.__dict__, name) for m in modules if isinstance(m, nn.Conv2d) for name in _CONV_SETTINGS]
    return [slot for child in modules for slot in hook_slots(child)] + settings


_CONV_SETTINGS = ("stride", "padding", "dilation", "groups", "padding_mode")


def _planned(layer: nn.Module) -> tuple[FusedBlock, tuple] | None:
    """(plan, the op's arguments) for a block run_layers may send straight to the op: one with
    a `fused_plan()` (fastmb's, converted torchvision and timm blocks), in eval, without hooks."""
    fused_plan = getattr(layer, "fused_plan", None)
    if fused_plan is None or layer.training or has_hooks(layer):
        return None
    plan = fused_plan()
    arguments = plan.direct_arguments() if plan is not None else None
    return (plan, arguments) if arguments is not None else None


def _chain(layers: list[nn.Module], channels: int) -> list[tuple[FusedBlock, tuple]]:
    """(plan, arguments) of the blocks at the start of `layers` that the op can run one after
    another on an input of `channels` channels: each with a plan (_planned), each taking the
    previous one's output."""
    chain = []
    for layer in layers:
        planned = _planned(layer)
        if planned is None or planned[0].in_channels != channels:
            break
        chain.append(planned)
        channels = planned[0].out_channels
    return chain


def _call_chain(x: Tensor, arguments: tuple) -> Tensor:
    """fastmb::inverted_residual_chain on x with (tensors, settings, names, stem arguments)."""
    tensors, settings, names, stem_arguments = arguments
    if not stem_arguments:  # the stem reads the image in any layout
        x = x.contiguous(memory_format=torch.channels_last)
    return _CHAIN(x, tensors, settings, names, *stem_arguments)


_PREPARE_CHAIN = getattr(_extension.C, "prepare_chain", None)
_PREPARE_REPLAY = getattr(_extension.C, "prepare_replay", None)
_REPLAY = getattr(_extension.C, "replay", None)


def _run_prepared_chain(x: Tensor, arguments: tuple) -> Tensor:
    """_call_chain's op call with (prepared, with a stem) from fastmb._C.prepare_chain."""
    prepared, stem = arguments
    if not stem:
        x = x.contiguous(memory_format=torch.channels_last)
    return _extension.C.run_chain(prepared, x)


# Per prepared op call, its step in fastmb._C.prepare_replay's steps from its arguments (the
# head's call registers its own: classifier_head.py).
NATIVE_STEPS: dict[Callable, Callable[[tuple], tuple]] = {_run_prepared_chain: lambda arguments: ("chain", *arguments)}


def _native_replay(in_channels: int, steps: tuple) -> object | None:
    """Prepared `steps` as one fastmb._C.replay call (a capsule), or None where a step has no
    native form."""
    if _PREPARE_REPLAY is None or any(call not in NATIVE_STEPS for call, _ in steps):
        return None
    return _PREPARE_REPLAY(in_channels, [NATIVE_STEPS[call](arguments) for call, arguments in steps])


def _prepared(steps: tuple) -> tuple:
    """`steps` with each chain op call prepared once (fastmb._C.prepare_chain): a replay then
    skips the op's unboxing of its 165-odd optional tensors and the blocks' checks, 20 us hot
    and 45-60 us cold at batch 1."""
    if _PREPARE_CHAIN is None:
        return steps
    return tuple((_run_prepared_chain, (_PREPARE_CHAIN(*arguments), bool(arguments[3]))) if call is _call_chain else (call, arguments)
                 for call, arguments in steps)  # fmt: skip


class Program:
    """The op calls a forward of x made (steps: (call, arguments)) and the slots their checks
    read, for a ForwardMemo. Complete while each call took the previous one's output (the first
    x) and nothing else ran (run_layers says when a layer ran as a module)."""

    def __init__(self, x: Tensor) -> None:
        self.steps: list[tuple[Callable[[Tensor, tuple], Tensor], tuple]] = []
        self.slots: list[Slot] = []
        self.output = x  # the last call's
        self.complete = True

    def run(self, call: Callable[[Tensor, tuple], Tensor], x: Tensor, arguments: tuple, slots: list[Slot]) -> Tensor:
        """call(x, arguments), recorded."""
        if x is not self.output:
            self.complete = False
        self.output = call(x, arguments)
        self.steps.append((call, arguments))
        self.slots += slots
        return self.output


def _run_chain(x: Tensor, chain: list[tuple[FusedBlock, tuple]], stem: FusedStem | None, stem_arguments: tuple,
               program: Program | None) -> Tensor:  # fmt: skip
    """The blocks of `chain` (and the stem before them, or the stem alone) as one
    fastmb::inverted_residual_chain call."""
    parts = [plan.chained(arguments) for plan, arguments in chain]
    tensors = [t for part in parts for t in part[0]]
    settings = [v for part in parts for v in part[1]]
    names = [name for part in parts for name in part[2]]
    arguments = (tensors, settings, names, stem_arguments)
    if program is None:
        return _call_chain(x, arguments)
    plans = [plan for plan, _ in chain] + ([stem] if stem is not None else [])
    return program.run(_call_chain, x, arguments, [slot for plan in plans for slot in plan.watch_slots()])


def run_layers(layers: Iterable[nn.Module], x: Tensor, program: Program | None = None) -> Tensor:
    """x through `layers` in order. In eval on the CPU each run of consecutive blocks with plans
    is one op call (fastmb::inverted_residual_chain), their plans and never-stale checks made
    together just before it: per call, a block's checks and the framework's dispatch cost about
    as much as a small block's work at batch 1. No user code runs between the checks and the op.
    A stem first (stem_plan) goes into the same call when the first block can take it (its
    output computed as the block reads it), else into a call of its own. Other layers, and
    blocks with hooks, are called as modules and end a run. `program` gets the op calls and what
    they were planned from (ForwardMemo)."""
    layers = list(layers)
    if not NATIVE or not isinstance(x, Tensor) or x.dim() != 4 or not eval_op_applies(x, x.shape[1]):  # a Proxy: modules
        for layer in layers:
            x = layer(x)
        if program is not None:
            program.complete = False
        return x
    i, ran = 0, False
    stem = stem_plan(layers[0]) if layers else None
    if stem is not None and stem.takes(x):
        channels = stem.stem.conv.out_channels
        chain = _chain(layers[1:], channels)
        stem_arguments = stem.arguments()
        if stem_arguments is not None:
            if chain and chain[0][0].takes_a_stem(channels):
                x = _run_chain(x, chain, stem, stem_arguments, program)
            else:  # the stem alone (its patch GEMMs beat oneDNN's conv over 3 channels, 1.3-2x)
                x = _run_chain(x, [], stem, stem_arguments, program)
                x = _run_chain(x, chain, None, (), program) if chain else x
            i, ran = 1 + len(chain), True
    while i < len(layers):
        chain = _chain(layers[i:], x.shape[1])
        if chain and chain[0][0].takes(x):
            x, i, ran = _run_chain(x, chain, None, (), program), i + len(chain), True
        else:  # layers[i] has no plan, or its plan does not take x
            x, i = layers[i](x), i + 1
            if program is not None:
                program.complete = False
    if ran:
        dispatch.note_backend("cpu")
    return x


def global_hook_slots() -> list[Slot]:
    """The sizes of the global module hook dicts (has_hooks)."""
    return [(hooks, None) for hooks in (module_hooks._global_forward_hooks, module_hooks._global_forward_pre_hooks,
                                        module_hooks._global_backward_hooks, module_hooks._global_backward_pre_hooks)]  # fmt: skip


class ForwardMemo:
    """A forward that ran as op calls only (a complete Program), run again as those calls while
    nothing they were planned from has changed: one Watch over every slot the plans' checks read
    (2061 for V3-Large, in 1375 dicts: 42 us after a forward at batch 1), where the checks
    themselves took 0.25-0.35 ms of a 2.3 ms forward (Python, each read a cache miss after the
    op's weights passed).
    Kept on `owner` by memoized_forward; `key` is what the caller passed that the slots do not
    cover (the modules its forward was given). The watch covers owner's children too: where the
    key holds nothing else, replayed_forward may skip comparing it."""

    def __init__(self, program: Program, in_channels: int, key: tuple, owner: nn.Module) -> None:
        self.watch = Watch([*program.slots, *global_hook_slots(), *structure_slots([owner])])
        self.steps = tuple(program.steps)
        self.in_channels = in_channels
        self.key = key
        children = list(owner._modules.values())
        self.key_watched = all(item is None or any(item is child for child in children) for item in key)
        self._replay: tuple | None = None  # the steps _prepared, made at the first replay
        # The steps as one native call (_native_replay) and the watch's short check it runs
        # first: made again when the watch takes new dict versions.
        self._native: tuple[object, tuple] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_replay": None, "_native": None}  # capsules: prepared again after a copy or unpickling

    def __call__(self, x: Tensor, key: tuple) -> Tensor | None:
        """The forward's output, or None when the memo does not apply to x or anything changed.
        The native replay first: where it cannot tell (another backend or a block recording
        backends, a tensor subclass, a mode, a changed slot), these checks decide."""
        if key != self.key:
            return None
        native = self._native
        if native is not None and not torch.compiler.is_compiling():  # dynamo would break its graph at the call
            y = _REPLAY(native[0], native[1], x)
            if y is not None:
                return y
        if not eval_op_applies(x, self.in_channels) or not self.watch.unchanged():
            return None
        if self._replay is None:
            self._replay = _prepared(self.steps)
        check = self.watch.short_check()
        if check is not None and (native is None or native[1][1] is not check[1]):
            replay = _native_replay(self.in_channels, self._replay)
            self._native = (replay, check) if replay is not None else None
        # A dispatch mode (a FLOP counter, a logger) sees the op calls only through the dispatcher.
        for call, arguments in self.steps if _python_dispatch._get_current_dispatch_mode() is not None else self._replay:
            x = call(x, arguments)
        dispatch.note_backend("cpu")
        return x


def memoized_forward(owner: nn.Module, key: tuple, x: Tensor, forward: Callable[[Tensor, Program], Tensor]) -> Tensor:
    """forward(x, program): made again by owner's ForwardMemo (in owner.__dict__) while it
    applies, else run and, when it ran as op calls only, kept as the new memo."""
    memo = owner.__dict__.get("_fastmb_forward")
    if memo is not None:
        y = memo(x, key)
        if y is not None:
            return y
    program = Program(x)
    y = forward(x, program)
    memoized = program.complete and program.steps and y is program.output
    owner.__dict__["_fastmb_forward"] = ForwardMemo(program, x.shape[1], key, owner) if memoized else None
    return y


def replayed_forward(owner: nn.Module, x: Tensor) -> Tensor | None:
    """owner's memoized forward on x through its native replay alone, or None: the model's
    forward then builds its key and calls memoized_forward. First in a forward, before the
    key's attribute reads and the calls around the memo: at batch 1 those cost 20-35 us of a 3 ms
    V3-Large forward, each Python line out of cache after the weights went through."""
    memo = owner.__dict__.get("_fastmb_forward")
    if memo is None or memo._native is None or not memo.key_watched or torch.compiler.is_compiling():
        return None
    capsule, check = memo._native
    return _REPLAY(capsule, check, x)


if NATIVE:

    @torch.library.register_fake("fastmb::inverted_residual")
    def _fake(x, expand_weight, expand_bias, expand_activation, dw_weight, dw_scale, dw_shift, stride, padding, dilation,
              dw_activation, fc1_weight, fc1_bias, fc2_weight, fc2_bias, se_activation, se_gate, project_weight, project_bias,
              residual, project_activation="identity", stem_weight=None, stem_scale=None, stem_shift=None, stem_stride=(1, 1),
              stem_padding=(0, 0), stem_dilation=(1, 1), stem_activation="identity"):  # fmt: skip
        if stem_weight is not None:
            x = x.new_empty(conv_output_shape(x, stem_weight, stem_stride, stem_padding, stem_dilation))
        n, _, ho, wo = conv_output_shape(x, dw_weight, stride, padding, dilation)
        return x.new_empty(n, project_bias.shape[0], ho, wo).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("fastmb::inverted_residual_chain")
    def _fake_chain(x, tensors, settings, names, stem_weight=None, stem_scale=None, stem_shift=None, stem_stride=(1, 1),
                    stem_padding=(0, 0), stem_dilation=(1, 1), stem_activation="identity"):  # fmt: skip
        if stem_weight is not None:
            x = x.new_empty(conv_output_shape(x, stem_weight, stem_stride, stem_padding, stem_dilation))
            x = x.contiguous(memory_format=torch.channels_last)  # the output, with no blocks
        for block in range(len(tensors) // _CHAIN_TENSORS):
            dw_weight, project_bias = tensors[block * _CHAIN_TENSORS + 2], tensors[block * _CHAIN_TENSORS + 10]
            values = settings[block * _CHAIN_SETTINGS : (block + 1) * _CHAIN_SETTINGS]
            n, _, ho, wo = conv_output_shape(x, dw_weight, values[0:2], values[2:6], values[6:8])
            x = x.new_empty(n, project_bias.shape[0], ho, wo).contiguous(memory_format=torch.channels_last)
        return x
