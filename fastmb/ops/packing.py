"""What the whole-block CPU ops (fastmb::inverted_residual, fastmb::classifier_head) share: when
they may run, and their arguments packed once from the modules' current tensors and packed
again whenever any of them changes, so an op never runs with stale weights."""

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

from fastmb import _extension, dispatch
from fastmb.ops.common import batch_norm_affine, batch_norm_channels, fused_norm, runs_composite, torchvision_frozen_batch_norm

PANEL = 16  # output channels per packed 1x1 weight panel (csrc/cpu/pointwise/kernels.h)


def eval_op_applies(x: Tensor, in_channels: int) -> bool:
    """Whether a whole-block eval op may take x: no autograd, a float32 (N, in_channels, H, W)
    CPU tensor, outside CPU autocast (the ops compute in float32; the modules' convs would run in
    the autocast dtype), the auto or cpu backend chosen, not traced (compile, export, torch.func).
    x.is_cpu and x.size(1), not x.device.type and x.shape[1]: those build Python objects, and
    right after a forward (the interpreter's lines out of cache) took 6-7 us more at batch 1."""
    return (
        not torch.is_grad_enabled()
        and isinstance(x, Tensor)  # not a torch.fx Proxy
        and x.is_cpu
        and not torch.is_autocast_enabled("cpu")
        and x.dtype == torch.float32
        and x.dim() == 4
        and x.size(1) == in_channels
        and dispatch.current_backend() in ("auto", "cpu")
        and not torch.compiler.is_compiling()
        and not runs_composite(x)
    )


def plain_batch_norm(bn: nn.Module, channels: int) -> bool:
    """An eval-capable batch norm over `channels` with affine parameters and running statistics
    (torchvision's FrozenBatchNorm2d is one)."""
    if torchvision_frozen_batch_norm(bn):
        return batch_norm_channels(bn) == channels
    return (
        fused_norm(bn)
        and bn.num_features == channels
        and bn.affine
        and bn.track_running_stats
        and bn.running_var is not None
    )


def plain_1x1_conv(conv: nn.Module) -> bool:
    """A 1x1 nn.Conv2d without stride, padding, dilation or groups (an SE block's FC layers as
    the ops compute them)."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )


def pointwise_conv(conv: nn.Module) -> bool:
    """A plain_1x1_conv without bias."""
    return plain_1x1_conv(conv) and conv.bias is None


def depthwise_conv(conv: nn.Module, types: tuple[type, ...] = (nn.Conv2d,)) -> bool:
    """A conv of one of `types` with a group per channel, no bias and numeric zero padding: what
    the depthwise ops compute (its settings may have been changed since it was converted)."""
    return (
        type(conv) in types
        and conv.bias is None
        and conv.groups == conv.in_channels == conv.out_channels
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def conv_bn_slots(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> list[tuple[dict, str]]:
    """Where the conv's weight and the batch norm's parameters and statistics are held: the
    modules' own dicts and keys, so a tensor replaced since (a new nn.Parameter) is read there."""
    affine = batch_norm_affine(bn)
    return [(conv._parameters, "weight"), (affine, "weight"), (affine, "bias"), (bn._buffers, "running_mean"),
            (bn._buffers, "running_var")]  # fmt: skip


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """The eval batch norm as a per-channel scale and shift, computed in float64."""
    scale = bn.weight.double() * torch.rsqrt(bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale


def pack_panels(weight: Tensor) -> Tensor:
    """An (out, in) 1x1 conv weight as the ops' GEMM reads it: (ceil(out / 16), in, 16), panels of
    16 output channels, zero-padded, in the weight's dtype."""
    out_channels, in_channels = weight.shape
    padded = weight.new_zeros(-(-out_channels // PANEL) * PANEL, in_channels)
    padded[:out_channels] = weight
    return padded.view(-1, PANEL, in_channels).transpose(1, 2).contiguous()


def fold_and_pack(conv: nn.Conv2d, bn: nn.BatchNorm2d, output_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A 1x1 conv's weight with its batch norm (and a per-channel scale of its output) folded in
    (in float64), packed as the ops' GEMM reads it (pack_panels), in float32; and the bias."""
    scale, shift = bn_scale_shift(bn)
    if output_scale is not None:
        scale, shift = scale * output_scale.double(), shift * output_scale.double()
    weight = conv.weight.double().flatten(1) * scale[:, None]
    return pack_panels(weight).float(), shift.float().contiguous()


Plan = TypeVar("Plan")
# Where a value a plan depends on is held: (a dict, a key), the value at key (a module's parameter,
# child, setting: `module.__dict__`); (a dict, None), the dict's size (a module's hooks).
Slot = tuple[dict, str | None]


def _python_slot_stamps(slots: Sequence[Slot], tensor_slots: int) -> tuple:
    stamps: list[int] = []
    for i, (holder, key) in enumerate(slots):
        if not isinstance(holder, dict):
            raise TypeError(f"slot_stamps: slot {i} must be a (dict, key) tuple")
        value = holder.get(key) if key is not None else None
        stamps.append(len(holder) if key is None else id(value) if key in holder else 0)
        if i < tensor_slots:
            stamps += [value.data_ptr(), value._version] if isinstance(value, Tensor) else [0, 0]
    return tuple(stamps)


# What the slots hold, in one value compared at once: fastmb._C's, one C loop (a forward's checks
# as Python reads took 0.25-0.35 ms at batch 1: every read a cache miss after the op's weights).
slot_stamps: Callable[[Sequence[Slot], int], object] = getattr(_extension.C, "slot_stamps", _python_slot_stamps)
# Each dict's version (PEP 509: CPython 3.11-3.13 give a dict a new one at every change to it), or
# None (3.14, or no extension: a Watch then reads every slot); and each tensor's data address and
# version counter, read only where there are versions.
dict_versions: Callable[[Sequence[dict]], object] = getattr(_extension.C, "dict_versions", lambda dicts: None)
tensor_stamps: Callable[[Sequence[Tensor]], object] | None = getattr(_extension.C, "tensor_stamps", None)


class Watch:
    """Slots as they hold now: `unchanged()` says whether they still hold the same objects (and
    tensors the same data and version) and dicts the same sizes. Keeps the values, so that no
    address is taken by another object while watched."""

    __slots__ = ("slots", "_tensor_slots", "_values", "_stamps", "_dicts", "_versions", "_tensors", "_tensor_stamps")

    def __init__(self, slots: Iterable[Slot]) -> None:
        unique = list({(id(holder), key): (holder, key) for holder, key in slots}.values())
        tensors = [slot for slot in unique if slot[1] is not None and isinstance(slot[0].get(slot[1]), Tensor)]
        others = [slot for slot in unique if slot[1] is None or not isinstance(slot[0].get(slot[1]), Tensor)]
        self.slots, self._tensor_slots = (*tensors, *others), len(tensors)  # slot_stamps reads the values of the first only
        self._values = [holder.get(key) for holder, key in self.slots if key is not None]
        self._stamps = slot_stamps(self.slots, self._tensor_slots)
        self._dicts = tuple({id(holder): holder for holder, _ in self.slots}.values())
        self._tensors = tuple(holder[key] for holder, key in tensors)
        self._versions = dict_versions(self._dicts)
        self._tensor_stamps = tensor_stamps(self._tensors) if self._versions is not None else None

    def unchanged(self) -> bool:
        # While no watched dict has a new version, every slot holds what it held: only the tensors'
        # data and versions are read. V3-Large's 2061 slots in 1375 dicts, after a forward at batch
        # 1: 42 us against 116 (each slot's reads are cache misses once the weights have passed).
        versions = dict_versions(self._dicts)
        if versions is not None and versions == self._versions:
            return tensor_stamps(self._tensors) == self._tensor_stamps
        if slot_stamps(self.slots, self._tensor_slots) != self._stamps:
            return False
        self._versions = versions  # a dict changed elsewhere than the slots: the short check again next time
        return True

    def short_check(self) -> tuple | None:
        """What unchanged() compares while no watched dict changes: (dicts, their versions,
        tensors, their stamps), or None where the interpreter keeps no dict versions. The
        versions are taken again when a dict changed elsewhere than the slots (a new object)."""
        return (self._dicts, self._versions, self._tensors, self._tensor_stamps) if self._versions is not None else None


def mode_slots(modules: Iterable[nn.Module]) -> list[Slot]:
    """The modules' `training` flags."""
    return [(module.__dict__, "training") for module in modules]


def hook_slots(module: nn.Module) -> list[Slot]:
    """The sizes of the module's hook dicts (has_hooks: a hook added or removed)."""
    return [(module.__dict__[name], None) for name in _HOOKS]


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def structure_slots(modules: Iterable[nn.Module]) -> list[Slot]:
    """Where the modules' children and activation settings are held (their `_modules` entries
    and count, `activation` and `gate` where they have them), so that a swapped layer or a
    changed activation makes a plan again."""
    slots: list[Slot] = []
    for module in modules:
        children, attributes = module._modules, module.__dict__
        if children:
            slots += [(children, None), *((children, name) for name in children)]
        slots += [(attributes, name) for name in ("activation", "gate") if name in attributes]
    return slots


def cached_plan(module: nn.Module, name: str, slots: Callable[[], list[Slot]], build: Callable[[], Plan], key: tuple = ()) -> Plan:
    """The plan (a PackedArguments, or None) kept in module.__dict__[name], made again by build()
    when a slot it was made from (slots(): structure_slots of its modules) holds something else,
    or `key` differs. The plan's `structure` says where it is kept and what it was made from."""
    cached = module.__dict__.get(name)
    if cached is None or cached[1] != key or not cached[0].unchanged():
        watch, plan = Watch(slots()), build()
        if plan is not None:
            plan.structure = [*watch.slots, (module.__dict__, name)]
        cached = module.__dict__[name] = (watch, key, plan)
    return cached[2]


def _detached(value: object) -> object:
    """value with its tensors (in lists and tuples too) detached: a view of a parameter made under
    no_grad fails copy.deepcopy of its model once the parameter has changed in place."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(item) for item in value)
    return value


class PackedArguments:
    """An op's arguments packed from modules' tensors: subclasses say which tensors and settings
    they are made from, and how they are packed."""

    def __init__(self) -> None:
        self._watch: Watch | None = None
        self._arguments: tuple = ()
        self._slots: list[Slot] | None = None
        self._tensor_count = 0
        self.structure: list[Slot] = []  # set by cached_plan

    def tensor_slots(self) -> list[Slot]:
        """Where each tensor the arguments are packed from is held: (a module's _parameters or
        _buffers, key)."""
        raise NotImplementedError

    def setting_slots(self) -> list[Slot]:
        """Where anything else the packed arguments depend on is held (eps, strides)."""
        return []

    def modes(self) -> list[nn.Module]:
        """The modules that must be in eval for the op to run."""
        return []

    def pack(self) -> tuple:
        raise NotImplementedError

    def arguments(self) -> tuple | None:
        """The packed arguments, packed again if any tensor was replaced or changed (its pointer
        or version counter) or a setting changed; None when a tensor is absent, not float32 on the
        CPU, or an inference tensor (made under torch.inference_mode: it has no version counter, so an
        in-place change could not be seen)."""
        if self._watch is None or not self._watch.unchanged():  # at batch 1 this check runs for every block on every call
            if self._slots is None:
                tensor_slots = self.tensor_slots()
                self._tensor_count, self._slots = len(tensor_slots), tensor_slots + self.setting_slots()
            # absent: moved out of _parameters since the plan was made (a parametrization)
            tensors = [holder.get(name) for holder, name in self._slots[: self._tensor_count]]
            if any(not isinstance(t, Tensor) or t.dtype != torch.float32 or t.device.type != "cpu" or t.is_inference() for t in tensors):
                return None
            with torch.no_grad():
                self._arguments = _detached(self.pack())
            self._watch = Watch(self._slots)
        return self._arguments

    def watch_slots(self) -> list[Slot]:
        """Every slot the plan's op arguments depend on (after arguments()): its structure, its
        tensors and settings, its modules' modes."""
        watched = self._watch.slots if self._watch is not None else ()
        return [*self.structure, *watched, *mode_slots(self.modes())]

    def run(self, op, x: Tensor) -> Tensor | None:
        """op(x, *arguments) on the cpu backend, x channels_last (converted once where it is not:
        the ops' outputs are channels_last, so the next block takes them as they are); None
        where the arguments cannot be packed."""
        arguments = self.arguments()
        if arguments is None:
            return None
        dispatch.note_backend("cpu")
        return op(x.contiguous(memory_format=torch.channels_last), *arguments)
