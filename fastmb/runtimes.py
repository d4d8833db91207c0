"""The inference runtimes a user would pick instead of PyTorch on a CPU, ONNX Runtime and
OpenVINO, running a model's ONNX export: the comparison `python -m fastmb` and the benchmarks
show next to fastmb. fp32, a given number of threads, latency settings; each is optional (None
when its package is not installed)."""

import importlib.util
import io
import os
import threading
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

def installed(runtime: str) -> bool:
    """Whether `runtime` (and the onnx package the export needs) can be imported."""
    return importlib.util.find_spec(runtime) is not None and importlib.util.find_spec("onnx") is not None


def export_onnx(model: nn.Module, x: torch.Tensor) -> bytes:
    """`model` (in its current mode) exported to ONNX for input shape x (TorchScript exporter)."""
    exported = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (x.contiguous(),), exported, dynamo=False, input_names=["x"])
    return exported.getvalue()


def onnxruntime_runner(onnx_model: bytes, x: torch.Tensor, threads: int) -> Callable[[], object]:
    """A call running the model on x in ONNX Runtime's CPU provider with `threads` intra-op threads."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
    inputs = {"x": x.contiguous().numpy()}
    return lambda: session.run(None, inputs)


def openvino_runner(onnx_model: bytes, x: torch.Tensor, threads: int) -> Callable[[], object]:
    """A call running the model on x in OpenVINO's CPU plugin: latency hint, `threads` threads,
    f32 inference precision (on CPUs with bf16 or AMX it would otherwise pick bf16)."""
    import openvino

    core = openvino.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(threads), "INFERENCE_PRECISION_HINT": "f32"}
    compiled = core.compile_model(core.read_model(onnx_model, b""), "CPU", config)
    request = compiled.create_infer_request()
    inputs = {0: x.contiguous().numpy()}
    return lambda: request.infer(inputs)


def wait_for_idle_threads(timeout: float = 0.5) -> float:
    """Waits until no other thread of this process is running (or `timeout` seconds have passed)
    and returns the seconds waited. A runtime's pool threads busy-wait after a run, ONNX
    Runtime's for about 50 ms: a provider timed meanwhile in the same process shares a core with
    them (fastmb at batch 1 on two cores: 2x slower right after ONNX Runtime). Providers timed in
    alternation each start from here, as they would in a process of their own. Linux only (it
    reads the threads' states from /proc); elsewhere it returns at once."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return 0.0
    me, start = str(threading.get_native_id()), time.perf_counter()

    def others_running() -> bool:
        for task in os.listdir(tasks):
            try:
                with open(f"{tasks}/{task}/stat") as stat:
                    fields = stat.read()
            except OSError:  # the thread has exited
                continue
            if task != me and fields[fields.rindex(")") + 2] == "R":
                return True
        return False

    # Idle in two looks 1 ms apart: a thread between two native calls sleeps for an instant on
    # the GIL (this thread holds it while it reads the states), and one look took that for idle.
    idle_looks = 0
    while idle_looks < 2 and time.perf_counter() - start < timeout:
        idle_looks = 0 if others_running() else idle_looks + 1
        if idle_looks < 2:
            time.sleep(0.001)
    return time.perf_counter() - start


RUNNERS = {"onnxruntime": onnxruntime_runner, "openvino": openvino_runner}
RUNTIMES = tuple(RUNNERS)


def runner(runtime: str, onnx_model: bytes, x: torch.Tensor, threads: int) -> Callable[[], object]:
    if runtime not in RUNNERS:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    return RUNNERS[runtime](onnx_model, x, threads)
