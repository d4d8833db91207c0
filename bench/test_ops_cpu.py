"""CPU op benchmarks at MobileNetV3-Large's depthwise and SE shapes, fp32: eager PyTorch
(NCHW and channels_last), torch.compile, and fastmb's cpu backend."""

import pytest
import torch

import fastmb
from oracle import EagerSqueezeExcitation, eager_dwconv_bn_act
from providers import provider_module, step
from shapes import mobilenet_v3_large_blocks
from timing import run_benchmark

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
    module, memory_format = provider_module(provider, eager, fused)
    x = torch.randn(batch, stage.channels, stage.size, stage.size).contiguous(memory_format=memory_format)
    with fastmb.use_backend("cpu"):
        run_benchmark(benchmark, f"dwconv {mode}-bs{batch} {stage.name}", provider, step(module, x, mode))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode, batch", MODES, ids=[f"{m}-bs{b}" for m, b in MODES])
@pytest.mark.parametrize("block", SE_BLOCKS, ids=lambda b: b.name)
def test_squeeze_excitation(benchmark, block, mode, batch, provider):
    eager = EagerSqueezeExcitation(block.channels, block.squeeze)
    fused = fastmb.nn.SqueezeExcitation(block.channels, block.squeeze)
    fused.load_state_dict(eager.state_dict())
    module, memory_format = provider_module(provider, eager, fused)
    x = torch.randn(batch, block.channels, block.size, block.size).contiguous(memory_format=memory_format)
    with fastmb.use_backend("cpu"):
        run_benchmark(benchmark, f"se {mode}-bs{batch} {block.name}", provider, step(module, x, mode))
