"""timm models on the CPU, fp32, channels_last (when timm is installed): efficientnet_b0 and
mobilenetv4_conv_small in eval (batch 1 and 16) and a training step (SGD, batch 16): timm eager,
timm under torch.compile, and the timm model after fastmb.convert (cpu backend)."""

import copy

import pytest
import torch

import fastmb
from fastmb.models.calibration import calibrate_batch_norm
from test_models_cpu import eval_step, train_step
from timing import run_benchmark

timm = pytest.importorskip("timm")

MODELS = ["efficientnet_b0", "mobilenetv4_conv_small"]
PROVIDERS = ["eager_cl", "compile", "convert"]

pytestmark = pytest.mark.skipif(fastmb.backends()["cpu"] != "available", reason=fastmb.backends()["cpu"])


def timm_model(name: str) -> torch.nn.Module:
    return calibrate_batch_norm(timm.create_model(name, pretrained=False), resolution=96)


def model_for(provider: str, model: torch.nn.Module) -> torch.nn.Module:
    if provider == "convert":
        model = fastmb.convert(copy.deepcopy(model))
    model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if provider == "compile" else model


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", [1, 16], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("name", MODELS)
def test_timm_eval(benchmark, name, batch, provider):
    model = timm_model(name)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    baseline = eval_step(copy.deepcopy(model).to(memory_format=torch.channels_last), x)
    run_benchmark(benchmark, f"timm eval-bs{batch} {name}", provider, eval_step(model_for(provider, model), x), baseline)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", MODELS)
def test_timm_train(benchmark, name, provider):
    model = timm_model(name)
    x = torch.randn(16, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (16,))
    baseline = train_step(copy.deepcopy(model).to(memory_format=torch.channels_last), x, target)
    run_benchmark(benchmark, f"timm train-bs16 {name}", provider, train_step(model_for(provider, model), x, target), baseline)
