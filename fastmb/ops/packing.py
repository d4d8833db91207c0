"""What the whole-block CPU ops (fastmb::inverted_residual, fastmb::classifier_head) share: when
they may run, and their arguments packed once from the modules' current tensors and packed
again whenever any of them changes, so an op never runs with stale weights."""

import operator
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor, nn

from fastmb import _extension, dispatch
from fastmb.ops.common import runs_composite

PANEL = 16  # output channels per packed 1x1 weight panel (csrc/cpu/pointwise/kernels.h)


def eval_op_applies(x: Tensor, in_channels: int) -> bool:
    """Whether a whole-block eval op may take x: no autograd, a float32 (N, in_channels, H, W)
    CPU tensor, the auto or cpu backend chosen, not traced (compile, export, torch.func)."""
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and x.shape[1] == in_channels
        and dispatch.current_backend() in ("auto", "cpu")
        and not torch.compiler.is_compiling()
        and not runs_composite(x)
    )


def plain_batch_norm(bn: nn.Module, channels: int) -> bool:
    """An eval-capable batch norm over `channels` with affine parameters and running statistics."""
    return (
        type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm)
        and bn.num_features == channels
        and bn.affine
        and bn.track_running_stats
        and bn.running_var is not None
    )


def pointwise_conv(conv: nn.Module) -> bool:
    """A 1x1 nn.Conv2d without bias, stride, padding, dilation or groups."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.bias is None
    )


def conv_bn_slots(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> list[tuple[dict, str]]:
    """Where the conv's weight and the batch norm's parameters and statistics are held: the
    modules' own dicts and keys, so a tensor replaced since (a new nn.Parameter) is read there."""
    return [(conv._parameters, "weight"), (bn._parameters, "weight"), (bn._parameters, "bias"), (bn._buffers, "running_mean"),
            (bn._buffers, "running_var")]  # fmt: skip


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """The eval batch norm as a per-channel scale and shift, computed in float64."""
    scale = bn.weight.double() * torch.rsqrt(bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale


def fold_and_pack(conv: nn.Conv2d, bn: nn.BatchNorm2d, output_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A 1x1 conv's weight with its batch norm (and a per-channel scale of its output) folded in
    (in float64), packed as the ops' GEMM reads it: (ceil(out / 16), in, 16), panels of 16
    output channels, zero-padded; and the bias."""
    scale, shift = bn_scale_shift(bn)
    if output_scale is not None:
        scale, shift = scale * output_scale.double(), shift * output_scale.double()
    weight = conv.weight.double().flatten(1) * scale[:, None]
    out_channels, in_channels = weight.shape
    padded = weight.new_zeros(-(-out_channels // PANEL) * PANEL, in_channels)
    padded[:out_channels] = weight
    packed = padded.view(-1, PANEL, in_channels).transpose(1, 2).float().contiguous()
    return packed, shift.float().contiguous()


_VERSION = operator.attrgetter("_version")
Plan = TypeVar("Plan")


def _python_tensor_stamps(tensors: list[Tensor]) -> tuple:
    return (*map(Tensor.data_ptr, tensors), *map(_VERSION, tensors))


# Each tensor's data address and version counter, in one value compared at once: fastmb._C's, one
# C loop (the checks of V3-Small's 196 tensors took 29 us at batch 1 as Python attribute reads).
tensor_stamps: Callable[[list[Tensor]], object] = getattr(_extension.C, "tensor_stamps", _python_tensor_stamps)


def cached_plan(module: nn.Module, name: str, key: tuple, build: Callable[[], Plan]) -> Plan:
    """The plan kept in module.__dict__[name], made again by build() when `key` (what it was made
    from: modules, their settings) differs from the one it was made for."""
    cached = module.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = module.__dict__[name] = (key, build())
    return cached[1]


class PackedArguments:
    """An op's arguments packed from modules' tensors: subclasses say which tensors and settings
    they are made from, and how they are packed."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._arguments: tuple = ()
        self._slots: list[tuple[dict, str]] | None = None

    def tensor_slots(self) -> list[tuple[dict, str]]:
        """Where each tensor the arguments are packed from is held: (a module's _parameters or
        _buffers, key)."""
        raise NotImplementedError

    def settings(self) -> tuple:
        """Anything else the packed arguments depend on (eps, strides): compared, not hashed."""
        return ()

    def pack(self) -> tuple:
        raise NotImplementedError

    def arguments(self) -> tuple | None:
        """The packed arguments, packed again if any tensor was replaced or changed (its pointer
        or version counter) or a setting changed; None when a tensor is not float32 on the CPU."""
        if self._slots is None:
            self._slots = self.tensor_slots()
        tensors = [holder[name] for holder, name in self._slots]
        key = (tensor_stamps(tensors), *self.settings())  # at batch 1 this check runs for every block on every call
        if key != self._key:
            if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
                return None
            with torch.no_grad():
                self._arguments = self.pack()
            self._key = key
        return self._arguments

    def run(self, op, x: Tensor) -> Tensor | None:
        """op(x, *arguments) on the cpu backend, x channels_last (converted once where it is not:
        the ops' outputs are channels_last, so the next block takes them as they are); None
        where the arguments cannot be packed."""
        arguments = self.arguments()
        if arguments is None:
            return None
        dispatch.note_backend("cpu")
        return op(x.contiguous(memory_format=torch.channels_last), *arguments)
