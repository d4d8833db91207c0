// Fused squeeze-and-excitation on CUDA, forward and backward, NHWC.
//
// The two passes over x are channel-vectorised kernels; the (N, C) excitation (FC layers,
// activation, gate) goes through ATen (cuBLAS), shared with the CPU backend.
//   forward   pass 1: pooled = mean_hw(x); excitation; pass 2: y = x * scale
//   backward  pass 1: dscale = sum_hw(grad_y * x); the excitation's backward;
//             pass 2: grad_x = grad_y * scale + grad_pooled / HW
#include <torch/library.h>

#include "../squeeze_excitation_fc.h"
#include "cuda_utils.cuh"

namespace fastmb::cuda {
namespace {

using at::Tensor;

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
  // 32-bit division: cuda_shape keeps pixel counts below 2^31
  const int64_t nc = int64_t(uint32_t(p) / uint32_t(pixels)) * channels + c;
  float v[V], s[V], t[V] = {};
  load_floats<V>(v, a + p * channels + c);
  load_floats<V>(s, scale + nc);  // (N, C) float rows, 16-byte aligned where V > 1 (vector_width)
  if (shift != nullptr) load_floats<V>(t, shift + nc);
#pragma unroll
  for (int l = 0; l < V; ++l) v[l] = fmaf(v[l], s[l], t[l]);
  store_floats<V>(out + p * channels + c, v);
}

struct Shape {
  int64_t n, c, pixels;
};

// (N, C) float: factor * per-image channel sums of a (* b).
Tensor image_channel_sums(const Tensor& a, const Tensor* b, const Shape& s, float factor) {
  Tensor out = at::empty({s.n, s.c}, a.options().dtype(at::kFloat));
  if (s.n == 0) return out;
  // No pixels: sums are 0, means (factor 1/0 = inf) NaN, as in eager.
  if (s.pixels == 0) return out.fill_(factor * 0.f);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_floating(a.scalar_type(), "squeeze_excitation", [&](auto element) {
    using T = decltype(element);
    dispatch_width<T>(vector_width(a.scalar_type(), s.c, {&a, b != nullptr ? b : &a}), [&](auto width) {
      constexpr int V = decltype(width)::value;
      const dim3 block = block_shape(s.c / V);
      channel_sums_kernel<T, V><<<dim3(s.n, ceil_div(s.c / V, block.x)), block, 0, stream>>>(
          out.mutable_data_ptr<float>(), a.const_data_ptr<T>(), b != nullptr ? b->const_data_ptr<T>() : nullptr, s.pixels, s.c,
          factor);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

void apply_scale(Tensor& out, const Tensor& a, const Tensor& scale, const Tensor* shift, const Shape& s) {
  const int64_t total_pixels = s.n * s.pixels;
  if (total_pixels == 0 || s.c == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_floating(a.scalar_type(), "squeeze_excitation", [&](auto element) {
    using T = decltype(element);
    dispatch_width<T>(vector_width(a.scalar_type(), s.c, {&a, &out, &scale, shift != nullptr ? shift : &scale}), [&](auto width) {
      constexpr int V = decltype(width)::value;
      const dim3 block = block_shape(s.c / V);
      scale_shift_kernel<T, V><<<dim3(ceil_div(total_pixels, block.y), ceil_div(s.c / V, block.x)), block, 0, stream>>>(
          out.mutable_data_ptr<T>(), a.const_data_ptr<T>(), scale.const_data_ptr<float>(),
          shift != nullptr ? shift->const_data_ptr<float>() : nullptr, s.pixels, total_pixels, s.c);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// The SE checks, then what the CUDA kernels take (_cuda_supports sends the rest to the reference).
Shape cuda_shape(const char* op, const Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "fastmb::", op, ": x must be a CUDA tensor for the CUDA kernels");
  const Shape s{x.size(0), x.size(1), x.size(2) * x.size(3)};
  TORCH_CHECK(double(s.n) * double(s.pixels) < 2147483647.0 && s.c < (int64_t(1) << 21), "fastmb::", op,
              ": the CUDA kernels take fewer than 2^31 pixels and 2^21 channels (larger inputs run on the reference backend)");
  return s;
}

std::tuple<Tensor, Tensor> squeeze_excitation_forward(const Tensor& x_in, const Tensor& fc1_weight, const std::optional<Tensor>& fc1_bias,
                                                      const Tensor& fc2_weight, const std::optional<Tensor>& fc2_bias,
                                                      c10::string_view activation, c10::string_view gate) {
  check_squeeze_excitation("squeeze_excitation", x_in, fc1_weight, fc1_bias, fc2_weight, fc2_bias);
  const Shape s = cuda_shape("squeeze_excitation", x_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const NoAutocast no_autocast;
  const Tensor x = as_nhwc(x_in);
  Nhwc4dOutput y(at::empty_like(x_in));  // laid out like x, as eager's elementwise ops and the fake do
  const Tensor pooled = image_channel_sums(x, nullptr, s, 1.f / float(s.pixels));
  const Excitation fc = excitation(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, parse_activation(activation), parse_gate(gate));
  apply_scale(y.nhwc, x, fc.scale, nullptr, s);
  return {y.finish(), pooled};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> squeeze_excitation_backward(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& pooled, const Tensor& fc1_weight, const std::optional<Tensor>& fc1_bias,
    const Tensor& fc2_weight, const std::optional<Tensor>& fc2_bias, c10::string_view activation, c10::string_view gate_name) {
  check_squeeze_excitation("squeeze_excitation_backward", x_in, fc1_weight, fc1_bias, fc2_weight, fc2_bias, &grad_y_in, &pooled);
  const Shape s = cuda_shape("squeeze_excitation_backward", x_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const NoAutocast no_autocast;
  const Activation act = parse_activation(activation);
  const Gate gate = parse_gate(gate_name);
  const Tensor x = as_nhwc(x_in), grad_y = as_nhwc(grad_y_in);
  Nhwc4dOutput grad_x(at::empty_like(x_in));
  const Excitation fc = excitation(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate);
  const Tensor grad_scale = image_channel_sums(grad_y, &x, s, 1.f);
  ExcitationGrads grads = excitation_backward(grad_scale, pooled, fc, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate);
  const Tensor grad_pooled = grads.pooled.div_(double(std::max<int64_t>(s.pixels, 1)));
  apply_scale(grad_x.nhwc, grad_y, fc.scale, &grad_pooled, s);
  const auto& p = grads.parameters;
  return {grad_x.finish(), p[0], p[1], p[2], p[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmb, CUDA, m) {
  m.impl("squeeze_excitation", &squeeze_excitation_forward);
  m.impl("squeeze_excitation_backward", &squeeze_excitation_backward);
}

}  // namespace fastmb::cuda
