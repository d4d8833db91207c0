"""The eager-PyTorch computations fastmb's ops replace, and DESIGN.md's accuracy rule.

The oracle is the eager computation in float64 on the CPU; a backend passes when its error
against the oracle is at most 2x the error of eager PyTorch in the same dtype, plus a small
absolute floor (flash-attention's rule)."""

import contextlib
import copy
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import torch
from torch import Tensor, nn

import fastmb
from fastmb.ops.activations import ACTIVATIONS, GATES

FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def eager_dwconv_bn_act(
    channels: int, kernel_size: int, stride: int = 1, dilation: int = 1, activation: str = "hardswish", momentum: float | None = 0.1
) -> nn.Sequential:
    """The eager module stack: depthwise Conv2d, BatchNorm2d, activation (torchvision's
    Conv2dNormActivation layout: children 0, 1, 2)."""
    padding = (kernel_size - 1) // 2 * dilation
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size, stride, padding, dilation, groups=channels, bias=False),
        nn.BatchNorm2d(channels, momentum=momentum),
        ACTIVATIONS[activation].make_module(inplace=False),
    )


class EagerSqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation, written out so the oracle needs no torchvision."""

    def __init__(self, channels: int, squeeze: int, activation: str = "relu", gate: str = "hardsigmoid") -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = ACTIVATIONS[activation].make_module(inplace=False)
        self.gate = GATES[gate].module()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.gate(self.fc2(self.activation(self.fc1(x.mean((2, 3), keepdim=True)))))
        return scale * x


def randomize_batch_norm(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """Non-trivial BN affine parameters and running statistics, so eval mode tests something."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                bn.weight.uniform_(0.5, 1.5, generator=generator)
                bn.bias.uniform_(-0.5, 0.5, generator=generator)
                bn.running_mean.uniform_(-0.5, 0.5, generator=generator)
                bn.running_var.uniform_(0.5, 2.0, generator=generator)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """The largest absolute difference, relative to the largest magnitude of `expected`."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def run(module: nn.Module, x: Tensor, grad: Tensor | None) -> dict[str, Tensor]:
    """Output, input grad, parameter grads and buffers of `module` on `x`, detached."""
    x = x.detach().clone().requires_grad_(grad is not None)
    module.zero_grad(set_to_none=True)
    y = module(x)
    results = {"y": y.detach()}
    if grad is not None:
        y.backward(grad.to(y.dtype))
        results["grad_x"] = x.grad
        results.update({f"grad_{name}": p.grad for name, p in module.named_parameters()})
    results.update({name: b.detach().clone() for name, b in module.named_buffers() if b.is_floating_point()})
    return results


def assert_close_to_oracle(
    actual: dict[str, Tensor], eager: dict[str, Tensor], oracle: dict[str, Tensor], dtype: torch.dtype, factor: float = 2.0
) -> None:
    """DESIGN.md's rule, entry by entry: |actual - oracle| <= factor * |eager - oracle| + floor,
    with the floor scaled by the oracle's magnitude."""
    assert actual.keys() == oracle.keys(), (actual.keys(), oracle.keys())
    for key, expected in oracle.items():
        expected = expected.double().cpu()
        got = actual[key]
        assert got.shape == expected.shape, f"{key}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
        error = (got.double().cpu() - expected).abs().max().item() if expected.numel() else 0.0
        eager_error = (eager[key].double().cpu() - expected).abs().max().item() if expected.numel() else 0.0
        scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
        bound = factor * eager_error + FLOOR[dtype] * scale
        assert error <= bound, f"{key}: max error {error:.3g} > {bound:.3g} (eager {dtype} error {eager_error:.3g})"


def assert_autocast_like_eager(model: nn.Module, eager: nn.Module, x: Tensor) -> None:
    """In eval under CPU bfloat16 autocast, `model`'s output has `eager`'s dtype and is within
    DESIGN.md's rule (the oracle: `eager` in float64); a forward made before autocast (a memo)
    neither applies inside it nor changes after it."""
    with torch.inference_mode():
        oracle = {"y": copy.deepcopy(eager).double()(x.double())}
        before = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual, expected = {"y": model(x)}, {"y": eager(x)}
        after = model(x)
    assert actual["y"].dtype == expected["y"].dtype == torch.bfloat16
    assert_close_to_oracle(actual, expected, oracle, torch.bfloat16)
    torch.testing.assert_close(after, before)


def clone_as(module: nn.Module, dtype: torch.dtype, memory_format: torch.memory_format = torch.contiguous_format) -> nn.Module:
    return copy.deepcopy(module).to(dtype=dtype, memory_format=memory_format)


def under_interpreter(backend: str, device: str) -> bool:
    """The Triton backend on CPU tensors: its kernels run in Triton's interpreter, one Python
    step per block, seconds a call (CI's Triton stage), so tests of CPU-kernel paths trim there."""
    return backend == "triton" and device == "cpu"


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to `count` for the block (the CPU ops' schedules
    depend on it)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_python(args: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python *args` in a child process that imports the fastmb this process tests (installed,
    or an in-place build): from a temporary working directory, which puts no checkout first on
    sys.path (in CI the checkout's fastmb has no compiled extension). Output captured as text."""
    path = [os.path.dirname(os.path.dirname(fastmb.__file__))] + [p or os.getcwd() for p in sys.path]
    child_env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run([sys.executable, *args], env=child_env, cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=timeout)
