"""The Triton kernels' PTX for a Hopper GPU (sm_90), compiled here without one: their loads and
stores over channels are 16-byte vectors also where the channel count is not a multiple of 16
(72 and 120 in MobileNetV3), pixel indices take no 64-bit divisions, and the 5x5 and 7x7
kernels do not spill. On 2026-12-04's H200 run they were 2-byte accesses there, and the
depthwise kernels 10-20x slower than cuDNN at those stages."""

import os
import re
import subprocess
import tempfile

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

    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    names = fn.arg_names
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in names}
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(names.index(name),): value for name, value in constexprs.items()},
        attrs={(names.index(name),): [["tt.divisibility", 16]] for name in pointers},
    )
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


def registers_and_spills(ptx: str) -> tuple[int, int]:
    """ptxas's register count and spill-store bytes for the PTX (Triton's own ptxas)."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as file:
            file.write(ptx)
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.devnull], capture_output=True, text=True, check=True).stderr
    return int(re.search(r"Used (\d+) registers", report)[1]), int(re.search(r"(\d+) bytes spill stores", report)[1])


def depthwise_forward_ptx(channels: int, kernel_size: int) -> str:
    """The bf16 depthwise forward kernel's PTX at `channels` and a square kernel, 64x32 tiles."""
    return compile_ptx(
        dwconv_bn_act._forward_kernel,
        {"x_ptr": "*bf16", "y_ptr": "*bf16", "w_ptr": "*fp32", "scale_ptr": "*fp32", "shift_ptr": "*fp32"},
        {"CV": common.channel_divisor(channels), "K": kernel_size, "ACT": 1, "ACC": tl.float32, "BLOCK_P": 64, "BLOCK_C": 32},
    )


def global_accesses(ptx: str) -> set[str]:
    return set(re.findall(r"(?:ld|st)\.global(?:\.\w+)*", ptx))


@pytest.mark.parametrize("channels", [72, 120])
def test_depthwise_forward_accesses_channels_16_bytes_at_a_time(channels):
    ptx = depthwise_forward_ptx(channels, 3)
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


@pytest.mark.parametrize("kernel_size", [5, 7])
def test_depthwise_forward_holds_its_taps_without_spilling(kernel_size):
    """With every tap unrolled the compiler loaded them all before the first FMA: 253 registers
    at 5x5 and 764 bytes spilled at 7x7 (4 warps). Kernel rows as a loop keep it in registers."""
    registers, spilled = registers_and_spills(depthwise_forward_ptx(72, kernel_size))
    assert spilled == 0 and registers <= 200, (registers, spilled)
