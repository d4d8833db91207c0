"""GPU model benchmarks for mobilenet_v3_large, channels_last: a training step (AMP bf16,
SGD, batch 256) and eval (bf16, batch 256 and 1); torchvision eager vs torchvision under
torch.compile vs fastmb with the same weights (the fastest available backend)."""

import pytest
import torch
import torchvision
from torch import nn

import fastmb
from timing import run_cuda_benchmark

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: bench/gpu_check.sh runs it")
PROVIDERS = ["eager_cl", "compile", "fastmb"]
CASES = [("train", 256), ("eval", 256), ("eval", 1)]


def model_for(provider: str) -> nn.Module:
    torch.manual_seed(0)
    theirs = torchvision.models.mobilenet_v3_large()
    if provider == "fastmb":
        ours = fastmb.mobilenet_v3_large()
        ours.load_state_dict(theirs.state_dict())
        theirs = ours
    model = theirs.cuda().to(memory_format=torch.channels_last)
    return torch.compile(model) if provider == "compile" else model


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode, batch", CASES, ids=[f"{m}-bs{b}" for m, b in CASES])
def test_mobilenet_v3_large_gpu(mode, batch, provider):
    model = model_for(provider)
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    if mode == "train":
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        target = torch.randint(0, 1000, (batch,), device="cuda")

        def fn():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
    else:
        model.eval()
        x = x.to(torch.bfloat16)
        model = model.to(torch.bfloat16)

        def fn():
            with torch.no_grad():
                return model(x)

    run_cuda_benchmark(f"model {mode}-bs{batch}-bf16 mobilenet_v3_large", provider, fn)
