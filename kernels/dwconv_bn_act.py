"""Triton kernels of the fused depthwise conv + BatchNorm + activation, and the operators
fastmb::dwconv_bn_act_triton / fastmb::dwconv_bn_act_backward_triton that launch them.

Tensors are NHWC (other layouts are converted on entry); a program owns a tile of output
pixels x channels and recomputes z = conv(x) in registers (DESIGN.md's kernel plan):
  eval forward    one kernel: y = act(z * scale + shift)
  train forward   statistics kernel: per-tile mean and M2 of z, Chan-merged; then as eval
  backward        pass 1: sums of dL/du and dL/du * x_hat; pass 2: dL/dz (stored) and per-tile
                  weight-gradient partials; pass 3: dL/dx, a gather over the taps
Offsets are 64-bit. Kernel sizes 3, 5 and 7 (square) are supported; others use the reference.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from fastmb.ops import schemas
from fastmb.ops.activations import ACTIVATIONS
from fastmb.ops.common import autocast_off, bn_affine, conv_output_shape, memory_format, new_output, padding_sides
from fastmb.kernels.common import (
    accumulation_dtype,
    activate,
    activation_grad,
    autotune_configs,
    channel_divisor,
    channel_mask,
    fixed_blocks,
    nhwc,
    row_offsets,
    triton_op as _triton_op,
)

KERNEL_SIZES = (3, 5, 7)
STATS_BLOCK_P, BLOCK_C = fixed_blocks(64, 32)


@triton.jit
def _load_tap(x_ptr, n, oh, ow, c, p_mask, c_mask, kh, kw, H, W, C, SH, SW, PH, PW, DH, DW, CV: tl.constexpr, ACC: tl.constexpr):
    """The input values tap (kh, kw) reads for a tile of output pixels; zero outside the image."""
    ih = oh * SH - PH + kh * DH
    iw = ow * SW - PW + kw * DW
    valid = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    offsets = row_offsets((n * H + ih) * W + iw, C, CV)
    return tl.load(x_ptr + offsets[:, None] + c[None, :], mask=valid[:, None] & c_mask[None, :], other=0.0).to(ACC)


@triton.jit
def _conv_tile(x_ptr, w_ptr, n, oh, ow, c, p_mask, c_mask, H, W, C, SH, SW, PH, PW, DH, DW, CV: tl.constexpr,
               K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    # Kernel rows as a loop, not unrolled: unrolled, the compiler issued 120 of the forward's 188
    # loads before its first FMA, holding every tap at once (PTX for sm_90: 253 registers at
    # k=5, 764 bytes spilled at k=7; as a loop 114 and 151 registers, no spills).
    for kh in range(K):
        for kw in tl.static_range(K):
            xv = _load_tap(x_ptr, n, oh, ow, c, p_mask, c_mask, kh, kw, H, W, C, SH, SW, PH, PW, DH, DW, CV, ACC)
            wv = tl.load(w_ptr + (kh * K + kw) * C + c, mask=c_mask, other=0.0)
            acc += xv * wv[None, :]
    return acc


@triton.jit
def _tile_indices(P, C, HO, WO, CV: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # Pixel indices in 32 bits (supports() keeps them below 2^31; offsets are 64-bit): 64-bit
    # divisions were 8 of the forward kernel's 947 PTX instructions, each a long subroutine.
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ow = p % WO
    oh = (p // WO) % HO
    n = p // (WO * HO)
    return p, c, n, oh, ow, p < P, channel_mask(c, C, CV)


@triton.autotune(
    configs=autotune_configs([{"BLOCK_P": 64, "BLOCK_C": 32}, {"BLOCK_P": 32, "BLOCK_C": 64}, {"BLOCK_P": 128, "BLOCK_C": 16}]),
    key=["C", "K", "SH"],
)
@triton.jit
def _forward_kernel(x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, P, H, W, C, HO, WO, SH, SW, PH, PW, DH, DW, CV: tl.constexpr,
                    K: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p, c, n, oh, ow, p_mask, c_mask = _tile_indices(P, C, HO, WO, CV, BLOCK_P, BLOCK_C)
    z = _conv_tile(x_ptr, w_ptr, n, oh, ow, c, p_mask, c_mask, H, W, C, SH, SW, PH, PW, DH, DW, CV, K, BLOCK_P, BLOCK_C, ACC)
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
    y = activate(z * scale[None, :] + shift[None, :], ACT)
    mask = p_mask[:, None] & c_mask[None, :]
    tl.store(y_ptr + row_offsets(p, C, CV)[:, None] + c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _statistics_kernel(x_ptr, w_ptr, mean_ptr, m2_ptr, P, H, W, C, HO, WO, SH, SW, PH, PW, DH, DW, CV: tl.constexpr,
                       K: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # Per tile: mean and M2 over its valid pixels (two passes in registers), for Chan's merge.
    p, c, n, oh, ow, p_mask, c_mask = _tile_indices(P, C, HO, WO, CV, BLOCK_P, BLOCK_C)
    z = _conv_tile(x_ptr, w_ptr, n, oh, ow, c, p_mask, c_mask, H, W, C, SH, SW, PH, PW, DH, DW, CV, K, BLOCK_P, BLOCK_C, ACC)
    count = tl.sum(p_mask.to(ACC), axis=0)
    mean = tl.sum(z, axis=0) / count  # masked pixels contribute zeros
    d = tl.where(p_mask[:, None], z - mean[None, :], 0.0)
    out = tl.program_id(0).to(tl.int64) * C + c
    tl.store(mean_ptr + out, mean, mask=c_mask)
    tl.store(m2_ptr + out, tl.sum(d * d, axis=0), mask=c_mask)


@triton.jit
def _grad_u_tile(x_ptr, w_ptr, gy_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, p, n, oh, ow, c, p_mask, c_mask,
                 H, W, C, SH, SW, PH, PW, DH, DW, CV: tl.constexpr, K: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """(x_hat, dL/du) of a tile; zero outside the tensor."""
    z = _conv_tile(x_ptr, w_ptr, n, oh, ow, c, p_mask, c_mask, H, W, C, SH, SW, PH, PW, DH, DW, CV, K, BLOCK_P, BLOCK_C, ACC)
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
    gamma = tl.load(gamma_ptr + c, mask=c_mask, other=0.0)
    beta = tl.load(beta_ptr + c, mask=c_mask, other=0.0)
    mask = p_mask[:, None] & c_mask[None, :]
    x_hat = tl.where(mask, (z - mean[None, :]) * invstd[None, :], 0.0)
    gy = tl.load(gy_ptr + row_offsets(p, C, CV)[:, None] + c[None, :], mask=mask, other=0.0).to(ACC)
    gu = activation_grad(gy, x_hat * gamma[None, :] + beta[None, :], ACT)
    return x_hat, tl.where(mask, gu, 0.0)


@triton.jit
def _grad_sums_kernel(x_ptr, w_ptr, gy_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, sum_gu_ptr, sum_gu_xhat_ptr,
                      P, H, W, C, HO, WO, SH, SW, PH, PW, DH, DW, CV: tl.constexpr, K: tl.constexpr, ACT: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p, c, n, oh, ow, p_mask, c_mask = _tile_indices(P, C, HO, WO, CV, BLOCK_P, BLOCK_C)
    x_hat, gu = _grad_u_tile(x_ptr, w_ptr, gy_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, p, n, oh, ow, c, p_mask, c_mask,
                             H, W, C, SH, SW, PH, PW, DH, DW, CV, K, ACT, ACC, BLOCK_P, BLOCK_C)
    out = tl.program_id(0).to(tl.int64) * C + c
    tl.store(sum_gu_ptr + out, tl.sum(gu, axis=0), mask=c_mask)
    tl.store(sum_gu_xhat_ptr + out, tl.sum(gu * x_hat, axis=0), mask=c_mask)


@triton.jit
def _grad_z_kernel(x_ptr, w_ptr, gy_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, a_ptr, b_ptr, d_ptr, gz_ptr, gw_ptr,
                   P, H, W, C, HO, WO, SH, SW, PH, PW, DH, DW, CV: tl.constexpr, K: tl.constexpr, ACT: tl.constexpr,
                   ACC: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # dL/dz = a * dL/du - b - x_hat * d per channel (b, d: the batch statistics' terms); stored
    # for pass 3, and multiplied with x at each tap into this tile's weight-gradient partials.
    p, c, n, oh, ow, p_mask, c_mask = _tile_indices(P, C, HO, WO, CV, BLOCK_P, BLOCK_C)
    x_hat, gu = _grad_u_tile(x_ptr, w_ptr, gy_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, p, n, oh, ow, c, p_mask, c_mask,
                             H, W, C, SH, SW, PH, PW, DH, DW, CV, K, ACT, ACC, BLOCK_P, BLOCK_C)
    a = tl.load(a_ptr + c, mask=c_mask, other=0.0)
    b = tl.load(b_ptr + c, mask=c_mask, other=0.0)
    d = tl.load(d_ptr + c, mask=c_mask, other=0.0)
    mask = p_mask[:, None] & c_mask[None, :]
    # The x_hat term left out where d is 0 (eval): a NaN in z must not reach dL/dz through it.
    gz = tl.where(mask, a[None, :] * gu - b[None, :] - tl.where(d[None, :] == 0.0, 0.0, x_hat * d[None, :]), 0.0)
    tl.store(gz_ptr + row_offsets(p, C, CV)[:, None] + c[None, :], gz, mask=mask)
    if WEIGHT_GRAD:
        for kh in tl.static_range(K):
            for kw in tl.static_range(K):
                xv = _load_tap(x_ptr, n, oh, ow, c, p_mask, c_mask, kh, kw, H, W, C, SH, SW, PH, PW, DH, DW, CV, ACC)
                partial = tl.sum(gz * xv, axis=0)
                tl.store(gw_ptr + (tl.program_id(0).to(tl.int64) * (K * K) + kh * K + kw) * C + c, partial, mask=c_mask)


@triton.autotune(configs=autotune_configs([{"BLOCK_P": 64, "BLOCK_C": 32}, {"BLOCK_P": 32, "BLOCK_C": 64}]), key=["C", "K", "SH"])
@triton.jit
def _grad_x_kernel(gz_ptr, w_ptr, gx_ptr, Q, H, W, C, HO, WO, SH, SW, PH, PW, DH, DW, CV: tl.constexpr,
                   K: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # dL/dx at input pixels: the sum over taps of dL/dz at the output pixel that read it.
    q, c, n, ih, iw, q_mask, c_mask = _tile_indices(Q, C, H, W, CV, BLOCK_P, BLOCK_C)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for kh in range(K):  # a loop, not unrolled: see _conv_tile
        th = ih + PH - kh * DH
        oh = th // SH
        valid_h = (th >= 0) & (th % SH == 0) & (oh < HO)
        for kw in tl.static_range(K):
            tw = iw + PW - kw * DW
            ow = tw // SW
            valid = q_mask & valid_h & (tw >= 0) & (tw % SW == 0) & (ow < WO)
            offsets = row_offsets((n * HO + oh) * WO + ow, C, CV)
            gz = tl.load(gz_ptr + offsets[:, None] + c[None, :], mask=valid[:, None] & c_mask[None, :], other=0.0)
            wv = tl.load(w_ptr + (kh * K + kw) * C + c, mask=c_mask, other=0.0)
            acc += gz * wv[None, :]
    mask = q_mask[:, None] & c_mask[None, :]
    tl.store(gx_ptr + row_offsets(q, C, CV)[:, None] + c[None, :], acc.to(gx_ptr.dtype.element_ty), mask=mask)


def _acc_triton(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _geometry(x, weight, stride, padding, dilation) -> dict:
    n, c, h, w = x.shape
    _, _, ho, wo = conv_output_shape(x, weight, stride, padding, dilation)
    top, _, left, _ = padding_sides(padding)  # the bottom and right padding only set HO and WO
    return dict(H=h, W=w, C=c, HO=ho, WO=wo, SH=stride[0], SW=stride[1], PH=top, PW=left,
                DH=dilation[0], DW=dilation[1], CV=channel_divisor(c), K=weight.shape[2])


def _taps_major(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.to(dtype).reshape(weight.shape[0], -1).t().contiguous()


def _from_nhwc(nhwc_tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`nhwc_tensor` in `like`'s memory format, with the fake kernels' strides."""
    if memory_format(like) == torch.channels_last:
        return nhwc_tensor
    return new_output(nhwc_tensor.shape, like).copy_(nhwc_tensor)


def supports(x: torch.Tensor, weight: torch.Tensor, bn_weight, bn_bias, running_mean, running_var, stride, padding,
             *args) -> bool:
    """Square 3/5/7 kernels; fp32/fp16/bf16/fp64 (no bf16 in the CPU interpreter); pixel indices,
    of the padded input and of the output, below 2^31 (the kernels index pixels in 32 bits)."""
    k = weight.shape[2]
    dtypes = (torch.float32, torch.float16, torch.float64) + ((torch.bfloat16,) if x.is_cuda else ())
    n, _, h, w = x.shape
    top, bottom, left, right = padding_sides(padding)
    # The output has no more pixels than the padded input; 2^16: a tile's reach past the last one.
    small = n * (h + top + bottom) * (w + left + right) < 2**31 - 2**16
    return k == weight.shape[3] and k in KERNEL_SIZES and x.dtype in dtypes and small


@_triton_op("fastmb::dwconv_bn_act_triton", schemas.DWCONV_BN_ACT)
def forward(
    x: Tensor,
    weight: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    eps: float,
    training: bool,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    with autocast_off(x.device.type):
        return _forward(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, eps, training, activation)


def _forward(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, eps, training, activation):
    acc = accumulation_dtype(x.dtype)
    g = _geometry(x, weight, stride, padding, dilation)
    n, c = x.shape[:2]
    p = n * g["HO"] * g["WO"]
    xs, w = nhwc(x), _taps_major(weight, acc)
    y = torch.empty((n, c, g["HO"], g["WO"]), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if not training:
        mean, var = running_mean.to(acc).clone(), running_var.to(acc).clone()
    elif p == 0:
        mean, var = x.new_zeros(c, dtype=acc), x.new_ones(c, dtype=acc)
    else:
        tiles = triton.cdiv(p, STATS_BLOCK_P)
        means = x.new_empty((tiles, c), dtype=acc)
        m2s = torch.empty_like(means)
        wrap_triton(_statistics_kernel)[(tiles, triton.cdiv(c, BLOCK_C))](
            xs, w, means, m2s, p, **g, ACC=_acc_triton(acc), BLOCK_P=STATS_BLOCK_P, BLOCK_C=BLOCK_C)
        # Chan's merge of the tiles: counts are full tiles but the last.
        counts = torch.full((tiles, 1), float(STATS_BLOCK_P), dtype=acc, device=x.device)
        counts[-1] = p - (tiles - 1) * STATS_BLOCK_P
        mean = (means * counts).sum(0) / p
        var = (m2s + counts * (means - mean) ** 2).sum(0) / p
    if p > 0:
        gamma, beta = bn_affine(bn_weight, bn_bias, mean)
        scale = gamma * torch.rsqrt(var + eps)
        shift = beta - mean * scale
        grid = lambda meta: (triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]))  # noqa: E731
        wrap_triton(_forward_kernel)[grid](xs, w, scale, shift, y, p, **g, ACT=ACTIVATIONS[activation].code, ACC=_acc_triton(acc))
    return _from_nhwc(y, x), mean, var


@_triton_op("fastmb::dwconv_bn_act_backward_triton", schemas.DWCONV_BN_ACT_BACKWARD)
def backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    eps: float,
    training: bool,
    activation: str,
    output_mask: list[bool],
    batch_sums: Tensor | None = None,
    batch_count: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with autocast_off(x.device.type):
        return _backward(grad_y, x, weight, bn_weight, bn_bias, mean, var, stride, padding, dilation, eps, training, activation,
                         output_mask, batch_sums, batch_count)


def _backward(grad_y, x, weight, bn_weight, bn_bias, mean, var, stride, padding, dilation, eps, training, activation, output_mask,
              batch_sums, batch_count):
    acc = mean.dtype
    g = _geometry(x, weight, stride, padding, dilation)
    n, c = x.shape[:2]
    p = n * g["HO"] * g["WO"]
    affine_dtype = bn_weight.dtype if bn_weight is not None else acc
    xs, gys, w = nhwc(x), nhwc(grad_y), _taps_major(weight, acc)
    invstd = torch.rsqrt(var + eps)
    gamma, beta = bn_affine(bn_weight, bn_bias, mean)
    a = gamma * invstd
    b, d = torch.zeros_like(mean), torch.zeros_like(mean)
    grad_gamma, grad_beta = mean.new_zeros(c), mean.new_zeros(c)
    tiles = triton.cdiv(p, STATS_BLOCK_P)
    launch = dict(P=p, **g, ACT=ACTIVATIONS[activation].code, ACC=_acc_triton(acc), BLOCK_P=STATS_BLOCK_P, BLOCK_C=BLOCK_C)
    grid = (tiles, triton.cdiv(c, BLOCK_C))
    if p > 0 and ((training and batch_sums is None) or output_mask[2]):
        sums_gu = x.new_empty((tiles, c), dtype=acc)
        sums_gu_xhat = torch.empty_like(sums_gu)
        wrap_triton(_grad_sums_kernel)[grid](xs, w, gys, mean, invstd, gamma, beta, sums_gu, sums_gu_xhat, **launch)
        grad_beta, grad_gamma = sums_gu.sum(0), sums_gu_xhat.sum(0)
    if p > 0 and training:  # the batch statistics' share of dL/dz, from the whole batch's sums if given
        sum_gu, sum_gu_xhat, count = (grad_beta, grad_gamma, p) if batch_sums is None else (*batch_sums.to(acc), batch_count)
        b, d = a * sum_gu / count, a * sum_gu_xhat / count
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    grad_weight = weight.new_zeros(weight.shape) if output_mask[1] else weight.new_empty(0)
    if p > 0 and (output_mask[0] or output_mask[1]):
        gz = x.new_empty((p, c), dtype=acc)
        gw_partials = x.new_empty((tiles, g["K"] * g["K"], c) if output_mask[1] else (1,), dtype=acc)
        wrap_triton(_grad_z_kernel)[grid](xs, w, gys, mean, invstd, gamma, beta, a, b, d, gz, gw_partials,
                                          WEIGHT_GRAD=bool(output_mask[1]), **launch)
        if output_mask[1]:
            grad_weight = gw_partials.sum(0).t().reshape(weight.shape).to(weight.dtype).contiguous()
        if output_mask[0]:
            q = x.shape[0] * x.shape[2] * x.shape[3]
            x_grid = lambda meta: (triton.cdiv(q, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]))  # noqa: E731
            wrap_triton(_grad_x_kernel)[x_grid](gz, w, grad_x, q, **g, ACC=_acc_triton(acc))
    elif output_mask[0]:
        grad_x.zero_()
    return (
        _from_nhwc(grad_x, x) if output_mask[0] else x.new_empty(0),
        grad_weight,
        grad_gamma.to(affine_dtype) if output_mask[2] else mean.new_empty(0, dtype=affine_dtype),
        grad_beta.to(affine_dtype) if output_mask[2] else mean.new_empty(0, dtype=affine_dtype),
    )
