// Fused depthwise conv + BatchNorm + activation on CUDA: the operators. They check the arguments,
// allocate outputs and buffers, choose the launch shapes and call the kernels' launchers
// (dwconv_bn_act_forward.cu, dwconv_bn_act_backward.cu; the passes are described there).
#include <ATen/TensorOperators.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"
#include "operator.h"

namespace fastmb::cuda {
namespace {

using at::Tensor;

// The geometry the kernels index with, in int: dwconv_geometry's checks, then what the CUDA
// kernels take (_cuda_supports in fastmb/ops/dwconv_bn_act.py sends the rest to the reference):
// CUDA tensors, square 3, 5 or 7 kernels, padded inputs and outputs of fewer than 2^31 pixels,
// fewer than 2^21 channels.
CudaGeometry cuda_geometry(const char* op, const Tensor& x, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, const std::optional<Tensor>& bn_weight, const std::optional<Tensor>& bn_bias) {
  const Geometry g = dwconv_geometry(op, x, weight, stride, padding, dilation, {{"bn_weight", &bn_weight}, {"bn_bias", &bn_bias}});
  TORCH_CHECK(x.is_cuda(), "fastmb::", op, ": x must be a CUDA tensor for the CUDA kernels");
  TORCH_CHECK(g.kh == g.kw && (g.kh == 3 || g.kh == 5 || g.kh == 7), "fastmb::", op,
              ": the CUDA kernels take square 3x3, 5x5 or 7x7 kernels (others run on the reference backend)");
  constexpr double kLimit = 2147483647.0;  // in double: the products below cannot overflow
  // the padded extent the taps read: (o - 1) * s + (k - 1) * d + 1 rows and columns
  const double padded_pixels = double(g.n) * (double(g.ho - 1) * g.sh + double(g.kh - 1) * g.dh + 1) *
                               (double(g.wo - 1) * g.sw + double(g.kw - 1) * g.dw + 1);
  const bool fits = padded_pixels < kLimit && double(g.pixels) < kLimit && g.c < (int64_t(1) << 21) &&
                    double(g.kh - 1) * double(g.dh) < kLimit && double(g.kw - 1) * double(g.dw) < kLimit && g.sh < kLimit && g.sw < kLimit;
  TORCH_CHECK(fits, "fastmb::", op, ": the CUDA kernels take padded inputs and outputs of fewer than 2^31 pixels and fewer than ",
              "2^21 channels (larger ones run on the reference backend)");
  return {g.n, g.c, g.h, g.w, g.ho, g.wo, g.pixels, int(g.kh), int(g.kw), int(g.sh), int(g.sw), int(g.ph), int(g.pw), int(g.dh), int(g.dw)};
}

// A reduction kernel's launch: reduction_blocks blocks along the strips (a grid-stride loop).
Launch reduction_launch(const CudaGeometry& g, int vector, const StripGrid& strips) {
  const dim3 block = block_shape(g.c / vector);
  const int64_t channel_blocks = ceil_div(g.c / vector, block.x);
  return {dim3(reduction_blocks(strips.count, block.y, channel_blocks), channel_blocks), block};
}

std::tuple<Tensor, Tensor, Tensor> dwconv_bn_act_forward(
    const Tensor& x_in, const Tensor& weight, const std::optional<Tensor>& bn_weight, const std::optional<Tensor>& bn_bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, double eps, bool training, c10::string_view activation) {
  const CudaGeometry g = cuda_geometry("dwconv_bn_act", x_in, weight, stride, padding, dilation, bn_weight, bn_bias);
  check_vector("dwconv_bn_act", "running_mean", running_mean, g.c, x_in);
  check_vector("dwconv_bn_act", "running_var", running_var, g.c, x_in);
  const Element element = element_of(x_in.scalar_type(), "dwconv_bn_act");
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
  // In eval the outputs are copies of the running statistics, written by the norm kernel.
  Tensor mean_out = training ? mean : at::empty({g.c}, float_options), var_out = training ? var : at::empty({g.c}, float_options);
  const Tensor norm = at::empty({3, g.c}, float_options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int vector = vector_width(x.scalar_type(), g.c, {&x, &out.nhwc});
  const StripGrid strips = strip_grid(g);

  if (training) {
    const Launch statistics = reduction_launch(g, vector, strips);
    const int64_t blocks = statistics.grid.x;
    const Tensor partial_mean = at::empty({blocks, g.c}, float_options), partial_m2 = at::empty_like(partial_mean);
    const Tensor partial_count = at::empty({blocks}, float_options);
    launch_dwconv_statistics(element, vector, statistics.grid, statistics.block, stream, partial_mean.mutable_data_ptr<float>(),
                             partial_m2.mutable_data_ptr<float>(), partial_count.mutable_data_ptr<float>(), x.const_data_ptr(),
                             w.const_data_ptr<float>(), g, strips);
    launch_dwconv_merge_statistics(stream, mean.mutable_data_ptr<float>(), var.mutable_data_ptr<float>(),
                                   partial_mean.const_data_ptr<float>(), partial_m2.const_data_ptr<float>(),
                                   partial_count.const_data_ptr<float>(), blocks, g.c);
  }
  launch_dwconv_norm(stream, norm.mutable_data_ptr<float>(), mean.const_data_ptr<float>(), var.const_data_ptr<float>(),
                     gamma.const_data_ptr<float>(), beta.const_data_ptr<float>(), float(eps),
                     training ? nullptr : mean_out.mutable_data_ptr<float>(), training ? nullptr : var_out.mutable_data_ptr<float>(), g.c);
  const Launch forward = rows_launch(g.c, vector, strips.count);
  launch_dwconv_forward(element, vector, forward.grid, forward.block, stream, out.nhwc.mutable_data_ptr(), x.const_data_ptr(),
                        w.const_data_ptr<float>(), norm.const_data_ptr<float>(), g, strips, act);
  return {out.finish(), mean_out, var_out};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dwconv_bn_act_backward(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& weight, const std::optional<Tensor>& bn_weight,
    const std::optional<Tensor>& bn_bias, const Tensor& mean_in, const Tensor& var_in, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, double eps, bool training, c10::string_view activation,
    std::array<bool, 3> output_mask, const std::optional<Tensor>& batch_sums, int64_t batch_count) {
  const CudaGeometry g = cuda_geometry("dwconv_bn_act_backward", x_in, weight, stride, padding, dilation, bn_weight, bn_bias);
  check_dwconv_backward(grad_y_in, x_in, g, mean_in, var_in, batch_sums, batch_count);
  const Element element = element_of(x_in.scalar_type(), "dwconv_bn_act_backward");
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
  // Passes 1 and 3 use full 16-byte vectors where they can, pass 2 grad_z_vector channels.
  const int vector = vector_width(x.scalar_type(), g.c, {&x, &grad_y, &grad_x.nhwc});
  const StripGrid strips = strip_grid(g);  // passes 1 and 2 take strips of output pixels

  Tensor partial_gu, partial_gu_xhat;
  if ((training && !group_sums) || want_affine) {
    const Launch sums = reduction_launch(g, vector, strips);
    partial_gu = at::empty({int64_t(sums.grid.x), g.c}, float_options);
    partial_gu_xhat = at::empty_like(partial_gu);
    launch_dwconv_grad_sums(element, vector, sums.grid, sums.block, stream, partial_gu.mutable_data_ptr<float>(),
                            partial_gu_xhat.mutable_data_ptr<float>(), grad_y.const_data_ptr(), x.const_data_ptr(),
                            w.const_data_ptr<float>(), mean.const_data_ptr<float>(), var.const_data_ptr<float>(),
                            gamma.const_data_ptr<float>(), beta.const_data_ptr<float>(), float(eps), g, strips, act);
  }
  launch_dwconv_coefficients(stream, coef.mutable_data_ptr<float>(), want_affine ? grad_gamma.mutable_data_ptr<float>() : nullptr,
                             want_affine ? grad_beta.mutable_data_ptr<float>() : nullptr,
                             partial_gu.defined() ? partial_gu.const_data_ptr<float>() : nullptr,
                             partial_gu_xhat.defined() ? partial_gu_xhat.const_data_ptr<float>() : nullptr,
                             partial_gu.defined() ? partial_gu.size(0) : 0, var.const_data_ptr<float>(), gamma.const_data_ptr<float>(),
                             float(eps), g.c, double(g.pixels), training && !group_sums);
  if (group_sums) {  // b and d from the process group's sums
    const Tensor sums = batch_sums->to(at::kDouble), a = coef[0].to(at::kDouble);
    coef[1].copy_(a * sums[0] / double(batch_count));
    coef[2].copy_(a * sums[1] / double(batch_count));
  }
  if (!want_x && !want_weight) return {grad_x.finish(), grad_weight, grad_gamma.to(affine_type), grad_beta.to(affine_type)};

  const Tensor gz = want_x ? at::empty({g.pixels, g.c}, float_options) : Tensor();
  const int gz_vector = vector == 1 ? 1 : grad_z_vector(g.kh);
  const Launch pass2 = reduction_launch(g, gz_vector, strips);
  const Tensor partial_gw = want_weight ? at::empty({int64_t(pass2.grid.x), int64_t(g.kh) * g.kw, g.c}, float_options) : Tensor();
  launch_dwconv_grad_z(element, gz_vector, pass2.grid, pass2.block, stream, want_x ? gz.mutable_data_ptr<float>() : nullptr,
                       want_weight ? partial_gw.mutable_data_ptr<float>() : nullptr, grad_y.const_data_ptr(), x.const_data_ptr(),
                       w.const_data_ptr<float>(), mean.const_data_ptr<float>(), var.const_data_ptr<float>(),
                       gamma.const_data_ptr<float>(), beta.const_data_ptr<float>(), coef.const_data_ptr<float>(), float(eps), g, strips,
                       act);
  if (want_weight) grad_weight.copy_(partial_gw.sum(0).t().reshape(weight.sizes()));  // [blocks][taps][C] -> (C, 1, K, K)
  if (want_x) {
    const Launch pass3 = rows_launch(g.c, vector, int64_t(g.n) * g.h * g.w);
    launch_dwconv_grad_x(element, vector, pass3.grid, pass3.block, stream, grad_x.nhwc.mutable_data_ptr(), gz.const_data_ptr<float>(),
                         w.const_data_ptr<float>(), g);
  }
  return {grad_x.finish(), grad_weight, grad_gamma.to(affine_type), grad_beta.to(affine_type)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmb, CUDA, m) {
  m.impl("dwconv_bn_act", &dwconv_bn_act_forward);
  m.impl("dwconv_bn_act_backward", &dwconv_bn_act_backward);
}

}  // namespace fastmb::cuda
