"""Backend registry and selection.

A backend is a set of kernels for the fused ops: "reference" (PyTorch ops, the correctness
oracle, runs anywhere), "cpu" and "cuda" (fastmb._C), "triton" (fastmb.kernels). Each fused op's
module (fastmb/ops/<op>.py) registers its operators here, and asks `select` for the forward
operator to call; the operator's registered autograd formula calls the same backend's backward.
"""

import contextlib
import functools
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fastmb import _extension

NAMES = ("reference", "cpu", "cuda", "triton")
AVAILABLE = "available"
# An entry of the measured table, not a backend: PyTorch's own kernels (cuDNN on a GPU), run as
# the op's composite, the eager modules' computation, where they measured faster than fastmb's.
PYTORCH = "pytorch"

# "auto" tries these, in order, for tensors of each device type; anything else, or nothing
# usable, runs the reference. For CUDA tensors the order is per op, from AUTO_ORDER_FILE.
_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
# Which GPU backend "auto" tries first for each fused op, or PYTORCH, as measured by
# bench/gpu_check.sh (it writes this table from its benchmarks; the results and the table are
# committed together).
AUTO_ORDER_FILE = os.path.join(os.path.dirname(__file__), "auto_order.json")


@dataclass(frozen=True)
class Kernel:
    """One backend's implementation of one fused op: a pair of operators with the op's schemas
    (fastmb/ops/schemas.py)."""

    forward: Callable  # called with the op's schema arguments
    backward: Callable
    supports: Callable[..., bool]  # the forward's arguments; False sends the call to the reference


_KERNELS: dict[tuple[str, str], Kernel] = {}
_default_backend = "auto"
_thread_state = threading.local()
_warned_device_types: set[str] = set()


def _always(*args: object) -> bool:
    return True


def register_kernel(
    backend: str, op: str, forward: Callable, backward: Callable, supports: Callable[..., bool] = _always
) -> None:
    """Makes the operator pair (forward, backward) fused op `op`'s kernels in `backend`."""
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {backend!r}")
    _KERNELS[(backend, op)] = Kernel(forward, backward, supports)
    _unavailable_reason.cache_clear()


def kernels(op: str) -> dict[str, Kernel]:
    """Fused op `op`'s kernels, by backend, in every backend that registered one."""
    return {backend: kernel for (backend, name), kernel in _KERNELS.items() if name == op}


def _has_kernels(backend: str) -> bool:
    return any(name == backend for name, _ in _KERNELS)


def _cuda_arch_mismatch() -> str | None:
    major, minor = torch.cuda.get_device_capability()
    built = [int(a) for a in _extension.C.cuda_archs.split(",") if a.isdigit()]
    if not built or any(a // 100 == major and a % 100 // 10 <= minor for a in built):
        return None
    return (
        f"fastmb._C was compiled for sm_{', sm_'.join(str(a // 10) for a in built)} but this GPU "
        f"is sm_{major}{minor}: rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}"
    )


@functools.cache
def _unavailable_reason(backend: str) -> str | None:
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda") and _extension.C is None:
        return _extension.LOAD_ERROR
    if backend == "cuda":
        if _extension.C.cuda_build != "built":
            return f"fastmb._C's CUDA kernels were {_extension.C.cuda_build}"
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as error:
            return f"triton cannot be imported ({error})"
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
    if not _has_kernels(backend):
        return f"this version of fastmb has no {backend} kernels yet"
    if backend == "cuda":
        return _cuda_arch_mismatch()
    return None


def backends() -> dict[str, str]:
    """Each backend name mapped to "available" or the reason it is not."""
    return {name: _unavailable_reason(name) or AVAILABLE for name in NAMES}


def _check_name(backend: str) -> None:
    if backend != "auto" and backend not in NAMES:
        raise ValueError(f"backend must be 'auto' or one of {NAMES}, got {backend!r}")
    reason = None if backend == "auto" else _unavailable_reason(backend)
    if reason is not None:
        raise RuntimeError(f"fastmb backend {backend!r} is not available: {reason}")


def _tell_replays(default_runs_cpu: bool | None = None, thread_runs_cpu: int | None = None, recording: int = 0) -> int:
    """Tells the models' native forward replays (fastmb._C.replay) what they cannot read from
    Python cheaply: whether the process-wide backend runs the CPU ops, this thread's use_backend
    choice (-1 none, 0 another backend, 1 auto or cpu), and record_backends blocks opened (+1)
    or closed (-1) in this thread. Returns this thread's previous choice."""
    return _extension.C.replay_backend(default_runs_cpu, thread_runs_cpu, recording) if _extension.C is not None else -1


def set_backend(backend: str) -> None:
    """Sets the process-wide backend: "auto" (fastest available per device) or a name."""
    global _default_backend
    _check_name(backend)
    _default_backend = backend
    _tell_replays(default_runs_cpu=backend in ("auto", "cpu"))


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Uses `backend` in this thread for the duration of the `with` block."""
    _check_name(backend)
    previous = getattr(_thread_state, "backend", None)
    _thread_state.backend = backend
    told = _tell_replays(thread_runs_cpu=int(backend in ("auto", "cpu")))
    try:
        yield
    finally:
        _thread_state.backend = previous
        _tell_replays(thread_runs_cpu=told)


def current_backend() -> str:
    return getattr(_thread_state, "backend", None) or _default_backend


def serves(backend: str, device_type: str) -> bool:
    """Whether `backend` runs tensors of `device_type` (the Triton interpreter runs CPU tensors)."""
    if backend == "triton":
        return device_type == "cuda" or (
            device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
        )
    return backend == device_type


def _usable(backend: str, op: str, device_type: str, args: tuple) -> Kernel | None:
    kernel = _KERNELS.get((backend, op))
    if kernel is None or _unavailable_reason(backend) or not serves(backend, device_type):
        return None
    return kernel if kernel.supports(*args) else None


@functools.cache
def auto_order(op: str, device_type: str) -> tuple[str, ...]:
    """The backends "auto" tries, in order, for fused op `op` on tensors of `device_type`."""
    if device_type == "cuda" and os.path.exists(AUTO_ORDER_FILE):
        with open(AUTO_ORDER_FILE) as file:
            measured = json.load(file)["order"].get(op)
        if measured:
            return tuple(measured)
    return _AUTO_ORDER.get(device_type, ())


def runs_pytorch(op: str, device_type: str, args: tuple) -> bool:
    """Whether "auto" runs fused op `op` on `args` as PyTorch's own ops: where the measured table
    ranks PYTORCH ahead of every fastmb backend that takes these arguments (GPUs only)."""
    if device_type != "cuda" or current_backend() != "auto":
        return False
    for chosen in auto_order(op, device_type):
        if chosen == PYTORCH:
            note_backend(PYTORCH)
            return True
        if _usable(chosen, op, device_type, args) is not None:
            return False
    return False


def select(op: str, device_type: str, args: tuple) -> Callable:
    """The forward operator that runs fused op `op` on `args` (the op's schema arguments)."""
    return select_kernel(op, device_type, args).forward


def select_kernel(op: str, device_type: str, args: tuple) -> Kernel:
    """The backend's kernels (forward and backward operators) that run fused op `op` on `args`."""
    backend = current_backend()
    chosen, kernel = backend, None
    if backend == "auto":
        for chosen in auto_order(op, device_type):
            kernel = _usable(chosen, op, device_type, args)
            if kernel is not None:
                break
        else:
            _warn_reference_once(device_type)
    elif backend != "reference":
        kernel = _usable(backend, op, device_type, args)
    if kernel is None:  # unsupported-but-valid input (a kernel size, a dtype, a device) runs the reference
        chosen, kernel = "reference", _KERNELS[("reference", op)]
    elif device_type == "cuda" and not torch.compiler.is_compiling():
        _warn_unvalidated_gpu(torch.cuda.current_device())
    note_backend(chosen)
    return kernel


def note_backend(backend: str) -> None:
    """Records, for record_backends, that a fused op's call ran on `backend`."""
    ran = getattr(_thread_state, "ran", None)
    if ran is not None:
        ran.add(backend)


@contextlib.contextmanager
def record_backends() -> Iterator[set[str]]:
    """Collects, in this thread, the backends that fused ops' calls ran on within the block."""
    previous, _thread_state.ran = getattr(_thread_state, "ran", None), set()
    _tell_replays(recording=1)
    try:
        yield _thread_state.ran
    finally:
        _thread_state.ran = previous
        _tell_replays(recording=-1)


# Per forward operator, its registered autograd formula as a plain torch.autograd.Function,
# which call() applies in eager: torch.library's per-call glue (filling the schema's defaults,
# redispatching) cost 35 us a call, a tenth of a small training layer's forward and backward.
_AUTOGRAD_FUNCTIONS: dict[Callable, type[torch.autograd.Function]] = {}


def register_autograd(forward_op: Callable, backward: Callable, setup_context: Callable) -> None:
    """torch.library.register_autograd(forward_op, backward, setup_context=setup_context), and
    the same formula as the autograd.Function that call() applies in eager."""
    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)

    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = forward_op(*args)
        setup_context(ctx, args, output)
        return output

    # OpOverload "dwconv_bn_act.default", a custom op's "fastmb_reference::dwconv_bn_act"
    name = getattr(forward_op, "__name__", None) or getattr(forward_op, "_qualname", "operator")
    methods = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    _AUTOGRAD_FUNCTIONS[forward_op] = type(f"{name.replace(':', '_').replace('.', '_')}_autograd", (torch.autograd.Function,), methods)


def autograd_function(forward_op: Callable) -> type[torch.autograd.Function] | None:
    """The autograd.Function call() applies for `forward_op` in eager, if one was registered."""
    return _AUTOGRAD_FUNCTIONS.get(forward_op)


def call(forward: Callable, args: tuple):
    """forward(*args), with its autograd formula where something needs a gradient; else below
    the autograd layer, where the registered (Python) autograd glue would only pass the call
    on, at a cost larger than a small kernel's."""
    if torch.compiler.is_compiling():
        return forward(*args)
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        function = _AUTOGRAD_FUNCTIONS.get(forward)
        return function.apply(*args) if function is not None else forward(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return forward(*args)


@functools.cache
def _warn_unvalidated_gpu(device: int) -> None:
    """Once per process and GPU: fastmb's GPU kernels have run on one GPU model only (an H200,
    whose full test suite did not finish there), so until `python -m fastmb check` passes on this
    GPU model, a call that runs them says so."""
    from fastmb.check import validated_devices

    name = torch.cuda.get_device_name(device)
    if name in validated_devices():
        return
    warnings.warn(
        f"fastmb: its CUDA and Triton kernels are not validated on {name} yet; run "
        "`python -m fastmb check --device cuda` (about a minute) to check them against the reference "
        "here (a pass is remembered), or use fastmb.set_backend(\"reference\") meanwhile.",
        RuntimeWarning,
        stacklevel=4,
    )


def _warn_reference_once(device_type: str) -> None:
    candidates = _AUTO_ORDER.get(device_type, ())
    if device_type in _warned_device_types or any(_unavailable_reason(c) is None for c in candidates):
        return
    _warned_device_types.add(device_type)
    reasons = "; ".join(f"{c}: {_unavailable_reason(c)}" for c in candidates) or "none serves it"
    warnings.warn(
        f"fastmb: no fused backend for {device_type} tensors ({reasons}); running the reference "
        "implementation (plain PyTorch ops). fastmb.backends() lists every backend's status.",
        RuntimeWarning,
        stacklevel=3,
    )
