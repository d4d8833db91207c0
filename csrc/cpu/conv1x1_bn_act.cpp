// fastmb::conv1x1_bn_act on the CPU: act(batch_norm(conv1x1(x))) in eval, for channels_last x,
// as one GEMM over the pixels and one epilogue pass that applies the batch norm (scale and shift
// per output channel, from its current parameters: nothing cached, so never stale) and the
// activation while each row of the output is in cache. One native call where ConvBNAct's Python
// path made three (fold, GEMM, activation), at batch 1 where those calls' cost shows.
#include <ATen/Parallel.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <vector>

#include "../common.h"
#include "vec.h"
#include "vec_math.h"

namespace fastmb::cpu {
namespace {

using at::Tensor;

// y[p][k] = act(y[p][k] * scale[k] + shift[k]) for pixels [p0, p1) of rows of c values.
template <typename T>
FASTMB_MULTIVERSION void scale_shift_activate(T* y, const T* scale, const T* shift, Activation activation, int64_t c, int64_t p0,
                                              int64_t p1) {
  using V = Vec<T>;
  const ActivationFn<T> act(activation);
  const bool smooth = is_smooth(activation);
  for (int64_t p = p0; p < p1; ++p) {
    T* row = y + p * c;
    int64_t k = 0;
    for (; k + V::kLanes <= c; k += V::kLanes) {
      const typename V::type u = V::load(row + k) * V::load(scale + k) + V::load(shift + k);
      V::store(row + k, smooth ? smooth_activation<VecMath, T>(activation, u) : act(u));
    }
    for (; k < c; ++k) row[k] = smooth ? smooth_activation<VecMath, T>(activation, row[k] * scale[k] + shift[k]) : act(row[k] * scale[k] + shift[k]);
  }
}

Tensor conv1x1_bn_act(const Tensor& x, const Tensor& weight, const Tensor& gamma, const Tensor& beta, const Tensor& mean,
                      const Tensor& var, double eps, c10::string_view activation) {
  const Activation act = parse_activation(activation);
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast), "fastmb::conv1x1_bn_act: x must be a channels_last (N, C, H, W) tensor");
  TORCH_CHECK(x.device().is_cpu(), "fastmb::conv1x1_bn_act: the CPU kernel takes CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "fastmb::conv1x1_bn_act: x must be float32 or float64");
  const int64_t in_channels = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == in_channels && weight.size(2) == 1 && weight.size(3) == 1 && weight.size(0) >= 1,
              "fastmb::conv1x1_bn_act: weight must be (C_out, ", in_channels, ", 1, 1), got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(), "fastmb::conv1x1_bn_act: weight must have x's dtype and device");
  const int64_t out_channels = weight.size(0);
  check_vector("conv1x1_bn_act", "bn_weight", gamma, out_channels, x);
  check_vector("conv1x1_bn_act", "bn_bias", beta, out_channels, x);
  check_vector("conv1x1_bn_act", "running_mean", mean, out_channels, x);
  check_vector("conv1x1_bn_act", "running_var", var, out_channels, x);
  const NoAutocast no_autocast;
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3), pixels = n * h * w;
  // channels_last x is a (pixels, C_in) matrix; the (C_out, C_in) weight is read transposed in place.
  Tensor y = at::mm(x.permute({0, 2, 3, 1}).reshape({pixels, in_channels}), weight.reshape({out_channels, in_channels}).t());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmb_conv1x1_bn_act", [&] {
    std::vector<scalar_t> scale(out_channels), shift(out_channels);
    const Tensor g = gamma.to(x.scalar_type()).contiguous(), b = beta.to(x.scalar_type()).contiguous();
    const Tensor m = mean.to(x.scalar_type()).contiguous(), v = var.to(x.scalar_type()).contiguous();
    // the pointers outside the loop: const_data_ptr's checks per element cost 25 us at 1152 channels
    const scalar_t *gp = g.const_data_ptr<scalar_t>(), *bp = b.const_data_ptr<scalar_t>();
    const scalar_t *mp = m.const_data_ptr<scalar_t>(), *vp = v.const_data_ptr<scalar_t>();
    for (int64_t k = 0; k < out_channels; ++k) {
      scale[k] = gp[k] / std::sqrt(vp[k] + scalar_t(eps));
      shift[k] = bp[k] - mp[k] * scale[k];
    }
    scalar_t* data = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, pixels, std::max<int64_t>(1, 16384 / out_channels), [&](int64_t p0, int64_t p1) {
      scale_shift_activate<scalar_t>(data, scale.data(), shift.data(), act, out_channels, p0, p1);
    });
  });
  return y.view({n, h, w, out_channels}).permute({0, 3, 1, 2});  // channels_last, as the conv returns it
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmb, CPU, m) { m.impl("conv1x1_bn_act", &conv1x1_bn_act); }

}  // namespace fastmb::cpu
