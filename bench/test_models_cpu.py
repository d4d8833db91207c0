"""Whole-model CPU benchmarks, fp32, channels_last. Eval: torchvision eager, torchvision under
torch.compile, ONNX Runtime and OpenVINO on the exported torchvision model (each when installed:
`pip install ".[bench]"`), the fastmb builder's model with the same weights, and the torchvision
model after fastmb.convert (cpu backend). The summary also gives fastmb's speed relative to the
faster of ONNX Runtime and OpenVINO. Training step (SGD, batch 16) of MobileNetV3-Large:
torchvision eager, the fastmb builder's model and the converted one; and the same step on NCHW
inputs, as a user who never asks for channels_last runs it, against torchvision eager in NCHW
(fastmb's models keep their channels_last weights)."""

import copy
import functools

import pytest
import torch
import torchvision
from torch import nn

import fastmb
from fastmb import runtimes
from fastmb.models.calibration import calibrate_batch_norm
from timing import THREADS, run_benchmark

MODELS = ["mobilenet_v3_large", "mobilenet_v3_small", "mobilenet_v2"]
BATCHES = [1, 16]
PROVIDERS = ["eager_cl", "compile", *runtimes.RUNTIMES, "fastmb", "convert"]
TRAIN_PROVIDERS = ["eager_cl", "fastmb", "convert"]

pytestmark = pytest.mark.skipif(fastmb.backends()["cpu"] != "available", reason=fastmb.backends()["cpu"])


@functools.cache
def onnx_export(name: str, batch: int) -> tuple[bytes, torch.nn.Module, torch.Tensor]:
    """The calibrated torchvision model, its ONNX export and the input, shared by both runtimes."""
    model = calibrate_batch_norm(getattr(torchvision.models, name)(), resolution=96).eval()
    x = torch.randn(batch, 3, 224, 224)
    return runtimes.export_onnx(model, x), model, x


def model_for(provider: str, name: str, torchvision_model: nn.Module) -> nn.Module:
    """The model `provider` runs, with torchvision_model's weights, channels_last."""
    if provider == "fastmb":
        model = getattr(fastmb, name)()
        model.load_state_dict(torchvision_model.state_dict())
    elif provider == "convert":
        model = fastmb.convert(copy.deepcopy(torchvision_model))
    else:
        model = torchvision_model
    model = model.train(torchvision_model.training).to(memory_format=torch.channels_last)
    return torch.compile(model) if provider == "compile" else model


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("name", MODELS)
def test_model_eval(benchmark, name, batch, provider):
    if provider in runtimes.RUNTIMES:
        if not runtimes.installed(provider):
            pytest.skip(f"{provider} (and onnx) not installed")
        onnx_model, torchvision_model, x = onnx_export(name, batch)
        fn = runtimes.runner(provider, onnx_model, x, THREADS)
    else:
        torchvision_model = calibrate_batch_norm(getattr(torchvision.models, name)(), resolution=96)
        x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
        fn = eval_step(model_for(provider, name, torchvision_model), x)
    x = x.contiguous(memory_format=torch.channels_last)
    baseline = eval_step(torchvision_model.to(memory_format=torch.channels_last), x)
    run_benchmark(benchmark, f"model eval-bs{batch} {name}", provider, fn, baseline)


@pytest.mark.parametrize("provider", TRAIN_PROVIDERS)
def test_model_train(benchmark, provider):
    torchvision_model = torchvision.models.mobilenet_v3_large()
    x = torch.randn(16, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (16,))
    fn = train_step(model_for(provider, "mobilenet_v3_large", torchvision_model), x, target)
    baseline = train_step(copy.deepcopy(torchvision_model).to(memory_format=torch.channels_last), x, target)
    run_benchmark(benchmark, "model train-bs16 mobilenet_v3_large", provider, fn, baseline)


@pytest.mark.parametrize("provider", ["eager", "fastmb", "convert"])
def test_model_train_nchw_input(benchmark, provider):
    torchvision_model = torchvision.models.mobilenet_v3_large()
    x = torch.randn(16, 3, 224, 224)
    target = torch.randint(0, 1000, (16,))
    if provider == "fastmb":
        model = fastmb.mobilenet_v3_large()
        model.load_state_dict(torchvision_model.state_dict())
    else:
        model = fastmb.convert(copy.deepcopy(torchvision_model)) if provider == "convert" else torchvision_model
    fn = train_step(model, x, target)
    baseline = None if provider == "eager" else train_step(copy.deepcopy(torchvision_model), x, target)
    run_benchmark(benchmark, "model train-bs16-nchw-input mobilenet_v3_large", provider, fn, baseline, baseline_provider="eager")


def eval_step(model: nn.Module, x: torch.Tensor):
    model.eval()

    def run():
        with torch.no_grad(), fastmb.use_backend("cpu"):
            return model(x)

    return run


def train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    """Forward, backward and an SGD update (a learning rate of 0: the weights stay as they are)."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def run():
        with fastmb.use_backend("cpu"):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), target).backward()
            optimizer.step()

    return run
