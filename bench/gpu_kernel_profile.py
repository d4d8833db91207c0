"""Where a fused op's GPU time goes, kernel by kernel: torch.profiler's CUDA time per kernel for
eager PyTorch and each fastmb GPU backend, eval and train (forward + backward), at a few of
MobileNetV3-Large's depthwise stages and SE blocks (batch 256, bf16, channels_last). The
benchmarks give each provider's total; this says which pass of a slow one to work on. First, the
host's side of the whole model at batch 1 (where launches bound it): the Python functions with
the most time in a forward, torchvision's and fastmb's.

    python bench/gpu_kernel_profile.py [--runs 5] [--rows 8]
"""

import argparse
import cProfile
import io
import os
import pstats
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests")]

import fastmb  # noqa: E402
from oracle import EagerSqueezeExcitation, eager_dwconv_bn_act  # noqa: E402
from providers import provider_module, step  # noqa: E402
from shapes import mobilenet_v3_large_blocks  # noqa: E402
from test_models_gpu import model_for  # noqa: E402

BATCH = 256
# The stages where the kernels lost most and least on 2026-12-04's H200 run.
DWCONV_STAGES = ("C72-k3-s1-56x56-relu", "C72-k5-s2-56x56-relu", "C672-k3-s1-14x14-hardswish", "C960-k5-s1-7x7-hardswish")
SE_BLOCKS = ("C72-S24-28x28", "C672-S168-14x14")


def cases():
    """(name, eager module, fused module, input shape) per profiled stage or block."""
    stages, blocks = mobilenet_v3_large_blocks()
    for stage in stages:
        if stage.name in DWCONV_STAGES:
            eager = eager_dwconv_bn_act(stage.channels, stage.kernel, stage.stride, activation=stage.activation)
            fused = fastmb.nn.DWConvBNAct(stage.channels, stage.kernel, stage.stride, activation=stage.activation)
            yield f"dwconv {stage.name}", eager, fused, (BATCH, stage.channels, stage.size, stage.size)
    for block in blocks:
        if block.name in SE_BLOCKS:
            eager, fused = EagerSqueezeExcitation(block.channels, block.squeeze), fastmb.nn.SqueezeExcitation(block.channels, block.squeeze)
            yield f"se {block.name}", eager, fused, (BATCH, block.channels, block.size, block.size)


def kernel_table(fn, runs: int, rows: int) -> list[str]:
    """The `rows` kernels with the most CUDA time over `runs` calls of fn (after two warm-up calls):
    microseconds per call and calls per run."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in profile.key_averages() if e.self_device_time_total > 0]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in kernels) / runs
    lines = [f"    {total:9.1f} us per call in all"]
    for e in kernels[:rows]:
        lines.append(f"    {e.self_device_time_total / runs:9.1f} us  x{e.count / runs:<4.0f} {e.key[:110]}")
    return lines


def host_profile(rows: int, calls: int = 50) -> None:
    """cProfile of `calls` eval forwards of MobileNetV3-Large at batch 1, bf16, channels_last,
    as bench/test_models_gpu.py builds it: per-call wall time and the top functions."""
    x = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    for name, provider in (("torchvision", "eager_cl"), ("fastmb", "fastmb")):
        model = model_for(provider).to(torch.bfloat16).eval()
        with torch.no_grad():
            for _ in range(5):
                model(x)
            torch.cuda.synchronize()
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(calls):
                model(x)
            torch.cuda.synchronize()
            profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).sort_stats("tottime")
        print(f"host, model eval bs1 {name}: {stats.total_tt / calls * 1e3:.2f} ms per forward under cProfile, "
              f"{stats.total_calls // calls} Python calls", flush=True)
        stats.print_stats(rows)
        print(out.getvalue().strip(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rows", type=int, default=8)
    args = parser.parse_args()
    host_profile(args.rows + 4)
    providers = ["eager_cl"] + [b for b in ("cuda", "triton") if fastmb.backends()[b] == "available"]
    for name, eager, fused, shape in cases():
        fused.load_state_dict(eager.state_dict())
        for mode in ("eval", "train"):
            for provider in providers:
                module, memory_format = provider_module(provider, eager.cuda().bfloat16(), fused.cuda().bfloat16())
                x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=memory_format)
                run = step(module, x, mode)
                with fastmb.use_backend(provider if provider in ("cuda", "triton") else "auto"):
                    lines = kernel_table(run, args.runs, args.rows)
                print(f"{name} {mode} {provider}:", *lines, sep="\n", flush=True)


if __name__ == "__main__":
    main()
