// Device code shared by the forward (dwconv_bn_act_forward.cu) and backward
// (dwconv_bn_act_backward.cu) CUDA kernels of the fused depthwise conv + BN + activation.
//
// NHWC throughout: a thread owns V consecutive channels (one 16-byte access of x where the
// layout allows it) at a strip of kStrip output pixels along a row at a time; blocks are
// (channel vectors) x (strips), so a warp reads contiguous channels and neighbouring pixels,
// and the k x k halo re-reads hit L1.
#pragma once

#include "cuda_utils.cuh"

namespace fastmb::cuda {

template <int K>
using KernelSize = std::integral_constant<int, K>;

// Calls f(KernelSize<K>{}) for the kernel size: 3, 5 or 7 (cuda_geometry made sure).
template <typename F>
void dispatch_kernel_size(int k, F&& f) {
  TORCH_CHECK(k == 3 || k == 5 || k == 7, "fastmb: the CUDA depthwise kernels take 3x3, 5x5 or 7x7 kernels, got ", k);
  if (k == 3) f(KernelSize<3>{});
  else if (k == 5) f(KernelSize<5>{});
  else f(KernelSize<7>{});
}

// Strip s of the output rows' strips_per_row: its row (n * Ho + oh), first column and the
// number of its pixels inside the row (kStrip except at the row's end).
struct Strip {
  uint32_t row;
  int ow0, pixels;
};
__device__ __forceinline__ Strip strip_at(int64_t s, int strips_per_row, int wo) {
  const uint32_t row = uint32_t(s) / uint32_t(strips_per_row);  // 32-bit: strips < pixels < 2^31
  const int ow0 = int(uint32_t(s) - row * uint32_t(strips_per_row)) * kStrip;
  return {row, ow0, min(kStrip, wo - ow0)};
}

// For each tap (i * K + j) whose kernel row lies inside the image: on_tap(tap), then
// on_pixel(tap, r, x_tap) for each of the strip's pixels r whose input lies inside it (zero
// padding: the others add nothing); x_tap points at channel c there.
template <int K, typename T, typename OnTap, typename OnPixel>
__device__ __forceinline__ void for_each_strip_tap(const T* __restrict__ x, const CudaGeometry& g, Strip strip, int64_t c,
                                                   OnTap&& on_tap, OnPixel&& on_pixel) {
  const int64_t n = strip.row / uint32_t(g.ho), oh = strip.row % uint32_t(g.ho);
  const T* x_img = x + n * g.h * g.w * g.c + c;
  const int64_t ih0 = oh * g.sh - g.ph, iw0 = int64_t(strip.ow0) * g.sw - g.pw;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const int64_t ih = ih0 + int64_t(i) * g.dh;
    if (ih < 0 || ih >= g.h) continue;
    const T* x_row = x_img + ih * g.w * g.c;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      on_tap(i * K + j);
#pragma unroll
      for (int r = 0; r < kStrip; ++r) {
        const int64_t iw = iw0 + int64_t(r) * g.sw + int64_t(j) * g.dw;
        if (r < strip.pixels && iw >= 0 && iw < g.w) on_pixel(i * K + j, r, x_row + iw * g.c);
      }
    }
  }
}

// z[r][0:V] = the depthwise conv at the strip's pixel r (0 for r >= strip.pixels), channels
// c..c+V-1. w is [K * K][C] in float; each tap's weights are loaded once for the strip.
template <int K, int V, typename T>
__device__ __forceinline__ void conv_strip(float (&z)[kStrip][V], const T* __restrict__ x, const float* __restrict__ w,
                                           const CudaGeometry& g, Strip strip, int64_t c) {
#pragma unroll
  for (int r = 0; r < kStrip; ++r)
#pragma unroll
    for (int l = 0; l < V; ++l) z[r][l] = 0.f;
  float wv[V];
  for_each_strip_tap<K>(
      x, g, strip, c, [&](int tap) { load_floats<V>(wv, w + tap * g.c + c); },
      [&](int, int r, const T* x_tap) {
        float xv[V];
        load_floats<V>(xv, x_tap);
#pragma unroll
        for (int l = 0; l < V; ++l) z[r][l] = fmaf(xv[l], wv[l], z[r][l]);
      });
}

// A thread's per-channel BN values, loaded once: the statistics used to normalise (batch or
// running) and the affine parameters.
template <int V>
struct ChannelNorm {
  float mean[V], invstd[V], gamma[V], beta[V];

  __device__ __forceinline__ ChannelNorm(const float* m, const float* var, const float* g, const float* b, float eps, int64_t c) {
#pragma unroll
    for (int l = 0; l < V; ++l) {
      mean[l] = m[c + l];
      invstd[l] = 1.f / sqrtf(var[c + l] + eps);
      gamma[l] = g[c + l];
      beta[l] = b[c + l];
    }
  }

  // From z and dL/dy at one pixel: x_hat = (z - mean) * invstd, and dL/du = act'(u) * dL/dy
  // with u = x_hat * gamma + beta.
  __device__ __forceinline__ void grad_u(float (&gu)[V], float (&x_hat)[V], const float (&z)[V], const float (&gy)[V],
                                         Activation act) const {
#pragma unroll
    for (int l = 0; l < V; ++l) {
      x_hat[l] = (z[l] - mean[l]) * invstd[l];
      gu[l] = activation_grad(act, gy[l], x_hat[l] * gamma[l] + beta[l]);
    }
  }
};

}  // namespace fastmb::cuda
