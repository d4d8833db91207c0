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
#include <torch/library.h>

#include "dwconv_bn_act.cuh"

namespace fastmb::cuda {
namespace {

using at::Tensor;

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

std::tuple<Tensor, Tensor, Tensor, Tensor> dwconv_bn_act_backward(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& weight, const std::optional<Tensor>& bn_weight,
    const std::optional<Tensor>& bn_bias, const Tensor& mean_in, const Tensor& var_in, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, double eps, bool training, c10::string_view activation,
    std::array<bool, 3> output_mask, const std::optional<Tensor>& batch_sums, int64_t batch_count) {
  const CudaGeometry g = cuda_geometry("dwconv_bn_act_backward", x_in, weight, stride, padding, dilation, bn_weight, bn_bias);
  check_dwconv_backward(grad_y_in, x_in, g, mean_in, var_in, batch_sums, batch_count);
  const bool group_sums = training && batch_sums.has_value();  // the process group's, instead of this batch's
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const NoAutocast no_autocast;
  const Activation act = parse_activation(activation);
  const auto float_options = x_in.options().dtype(at::kFloat);
  const at::ScalarType affine_type = bn_weight.has_value() ? bn_weight->scalar_type() : at::kFloat;
  const bool want_x = output_mask[0], want_weight = output_mask[1], want_affine = output_mask[2];

  Nhwc4dOutput grad_x(want_x ? x_in.sizes() : at::IntArrayRef{0}, x_in.options(),
                      want_x ? x_in.suggest_memory_format() : at::MemoryFormat::Contiguous);
  Tensor grad_weight = want_weight ? at::zeros_like(weight, at::MemoryFormat::Contiguous) : at::empty({0}, weight.options());
  Tensor grad_gamma = at::zeros({want_affine ? g.c : 0}, float_options), grad_beta = at::zeros_like(grad_gamma);
  if (g.pixels == 0 || !(want_x || want_weight || want_affine)) {
    if (want_x) grad_x.nhwc.zero_();
    return {grad_x.finish(), grad_weight, grad_gamma.to(affine_type), grad_beta.to(affine_type)};
  }

  const Tensor x = as_nhwc(x_in), grad_y = as_nhwc(grad_y_in);
  const Tensor w = taps_major(weight, at::kFloat);
  const Tensor mean = mean_in.to(at::kFloat).contiguous(), var = var_in.to(at::kFloat).contiguous();
  const Tensor gamma = vector_or(bn_weight, g.c, at::kFloat, x, 1.0), beta = vector_or(bn_bias, g.c, at::kFloat, x, 0.0);
  const Tensor coef = at::empty({3, g.c}, float_options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int width = vector_width(x.scalar_type(), g.c, {&x, &grad_y, &grad_x.nhwc});
  const StripGrid strips = strip_grid(g);  // passes 1 and 2 take strips of output pixels

  dispatch_floating(x.scalar_type(), "dwconv_bn_act_backward", [&](auto element) {
    using T = decltype(element);
    dispatch_kernel_size(g.kh, [&](auto kernel_size) {
      constexpr int K = decltype(kernel_size)::value;
      // Passes 1 and 3 use full 16-byte vectors where they can.
      Tensor partial_gu, partial_gu_xhat;
      if ((training && !group_sums) || want_affine) {
        dispatch_width<T>(width, [&](auto vector) {
          constexpr int V = decltype(vector)::value;
          const dim3 block = block_shape(g.c / V);
          const int64_t channel_blocks = ceil_div(g.c / V, block.x);
          const int64_t blocks = reduction_blocks(strips.count, block.y, channel_blocks);
          partial_gu = at::empty({blocks, g.c}, float_options);
          partial_gu_xhat = at::empty_like(partial_gu);
          grad_sums_kernel<T, K, V><<<dim3(blocks, channel_blocks), block, 0, stream>>>(
              partial_gu.mutable_data_ptr<float>(), partial_gu_xhat.mutable_data_ptr<float>(), grad_y.const_data_ptr<T>(),
              x.const_data_ptr<T>(), w.const_data_ptr<float>(), mean.const_data_ptr<float>(), var.const_data_ptr<float>(),
              gamma.const_data_ptr<float>(), beta.const_data_ptr<float>(), float(eps), g, strips.per_row, strips.count, act);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
      const dim3 merge_block = merge_block_shape();
      coefficients_kernel<<<ceil_div(g.c, merge_block.x), merge_block, 0, stream>>>(
          coef.mutable_data_ptr<float>(), want_affine ? grad_gamma.mutable_data_ptr<float>() : nullptr,
          want_affine ? grad_beta.mutable_data_ptr<float>() : nullptr,
          partial_gu.defined() ? partial_gu.const_data_ptr<float>() : nullptr,
          partial_gu_xhat.defined() ? partial_gu_xhat.const_data_ptr<float>() : nullptr, partial_gu.defined() ? partial_gu.size(0) : 0,
          var.const_data_ptr<float>(), gamma.const_data_ptr<float>(), float(eps), g.c, double(g.pixels), training && !group_sums);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (group_sums) {  // b and d from the process group's sums
        const Tensor sums = batch_sums->to(at::kDouble), a = coef[0].to(at::kDouble);
        coef[1].copy_(a * sums[0] / double(batch_count));
        coef[2].copy_(a * sums[1] / double(batch_count));
      }
      if (!want_x && !want_weight) return;

      // Pass 2 keeps K*K*V weight-gradient sums per thread: V = 4 channels for 3x3, 2 for 5x5, 1 for
      // 7x7 (at 2, its 98 sums spilled 636 bytes under the 128-register cap).
      const Tensor gz = want_x ? at::empty({g.pixels, g.c}, float_options) : Tensor();
      constexpr int kGradZWidth = K == 3 ? 4 : K == 5 ? 2 : 1;  // <= every 16-byte width
      const auto grad_z = [&](auto vector) {
        constexpr int V = decltype(vector)::value;
        const dim3 block = block_shape(g.c / V);
        const int64_t channel_blocks = ceil_div(g.c / V, block.x);
        const int64_t blocks = reduction_blocks(strips.count, block.y, channel_blocks);
        const Tensor partial_gw = want_weight ? at::empty({blocks, K * K, g.c}, float_options) : Tensor();
        grad_z_kernel<T, K, V><<<dim3(blocks, channel_blocks), block, 0, stream>>>(
            want_x ? gz.mutable_data_ptr<float>() : nullptr, want_weight ? partial_gw.mutable_data_ptr<float>() : nullptr,
            grad_y.const_data_ptr<T>(), x.const_data_ptr<T>(), w.const_data_ptr<float>(), mean.const_data_ptr<float>(),
            var.const_data_ptr<float>(), gamma.const_data_ptr<float>(), beta.const_data_ptr<float>(), coef.const_data_ptr<float>(),
            float(eps), g, strips.per_row, strips.count, act);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (want_weight) {  // [blocks][taps][C] -> (C, 1, K, K)
          grad_weight.copy_(partial_gw.sum(0).t().reshape(weight.sizes()));
        }
      };
      if (width == 1) grad_z(Width<1>{});
      else grad_z(Width<kGradZWidth>{});

      if (!want_x) return;
      dispatch_width<T>(width, [&](auto vector) {
        constexpr int V = decltype(vector)::value;
        const dim3 block = block_shape(g.c / V);
        grad_x_kernel<T, K, V><<<dim3(ceil_div(g.n * g.h * g.w, block.y), ceil_div(g.c / V, block.x)), block, 0, stream>>>(
            grad_x.nhwc.mutable_data_ptr<T>(), gz.const_data_ptr<float>(), w.const_data_ptr<float>(), g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {grad_x.finish(), grad_weight, grad_gamma.to(affine_type), grad_beta.to(affine_type)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmb, CUDA, m) { m.impl("dwconv_bn_act_backward", &dwconv_bn_act_backward); }

}  // namespace fastmb::cuda
