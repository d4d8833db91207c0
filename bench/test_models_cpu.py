"""Whole-model CPU benchmarks, eval, fp32, channels_last: torchvision eager, torchvision under
torch.compile, ONNX Runtime on the exported torchvision model (when onnxruntime is
installed), and the fastmb model with the same weights (cpu backend)."""

import io

import pytest
import torch
import torchvision

import fastmb
from fastmb.models.calibration import calibrate_batch_norm
from timing import THREADS, run_benchmark

MODELS = ["mobilenet_v3_large", "mobilenet_v3_small", "mobilenet_v2"]
BATCHES = [1, 16]
PROVIDERS = ["eager_cl", "compile", "onnxruntime", "fastmb"]

pytestmark = pytest.mark.skipif(fastmb.backends()["cpu"] != "available", reason=fastmb.backends()["cpu"])


def onnxruntime_runner(model: torch.nn.Module, x: torch.Tensor):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    exported = io.BytesIO()
    torch.onnx.export(model, (x,), exported, dynamo=False, input_names=["x"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(exported.getvalue(), options, providers=["CPUExecutionProvider"])
    inputs = {"x": x.contiguous().numpy()}
    return lambda: session.run(None, inputs)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("name", MODELS)
def test_model_eval(benchmark, name, batch, provider):
    torchvision_model = calibrate_batch_norm(getattr(torchvision.models, name)(), resolution=96)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    if provider == "onnxruntime":
        fn = onnxruntime_runner(torchvision_model, x)
    else:
        if provider == "fastmb":
            model = getattr(fastmb, name)().eval()
            model.load_state_dict(torchvision_model.state_dict())
        else:
            model = torchvision_model
        model = model.to(memory_format=torch.channels_last)
        if provider == "compile":
            model = torch.compile(model)

        fn = eval_step(model, x)
    baseline = eval_step(torchvision_model.to(memory_format=torch.channels_last), x)
    run_benchmark(benchmark, f"model eval-bs{batch} {name}", provider, fn, baseline)


def eval_step(model: torch.nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad(), fastmb.use_backend("cpu"):
            return model(x)

    return run
