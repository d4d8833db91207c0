"""The inference runtimes a user would pick instead of PyTorch on a CPU, ONNX Runtime and
OpenVINO, running a model's ONNX export: the comparison `python -m fastmb` and the benchmarks
show next to fastmb. fp32, a given number of threads, latency settings; each is optional (None
when its package is not installed)."""

import importlib.util
import io
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


RUNNERS = {"onnxruntime": onnxruntime_runner, "openvino": openvino_runner}
RUNTIMES = tuple(RUNNERS)


def runner(runtime: str, onnx_model: bytes, x: torch.Tensor, threads: int) -> Callable[[], object]:
    if runtime not in RUNNERS:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    return RUNNERS[runtime](onnx_model, x, threads)
