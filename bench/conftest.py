"""pytest-benchmark suites (`pytest bench/`). Every benchmark belongs to a group (one shape,
mode and batch) and names its provider in extra_info; at the end each group's providers are
printed with their speedup over the group's baseline (eager PyTorch, channels_last),
measured in the same run (on the CPU also paired: timed in alternation with the baseline; on
a GPU, the achieved bandwidth against the measured copy bandwidth), and the geometric mean of
the speedups per suite."""

import datetime
import json
import math
import os
import sys
from collections import defaultdict

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests")]  # bench/shapes.py, tests/oracle.py (shared oracles)

from timing import BASELINE, COPY_BANDWIDTH, GROUP_BASELINES, RESULTS, THREADS, Result  # noqa: E402

from fastmb import _extension  # noqa: E402

_executed: list[str] = []  # benchmarks that ran
_nothing_ran: list[bool] = []  # set when every collected benchmark was skipped


def pytest_configure(config):
    problem = _extension.unbuilt_source_tree()
    if problem:  # every benchmark would skip
        pytest.exit(problem, returncode=pytest.ExitCode.USAGE_ERROR)
    torch.set_num_threads(THREADS)


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        _executed.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    """A benchmark run that timed nothing (every benchmark skipped) fails."""
    if exitstatus == pytest.ExitCode.OK and session.testscollected and not _executed:
        _nothing_ran.append(True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _nothing_ran:
        terminalreporter.write_line("no benchmark ran: every one was skipped (the summary says why)", red=True)
    write_speedups(terminalreporter)


def write_speedups(terminalreporter) -> None:
    """Each group's providers with their speedup over the baseline, and the geometric means."""
    if not RESULTS:
        return
    groups: dict[str, dict[str, Result]] = defaultdict(dict)
    for result in RESULTS:
        groups[result.group][result.provider] = result
    write = terminalreporter.write_line
    copy = f"; GPU copy bandwidth {COPY_BANDWIDTH[0] / 1e9:.0f} GB/s" if COPY_BANDWIDTH else ""
    write(f"\nspeedup over {BASELINE}, or the group's named baseline (median times; CPU: {THREADS} threads{copy}):")
    suites: dict[tuple[str, str], list[float]] = defaultdict(list)
    paired: dict[tuple[str, str], list[float]] = defaultdict(list)
    for group, results in sorted(groups.items()):
        baseline = GROUP_BASELINES.get(group, BASELINE)
        if baseline not in results:
            continue
        cells = []
        for provider, result in sorted(results.items()):
            speedup = results[baseline].seconds / result.seconds
            cell = f"{provider} {result.seconds * 1e3:.3f} ms ({speedup:.2f}x"
            if result.paired is not None:
                cell += f", paired {result.paired:.2f}x"
                paired[(" ".join(group.split(" ")[:2]), provider)].append(result.paired)
            if result.faults is not None and max(result.faults) >= 100:  # 100 pages: 0.4 MB mapped afresh per run
                cell += f", page faults {result.faults[0]:.0f} vs {result.faults[1]:.0f}"
            if result.bytes:
                bandwidth = result.bytes / result.seconds
                share = f", {bandwidth / COPY_BANDWIDTH[0]:.0%} of copy" if COPY_BANDWIDTH else ""
                cell += f", {bandwidth / 1e9:.0f} GB/s{share}"
            cells.append(cell + ")")
            suites[(" ".join(group.split(" ")[:2]), provider)].append(speedup)
        write(f"  {group:<52} " + "  ".join(cells))
    write_alternative_ratios(write, groups)
    if os.environ.get("FASTMB_AUTO_ORDER_OUT"):
        write_auto_order(groups, os.environ["FASTMB_AUTO_ORDER_OUT"])
    write("\ngeometric-mean speedup per suite and provider:")
    for (suite, provider), speedups in sorted(suites.items()):
        line = f"  {suite:<32} {provider:<14} {geomean(speedups):.2f}x over {len(speedups)} groups"
        if len(paired[(suite, provider)]) == len(speedups):
            line += f"; paired {geomean(paired[(suite, provider)]):.2f}x"
        write(line)


# What a user would pick instead of eager PyTorch: torch.compile, and for CPU inference the
# runtimes of fastmb/runtimes.py; and fastmb's providers, compared with the fastest of those.
ALTERNATIVES = ("compile", "onnxruntime", "openvino")
FUSED = ("fastmb", "convert", "cuda", "triton")


def write_alternative_ratios(write, groups: dict[str, dict[str, Result]]) -> None:
    """Per group with an alternative timed: each fastmb provider's speed over the fastest
    alternative's, from the medians and from the paired speedups (each alternated with the same
    baseline)."""
    lines = []
    for group, results in sorted(groups.items()):
        timed = [results[r] for r in ALTERNATIVES if r in results]
        if not timed:
            continue
        fastest = min(timed, key=lambda r: r.seconds)
        cells = []
        for provider in FUSED:
            if provider not in results:
                continue
            ours = results[provider]
            cell = f"{provider} {fastest.seconds / ours.seconds:.2f}x"
            if ours.paired is not None and fastest.paired is not None:
                cell += f" (paired {ours.paired / fastest.paired:.2f}x)"
            cells.append(cell)
        if cells:
            lines.append(f"  {group:<52} vs {fastest.provider} {fastest.seconds * 1e3:.3f} ms: " + "  ".join(cells))
    if lines:
        write("\nspeed relative to the fastest of torch.compile, ONNX Runtime and OpenVINO timed (>1: faster than it):")
        for line in lines:
            write(line)


def geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


# Benchmark group prefixes of the fused ops (bench/test_ops_gpu.py).
OP_GROUPS = {"dwconv_bn_act": "dwconv ", "squeeze_excitation": "se "}
# The candidates for "auto" on a GPU: fastmb's GPU backends, and PyTorch's own ops (the eager
# modules' computation, which auto runs as the op's composite), timed as the baseline provider.
AUTO_CANDIDATES = {"cuda": "cuda", "triton": "triton", BASELINE: "pytorch"}


def write_auto_order(groups: dict[str, dict[str, Result]], path: str) -> None:
    """fastmb/auto_order.json's table from this run: per fused op, the candidates timed in every
    group of the op (both modes, each dtype), fastest first by geometric-mean time relative to
    PyTorch's, then the GPU backends this run did not time (still tried where those before them
    do not apply). Not written when this run timed no fastmb backend against PyTorch."""
    order, ratios = {}, {}
    for op, prefix in OP_GROUPS.items():
        timed = [r for g, r in groups.items() if g.startswith(prefix) and BASELINE in r]
        candidates = [p for p in AUTO_CANDIDATES if timed and all(p in r for r in timed)]
        if len(candidates) < 2:
            continue
        relative = {
            AUTO_CANDIDATES[p]: round(geomean([r[p].seconds / r[BASELINE].seconds for r in timed]), 4) for p in candidates
        }
        order[op] = sorted(relative, key=relative.get) + [b for b in ("cuda", "triton") if b not in relative]
        ratios[op] = {"time_over_pytorch": relative, "groups": len(timed)}
    if not order:
        return
    table = {
        "measured": f"{datetime.date.today()} {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
        "source": "bench/gpu_check.sh (bench/test_ops_gpu.py medians)",
        "ratios": ratios,
        "order": order,
    }
    with open(path, "w") as file:
        json.dump(table, file, indent=2)
