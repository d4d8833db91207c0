"""Running one benchmark and recording it for the summary bench/conftest.py prints.

CPU benchmarks are timed by pytest-benchmark (medians, warm-up excluded), and each provider
also in alternation with its group's baseline (the paired speedup); CUDA benchmarks by
triton.testing.do_bench (CUDA events, median), with the achieved bandwidth when the minimum
bytes moved are given."""

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastmb import runtimes

try:
    import resource
except ImportError:  # Windows: no page-fault counts
    resource = None

BASELINE = "eager_cl"  # eager PyTorch, channels_last: what every speedup is relative to
THREADS = int(os.environ.get("FASTMB_BENCH_THREADS", "2"))


@dataclass
class Result:
    group: str
    provider: str
    seconds: float
    bytes: int | None = None  # minimum bytes moved: x read once, y written once
    paired: float | None = None  # median of baseline time / this time over alternating runs
    faults: tuple[float, float] | None = None  # minor page faults per run, this and the baseline, alternating


RESULTS: list[Result] = []
GROUP_BASELINES: dict[str, str] = {}  # groups whose baseline is not BASELINE: the provider that is
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


def minor_page_faults() -> int:
    """This process's minor page faults so far (0 where the OS does not say)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def paired_speedup(
    baseline: Callable[[], object], fn: Callable[[], object], seconds: float = 1.0, settle: bool = False
) -> tuple[float, tuple[float, float]]:
    """The median over alternating runs of baseline time / fn time (10 to 60 pairs, about
    `seconds` in all), and the minor page faults per timed run of fn and of the baseline. A CPU
    whose speed drifts from minute to minute, as shared machines' do, moves this ratio much less
    than the ratio of two medians taken one after the other. It is also a colder measurement:
    each fn run follows baseline runs, which have evicted fn's input from the caches (the
    back-to-back medians read inputs up to L3's size from cache). Each timed run follows an
    untimed one of the same provider. With `settle` (fn runs on a runtime's own thread pool) each
    run also waits for the other provider's threads to stop spinning: ONNX Runtime's spin for
    about 50 ms after a run, and timed meanwhile eager PyTorch ran up to 2x slower. The faults
    say how much of a gap is the allocator mapping memory afresh (glibc's returns freed blocks
    to the kernel)."""
    faults = {baseline: 0, fn: 0}

    def timed(f: Callable[[], object]) -> float:
        if settle:
            runtimes.wait_for_idle_threads()
        f()  # untimed: warms this provider's threads and caches
        before = minor_page_faults()
        start = time.perf_counter()
        f()
        elapsed = time.perf_counter() - start
        faults[f] += minor_page_faults() - before
        return elapsed

    pairs = [(timed(baseline), timed(fn))]
    rounds = min(60, max(10, int(seconds / (2 * sum(pairs[0])))))  # each pair runs both twice
    pairs += [(timed(baseline), timed(fn)) for _ in range(rounds - 1)]
    return statistics.median(b / f for b, f in pairs), (faults[fn] / rounds, faults[baseline] / rounds)


def run_benchmark(
    benchmark,
    group: str,
    provider: str,
    fn: Callable[[], object],
    baseline: Callable[[], object] | None = None,
    baseline_provider: str = BASELINE,
) -> None:
    """Warms `fn` up (compiles, caches), then times it with pytest-benchmark; given the group's
    `baseline` (and unless benchmarks are disabled), also the paired speedup over it. The
    summary's speedups are over the group's `baseline_provider`."""
    if baseline_provider != BASELINE:
        GROUP_BASELINES[group] = baseline_provider
    runtimes.wait_for_idle_threads()  # the previous benchmark's runtime threads may still spin
    for _ in range(2):
        fn()
    benchmark.group = group
    benchmark.extra_info["provider"] = provider
    benchmark(fn)
    if benchmark.stats is not None and benchmark.stats.stats.rounds:
        paired = faults = None
        if baseline is not None and provider != baseline_provider and not benchmark.disabled:
            baseline()
            paired, faults = paired_speedup(baseline, fn, settle=provider in runtimes.RUNTIMES)
            benchmark.extra_info["paired_speedup"] = paired
            benchmark.extra_info["page_faults_per_run"] = faults
        RESULTS.append(Result(group, provider, benchmark.stats.stats.median, paired=paired, faults=faults))


def run_cuda_benchmark(group: str, provider: str, fn: Callable[[], object], bytes_moved: int | None = None) -> float:
    """Median seconds of `fn` on the GPU (triton.testing.do_bench: warm-up, CUDA events)."""
    from triton.testing import do_bench

    seconds = do_bench(fn, return_mode="median") / 1e3
    RESULTS.append(Result(group, provider, seconds, bytes_moved))
    # A line as each finishes (seen under `pytest -s`): a run cut short keeps what it timed.
    print(f"\ntimed: {group} | {provider} | {seconds * 1e3:.4f} ms", flush=True)
    return seconds
