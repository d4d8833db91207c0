"""`python -m fastmb check`: a short correctness check of every available fused backend on the
user's own device, against the reference in float64 (DESIGN.md's rule: at most twice plain
PyTorch's own error in the same dtype, plus a small floor). A CUDA device that passes is
recorded, and "auto" stops warning that fastmb's GPU kernels are unvalidated there."""

import json
import os
import time
from dataclasses import dataclass

import torch

from fastmb import dispatch

FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# (kernel, stride, dilation, activation): MobileNet's depthwise stages and the odd ones.
DWCONV_CASES = [(3, 1, 1, "hardswish"), (3, 2, 1, "relu"), (5, 1, 1, "relu6"), (5, 2, 1, "identity"), (7, 1, 2, "hardswish")]
SE_CASES = [("relu", "hardsigmoid"), ("hardswish", "sigmoid")]


@dataclass
class Row:
    backend: str
    case: str
    error: float  # max over the outputs and gradients, relative to each one's magnitude
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound


def validated_devices_file() -> str:
    cache = os.environ.get("FASTMB_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "fastmb"))
    return os.path.join(cache, "validated_devices.json")


def device_key(device: torch.device) -> str:
    """The GPU model, driver-independent: what a check validates."""
    return torch.cuda.get_device_name(device)


def validated_devices() -> set[str]:
    try:
        with open(validated_devices_file()) as file:
            return set(json.load(file))
    except (OSError, ValueError):
        return set()


def record_validated(device: torch.device) -> None:
    path = validated_devices_file()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as file:
        json.dump(sorted(validated_devices() | {device_key(device)}), file)


def _outputs(op, args: list, grad: torch.Tensor | None) -> list[torch.Tensor]:
    """The op's output and, given grad, the gradients of its tensor arguments that need one."""
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    y = op(*args)
    if grad is None:
        return [y.detach()]
    return [y.detach(), *torch.autograd.grad(y, tensors, grad.to(y.dtype))]


def _compare(backend: str, case: str, make_args, op, device: torch.device, dtype: torch.dtype) -> Row:
    """make_args(device, dtype, requires_grad) -> the op's arguments; the same values each call."""
    errors, bounds = [], []
    with dispatch.use_backend("reference"):  # plain PyTorch ops: the float64 oracle, and eager's own error
        shape = op(*make_args(torch.device("cpu"), torch.float64)).shape
        grad = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        oracle = _outputs(op, make_args(torch.device("cpu"), torch.float64), grad)
        eager = _outputs(op, make_args(device, dtype), grad.to(device))
    with dispatch.use_backend(backend):
        actual = _outputs(op, make_args(device, dtype), grad.to(device))
    for got, plain, expected in zip(actual, eager, oracle):
        scale = max(expected.abs().max().item(), 1.0)
        errors.append((got.double().cpu() - expected).abs().max().item() / scale)
        bounds.append((2 * (plain.double().cpu() - expected).abs().max().item() + FLOOR[dtype] * scale) / scale)
    worst = max(range(len(errors)), key=lambda i: errors[i] - bounds[i])
    return Row(backend, case, errors[worst], bounds[worst])


def _dwconv_args(kernel: int, stride: int, dilation: int, activation: str, training: bool):
    import fastmb

    def make(device: torch.device, dtype: torch.dtype) -> list:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 16, 11, 11, generator=g, dtype=torch.float64) * 2 + 0.5
        w = torch.randn(16, 1, kernel, kernel, generator=g, dtype=torch.float64)
        gamma, beta = torch.rand(16, generator=g, dtype=torch.float64) + 0.5, torch.randn(16, generator=g, dtype=torch.float64)
        mean, var = torch.randn(16, generator=g, dtype=torch.float64), torch.rand(16, generator=g, dtype=torch.float64) + 0.5
        tensors = [t.to(device, dtype).requires_grad_() for t in (x, w)] + [t.to(device).requires_grad_() for t in (gamma, beta)]
        return [*tensors, mean.to(device), var.to(device)]

    def op(x, w, gamma, beta, mean, var):
        return fastmb.ops.dwconv_bn_act(x, w, gamma, beta, mean.clone(), var.clone(), stride=stride, dilation=dilation,
                                        training=training, activation=activation)  # fmt: skip

    return make, op


def _se_args(activation: str, gate: str):
    import fastmb

    def make(device: torch.device, dtype: torch.dtype) -> list:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 16, 7, 7, generator=g, dtype=torch.float64)
        fc = [torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5 for shape in ((8, 16), (8,), (16, 8), (16,))]
        return [x.to(device, dtype).requires_grad_(), *(t.to(device).requires_grad_() for t in fc)]

    def op(x, w1, b1, w2, b2):
        return fastmb.ops.squeeze_excitation(x, w1, b1, w2, b2, activation=activation, gate=gate)

    return make, op


def run_check(device: torch.device) -> list[Row]:
    """Every fused backend available for `device` against the float64 reference."""
    backends = [b for b in ("cpu", "cuda", "triton") if dispatch.backends()[b] == dispatch.AVAILABLE and dispatch.serves(b, device.type)]
    dtypes = [torch.float32, torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32, torch.bfloat16]
    rows = []
    for backend in backends:
        for dtype in dtypes:
            if backend == "cpu" and dtype == torch.float16:
                continue
            name = str(dtype).removeprefix("torch.")
            for training in (True, False):
                for kernel, stride, dilation, activation in DWCONV_CASES:
                    make, op = _dwconv_args(kernel, stride, dilation, activation, training)
                    case = f"dwconv k{kernel} s{stride} d{dilation} {activation} {'train' if training else 'eval'} {name}"
                    rows.append(_compare(backend, case, make, op, device, dtype))
            for activation, gate in SE_CASES:
                make, op = _se_args(activation, gate)
                rows.append(_compare(backend, f"se {activation} {gate} {name}", make, op, device, dtype))
    return rows


def main(device: torch.device) -> int:
    """Prints the table; 0 when every row passes (a CUDA device is then recorded), 1 otherwise."""
    started = time.perf_counter()
    rows = run_check(device)
    if not rows:
        print(f"fastmb check: no fused backend is available for {device}: {dispatch.backends()}")
        return 1
    print(f"{'backend':<8}{'case':<44}{'error':>10}{'bound':>10}  ok")
    for row in rows:
        print(f"{row.backend:<8}{row.case:<44}{row.error:>10.2e}{row.bound:>10.2e}  {'ok' if row.ok else 'MISMATCH'}")
    failed = [row for row in rows if not row.ok]
    where = device_key(device) if device.type == "cuda" else "this CPU"
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed on {where} in {time.perf_counter() - started:.0f} s")
    if failed:
        return 1
    if device.type == "cuda":
        record_validated(device)
    return 0
