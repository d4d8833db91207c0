"""The Triton kernels' PTX for a Hopper GPU (sm_90), compiled here without one: their loads and
stores over channels are 16-byte vectors also where the channel count is not a multiple of 16
(72 and 120 in MobileNetV3), and pixel indices take no 64-bit divisions. On 2026-12-04's H200 run
they were 2-byte accesses there, and the depthwise kernels 10-20x slower than cuDNN at those
stages."""

import re

import pytest
import triton.language as tl

from fastmb.kernels import common, dwconv_bn_act, squeeze_excitation

pytestmark = pytest.mark.skipif(common.INTERPRETED, reason="compiles for a GPU; under TRITON_INTERPRET=1 the kernels are Python")


def compile_ptx(kernel, pointers: dict[str, str], constexprs: dict[str, object]) -> str:
    """The PTX of `kernel` (under triton.autotune or not) for sm_90: pointer arguments typed and
    16-byte aligned as given, other arguments 32-bit integers without divisibility facts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(kernel, "fn", kernel)
    names = fn.arg_names
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in names}
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(names.index(name),): value for name, value in constexprs.items()},
        attrs={(names.index(name),): [["tt.divisibility", 16]] for name in pointers},
    )
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


def global_accesses(ptx: str) -> set[str]:
    return set(re.findall(r"(?:ld|st)\.global(?:\.\w+)*", ptx))


@pytest.mark.parametrize("channels", [72, 120])
def test_depthwise_forward_accesses_channels_16_bytes_at_a_time(channels):
    ptx = compile_ptx(
        dwconv_bn_act._forward_kernel,
        {"x_ptr": "*bf16", "y_ptr": "*bf16", "w_ptr": "*fp32", "scale_ptr": "*fp32", "shift_ptr": "*fp32"},
        {"CV": common.channel_divisor(channels), "K": 3, "ACT": 1, "ACC": tl.float32, "BLOCK_P": 64, "BLOCK_C": 32},
    )
    accesses = global_accesses(ptx)
    assert "ld.global.v4.b32" in accesses and "st.global.v4.b32" in accesses, accesses
    assert not {a for a in accesses if a.endswith((".b16", ".u16"))}, accesses  # no 2-byte element accesses
    assert not re.findall(r"\b(?:div|rem)\.[su]64", ptx)  # a long subroutine each, per pixel


def test_se_scale_accesses_channels_16_bytes_at_a_time():
    ptx = compile_ptx(
        squeeze_excitation._scale_shift_kernel,
        {"a_ptr": "*bf16", "out_ptr": "*bf16", "scale_ptr": "*fp32", "shift_ptr": "*fp32"},
        {"CV": common.channel_divisor(120), "SHIFT": False, "BLOCK_P": 64, "BLOCK_C": 32},
    )
    accesses = global_accesses(ptx)
    assert "st.global.v4.b32" in accesses, accesses
    assert not {a for a in accesses if a.endswith((".b16", ".u16"))}, accesses
    assert not re.findall(r"\b(?:div|rem)\.[su]64", ptx)
