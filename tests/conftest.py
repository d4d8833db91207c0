"""Shared fixtures: the device under test (FASTMB_TEST_DEVICE, default cpu; bench/gpu_check.sh
runs the same suite with cuda) and every fastmb backend available for it."""

import faulthandler
import itertools
import os
import sys

import pytest
import torch

import fastmb
from fastmb import _extension

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracle.py, also used by bench/

DEVICE = os.environ.get("FASTMB_TEST_DEVICE", "cpu")
BACKENDS_FOR_DEVICE = {"cpu": ("reference", "cpu", "triton"), "cuda": ("reference", "cuda", "triton")}


def pytest_configure(config):
    problem = _extension.unbuilt_source_tree()
    if problem:  # the tests would skip every compiled backend
        pytest.exit(problem, returncode=pytest.ExitCode.USAGE_ERROR)


_FAULT_LOGS = []  # FASTMB_TEST_TIMES's crash logs, kept open for faulthandler


def pytest_sessionstart(session):
    """FASTMB_TEST_TIMES=FILE: a crashing test's Python stack to FILE.crash-<process>
    (pytest-xdist reports only "node down"); after pytest's own faulthandler has set up."""
    times = os.environ.get("FASTMB_TEST_TIMES")
    if times:
        _FAULT_LOGS.append(open(f"{times}.crash-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}", "a"))
        faulthandler.enable(file=_FAULT_LOGS[-1])


def pytest_runtest_logreport(report):
    """FASTMB_TEST_TIMES=FILE: each test's time appended as it finishes, and a failure's
    traceback (gpu_check.sh's steps can run out of time before pytest prints its summary).
    Written by the process that reports, not by pytest-xdist's workers too."""
    path = os.environ.get("FASTMB_TEST_TIMES")
    if not path or "PYTEST_XDIST_WORKER" in os.environ or not (report.when == "call" or report.failed):
        return
    with open(path, "a") as times:
        times.write(f"{report.duration:.2f} {report.outcome} {report.when} {report.nodeid}\n")
        if report.failed:
            times.write(report.longreprtext[-4000:] + "\n")


def available_backends() -> list[str]:
    status = fastmb.backends()
    return [name for name in BACKENDS_FOR_DEVICE[DEVICE] if status[name] == "available"]


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(params=available_backends())
def backend(request):
    """Runs the test once per backend available for the device, with that backend forced."""
    with fastmb.use_backend(request.param):
        yield request.param


@pytest.fixture
def opcheck_utils(backend) -> tuple[str, ...]:
    """torch.library.opcheck's default checks for the backend's operators. Under Triton's
    interpreter (CPU tensors) wrap_triton runs the kernels even on fake tensors, so the fake
    tensor and AOT dispatch checks of the Triton operators run on a GPU only (gpu_check.sh)."""
    checks = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    return checks[:2] if backend == "triton" and DEVICE == "cpu" else checks


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def native_block_calls(monkeypatch) -> list[tuple[str, int]]:
    """One entry per block the native inverted-residual ops run from here on, in order: ("stem",
    call) for a block run with a stem in front, else ("block", call), `call` counting the op
    calls; ("stem alone", call) for a stem run without blocks. Both paths count: a block's own forward (fastmb::inverted_residual) and run_layers'
    runs of blocks (fastmb::inverted_residual_chain)."""
    from fastmb.ops import inverted_residual as ir

    calls: list[tuple[str, int]] = []
    count = itertools.count()
    single, chain = ir._OP, ir._CHAIN

    def one_block(x, *args):
        calls.append(("stem" if len(args) > 20 and args[20] is not None else "block", next(count)))
        return single(x, *args)

    def blocks(x, tensors, settings, names, *stem):
        call, with_stem = next(count), bool(stem) and stem[0] is not None
        if not tensors:
            calls.append(("stem alone", call))
        else:
            blocks = len(tensors) // ir._CHAIN_TENSORS
            calls.extend((kind, call) for kind in ["stem" if with_stem else "block"] + ["block"] * (blocks - 1))
        return chain(x, tensors, settings, names, *stem)

    monkeypatch.setattr(ir, "_OP", one_block)
    monkeypatch.setattr(ir, "_CHAIN", blocks)
    return calls
