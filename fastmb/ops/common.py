"""Argument checks and shape/layout rules shared by the fused ops and all their backends."""

import contextlib
import importlib
import math
import numbers
import operator
from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor
from torch._prims_common import suggest_memory_format

from fastmb import _extension, dispatch


def symbolic(x: object) -> bool:
    """Whether x is a torch.fx Proxy (torch.fx.symbolic_trace, torchvision's
    create_feature_extractor): the fused layers then call their modules, which the trace records
    as the standard modules they are."""
    return isinstance(x, torch.fx.Proxy)


# Frozen batch norms: an eval batch norm in training too, whose weight and bias are buffers, not
# parameters. torchvision's (its detection models' backbones with pretrained weights) stands where
# a BatchNorm2d would; timm's (timm.layers.freeze_batch_norm_2d) where a BatchNormAct2d would, and
# applies its act. Told by class name and module, so that nothing imports torchvision or timm.
_TORCHVISION_FROZEN = ("torchvision.ops.misc", "FrozenBatchNorm2d")
_TIMM_FROZEN = ("timm.layers.norm_act", "FrozenBatchNormAct2d")


def frozen_batch_norm(module: object) -> bool:
    """Whether `module` is a frozen batch norm, torchvision's or timm's (one lookup: the fused
    layers ask on every call)."""
    cls = type(module)
    return (cls.__module__, cls.__name__) in (_TORCHVISION_FROZEN, _TIMM_FROZEN)


def torchvision_frozen_batch_norm(module: object) -> bool:
    """Whether `module` is torchvision's FrozenBatchNorm2d (a batch norm without activation)."""
    cls = type(module)
    return (cls.__module__, cls.__name__) == _TORCHVISION_FROZEN


def timm_frozen_batch_norm(module: object) -> bool:
    """Whether `module` is timm's FrozenBatchNormAct2d (with its act and drop, as BatchNormAct2d)."""
    cls = type(module)
    return (cls.__module__, cls.__name__) == _TIMM_FROZEN


def fused_norm(bn: object) -> bool:
    """Whether `bn` is a batch norm the fused stages compute: exactly a BatchNorm2d or SyncBatchNorm
    (a subclass may compute otherwise), or torchvision's FrozenBatchNorm2d."""
    return type(bn) in (torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm) or torchvision_frozen_batch_norm(bn)


def batch_norm_affine(bn: torch.nn.Module) -> dict:
    """The dict that holds a batch norm's weight and bias: its parameters, a frozen one's buffers."""
    return bn._buffers if frozen_batch_norm(bn) else bn._parameters


def batch_norm_channels(bn: torch.nn.Module) -> int:
    """How many channels a BatchNorm2d, SyncBatchNorm or FrozenBatchNorm2d normalises."""
    return bn.num_features if not frozen_batch_norm(bn) else bn._buffers["running_var"].shape[0]


def check_tensor(name: str, value: object, ndim: int | tuple[int, ...]) -> Tensor:
    """`value` must be a floating-point tensor with `ndim` dimensions (one of them)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if value.dim() not in allowed:
        shapes = " or ".join(f"{d}-D" for d in allowed)
        raise ValueError(f"{name} must be {shapes}, got a {value.dim()}-D tensor of shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def check_optional_vector(name: str, value: object, length: int, what: str) -> Tensor | None:
    """`value` is None or a floating-point vector of `length` (`what` says where it comes from)."""
    if value is None:
        return None
    check_tensor(name, value, 1)
    if value.shape[0] != length:
        raise ValueError(f"{name} must have {length} elements ({what}), got {value.shape[0]}")
    return value


def check_same_device(x: Tensor, **others: Tensor | None) -> None:
    for name, tensor in others.items():
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}; move them to one device")


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


_INT64_MAX = 2**63 - 1


def integer(name: str, value: object, minimum: int) -> int:
    """An integer (any type with __index__: int, numpy's, a 0-d integer tensor; not bool) from
    `minimum` up to int64's limit, as conv sizes are."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = operator.index(value)
    if not minimum <= value <= _INT64_MAX:
        raise ValueError(f"{name} must be at least {minimum} (and fit in 64 bits), got {value}")
    return value


def pair(name: str, value: int | Sequence[int], minimum: int) -> list[int]:
    """An integer or a pair of them, each at least `minimum`, as [h, w]."""
    values = list(value) if isinstance(value, (tuple, list)) else [value, value]
    if len(values) != 2:
        raise TypeError(f"{name} must be an integer or a pair of integers, got {value!r}")
    return [integer(name, v, minimum) for v in values]


def conv_padding(name: str, value: int | Sequence[int]) -> list[int]:
    """A conv padding as the ops take it: an integer or [h, w] pair padding both sides alike, or
    [top, bottom, left, right] (asymmetric, as timm's "same" padding needs at stride 2)."""
    if isinstance(value, (tuple, list)) and len(value) == 4:
        return [integer(name, v, 0) for v in value]
    if isinstance(value, (tuple, list)) and len(value) != 2:
        raise TypeError(f"{name} must be an integer, an [h, w] pair or [top, bottom, left, right], got {value!r}")
    return pair(name, value, 0)


def padding_sides(padding: Sequence[int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a padding conv_padding returned."""
    return tuple(padding) if len(padding) == 4 else (padding[0], padding[0], padding[1], padding[1])


def real(name: str, value: object, minimum: float = -math.inf) -> float:
    """A finite real number (not bool) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
    return float(value)


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, biased_var: Tensor, count: float | Tensor, momentum: float
) -> None:
    """nn.BatchNorm2d's running-statistics update from a batch's mean and biased variance over
    `count` values per channel: the running variance takes the unbiased one."""
    # This runs for every fused layer in every training step: lerp_, (1 - momentum) * running +
    # momentum * batch, is one call per buffer, and detached inputs need no no_grad block.
    if isinstance(count, Tensor):
        count = count.detach()
    running_mean.lerp_(mean.detach().to(running_mean.dtype), momentum)
    running_var.lerp_((biased_var.detach() * (count / (count - 1))).to(running_var.dtype), momentum)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def conv_output_size(size: int, kernel: int, stride: int, padding_total: int, dilation: int) -> int:
    return (size + padding_total - dilation * (kernel - 1) - 1) // stride + 1


def conv_output_shape(
    x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> tuple[int, int, int, int]:
    """(N, C_out, H_out, W_out) of a conv of x (N, C, H, W) with weight (C_out, C_in / groups,
    kH, kW): a depthwise conv's C_out is C."""
    n, _, h, w = x.shape
    top, bottom, left, right = padding_sides(padding)
    return (
        n,
        weight.shape[0],
        conv_output_size(h, weight.shape[2], stride[0], top + bottom, dilation[0]),
        conv_output_size(w, weight.shape[3], stride[1], left + right, dilation[1]),
    )


def memory_format(x: Tensor) -> torch.memory_format:
    """The layout outputs take: channels_last for NHWC-strided inputs, as ATen's conv does."""
    return suggest_memory_format(x)


def new_output(shape: Sequence[int], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised output in `like`'s memory format (canonical strides, so that fake and
    real implementations agree)."""
    fmt = memory_format(like) if len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


def bn_affine(bn_weight: Tensor | None, bn_bias: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
    """(gamma, beta) in `like`'s dtype and device; None means ones and zeros, as affine=False."""
    c = like.shape[0]
    gamma = like.new_ones(c) if bn_weight is None else bn_weight.to(like.dtype)
    beta = like.new_zeros(c) if bn_bias is None else bn_bias.to(like.dtype)
    return gamma, beta


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in and keep statistics in: fp32 for fp16/bf16."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _onnx_export_flag() -> Callable[[], bool]:
    """torch.onnx.is_in_onnx_export, without the two imports it makes on every call (a
    microsecond, on every fused op call) where this torch has the flags it reads."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

        return lambda: _flags._is_onnx_exporting or GLOBALS.in_onnx_export
    except ImportError:
        return torch.onnx.is_in_onnx_export


_in_onnx_export = _onnx_export_flag()


def runs_composite(*tensors: Tensor | None) -> bool:
    """Whether a fused op runs as its composite of differentiable PyTorch ops (no custom op):
    during ONNX export (the graph then holds standard ONNX ops) and torch.jit.trace (a trace
    loads without fastmb, as torchvision's does; the whole-block calls' string lists do not
    trace), under torch.func transforms and with forward-mode AD tangents (the custom ops have
    no rules for those)."""
    # Dynamo traces torch.onnx.is_in_onnx_export, not the flags it reads.
    exporting = torch.onnx.is_in_onnx_export() if torch.compiler.is_compiling() else _in_onnx_export() or torch._C._is_tracing()
    if exporting or torch._C._are_functorch_transforms_active():
        return True
    return forward_ad._current_level >= 0 and any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def differentiable_grads(
    function: Callable[..., Tensor], inputs: tuple[Tensor | None, ...], needs: Sequence[bool], grad_output: Tensor
) -> list[Tensor | None]:
    """The gradients of function(*inputs) for the inputs marked in `needs`, with a graph of their
    own (create_graph): the double backward of the fused ops, through their composites."""
    wanted = [i for i, (t, need) in enumerate(zip(inputs, needs)) if need and t is not None]
    with torch.enable_grad():
        output = function(*inputs)
    grads = torch.autograd.grad(output, [inputs[i] for i in wanted], grad_output, create_graph=True, allow_unused=True)
    result: list[Tensor | None] = [None] * len(inputs)
    for i, grad in zip(wanted, grads):
        result[i] = grad if grad is not None else torch.zeros_like(inputs[i])
    return result


def cpu_kernels_support(x: Tensor, *args: object) -> bool:
    """What fastmb._C's CPU kernels take: float32, float64 and bfloat16 (float16 runs on the
    reference); any kernel size, stride and dilation."""
    return x.dtype in (torch.float32, torch.float64, torch.bfloat16)


def register_backends(
    op: str,
    register_operators: Callable[..., None],
    reference_ops: tuple[Callable, Callable],
    cuda_supports: Callable[..., bool],
) -> None:
    """Each backend's (forward, backward) operator pair for `op`, given to `register_operators`
    (the op's fakes and autograd formula) and to the dispatcher: the reference always; fastmb._C's
    native operators (`op` and `op`_backward: CPU and CUDA kernels) where it was built; the Triton
    operators (fastmb.kernels.`op`) where triton imports."""
    register_operators(*reference_ops)
    dispatch.register_kernel("reference", op, *reference_ops)
    if _extension.C is not None:
        native = (getattr(torch.ops.fastmb, op).default, getattr(torch.ops.fastmb, f"{op}_backward").default)
        register_operators(*native)
        if _extension.has_kernel(op, "CPU"):
            dispatch.register_kernel("cpu", op, *native, supports=cpu_kernels_support)
        if _extension.has_kernel(op, "CUDA"):
            dispatch.register_kernel("cuda", op, *native, supports=cuda_supports)
    try:
        kernels = importlib.import_module(f"fastmb.kernels.{op}")
    except ModuleNotFoundError as error:  # no triton (fastmb.backends() says so), or a bare source tree
        if error.name not in ("triton", "fastmb.kernels"):
            raise
    else:
        register_operators(kernels.forward, kernels.backward, fake=False)  # triton_op brings its fake
        dispatch.register_kernel("triton", op, kernels.forward, kernels.backward, supports=kernels.supports)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts conv inputs to on `device_type`, or None when it is off."""
    # CPU and CUDA have autocast: torch.compile in torch 2.11 cannot trace is_autocast_available.
    available = device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type)
    if available and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Disables autocast inside an implementation that chooses its own precisions."""
    if autocast_dtype(device_type) is not None:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
