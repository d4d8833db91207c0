"""pytest-benchmark suites (`pytest bench/`). Every benchmark belongs to a group (one shape,
mode and batch) and names its provider in extra_info; at the end each group's providers are
printed with their speedup over the group's baseline (eager PyTorch, channels_last),
measured in the same run, and the geometric mean of the speedups per suite."""

import math
import os
import sys
from collections import defaultdict

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests")]  # bench/shapes.py, tests/oracle.py (shared oracles)

from timing import BASELINE, THREADS  # noqa: E402


def pytest_configure(config):
    torch.set_num_threads(THREADS)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    timed = [b for b in getattr(session, "benchmarks", []) if b.stats is not None and b.stats.rounds]
    if not timed:
        return
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in timed:
        groups[bench.group][bench.extra_info["provider"]] = bench.stats.median
    write = terminalreporter.write_line
    write(f"\nspeedup over {BASELINE} (median times, {THREADS} threads):")
    suites: dict[tuple[str, str], list[float]] = defaultdict(list)
    for group, medians in sorted(groups.items()):
        if BASELINE not in medians:
            continue
        cells = []
        for provider, median in sorted(medians.items()):
            speedup = medians[BASELINE] / median
            cells.append(f"{provider} {median * 1e3:.3f} ms ({speedup:.2f}x)")
            suites[(group.split(" ")[0] + " " + group.split(" ")[1], provider)].append(speedup)
        write(f"  {group:<52} " + "  ".join(cells))
    write("\ngeometric-mean speedup per suite and provider:")
    for (suite, provider), speedups in sorted(suites.items()):
        geomean = math.exp(sum(map(math.log, speedups)) / len(speedups))
        write(f"  {suite:<28} {provider:<12} {geomean:.2f}x over {len(speedups)} groups")
