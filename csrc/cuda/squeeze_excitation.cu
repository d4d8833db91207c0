// Fused squeeze-and-excitation on CUDA, NHWC: the kernels of the two passes over x, channel-
// vectorised. The operators (squeeze_excitation_op.cpp) run the (N, C) excitation (FC layers,
// activation, gate) through ATen (cuBLAS), shared with the CPU backend:
//   forward   pass 1: pooled = mean_hw(x); excitation; pass 2: y = x * scale
//   backward  pass 1: dscale = sum_hw(grad_y * x); the excitation's backward;
//             pass 2: grad_x = grad_y * scale + grad_pooled / HW
#include "cuda_utils.cuh"

namespace fastmb::cuda {
namespace {

// out[n][c] = factor * sum over image n's pixels of a (or a * b when b is given). One block per
// (image, channel group); its rows stride over the pixels and are summed in shared memory.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    channel_sums_kernel(float* __restrict__ out, const T* __restrict__ a, const T* __restrict__ b, int64_t pixels, int64_t channels,
                        float factor) {
  __shared__ float shared[kThreads * V];
  const int64_t n = blockIdx.x;
  const int64_t c = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  const bool active = c < channels;  // inactive threads still take part in the block sum
  float acc[V] = {};
  if (active) {
    for (int64_t p = threadIdx.y; p < pixels; p += blockDim.y) {
      const int64_t offset = (n * pixels + p) * channels + c;
      float av[V];
      load_floats<V>(av, a + offset);
      if (b != nullptr) {
        float bv[V];
        load_floats<V>(bv, b + offset);
#pragma unroll
        for (int l = 0; l < V; ++l) acc[l] = fmaf(av[l], bv[l], acc[l]);
      } else {
#pragma unroll
        for (int l = 0; l < V; ++l) acc[l] += av[l];
      }
    }
  }
  sum_over_rows<V>(acc, shared);
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int l = 0; l < V; ++l) out[n * channels + c + l] = acc[l] * factor;
  }
}

// out = a * scale[n] (+ shift[n]) per image n, (N, C) float scale and shift; one pixel and V
// channels per thread.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    scale_shift_kernel(T* __restrict__ out, const T* __restrict__ a, const float* __restrict__ scale, const float* __restrict__ shift,
                       int64_t pixels, int64_t total_pixels, int64_t channels) {
  const int64_t c = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  const int64_t p = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (c >= channels || p >= total_pixels) return;
  // 32-bit division: cuda_shape (squeeze_excitation_op.cpp) keeps pixel counts below 2^31
  const int64_t nc = int64_t(uint32_t(p) / uint32_t(pixels)) * channels + c;
  float v[V], s[V], t[V] = {};
  load_floats<V>(v, a + p * channels + c);
  load_floats<V>(s, scale + nc);  // (N, C) float rows, 16-byte aligned where V > 1 (vector_width)
  if (shift != nullptr) load_floats<V>(t, shift + nc);
#pragma unroll
  for (int l = 0; l < V; ++l) v[l] = fmaf(v[l], s[l], t[l]);
  store_floats<V>(out + p * channels + c, v);
}

}  // namespace

void launch_channel_sums(Element element, int vector, dim3 grid, dim3 block, cudaStream_t stream, float* out, const void* a,
                         const void* b, int64_t pixels, int64_t channels, float factor) {
  dispatch_element(element, [&](auto e) {
    using T = decltype(e);
    dispatch_width<T>(vector, [&](auto width) {
      channel_sums_kernel<T, decltype(width)::value><<<grid, block, 0, stream>>>(out, static_cast<const T*>(a), static_cast<const T*>(b),
                                                                                 pixels, channels, factor);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void launch_scale_shift(Element element, int vector, dim3 grid, dim3 block, cudaStream_t stream, void* out, const void* a,
                        const float* scale, const float* shift, int64_t pixels, int64_t total_pixels, int64_t channels) {
  dispatch_element(element, [&](auto e) {
    using T = decltype(e);
    dispatch_width<T>(vector, [&](auto width) {
      scale_shift_kernel<T, decltype(width)::value><<<grid, block, 0, stream>>>(static_cast<T*>(out), static_cast<const T*>(a), scale,
                                                                                shift, pixels, total_pixels, channels);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace fastmb::cuda
