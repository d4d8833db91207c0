// fastmb::batch_norm_act on the CPU: y = act(batch_norm(z)) in training, with the batch's
// statistics, and its backward; z NHWC (other layouts converted on entry). It is the batch norm
// of the pointwise and full convs in training (fastmb/nn/conv_bn_act.py): eager's batch norm,
// activation and their backward make about nine passes over activation-sized tensors, these four.
//   forward   pass 1: per-thread moments of z (Chan merges); pass 2: y = act(z * scale + shift)
//   backward  pass 1: the sums of dL/du and dL/du * x_hat, u and dL/du recomputed from z and
//             dL/dy; pass 2: dL/dz
// The passes are the depthwise kernels' (dwconv/passes.h), without the conv.
#include <torch/library.h>

#include "dwconv/operator.h"

namespace fastmb::cpu {
namespace {

using at::Tensor;
using dwconv::BnParams;
using dwconv::Kernels;
using dwconv::Moments;

// z (N, C, H, W), a CPU float tensor, and the optional per-channel affine vectors.
void check_input(const char* op, const Tensor& z, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK(z.dim() == 4, "fastmb::", op, ": z must be (N, C, H, W), got shape ", z.sizes());
  TORCH_CHECK(z.device().is_cpu(), "fastmb::", op, ": the CPU kernel takes CPU tensors, got ", z.device());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, "fastmb::", op,
              ": the CPU kernel takes float32 and float64, got ", z.scalar_type());
  check_vector(op, "weight", weight, z.size(1), z);
  check_vector(op, "bias", bias, z.size(1), z);
}

// Pixels per parallel task: about 64K values.
int64_t pixel_grain(int64_t channels) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(channels, 1)); }

std::tuple<Tensor, Tensor, Tensor> batch_norm_act_forward(const Tensor& z_in, const std::optional<Tensor>& weight,
                                                          const std::optional<Tensor>& bias, double eps, c10::string_view activation) {
  check_input("batch_norm_act", z_in, weight, bias);
  const NoAutocast no_autocast;
  const Activation act = parse_activation(activation);
  const int64_t c = z_in.size(1), pixels = c == 0 ? 0 : z_in.numel() / c;
  const auto options = z_in.options();
  Nhwc4dOutput out(z_in.sizes(), options, z_in.suggest_memory_format());
  if (pixels == 0) return {out.output, at::zeros({c}, options), at::ones({c}, options)};

  const Tensor z = as_nhwc(z_in);
  const Tensor gamma = vector_or(weight, c, z.scalar_type(), z, 1.0), beta = vector_or(bias, c, z.scalar_type(), z, 0.0);
  Tensor mean = at::empty({c}, options), var = at::empty({c}, options);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fastmb_batch_norm_act", [&] {
    const Kernels<scalar_t> kernels = dwconv::select_elementwise_kernels<scalar_t>();
    const scalar_t* z_data = z.const_data_ptr<scalar_t>();
    scalar_t* y_data = out.nhwc.mutable_data_ptr<scalar_t>();
    const int threads = at::get_num_threads();
    std::vector<double> means(threads * c, 0.0), m2s(threads * c, 0.0);
    std::vector<int64_t> counts(threads, 0);
    at::parallel_for(0, pixels, pixel_grain(c), [&](int64_t begin, int64_t end) {
      const int t = at::get_thread_num();
      Moments moments{means.data() + t * c, m2s.data() + t * c, counts[t]};
      kernels.batch_norm_moments(moments, z_data + begin * c, end - begin, c);
      counts[t] = moments.count;
    });
    scalar_t *m = mean.mutable_data_ptr<scalar_t>(), *v = var.mutable_data_ptr<scalar_t>();
    dwconv::merge_moments(m, v, means, m2s, counts, c);
    std::vector<scalar_t> scale(c), shift(c);
    dwconv::fold_batch_norm(scale.data(), shift.data(), m, v, gamma.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(), eps, c);
    at::parallel_for(0, pixels, pixel_grain(c), [&](int64_t begin, int64_t end) {
      kernels.normalize(y_data + begin * c, z_data + begin * c, scale.data(), shift.data(), act, end - begin, c);
    });
  });
  return {out.finish(), mean, var};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_act_backward(const Tensor& grad_y_in, const Tensor& z_in, const std::optional<Tensor>& weight,
                                                           const std::optional<Tensor>& bias, const Tensor& mean_in, const Tensor& var_in,
                                                           double eps, c10::string_view activation, std::array<bool, 2> output_mask) {
  const char* op = "batch_norm_act_backward";
  check_input(op, z_in, weight, bias);
  TORCH_CHECK(grad_y_in.sizes() == z_in.sizes(), "fastmb::", op, ": grad_y must have z's shape ", z_in.sizes(), ", got ", grad_y_in.sizes());
  TORCH_CHECK(grad_y_in.scalar_type() == z_in.scalar_type() && grad_y_in.device() == z_in.device(), "fastmb::", op,
              ": grad_y must have z's dtype and device");
  const int64_t c = z_in.size(1), pixels = c == 0 ? 0 : z_in.numel() / c;
  check_vector(op, "mean", mean_in, c, z_in);
  check_vector(op, "var", var_in, c, z_in);
  const NoAutocast no_autocast;
  const Activation act = parse_activation(activation);
  const auto options = z_in.options();
  const at::ScalarType affine_type = weight.has_value() ? weight->scalar_type() : z_in.scalar_type();
  Nhwc4dOutput grad_z(output_mask[0] ? z_in.sizes() : at::IntArrayRef{0}, options,
                      output_mask[0] ? z_in.suggest_memory_format() : at::MemoryFormat::Contiguous);
  Tensor grad_gamma = at::zeros({output_mask[1] ? c : 0}, options), grad_beta = at::zeros_like(grad_gamma);
  if (pixels == 0 || !(output_mask[0] || output_mask[1])) {
    if (output_mask[0]) grad_z.nhwc.zero_();
    return {grad_z.finish(), grad_gamma.to(affine_type), grad_beta.to(affine_type)};
  }

  const Tensor z = as_nhwc(z_in), grad_y = as_nhwc(grad_y_in);
  const Tensor mean = mean_in.to(z.scalar_type()).contiguous(), var = var_in.to(z.scalar_type()).contiguous();
  const Tensor gamma = vector_or(weight, c, z.scalar_type(), z, 1.0), beta = vector_or(bias, c, z.scalar_type(), z, 0.0);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fastmb_batch_norm_act_backward", [&] {
    const Kernels<scalar_t> kernels = dwconv::select_elementwise_kernels<scalar_t>();
    const scalar_t *z_data = z.const_data_ptr<scalar_t>(), *gy_data = grad_y.const_data_ptr<scalar_t>();
    const scalar_t *pm = mean.const_data_ptr<scalar_t>(), *pv = var.const_data_ptr<scalar_t>(), *pg = gamma.const_data_ptr<scalar_t>();
    std::vector<scalar_t> invstd(c), a(c), b(c), d(c);
    for (int64_t k = 0; k < c; ++k) {
      invstd[k] = scalar_t(1) / std::sqrt(pv[k] + scalar_t(eps));
      a[k] = pg[k] * invstd[k];
    }
    const BnParams<scalar_t> bn{pm, invstd.data(), pg, beta.const_data_ptr<scalar_t>()};
    const int threads = at::get_num_threads();
    std::vector<double> sums(2 * threads * c, 0.0);
    at::parallel_for(0, pixels, pixel_grain(c), [&](int64_t begin, int64_t end) {
      double* s = sums.data() + 2 * at::get_thread_num() * c;
      kernels.batch_norm_grad_sums(s, s + c, z_data + begin * c, gy_data + begin * c, bn, act, end - begin, c);
    });
    scalar_t *grad_beta_values = grad_beta.mutable_data_ptr<scalar_t>(), *grad_gamma_values = grad_gamma.mutable_data_ptr<scalar_t>();
    dwconv::for_each_channel_grad_sums(sums, c, c, [&](int64_t k, double sum_gu, double sum_gu_xhat) {
      if (output_mask[1]) {
        grad_beta_values[k] = scalar_t(sum_gu);
        grad_gamma_values[k] = scalar_t(sum_gu_xhat);
      }
      b[k] = a[k] * scalar_t(sum_gu / double(pixels));
      d[k] = a[k] * scalar_t(sum_gu_xhat / double(pixels));
    });
    if (!output_mask[0]) return;
    scalar_t* gz_data = grad_z.nhwc.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, pixels, pixel_grain(c), [&](int64_t begin, int64_t end) {
      kernels.batch_norm_grad_values(gz_data + begin * c, z_data + begin * c, gy_data + begin * c, bn, a.data(), b.data(), d.data(), act,
                                     end - begin, c);
    });
  });
  return {grad_z.finish(), grad_gamma.to(affine_type), grad_beta.to(affine_type)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmb, CPU, m) {
  m.impl("batch_norm_act", &batch_norm_act_forward);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward);
}

}  // namespace fastmb::cpu
