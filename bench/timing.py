"""Running one benchmark and recording it for the summary bench/conftest.py prints.

CPU benchmarks are timed by pytest-benchmark (medians, warm-up excluded); CUDA benchmarks by
triton.testing.do_bench (CUDA events, median), with the achieved bandwidth when the minimum
bytes moved are given."""

import os
from collections.abc import Callable
from dataclasses import dataclass

BASELINE = "eager_cl"  # eager PyTorch, channels_last: what every speedup is relative to
THREADS = int(os.environ.get("FASTMB_BENCH_THREADS", "2"))


@dataclass
class Result:
    group: str
    provider: str
    seconds: float
    bytes: int | None = None  # minimum bytes moved: x read once, y written once


RESULTS: list[Result] = []
COPY_BANDWIDTH: list[float] = []  # bytes/s of a large device-to-device copy, measured once per GPU session


def measure_copy_bandwidth(bytes_: int = 1 << 30) -> float:
    """Bytes/s of copying a `bytes_` buffer on the GPU (read + write), the roof for our kernels."""
    import torch
    from triton.testing import do_bench

    if not COPY_BANDWIDTH:
        src = torch.empty(bytes_, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        COPY_BANDWIDTH.append(2 * bytes_ / (do_bench(lambda: dst.copy_(src), return_mode="median") / 1e3))
    return COPY_BANDWIDTH[0]


def run_benchmark(benchmark, group: str, provider: str, fn: Callable[[], object]) -> None:
    """Warms `fn` up (compiles, caches), then times it with pytest-benchmark."""
    for _ in range(2):
        fn()
    benchmark.group = group
    benchmark.extra_info["provider"] = provider
    benchmark(fn)
    if benchmark.stats is not None and benchmark.stats.stats.rounds:
        RESULTS.append(Result(group, provider, benchmark.stats.stats.median))


def run_cuda_benchmark(group: str, provider: str, fn: Callable[[], object], bytes_moved: int | None = None) -> float:
    """Median seconds of `fn` on the GPU (triton.testing.do_bench: warm-up, CUDA events)."""
    from triton.testing import do_bench

    seconds = do_bench(fn, return_mode="median") / 1e3
    RESULTS.append(Result(group, provider, seconds, bytes_moved))
    return seconds
