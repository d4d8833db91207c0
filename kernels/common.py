"""Triton helpers shared by the fused-op kernels: activations with PyTorch's conventions,
launch settings, and NHWC layout handling."""

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# FASTMB_TRITON_AUTOTUNE=0: the first config only, without timing any (bench/gpu_check.sh's
# tests, whose many shapes each autotune afresh: on 2026-12-04 an H200 ran 351 tests in 150 s).
AUTOTUNE = os.environ.get("FASTMB_TRITON_AUTOTUNE", "1") != "0"


@triton.jit
def activate(u, ACT: tl.constexpr):
    # ACT: the activation's code in fastmb.ops.activations.ACTIVATIONS.
    # tl.where keeps NaN (comparisons with NaN are false), as PyTorch's activations do.
    if ACT == 0:
        t = u + 3.0
        t = tl.where(t < 0.0, 0.0, t)
        t = tl.where(t > 6.0, 6.0, t)
        return u * t / 6.0
    elif ACT == 1:
        return tl.where(u < 0.0, 0.0, u)
    elif ACT == 2:
        v = tl.where(u < 0.0, 0.0, u)
        return tl.where(v > 6.0, 6.0, v)
    elif ACT == 4:
        return u * tl.sigmoid(u)
    elif ACT == 5:
        return 0.5 * u * (1.0 + tl.erf(u * 0.7071067811865476))
    elif ACT == 6:
        # 0.5 u (1 + tanh(k)) as the identity u * sigmoid(2k): no tanh, no cancellation for u << 0
        return u * tl.sigmoid(u * (1.5957691216057308 + 0.07135481627260025 * u * u))
    else:
        return u


@triton.jit
def activation_grad(g, u, ACT: tl.constexpr):
    # PyTorch's kinks: relu'(0) = 0, hardswish' = 0 below -3, u/3 + 1/2 up to 3, 1 above; at
    # u = NaN, as PyTorch's vectorised kernels: relu passes g, relu6 gives 0, hardswish NaN.
    if ACT == 0:
        return tl.where(u < -3.0, 0.0, tl.where(u > 3.0, g, g * (u / 3.0 + 0.5)))
    elif ACT == 1:
        return tl.where(u <= 0.0, 0.0, g)
    elif ACT == 2:
        return tl.where((u > 0.0) & (u < 6.0), g, 0.0)
    elif ACT == 4:
        # 1 - s as sigmoid(-u): accurate where s is near 1 and u large
        return g * (tl.sigmoid(u) * (1.0 + u * tl.sigmoid(-u)))
    elif ACT == 5:
        cdf = 0.5 * (1.0 + tl.erf(u * 0.7071067811865476))
        return g * (cdf + u * 0.3989422804014327 * tl.exp(-0.5 * u * u))
    elif ACT == 6:
        k = u * (1.5957691216057308 + 0.07135481627260025 * u * u)
        s = tl.sigmoid(k)
        return g * (s + u * s * tl.sigmoid(-k) * (1.5957691216057308 + 0.21406444881780076 * u * u))
    else:
        return g


def triton_op(name: str, schema: str):
    """torch.library.triton_op with fastmb's schema; older torch infers it from the type hints."""
    def register(fn):
        try:
            return torch.library.triton_op(name, fn, mutates_args=(), schema=schema)
        except TypeError:  # torch without triton_op(schema=...)
            return torch.library.triton_op(name, fn, mutates_args=())

    return register


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


@triton.jit
def row_offsets(rows, C, CV: tl.constexpr):
    """rows * C in 64 bits (NHWC rows of C channels), marked as multiples of CV, a power of two
    dividing C: with channel_mask it lets loads and stores over channels use 16-byte accesses
    where C is not a multiple of 16 (72 or 120 channels: else 2-byte ones, seen in the PTX)."""
    return tl.multiple_of(rows.to(tl.int64) * C, CV)


@triton.jit
def channel_mask(c, C, CV: tl.constexpr):
    """c < C for a tile's channels c (starting at a multiple of the tile's width, at least CV),
    marked constant over each aligned group of CV channels (C is a multiple of CV)."""
    return tl.max_constancy(c < C, CV)


def channel_divisor(channels: int) -> int:
    """CV for row_offsets and channel_mask: the largest power of two dividing `channels`, at most 16."""
    return max(1, min(channels & -channels, 16))


# Under the interpreter a launch costs per program, not per element: these larger blocks ran the
# interpreted depthwise tests 1.4-3x faster, and the tests' shapes still span several of them.
INTERPRETER_BLOCKS = {"BLOCK_P": 128, "BLOCK_C": 64}


def fixed_blocks(block_p: int, block_c: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of a kernel launched without autotuning; INTERPRETER_BLOCKS' under the
    interpreter, as autotune_configs gives the autotuned ones."""
    return (INTERPRETER_BLOCKS["BLOCK_P"], INTERPRETER_BLOCKS["BLOCK_C"]) if INTERPRETED else (block_p, block_c)


def autotune_configs(configs: list[dict]) -> list[triton.Config]:
    """The configs to autotune over; the first alone where FASTMB_TRITON_AUTOTUNE=0 says so, and
    under the interpreter (where timing means nothing) the first with INTERPRETER_BLOCKS."""
    if INTERPRETED:
        return [triton.Config({**configs[0], **INTERPRETER_BLOCKS})]
    return [triton.Config(c) for c in (configs if AUTOTUNE else configs[:1])]
