"""Triton kernels of the fused squeeze-and-excitation, and the operators
fastmb::squeeze_excitation_triton / fastmb::squeeze_excitation_backward_triton.

NHWC. The two passes over x are kernels (per-image channel sums; a per-image channel scale and
shift); the tiny FC layers in between are PyTorch ops on (N, C) matrices:
  forward   pooled = mean_hw(x); scale = gate(fc2(act(fc1(pooled)))); y = x * scale
  backward  dscale = sum_hw(grad_y * x); the FC layers' backward; grad_x = grad_y * scale + dpooled / HW
"""

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from fastmb.kernels.common import accumulation_dtype, autotune_configs, channel_divisor, channel_mask, nhwc, row_offsets, triton_op
from fastmb.ops import schemas
from fastmb.ops.reference.squeeze_excitation import excitation, excitation_backward
from fastmb.ops.common import autocast_off

BLOCK_P, BLOCK_C = 64, 32


@triton.jit
def _channel_sums_kernel(a_ptr, b_ptr, out_ptr, HW, C, CV: tl.constexpr, PRODUCT: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # out[n, c] = sum over the pixels of image n of a (or a * b), one program per (n, channel block).
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = channel_mask(c, C, CV)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < HW)[:, None] & c_mask[None, :]
        offsets = row_offsets(n * HW + p, C, CV)[:, None] + c[None, :]
        a = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(ACC)
        if PRODUCT:
            a *= tl.load(b_ptr + offsets, mask=mask, other=0.0).to(ACC)
        acc += a
    tl.store(out_ptr + n * C + c, tl.sum(acc, axis=0), mask=c_mask)


@triton.autotune(configs=autotune_configs([{"BLOCK_P": 64, "BLOCK_C": 32}, {"BLOCK_P": 16, "BLOCK_C": 128}]), key=["C"])
@triton.jit
def _scale_shift_kernel(a_ptr, scale_ptr, shift_ptr, out_ptr, P, HW, C, CV: tl.constexpr, SHIFT: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # out[n, p, c] = a[n, p, c] * scale[n, c] (+ shift[n, c]) over the flattened pixels of all images,
    # indexed in 32 bits (supports() keeps them below 2^31): no 64-bit division per pixel.
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (p < P)[:, None] & channel_mask(c, C, CV)[None, :]
    per_image = row_offsets(p // HW, C, CV)[:, None] + c[None, :]
    scale = tl.load(scale_ptr + per_image, mask=mask, other=0.0)
    rows = row_offsets(p, C, CV)[:, None] + c[None, :]
    a = tl.load(a_ptr + rows, mask=mask, other=0.0).to(scale.dtype)
    out = a * scale
    if SHIFT:
        out += tl.load(shift_ptr + per_image, mask=mask, other=0.0)
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=mask)


def _channel_sums(a: Tensor, b: Tensor | None, acc: torch.dtype) -> Tensor:
    n, c, h, w = a.shape
    out = a.new_empty((n, c), dtype=acc)
    if n > 0:
        wrap_triton(_channel_sums_kernel)[(n, triton.cdiv(c, BLOCK_C))](
            a, a if b is None else b, out, h * w, c, CV=channel_divisor(c), PRODUCT=b is not None,
            ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    return out


def _scale_shift(a: Tensor, scale: Tensor, shift: Tensor | None, like: Tensor) -> Tensor:
    """a * scale (+ shift) per image and channel, laid out like `like` (torch.empty_like)."""
    n, c, h, w = a.shape
    out = torch.empty_like(a)
    if a.numel() > 0:
        grid = lambda meta: (triton.cdiv(n * h * w, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]))  # noqa: E731
        wrap_triton(_scale_shift_kernel)[grid](a, scale, scale if shift is None else shift, out, n * h * w, h * w, c,
                                               CV=channel_divisor(c), SHIFT=shift is not None)
    if like.is_contiguous(memory_format=torch.channels_last):  # then a is `like` itself
        return out
    return torch.empty_like(like).copy_(out)


def supports(x: Tensor, *args) -> bool:
    """fp32/fp16/fp64, bf16 on a GPU; fewer than 2^31 - 2^16 pixels in all (32-bit pixel indices)."""
    dtypes = (torch.float32, torch.float16, torch.float64) + ((torch.bfloat16,) if x.is_cuda else ())
    return x.dtype in dtypes and x.shape[0] * x.shape[2] * x.shape[3] < 2**31 - 2**16


@triton_op("fastmb::squeeze_excitation_triton", schemas.SQUEEZE_EXCITATION)
def forward(
    x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None, activation: str, gate: str
) -> tuple[Tensor, Tensor]:
    acc = accumulation_dtype(x.dtype)
    xs = nhwc(x)
    with autocast_off(x.device.type):  # the FC layers compute in the accumulation dtype
        pooled = _channel_sums(xs, None, acc) / (x.shape[2] * x.shape[3])
        scale = excitation(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate)[3]
        return _scale_shift(xs, scale, None, x), pooled


@triton_op("fastmb::squeeze_excitation_backward_triton", schemas.SQUEEZE_EXCITATION_BACKWARD)
def backward(
    grad_y: Tensor,
    x: Tensor,
    pooled: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    activation: str,
    gate: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with autocast_off(x.device.type):  # the FC layers compute in the accumulation dtype
        return _backward(grad_y, x, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate)


def _backward(grad_y, x, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate):
    xs, gys = nhwc(x), nhwc(grad_y)
    fc = excitation(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate)
    grad_scale = _channel_sums(gys, xs, pooled.dtype)
    parameters = (fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    grad_pooled, grad_parameters = excitation_backward(grad_scale, pooled, fc, parameters, activation, gate)
    grad_x = _scale_shift(gys, fc[3], grad_pooled / max(x.shape[2] * x.shape[3], 1), x)
    return (grad_x, *grad_parameters)
