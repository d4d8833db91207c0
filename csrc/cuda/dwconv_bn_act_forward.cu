// Fused depthwise conv + BatchNorm + activation on CUDA: the forward (DESIGN.md's plan).
//   eval    BN's per-channel scale first (a C-thread kernel), then one pass:
//           y = act((z - mean) * scale + beta)
//   train   pass 1: mean and M2 of z per strip of pixels (z is not stored), Chan-merged per
//           thread and block, then per channel in float64; pass 2: as eval with the batch
//           statistics
#include <torch/library.h>

#include "dwconv_bn_act.cuh"

namespace fastmb::cuda {
namespace {

using at::Tensor;

// BN per channel as norm = [mean; scale = gamma / sqrt(var + eps); beta], for the forward's
// (z - mean) * scale + beta: unlike a folded z * scale + shift it loses nothing where |mean| is
// far larger than the deviation. In eval it also copies the running statistics to the op's
// mean/var outputs (mean_out, var_out; null in training).
__global__ void norm_kernel(float* __restrict__ norm, const float* __restrict__ mean, const float* __restrict__ var,
                            const float* __restrict__ gamma, const float* __restrict__ beta, float eps, float* __restrict__ mean_out,
                            float* __restrict__ var_out, int64_t channels) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  norm[c] = mean[c];
  norm[channels + c] = gamma[c] / sqrtf(var[c] + eps);
  norm[2 * channels + c] = beta[c];
  if (mean_out != nullptr) mean_out[c] = mean[c], var_out[c] = var[c];
}

// y = act((conv(x) - mean) * scale + beta) at kStrip output pixels of one row (strip s of the
// rows' strips_per_row) and V channels per thread; norm is norm_kernel's.
template <typename T, int K, int V>
__global__ void __launch_bounds__(kThreads, kThreeBlocksPerSm)
    forward_kernel(T* __restrict__ y, const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ norm,
                   CudaGeometry g, int strips_per_row, int64_t strips, Activation act) {
  const int64_t c = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  const int64_t s = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (c >= g.c || s >= strips) return;
  const Strip strip = strip_at(s, strips_per_row, g.wo);
  float acc[kStrip][V];
  conv_strip<K, V>(acc, x, w, g, strip, c);
  float mean[V], scale[V], beta[V];
  load_floats<V>(mean, norm + c);
  load_floats<V>(scale, norm + g.c + c);
  load_floats<V>(beta, norm + 2 * g.c + c);
  T* y_row = y + (int64_t(strip.row) * g.wo + strip.ow0) * g.c + c;
#pragma unroll
  for (int r = 0; r < kStrip; ++r) {
    if (r >= strip.pixels) break;
#pragma unroll
    for (int l = 0; l < V; ++l) acc[r][l] = activate(act, fmaf(acc[r][l] - mean[l], scale[l], beta[l]));
    store_floats<V>(y_row + int64_t(r) * g.c, acc[r]);
  }
}

// Train pass 1: each thread takes strips of output pixels (a grid-stride loop), a strip's mean
// and M2 exactly from its pixels, Chan-merged into the thread's; the block merges its rows
// with Chan's formula, and block b writes its per-channel mean and M2 and its pixel count to
// row b of the partial buffers.
template <typename T, int K, int V>
__global__ void __launch_bounds__(kThreads, kTwoBlocksPerSm)
    statistics_kernel(float* __restrict__ partial_mean, float* __restrict__ partial_m2, float* __restrict__ partial_count,
                      const T* __restrict__ x, const float* __restrict__ w, CudaGeometry g, int strips_per_row, int64_t strips) {
  __shared__ float s_mean[kThreads * V], s_m2[kThreads * V], s_count[kThreads];
  const int64_t c = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  const bool active = c < g.c;  // inactive threads still take part in the merge
  float mean[V] = {}, m2[V] = {}, count = 0.f;
  if (active) {
    for (int64_t s = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; s < strips; s += int64_t(gridDim.x) * blockDim.y) {
      const Strip strip = strip_at(s, strips_per_row, g.wo);
      float z[kStrip][V];
      conv_strip<K, V>(z, x, w, g, strip, c);
      const float pixels = float(strip.pixels), total = count + pixels;
      const float inv_pixels = 1.f / pixels, share = pixels / total, cross = count * pixels / total;
#pragma unroll
      for (int l = 0; l < V; ++l) {
        float strip_mean = 0.f, strip_m2 = 0.f;
#pragma unroll
        for (int r = 0; r < kStrip; ++r) strip_mean += r < strip.pixels ? z[r][l] : 0.f;
        strip_mean *= inv_pixels;
#pragma unroll
        for (int r = 0; r < kStrip; ++r) {
          const float d = z[r][l] - strip_mean;
          strip_m2 += r < strip.pixels ? d * d : 0.f;
        }
        const float delta = strip_mean - mean[l];
        mean[l] = fmaf(delta, share, mean[l]);
        m2[l] += strip_m2 + delta * delta * cross;
      }
      count = total;
    }
  }
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int l = 0; l < V; ++l) s_mean[t * V + l] = mean[l], s_m2[t * V + l] = m2[l];
  s_count[t] = count;
  __syncthreads();
  for (int s = first_tree_step(blockDim.y); s > 0; s >>= 1) {
    const int o = t + s * blockDim.x;
    if (threadIdx.y < s && threadIdx.y + s < blockDim.y && s_count[o] > 0.f) {
      const float na = s_count[t], nb = s_count[o], total = na + nb;
#pragma unroll
      for (int l = 0; l < V; ++l) {
        const float delta = s_mean[o * V + l] - s_mean[t * V + l];
        s_mean[t * V + l] += delta * (nb / total);
        s_m2[t * V + l] += s_m2[o * V + l] + delta * delta * (na * nb / total);
      }
      s_count[t] = total;
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int l = 0; l < V; ++l) {
      partial_mean[blockIdx.x * g.c + c + l] = s_mean[t * V + l];
      partial_m2[blockIdx.x * g.c + c + l] = s_m2[t * V + l];
    }
    if (c == 0) partial_count[blockIdx.x] = s_count[t];
  }
}

// Merges the blocks' partial statistics per channel into the batch mean and biased variance,
// in float64 and in two sweeps over the partials (merge_block_shape: a block's rows share them):
// mean = sum(n_b * mean_b) / n, then M2 = sum(M2_b + n_b * (mean_b - mean)^2), Chan's merge
// without its per-step division.
__global__ void __launch_bounds__(kThreads)
    merge_statistics_kernel(float* __restrict__ mean, float* __restrict__ var, const float* __restrict__ partial_mean,
                            const float* __restrict__ partial_m2, const float* __restrict__ partial_count, int64_t blocks,
                            int64_t channels) {
  __shared__ double shared[kThreads * 2];
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = c < channels;  // inactive threads still take part in the block sums
  double sums[2] = {};  // pixels, then sum of n_b * mean_b
  if (active) {
    for (int64_t b = threadIdx.y; b < blocks; b += blockDim.y) {
      const double nb = partial_count[b];
      if (nb == 0.0) continue;
      sums[0] += nb;
      sums[1] += nb * double(partial_mean[b * channels + c]);
    }
  }
  sum_over_rows<2>(sums, shared);
  const double n = sums[0], m = sums[1] / n;
  double m2[1] = {};
  if (active) {
    for (int64_t b = threadIdx.y; b < blocks; b += blockDim.y) {
      const double nb = partial_count[b];
      if (nb == 0.0) continue;
      const double delta = double(partial_mean[b * channels + c]) - m;
      m2[0] += double(partial_m2[b * channels + c]) + nb * delta * delta;
    }
  }
  sum_over_rows<1>(m2, shared);
  if (threadIdx.y == 0 && active) {
    mean[c] = float(m);
    var[c] = float(m2[0] / n);
  }
}

std::tuple<Tensor, Tensor, Tensor> dwconv_bn_act_forward(
    const Tensor& x_in, const Tensor& weight, const std::optional<Tensor>& bn_weight, const std::optional<Tensor>& bn_bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, double eps, bool training, c10::string_view activation) {
  const CudaGeometry g = cuda_geometry("dwconv_bn_act", x_in, weight, stride, padding, dilation, bn_weight, bn_bias);
  check_vector("dwconv_bn_act", "running_mean", running_mean, g.c, x_in);
  check_vector("dwconv_bn_act", "running_var", running_var, g.c, x_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const NoAutocast no_autocast;
  const Activation act = parse_activation(activation);
  const auto float_options = x_in.options().dtype(at::kFloat);
  TORCH_CHECK(training || (running_mean.has_value() && running_var.has_value()),
              "fastmb::dwconv_bn_act: eval needs running statistics");
  Nhwc4dOutput out({g.n, g.c, g.ho, g.wo}, x_in.options(), x_in.suggest_memory_format());
  if (out.output.numel() == 0) {
    if (training) return {out.output, at::zeros({g.c}, float_options), at::ones({g.c}, float_options)};
    return {out.output, running_mean->to(at::kFloat, false, true), running_var->to(at::kFloat, false, true)};
  }

  const Tensor x = as_nhwc(x_in);
  const Tensor w = taps_major(weight, at::kFloat);
  const Tensor gamma = vector_or(bn_weight, g.c, at::kFloat, x, 1.0), beta = vector_or(bn_bias, g.c, at::kFloat, x, 0.0);
  const Tensor mean = training ? at::empty({g.c}, float_options) : running_mean->to(at::kFloat).contiguous();
  const Tensor var = training ? at::empty({g.c}, float_options) : running_var->to(at::kFloat).contiguous();
  // In eval the outputs are copies of the running statistics, written by norm_kernel.
  Tensor mean_out = training ? mean : at::empty({g.c}, float_options), var_out = training ? var : at::empty({g.c}, float_options);
  const Tensor norm = at::empty({3, g.c}, float_options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_floating(x.scalar_type(), "dwconv_bn_act", [&](auto element) {
    using T = decltype(element);
    dispatch_width<T>(vector_width(x.scalar_type(), g.c, {&x, &out.nhwc}), [&](auto width) {
      constexpr int V = decltype(width)::value;
      dispatch_kernel_size(g.kh, [&](auto kernel_size) {
        constexpr int K = decltype(kernel_size)::value;
        const dim3 block = block_shape(g.c / V);
        const int64_t channel_blocks = ceil_div(g.c / V, block.x);
        const StripGrid strips = strip_grid(g);
        if (training) {
          const int64_t blocks = reduction_blocks(strips.count, block.y, channel_blocks);
          const Tensor partial_mean = at::empty({blocks, g.c}, float_options), partial_m2 = at::empty_like(partial_mean);
          const Tensor partial_count = at::empty({blocks}, float_options);
          statistics_kernel<T, K, V><<<dim3(blocks, channel_blocks), block, 0, stream>>>(
              partial_mean.mutable_data_ptr<float>(), partial_m2.mutable_data_ptr<float>(), partial_count.mutable_data_ptr<float>(),
              x.const_data_ptr<T>(), w.const_data_ptr<float>(), g, strips.per_row, strips.count);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          const dim3 merge_block = merge_block_shape();
          merge_statistics_kernel<<<ceil_div(g.c, merge_block.x), merge_block, 0, stream>>>(
              mean.mutable_data_ptr<float>(), var.mutable_data_ptr<float>(), partial_mean.const_data_ptr<float>(),
              partial_m2.const_data_ptr<float>(), partial_count.const_data_ptr<float>(), blocks, g.c);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        norm_kernel<<<ceil_div(g.c, kThreads), kThreads, 0, stream>>>(
            norm.mutable_data_ptr<float>(), mean.const_data_ptr<float>(), var.const_data_ptr<float>(),
            gamma.const_data_ptr<float>(), beta.const_data_ptr<float>(), float(eps),
            training ? nullptr : mean_out.mutable_data_ptr<float>(), training ? nullptr : var_out.mutable_data_ptr<float>(), g.c);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const dim3 strip_block = block_shape(g.c / V);
        forward_kernel<T, K, V><<<dim3(ceil_div(strips.count, strip_block.y), ceil_div(g.c / V, strip_block.x)), strip_block, 0, stream>>>(
            out.nhwc.mutable_data_ptr<T>(), x.const_data_ptr<T>(), w.const_data_ptr<float>(), norm.const_data_ptr<float>(), g,
            strips.per_row, strips.count, act);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {out.finish(), mean_out, var_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmb, CUDA, m) { m.impl("dwconv_bn_act", &dwconv_bn_act_forward); }

}  // namespace fastmb::cuda
