// Fused squeeze-and-excitation on CUDA: the operators. The passes over x are the kernels of
// squeeze_excitation.cu; the (N, C) excitation goes through ATen (squeeze_excitation_fc.h).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../squeeze_excitation_fc.h"
#include "operator.h"

namespace fastmb::cuda {
namespace {

using at::Tensor;

struct Shape {
  int64_t n, c, pixels;
};

// (N, C) float: factor * per-image channel sums of a (* b).
Tensor image_channel_sums(const Tensor& a, const Tensor* b, const Shape& s, float factor) {
  Tensor out = at::empty({s.n, s.c}, a.options().dtype(at::kFloat));
  if (s.n == 0) return out;
  // No pixels: sums are 0, means (factor 1/0 = inf) NaN, as in eager.
  if (s.pixels == 0) return out.fill_(factor * 0.f);
  const int vector = vector_width(a.scalar_type(), s.c, {&a, b != nullptr ? b : &a});
  const dim3 block = block_shape(s.c / vector);
  launch_channel_sums(element_of(a.scalar_type(), "squeeze_excitation"), vector, dim3(s.n, ceil_div(s.c / vector, block.x)), block,
                      c10::cuda::getCurrentCUDAStream(), out.mutable_data_ptr<float>(), a.const_data_ptr(),
                      b != nullptr ? b->const_data_ptr() : nullptr, s.pixels, s.c, factor);
  return out;
}

void apply_scale(Tensor& out, const Tensor& a, const Tensor& scale, const Tensor* shift, const Shape& s) {
  const int64_t total_pixels = s.n * s.pixels;
  if (total_pixels == 0 || s.c == 0) return;
  const int vector = vector_width(a.scalar_type(), s.c, {&a, &out, &scale, shift != nullptr ? shift : &scale});
  const Launch launch = rows_launch(s.c, vector, total_pixels);
  launch_scale_shift(element_of(a.scalar_type(), "squeeze_excitation"), vector, launch.grid, launch.block,
                     c10::cuda::getCurrentCUDAStream(), out.mutable_data_ptr(), a.const_data_ptr(), scale.const_data_ptr<float>(),
                     shift != nullptr ? shift->const_data_ptr<float>() : nullptr, s.pixels, total_pixels, s.c);
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
