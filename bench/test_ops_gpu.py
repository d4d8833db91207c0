"""GPU op benchmarks at MobileNetV3-Large's depthwise and SE shapes: batch 256, bf16 and fp16,
channels_last; eager PyTorch, torch.compile and each fastmb GPU backend, eval and train
(forward + backward). Timed with CUDA events (triton.testing.do_bench, median); eval rows
also report the bandwidth achieved on the minimum bytes (x read once, y written once)."""

import pytest
import torch

import fastmb
from fastmb.ops.common import conv_output_size
from oracle import EagerSqueezeExcitation, eager_dwconv_bn_act
from providers import provider_module, step
from shapes import mobilenet_v3_large_blocks
from timing import measure_copy_bandwidth, run_cuda_benchmark

STAGES, SE_BLOCKS = mobilenet_v3_large_blocks()
BATCH = 256
DTYPES = [torch.bfloat16, torch.float16]
PROVIDERS = ["eager_cl", "compile", "triton", "cuda"]

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: bench/gpu_check.sh runs it")


@pytest.fixture(autouse=True, scope="module")
def copy_bandwidth():
    measure_copy_bandwidth()


def time_provider(group, provider, eager, fused, x_shape, dtype, mode, output_numel):
    if provider in ("triton", "cuda") and fastmb.backends()[provider] != "available":
        pytest.skip(f"{provider}: {fastmb.backends()[provider]}")
    eager, fused = eager.cuda().to(dtype), fused.cuda().to(dtype)
    module, memory_format = provider_module(provider, eager, fused)
    x = torch.randn(x_shape, device="cuda", dtype=dtype).contiguous(memory_format=memory_format)
    run = step(module, x, mode)
    backend = provider if provider in ("triton", "cuda") else "auto"

    def fn():
        with fastmb.use_backend(backend):
            return run()

    minimum_bytes = (x.numel() + output_numel) * x.element_size() if mode == "eval" else None
    run_cuda_benchmark(group, provider, fn, minimum_bytes)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_dwconv_bn_act_gpu(stage, dtype, mode, provider):
    eager = eager_dwconv_bn_act(stage.channels, stage.kernel, stage.stride, activation=stage.activation)
    fused = fastmb.nn.DWConvBNAct(stage.channels, stage.kernel, stage.stride, activation=stage.activation)
    fused.load_state_dict(eager.state_dict())
    out = conv_output_size(stage.size, stage.kernel, stage.stride, stage.kernel // 2 * 2, 1)
    group = f"dwconv {mode}-bs{BATCH}-{str(dtype)[6:]} {stage.name}"
    time_provider(group, provider, eager, fused, (BATCH, stage.channels, stage.size, stage.size), dtype, mode,
                  BATCH * stage.channels * out * out)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", SE_BLOCKS, ids=lambda b: b.name)
def test_squeeze_excitation_gpu(block, dtype, mode, provider):
    eager = EagerSqueezeExcitation(block.channels, block.squeeze)
    fused = fastmb.nn.SqueezeExcitation(block.channels, block.squeeze)
    fused.load_state_dict(eager.state_dict())
    shape = (BATCH, block.channels, block.size, block.size)
    group = f"se {mode}-bs{BATCH}-{str(dtype)[6:]} {block.name}"
    time_provider(group, provider, eager, fused, shape, dtype, mode, BATCH * block.channels * block.size**2)
