// Fused depthwise conv + BatchNorm + activation on CUDA: the forward (DESIGN.md's plan).
//   eval    BN's per-channel scale first (a C-thread kernel), then one pass:
//           y = act((z - mean) * scale + beta)
//   train   pass 1: mean and M2 of z per strip of pixels (z is not stored), Chan-merged per
//           thread and block, then per channel in float64; pass 2: as eval with the batch
//           statistics
#include "dwconv_bn_act.cuh"

namespace fastmb::cuda {
namespace {

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

}  // namespace

void launch_dwconv_norm(cudaStream_t stream, float* norm, const float* mean, const float* var, const float* gamma, const float* beta,
                        float eps, float* mean_out, float* var_out, int64_t channels) {
  norm_kernel<<<ceil_div(channels, kThreads), kThreads, 0, stream>>>(norm, mean, var, gamma, beta, eps, mean_out, var_out, channels);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_dwconv_statistics(Element element, int vector, dim3 grid, dim3 block, cudaStream_t stream, float* partial_mean,
                              float* partial_m2, float* partial_count, const void* x, const float* w, const CudaGeometry& g,
                              const StripGrid& strips) {
  dispatch_element(element, [&](auto e) {
    using T = decltype(e);
    dispatch_width<T>(vector, [&](auto width) {
      dispatch_kernel_size(g.kh, [&](auto kernel_size) {
        statistics_kernel<T, decltype(kernel_size)::value, decltype(width)::value><<<grid, block, 0, stream>>>(
            partial_mean, partial_m2, partial_count, static_cast<const T*>(x), w, g, strips.per_row, strips.count);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void launch_dwconv_merge_statistics(cudaStream_t stream, float* mean, float* var, const float* partial_mean, const float* partial_m2,
                                    const float* partial_count, int64_t blocks, int64_t channels) {
  const dim3 block = merge_block_shape();
  merge_statistics_kernel<<<ceil_div(channels, block.x), block, 0, stream>>>(mean, var, partial_mean, partial_m2, partial_count, blocks,
                                                                             channels);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_dwconv_forward(Element element, int vector, dim3 grid, dim3 block, cudaStream_t stream, void* y, const void* x,
                           const float* w, const float* norm, const CudaGeometry& g, const StripGrid& strips, Activation act) {
  dispatch_element(element, [&](auto e) {
    using T = decltype(e);
    dispatch_width<T>(vector, [&](auto width) {
      dispatch_kernel_size(g.kh, [&](auto kernel_size) {
        forward_kernel<T, decltype(kernel_size)::value, decltype(width)::value><<<grid, block, 0, stream>>>(
            static_cast<T*>(y), static_cast<const T*>(x), w, norm, g, strips.per_row, strips.count, act);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

}  // namespace fastmb::cuda
