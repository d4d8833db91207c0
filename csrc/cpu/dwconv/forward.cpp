// fastmb::dwconv_bn_act on the CPU: y = act(batch_norm(depthwise_conv(x))), NHWC (other layouts
// converted on entry), in bands of output rows per thread (passes.h has the passes).
//   eval      one pass: BN folded into a per-channel scale and shift, applied as z is stored
//   training  pass 1: z, stored (in y when it is float), and per-thread Welford states merged
//             with Chan's formula; pass 2: y = act(z * scale + shift)
#include <torch/library.h>

#include "operator.h"

namespace fastmb::cpu::dwconv {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> dwconv_bn_act_forward(const Tensor& x_in, const Tensor& weight, const std::optional<Tensor>& bn_weight,
                                                         const std::optional<Tensor>& bn_bias, const std::optional<Tensor>& running_mean,
                                                         const std::optional<Tensor>& running_var, at::IntArrayRef stride,
                                                         at::IntArrayRef padding, at::IntArrayRef dilation, double eps, bool training,
                                                         c10::string_view activation) {
  const Geometry g = checked_geometry("dwconv_bn_act", x_in, weight, stride, padding, dilation, bn_weight, bn_bias);
  check_vector("dwconv_bn_act", "running_mean", running_mean, g.c, x_in);
  check_vector("dwconv_bn_act", "running_var", running_var, g.c, x_in);
  const NoAutocast no_autocast;
  const Activation act = parse_activation(activation);
  const at::ScalarType acc_type = at::toOpMathType(x_in.scalar_type());
  const auto stats_options = x_in.options().dtype(acc_type);
  Nhwc4dOutput out({g.n, g.c, g.ho, g.wo}, x_in.options(), x_in.suggest_memory_format());
  Tensor mean, var;
  if (!training) {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(), "fastmb::dwconv_bn_act: eval needs running statistics");
    mean = running_mean->to(acc_type).clone();
    var = running_var->to(acc_type).clone();
  } else if (out.output.numel() == 0) {
    mean = at::zeros({g.c}, stats_options);
    var = at::ones({g.c}, stats_options);
  }
  if (out.output.numel() == 0) return {out.output, mean, var};

  const Tensor x = as_nhwc(x_in);
  const Tensor gamma = vector_or(bn_weight, g.c, acc_type, x, 1.0), beta = vector_or(bn_bias, g.c, acc_type, x, 0.0);
  const int64_t rows = g.n * g.ho, in_row = g.w * g.c, out_row = g.wo * g.c;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastmb_dwconv_bn_act_forward", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const Kernels<Acc> kernels = select_kernels<Acc>(g);
    const Acc* w = taps_major_scratch<scalar_t, Acc>(weight);
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* y_data = out.nhwc.mutable_data_ptr<scalar_t>();
    // One image's input rows for output rows [oh0, oh1), as the passes read them.
    const auto input_for = [&](int64_t n, int64_t oh0, int64_t oh1, AlignedVector<Acc>& buffer) {
      const auto [lo, hi] = input_rows(g, oh0, oh1);
      return rows_as_acc(kernels, x_data + n * g.h * in_row, lo, hi, in_row, g.c, 0, g.c, buffer);
    };
    // Training keeps z between its two passes: in y itself when it has the accumulation dtype
    // (normalised in place), else in a transient buffer.
    Tensor z_buffer;
    if (training && !std::is_same_v<scalar_t, Acc>) z_buffer = at::empty({rows * g.wo, g.c}, stats_options);
    Acc* z_data = z_buffer.defined() ? z_buffer.mutable_data_ptr<Acc>() : reinterpret_cast<Acc*>(y_data);
    if (training) {
      const int threads = at::get_num_threads();
      std::vector<double> means(threads * g.c, 0.0), m2s(threads * g.c, 0.0);
      std::vector<int64_t> counts(threads, 0);
      at::parallel_for(0, rows, row_grain(g), [&](int64_t begin, int64_t end) {
        const int t = at::get_thread_num();
        Moments moments{means.data() + t * g.c, m2s.data() + t * g.c, counts[t]};
        thread_local AlignedVector<Acc> x_rows;
        for_image_bands(g, begin, end, [&](int64_t n, int64_t oh0, int64_t oh1) {
          kernels.statistics_rows(z_data + n * g.ho * out_row, moments, input_for(n, oh0, oh1, x_rows), w, g, oh0, oh1);
        });
        counts[t] = moments.count;
      });
      mean = at::empty({g.c}, stats_options);
      var = at::empty({g.c}, stats_options);
      merge_moments(mean.mutable_data_ptr<Acc>(), var.mutable_data_ptr<Acc>(), means, m2s, counts, g.c);
    }
    AlignedVector<Acc> scale(g.c), shift(g.c);
    fold_batch_norm(scale.data(), shift.data(), mean.const_data_ptr<Acc>(), var.const_data_ptr<Acc>(), gamma.const_data_ptr<Acc>(),
                    beta.const_data_ptr<Acc>(), eps, g.c);
    at::parallel_for(0, rows, row_grain(g), [&](int64_t begin, int64_t end) {
      if (training) {  // z was stored by the statistics pass
        normalize_into(kernels, y_data + begin * out_row, z_data + begin * out_row, scale.data(), shift.data(), act, (end - begin) * g.wo,
                       g.c);
        return;
      }
      thread_local AlignedVector<Acc> x_rows, y_rows;
      for_image_bands(g, begin, end, [&](int64_t n, int64_t oh0, int64_t oh1) {
        scalar_t* y_img = y_data + n * g.ho * out_row;
        Acc* y = output_rows(y_img, oh0, oh1, out_row, y_rows);
        kernels.eval_rows(y, input_for(n, oh0, oh1, x_rows), w, scale.data(), shift.data(), g, act, oh0, oh1, 0, g.c);
        store_rows(kernels, y_img, y, oh0, oh1, out_row, g.c, 0, g.c);
      });
    });
  });
  return {out.finish(), mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmb, CPU, m) { m.impl("dwconv_bn_act", &dwconv_bn_act_forward); }

}  // namespace fastmb::cpu::dwconv
