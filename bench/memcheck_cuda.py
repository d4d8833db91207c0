"""One small forward + backward of every CUDA kernel variant (dtypes, kernel sizes, vector and
scalar channel paths, train and eval, both fused ops), for `compute-sanitizer --tool memcheck`
(bench/gpu_check.sh). Exits non-zero if a result breaks DESIGN.md's rule: its error against the
float64 CPU reference is at most twice the reference backend's in the same dtype on the GPU."""

import os
import sys
from collections.abc import Callable

import torch

import fastmb

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from oracle import assert_close_to_oracle  # noqa: E402

Case = tuple[Callable[..., torch.Tensor], list[torch.Tensor]]  # (op, differentiable inputs)


def dwconv_case(dtype: torch.dtype, kernel: int, channels: int, training: bool, shape: tuple[int, int, int] = (2, 9, 10)) -> Case:
    batch, height, width = shape
    x = torch.randn(batch, channels, height, width, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, 1, kernel, kernel, device="cuda", dtype=dtype)
    bn_weight, bn_bias = torch.rand(channels, device="cuda") + 0.5, torch.randn(channels, device="cuda")

    def op(x, weight, bn_weight, bn_bias):
        stats = torch.zeros_like(bn_weight), torch.ones_like(bn_weight)
        return fastmb.ops.dwconv_bn_act(x, weight, bn_weight, bn_bias, *stats, stride=2 if kernel == 5 else 1, training=training)

    return op, [x, weight, bn_weight, bn_bias]


def se_case(dtype: torch.dtype, channels: int) -> Case:
    x = torch.randn(2, channels, 5, 6, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    fc = [torch.randn(4, channels, device="cuda"), torch.randn(4, device="cuda"), torch.randn(channels, 4, device="cuda"), torch.randn(channels, device="cuda")]
    return fastmb.ops.squeeze_excitation, [x, *fc]


def results(backend: str, case: Case, oracle: bool = False) -> dict[str, torch.Tensor]:
    """Output and input gradients; `oracle`: every input in float64 on the CPU."""
    op, inputs = case
    leaves = [(t.detach().double().cpu() if oracle else t.detach().clone()).requires_grad_() for t in inputs]
    with fastmb.use_backend(backend):
        y = op(*leaves)
        grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
    return {"y": y, **{f"grad {i}": g for i, g in enumerate(grads)}}


def main() -> int:
    cases: dict[str, Callable[[], Case]] = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for channels in (16, 5):  # the 16-byte vector path and the scalar path
            for kernel in (3, 5, 7):
                for training in (True, False):
                    name = f"dwconv {dtype} k{kernel} c{channels} {'train' if training else 'eval'}"
                    cases[name] = lambda d=dtype, k=kernel, c=channels, t=training: dwconv_case(d, k, c, t)
            cases[f"se {dtype} c{channels}"] = lambda d=dtype, c=channels: se_case(d, c)
    # Enough output pixels (262144 strips of 4) that the reduction passes' threads take two
    # strips on an H200 (1056 blocks of 128 rows), so their per-thread merges run too.
    cases["dwconv bf16 k3 c16 train, 16x256x256"] = lambda: dwconv_case(torch.bfloat16, 3, 16, True, (16, 256, 256))
    # 72 bf16 channels: 9 vectors, blocks of 9 x 28 threads, a tree over rows of no power of two.
    for kernel in (3, 5):
        cases[f"dwconv bf16 k{kernel} c72 train, 4x28x28"] = lambda k=kernel: dwconv_case(torch.bfloat16, k, 72, True, (4, 28, 28))
    cases["se bf16 c72"] = lambda: se_case(torch.bfloat16, 72)
    failures = 0
    for name, make in cases.items():
        case = make()
        try:
            assert_close_to_oracle(results("cuda", case), results("reference", case), results("reference", case, True), case[1][0].dtype)
            print(f"ok   {name}", flush=True)
        except AssertionError as error:
            failures += 1
            print(f"FAIL {name}: {error}", flush=True)
    torch.cuda.synchronize()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
