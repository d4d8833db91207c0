// fastmb::fold_conv_bn on the CPU: an eval-mode batch norm folded into the conv before it,
// weight' = weight * scale and bias' = beta - mean * scale per output channel, with scale =
// gamma / sqrt(var + eps). One call instead of six ATen ops: ConvBNAct folds on every eval
// call (never stale), where the ops' dispatch cost was most of the fold's time.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../common.h"

namespace fastmb::cpu {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> fold_conv_bn(const Tensor& weight_in, const Tensor& gamma_in, const Tensor& beta_in, const Tensor& mean_in,
                                        const Tensor& var_in, double eps) {
  TORCH_CHECK(weight_in.dim() >= 2 && weight_in.size(0) >= 1, "fastmb::fold_conv_bn: weight must be a conv weight (C_out, ...)");
  TORCH_CHECK(weight_in.device().is_cpu(), "fastmb::fold_conv_bn: the CPU kernel takes CPU tensors");
  const int64_t out_channels = weight_in.size(0);
  check_vector("fold_conv_bn", "bn_weight", gamma_in, out_channels, weight_in);
  check_vector("fold_conv_bn", "bn_bias", beta_in, out_channels, weight_in);
  check_vector("fold_conv_bn", "running_mean", mean_in, out_channels, weight_in);
  check_vector("fold_conv_bn", "running_var", var_in, out_channels, weight_in);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "fastmb::fold_conv_bn: eps must be finite and >= 0, got ", eps);
  // Any layout with the output channel outermost and dense keeps each channel's values in one
  // block (contiguous and channels_last weights both do); others are made contiguous.
  const int64_t block = weight_in.numel() / out_channels;
  const bool blocked = weight_in.is_non_overlapping_and_dense() && weight_in.stride(0) == block;
  const Tensor weight = blocked ? weight_in : weight_in.contiguous();
  Tensor folded = at::empty_like(weight), bias = at::empty({out_channels}, weight.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "fastmb_fold_conv_bn", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<Acc>::value;
    const Tensor gamma = gamma_in.to(acc).contiguous(), beta = beta_in.to(acc).contiguous();
    const Tensor mean = mean_in.to(acc).contiguous(), var = var_in.to(acc).contiguous();
    const Acc *g = gamma.const_data_ptr<Acc>(), *b = beta.const_data_ptr<Acc>(), *m = mean.const_data_ptr<Acc>(), *v = var.const_data_ptr<Acc>();
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    scalar_t *out = folded.mutable_data_ptr<scalar_t>(), *out_bias = bias.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, out_channels, std::max<int64_t>(1, 16384 / std::max<int64_t>(block, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        // In double: the folded values are then rounded once, as closely as a float fold can be.
        const double scale = double(g[o]) / std::sqrt(double(v[o]) + eps);
        for (int64_t j = 0; j < block; ++j) out[o * block + j] = scalar_t(double(w[o * block + j]) * scale);
        out_bias[o] = scalar_t(double(b[o]) - double(m[o]) * scale);
      }
    });
  });
  return {folded, bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmb, CPU, m) { m.impl("fold_conv_bn", &fold_conv_bn); }

}  // namespace fastmb::cpu
