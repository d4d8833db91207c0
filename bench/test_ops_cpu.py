"""CPU op benchmarks at MobileNetV3-Large's depthwise and SE shapes, fp32: eager PyTorch
(NCHW and channels_last), torch.compile, and fastmb's cpu backend."""

import copy

import pytest
import torch

import fastmb
from oracle import EagerSqueezeExcitation, eager_dwconv_bn_act
from providers import provider_module, step
from shapes import mobilenet_v3_large_blocks
from timing import BASELINE, run_benchmark

STAGES, SE_BLOCKS = mobilenet_v3_large_blocks()
MODES = [("eval", 1), ("eval", 16), ("train", 16)]
PROVIDERS = ["eager", "eager_cl", "compile", "fastmb"]

pytestmark = pytest.mark.skipif(fastmb.backends()["cpu"] != "available", reason=fastmb.backends()["cpu"])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode, batch", MODES, ids=[f"{m}-bs{b}" for m, b in MODES])
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_dwconv_bn_act(benchmark, stage, mode, batch, provider):
    eager = eager_dwconv_bn_act(stage.channels, stage.kernel, stage.stride, activation=stage.activation)
    fused = fastmb.nn.DWConvBNAct(stage.channels, stage.kernel, stage.stride, activation=stage.activation)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(batch, stage.channels, stage.size, stage.size)
    with fastmb.use_backend("cpu"):
        run_benchmark(benchmark, f"dwconv {mode}-bs{batch} {stage.name}", provider, *steps(provider, eager, fused, x, mode))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode, batch", MODES, ids=[f"{m}-bs{b}" for m, b in MODES])
@pytest.mark.parametrize("block", SE_BLOCKS, ids=lambda b: b.name)
def test_squeeze_excitation(benchmark, block, mode, batch, provider):
    eager = EagerSqueezeExcitation(block.channels, block.squeeze)
    fused = fastmb.nn.SqueezeExcitation(block.channels, block.squeeze)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(batch, block.channels, block.size, block.size)
    with fastmb.use_backend("cpu"):
        run_benchmark(benchmark, f"se {mode}-bs{batch} {block.name}", provider, *steps(provider, eager, fused, x, mode))


def steps(provider: str, eager: torch.nn.Module, fused: torch.nn.Module, x: torch.Tensor, mode: str):
    """The provider's timed step, and the baseline's (eager channels_last, on its own copy of
    the module and input) to pair it with; None for the baseline itself."""
    baseline = None
    if provider != BASELINE:
        baseline_module, baseline_format = provider_module(BASELINE, copy.deepcopy(eager), fused)
        baseline = step(baseline_module, x.clone().contiguous(memory_format=baseline_format), mode)
    module, memory_format = provider_module(provider, eager, fused)
    return step(module, x.contiguous(memory_format=memory_format), mode), baseline
