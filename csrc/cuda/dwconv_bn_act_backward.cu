// Fused depthwise conv + BatchNorm + activation on CUDA: the backward (DESIGN.md's plan;
// z = conv(x) is recomputed, never stored).
// Passes 1 and 2 recompute z a strip of output pixels at a time (dwconv_bn_act.cuh).
//   pass 1  per-channel sums of dL/du and dL/du * x_hat (the BN affine grads, and in training
//           the batch statistics' share of dL/dz); skipped in eval unless the affine grads are
//           wanted
//   pass 2  dL/dz = a * dL/du - b - x_hat * d per pixel, written to a float buffer for pass 3,
//           and the weight gradient: each thread keeps its k*k per-channel sums of dL/dz * x in
//           registers over its pixels, blocks reduce them, one partial row per block
//   pass 3  dL/dx as a gather of dL/dz over the taps (no atomics)
#include "dwconv_bn_act.cuh"

namespace fastmb::cuda {
namespace {

// Pass 1: block b writes its per-channel sums of dL/du and dL/du * x_hat to row b of the
// partials; each thread takes strips of output pixels (a grid-stride loop).
template <typename T, int K, int V>
__global__ void __launch_bounds__(kThreads, kTwoBlocksPerSm)
    grad_sums_kernel(float* __restrict__ partial_gu, float* __restrict__ partial_gu_xhat, const T* __restrict__ gy,
                     const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ mean, const float* __restrict__ var,
                     const float* __restrict__ gamma, const float* __restrict__ beta, float eps, CudaGeometry g, int strips_per_row,
                     int64_t strips, Activation act) {
  __shared__ float shared[kThreads * V];
  const int64_t c = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  const bool active = c < g.c;  // inactive threads still take part in the block sums
  float sum_gu[V] = {}, sum_gu_xhat[V] = {};
  if (active) {
    const ChannelNorm<V> bn(mean, var, gamma, beta, eps, c);
    for (int64_t s = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; s < strips; s += int64_t(gridDim.x) * blockDim.y) {
      const Strip strip = strip_at(s, strips_per_row, g.wo);
      float z[kStrip][V];
      conv_strip<K, V>(z, x, w, g, strip, c);
      const T* gy_strip = gy + (int64_t(strip.row) * g.wo + strip.ow0) * g.c + c;
#pragma unroll
      for (int r = 0; r < kStrip; ++r) {
        if (r >= strip.pixels) break;
        float gyv[V], gu[V], x_hat[V];
        load_floats<V>(gyv, gy_strip + int64_t(r) * g.c);
        bn.grad_u(gu, x_hat, z[r], gyv, act);
#pragma unroll
        for (int l = 0; l < V; ++l) sum_gu[l] += gu[l], sum_gu_xhat[l] = fmaf(gu[l], x_hat[l], sum_gu_xhat[l]);
      }
    }
  }
  sum_over_rows<V>(sum_gu, shared);
  sum_over_rows<V>(sum_gu_xhat, shared);
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int l = 0; l < V; ++l) {
      partial_gu[blockIdx.x * g.c + c + l] = sum_gu[l];
      partial_gu_xhat[blockIdx.x * g.c + c + l] = sum_gu_xhat[l];
    }
  }
}

// Per channel, from the pass-1 partials (float64 sums over the blocks' rows, merge_block_shape;
// blocks = 0 when pass 1 was skipped): coef = [a = gamma * invstd; b; d] with
// dL/dz = a * dL/du - b - x_hat * d, and the BN affine grads (grad_gamma = sum dL/du * x_hat,
// grad_beta = sum dL/du) when they are wanted.
__global__ void __launch_bounds__(kThreads)
    coefficients_kernel(float* __restrict__ coef, float* __restrict__ grad_gamma, float* __restrict__ grad_beta,
                        const float* __restrict__ partial_gu, const float* __restrict__ partial_gu_xhat, int64_t blocks,
                        const float* __restrict__ var, const float* __restrict__ gamma, float eps, int64_t channels, double values,
                        bool training) {
  __shared__ double shared[kThreads * 2];
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = c < channels;  // inactive threads still take part in the block sums
  double sums[2] = {};  // dL/du, dL/du * x_hat
  if (active) {
    for (int64_t b = threadIdx.y; b < blocks; b += blockDim.y) {
      sums[0] += partial_gu[b * channels + c];
      sums[1] += partial_gu_xhat[b * channels + c];
    }
  }
  sum_over_rows<2>(sums, shared);
  if (threadIdx.y != 0 || !active) return;
  const float invstd = 1.f / sqrtf(var[c] + eps), a = gamma[c] * invstd;
  coef[c] = a;
  coef[channels + c] = training ? a * float(sums[0] / values) : 0.f;
  coef[2 * channels + c] = training ? a * float(sums[1] / values) : 0.f;
  if (grad_gamma != nullptr) {
    grad_gamma[c] = float(sums[1]);
    grad_beta[c] = float(sums[0]);
  }
}

// Pass 2: dL/dz into gz (when dL/dx is wanted) and, when partial_gw is given, block b's weight
// gradient [K * K][C] into partial_gw[b]. V is small (2 or 4) so the K*K*V sums fit in registers.
template <typename T, int K, int V>
__global__ void __launch_bounds__(kThreads, kTwoBlocksPerSm)
    grad_z_kernel(float* __restrict__ gz, float* __restrict__ partial_gw, const T* __restrict__ gy, const T* __restrict__ x,
                  const float* __restrict__ w, const float* __restrict__ mean, const float* __restrict__ var,
                  const float* __restrict__ gamma, const float* __restrict__ beta, const float* __restrict__ coef, float eps, CudaGeometry g,
                  int strips_per_row, int64_t strips, Activation act) {
  __shared__ float shared[kThreads * V];
  const int64_t c = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  const bool active = c < g.c;  // inactive threads still take part in the block sums
  float gw[K * K][V] = {};
  if (active) {
    const ChannelNorm<V> bn(mean, var, gamma, beta, eps, c);
    float a[V], b[V], d[V];
#pragma unroll
    for (int l = 0; l < V; ++l) a[l] = coef[c + l], b[l] = coef[g.c + c + l], d[l] = coef[2 * g.c + c + l];
    for (int64_t s = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; s < strips; s += int64_t(gridDim.x) * blockDim.y) {
      const Strip strip = strip_at(s, strips_per_row, g.wo);
      const int64_t p0 = int64_t(strip.row) * g.wo + strip.ow0;
      float z[kStrip][V];  // z, then dL/dz in place
      conv_strip<K, V>(z, x, w, g, strip, c);
#pragma unroll
      for (int r = 0; r < kStrip; ++r) {
        if (r >= strip.pixels) break;
        float gyv[V], gu[V], x_hat[V];
        load_floats<V>(gyv, gy + (p0 + r) * g.c + c);
        bn.grad_u(gu, x_hat, z[r], gyv, act);
#pragma unroll
        // The x_hat term left out where d is 0 (eval): a NaN in z must not reach dL/dz through it.
        for (int l = 0; l < V; ++l) z[r][l] = a[l] * gu[l] - b[l] - (d[l] == 0.f ? 0.f : x_hat[l] * d[l]);
        if (gz != nullptr) store_floats<V>(gz + (p0 + r) * g.c + c, z[r]);
      }
      if (partial_gw == nullptr) continue;
      // The taps' inputs were just read by conv_strip: these loads hit L1.
      for_each_strip_tap<K>(
          x, g, strip, c, [](int) {},
          [&](int tap, int r, const T* x_tap) {
            float xv[V];
            load_floats<V>(xv, x_tap);
#pragma unroll
            for (int l = 0; l < V; ++l) gw[tap][l] = fmaf(z[r][l], xv[l], gw[tap][l]);
          });
    }
  }
  if (partial_gw == nullptr) return;  // the same for the whole block
#pragma unroll
  for (int tap = 0; tap < K * K; ++tap) {
    sum_over_rows<V>(gw[tap], shared);
    if (threadIdx.y == 0 && active) {
#pragma unroll
      for (int l = 0; l < V; ++l) partial_gw[(int64_t(blockIdx.x) * K * K + tap) * g.c + c + l] = gw[tap][l];
    }
  }
}

// Pass 3: dL/dx at one input pixel and V channels per thread, gathered from the output pixels
// whose taps read it.
template <typename T, int K, int V>
__global__ void __launch_bounds__(kThreads)
    grad_x_kernel(T* __restrict__ gx, const float* __restrict__ gz, const float* __restrict__ w, CudaGeometry g) {
  const int64_t c = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  const int64_t q = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (c >= g.c || q >= g.n * g.h * g.w) return;
  const PixelCoords in = pixel_coords(uint32_t(q), uint32_t(g.h), uint32_t(g.w));
  const float* gz_img = gz + in.n * g.ho * g.wo * g.c + c;
  float acc[V] = {};
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const int th = int(in.h) + g.ph - i * g.dh;  // = oh * stride when output row oh reads it
    if (th < 0 || th % g.sh != 0 || th / g.sh >= g.ho) continue;
    const int64_t oh = th / g.sh;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int tw = int(in.w) + g.pw - j * g.dw;
      if (tw < 0 || tw % g.sw != 0 || tw / g.sw >= g.wo) continue;
      float gzv[V], wv[V];
      load_floats<V>(gzv, gz_img + (oh * g.wo + tw / g.sw) * g.c);
      load_floats<V>(wv, w + (i * K + j) * g.c + c);
#pragma unroll
      for (int l = 0; l < V; ++l) acc[l] = fmaf(gzv[l], wv[l], acc[l]);
    }
  }
  store_floats<V>(gx + q * g.c + c, acc);
}

}  // namespace

void launch_dwconv_grad_sums(Element element, int vector, dim3 grid, dim3 block, cudaStream_t stream, float* partial_gu,
                             float* partial_gu_xhat, const void* grad_y, const void* x, const float* w, const float* mean,
                             const float* var, const float* gamma, const float* beta, float eps, const CudaGeometry& g,
                             const StripGrid& strips, Activation act) {
  dispatch_element(element, [&](auto e) {
    using T = decltype(e);
    dispatch_width<T>(vector, [&](auto width) {
      dispatch_kernel_size(g.kh, [&](auto kernel_size) {
        grad_sums_kernel<T, decltype(kernel_size)::value, decltype(width)::value><<<grid, block, 0, stream>>>(
            partial_gu, partial_gu_xhat, static_cast<const T*>(grad_y), static_cast<const T*>(x), w, mean, var, gamma, beta, eps, g,
            strips.per_row, strips.count, act);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void launch_dwconv_coefficients(cudaStream_t stream, float* coef, float* grad_gamma, float* grad_beta, const float* partial_gu,
                                const float* partial_gu_xhat, int64_t blocks, const float* var, const float* gamma, float eps,
                                int64_t channels, double pixels, bool batch_statistics) {
  const dim3 block = merge_block_shape();
  coefficients_kernel<<<ceil_div(channels, block.x), block, 0, stream>>>(coef, grad_gamma, grad_beta, partial_gu, partial_gu_xhat, blocks,
                                                                         var, gamma, eps, channels, pixels, batch_statistics);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_dwconv_grad_z(Element element, int vector, dim3 grid, dim3 block, cudaStream_t stream, float* grad_z, float* partial_gw,
                          const void* grad_y, const void* x, const float* w, const float* mean, const float* var, const float* gamma,
                          const float* beta, const float* coef, float eps, const CudaGeometry& g, const StripGrid& strips,
                          Activation act) {
  dispatch_element(element, [&](auto e) {
    using T = decltype(e);
    dispatch_kernel_size(g.kh, [&](auto kernel_size) {
      constexpr int K = decltype(kernel_size)::value;
      dispatch_vector<grad_z_vector(K)>(vector, [&](auto width) {
        grad_z_kernel<T, K, decltype(width)::value><<<grid, block, 0, stream>>>(
            grad_z, partial_gw, static_cast<const T*>(grad_y), static_cast<const T*>(x), w, mean, var, gamma, beta, coef, eps, g,
            strips.per_row, strips.count, act);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void launch_dwconv_grad_x(Element element, int vector, dim3 grid, dim3 block, cudaStream_t stream, void* grad_x, const float* grad_z,
                          const float* w, const CudaGeometry& g) {
  dispatch_element(element, [&](auto e) {
    using T = decltype(e);
    dispatch_width<T>(vector, [&](auto width) {
      dispatch_kernel_size(g.kh, [&](auto kernel_size) {
        grad_x_kernel<T, decltype(kernel_size)::value, decltype(width)::value><<<grid, block, 0, stream>>>(static_cast<T*>(grad_x),
                                                                                                              grad_z, w, g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

}  // namespace fastmb::cuda
