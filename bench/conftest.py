"""pytest-benchmark suites (`pytest bench/`). Every benchmark belongs to a group (one shape,
mode and batch) and names its provider in extra_info; at the end each group's providers are
printed with their speedup over the group's baseline (eager PyTorch, channels_last),
measured in the same run (and, on a GPU, the achieved bandwidth against the measured copy
bandwidth), and the geometric mean of the speedups per suite."""

import math
import os
import sys
from collections import defaultdict

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests")]  # bench/shapes.py, tests/oracle.py (shared oracles)

from timing import BASELINE, COPY_BANDWIDTH, RESULTS, THREADS, Result  # noqa: E402


def pytest_configure(config):
    torch.set_num_threads(THREADS)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    if not RESULTS:
        return
    groups: dict[str, dict[str, Result]] = defaultdict(dict)
    for result in RESULTS:
        groups[result.group][result.provider] = result
    write = terminalreporter.write_line
    copy = f"; GPU copy bandwidth {COPY_BANDWIDTH[0] / 1e9:.0f} GB/s" if COPY_BANDWIDTH else ""
    write(f"\nspeedup over {BASELINE} (median times; CPU: {THREADS} threads{copy}):")
    suites: dict[tuple[str, str], list[float]] = defaultdict(list)
    for group, results in sorted(groups.items()):
        if BASELINE not in results:
            continue
        cells = []
        for provider, result in sorted(results.items()):
            speedup = results[BASELINE].seconds / result.seconds
            cell = f"{provider} {result.seconds * 1e3:.3f} ms ({speedup:.2f}x"
            if result.bytes:
                bandwidth = result.bytes / result.seconds
                share = f", {bandwidth / COPY_BANDWIDTH[0]:.0%} of copy" if COPY_BANDWIDTH else ""
                cell += f", {bandwidth / 1e9:.0f} GB/s{share}"
            cells.append(cell + ")")
            suites[(" ".join(group.split(" ")[:2]), provider)].append(speedup)
        write(f"  {group:<52} " + "  ".join(cells))
    write("\ngeometric-mean speedup per suite and provider:")
    for (suite, provider), speedups in sorted(suites.items()):
        geomean = math.exp(sum(map(math.log, speedups)) / len(speedups))
        write(f"  {suite:<32} {provider:<14} {geomean:.2f}x over {len(speedups)} groups")
