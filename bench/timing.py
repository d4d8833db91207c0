"""Running one benchmark: warm-up, then pytest-benchmark's timing, grouped for the summary."""

import os
from collections.abc import Callable

BASELINE = "eager_cl"  # eager PyTorch, channels_last: what every speedup is relative to
THREADS = int(os.environ.get("FASTMB_BENCH_THREADS", "2"))


def run_benchmark(benchmark, group: str, provider: str, fn: Callable[[], object]) -> None:
    """Warms `fn` up (compiles, caches), then times it in `group` as `provider`."""
    for _ in range(2):
        fn()
    benchmark.group = group
    benchmark.extra_info["provider"] = provider
    benchmark(fn)
