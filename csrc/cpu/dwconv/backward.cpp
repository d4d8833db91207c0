// fastmb::dwconv_bn_act_backward on the CPU, NHWC (other layouts converted on entry):
//   pass 1 (training, or BN affine grads wanted), in bands of output rows: the per-channel sums
//          of dL/du and dL/du * x_hat, giving the BN grads and the batch statistics' terms; z
//          kept in dL/dx's memory for pass 2 where it fits
//   pass 2, per (image, channel block): dL/dz, the weight gradient (per-thread partials) and
//          dL/dx (passes.h's grad_input_weight_block)
#include <torch/library.h>

#include "operator.h"

namespace fastmb::cpu::dwconv {
namespace {

using at::Tensor;

// Channels per backward pass-2 task when whole images would not share out evenly between the
// threads (pass 2 runs per image, or per image and channel block).
constexpr int64_t kBlock = 64;

// Stride 1 (K specialised, padding within the kernel's extent): dL/dx is the conv of dL/dz with
// the flipped kernel (padding (K - 1) * dilation - pad), which the forward's sliding tiles
// compute with dL/dz in registers instead of a gather. The flipped taps-major weight per
// channel block of `block` channels ([blocks][taps][nc], the tasks' channel stride), built once
// per call; empty when the geometry gathers.
template <typename Acc>
AlignedVector<Acc> flipped_blocks(const Acc* w, const Geometry& g, int64_t block) {
  if (specialised_kernel_size(g) == 0 || g.sh != 1 || g.sw != 1 || g.ph > (g.kh - 1) * g.dh || g.pw > g.kw - 1) return {};
  const int taps = g.kh * g.kw;
  AlignedVector<Acc> flipped(taps * g.c);
  for (int64_t c0 = 0; c0 < g.c; c0 += block) {
    const int64_t nc = std::min(block, g.c - c0);
    for (int t = 0; t < taps; ++t) std::copy(w + t * g.c + c0, w + t * g.c + c0 + nc, flipped.data() + c0 * taps + (taps - 1 - t) * nc);
  }
  return flipped;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dwconv_bn_act_backward(const Tensor& grad_y_in, const Tensor& x_in, const Tensor& weight,
                                                                  const std::optional<Tensor>& bn_weight,
                                                                  const std::optional<Tensor>& bn_bias, const Tensor& mean_in,
                                                                  const Tensor& var_in, at::IntArrayRef stride, at::IntArrayRef padding,
                                                                  at::IntArrayRef dilation, double eps, bool training,
                                                                  c10::string_view activation, std::array<bool, 3> output_mask,
                                                                  const std::optional<Tensor>& batch_sums, int64_t batch_count) {
  const Geometry g = checked_geometry("dwconv_bn_act_backward", x_in, weight, stride, padding, dilation, bn_weight, bn_bias);
  check_dwconv_backward(grad_y_in, x_in, g, mean_in, var_in, batch_sums, batch_count);
  const NoAutocast no_autocast;
  const Activation act = parse_activation(activation);
  const at::ScalarType acc_type = at::toOpMathType(x_in.scalar_type());
  const auto acc_options = x_in.options().dtype(acc_type);
  const at::ScalarType affine_type = bn_weight.has_value() ? bn_weight->scalar_type() : acc_type;

  Nhwc4dOutput grad_x(output_mask[0] ? x_in.sizes() : at::IntArrayRef{0}, x_in.options(),
                      output_mask[0] ? x_in.suggest_memory_format() : at::MemoryFormat::Contiguous);
  Tensor grad_weight = output_mask[1] ? at::zeros_like(weight, at::MemoryFormat::Contiguous) : at::empty({0}, weight.options());
  Tensor grad_gamma = at::zeros({output_mask[2] ? g.c : 0}, acc_options), grad_beta = at::zeros_like(grad_gamma);
  const int64_t values = g.n * g.ho * g.wo;
  if (values == 0 || !(output_mask[0] || output_mask[1] || output_mask[2])) {
    if (output_mask[0]) grad_x.nhwc.zero_();
    return {grad_x.finish(), grad_weight, grad_gamma.to(affine_type), grad_beta.to(affine_type)};
  }

  const Tensor x = as_nhwc(x_in), grad_y = as_nhwc(grad_y_in);
  const Tensor mean = mean_in.to(acc_type).contiguous(), var = var_in.to(acc_type).contiguous();
  const Tensor gamma = vector_or(bn_weight, g.c, acc_type, x, 1.0), beta = vector_or(bn_bias, g.c, acc_type, x, 0.0);
  const int taps = g.kh * g.kw;
  const int64_t in_row = g.w * g.c, out_row = g.wo * g.c;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastmb_dwconv_bn_act_backward", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const Kernels<Acc> kernels = select_kernels<Acc>(g);
    const Acc* w = taps_major_scratch<scalar_t, Acc>(weight);
    const scalar_t *x_data = x.const_data_ptr<scalar_t>(), *gy_data = grad_y.const_data_ptr<scalar_t>();
    const Acc *pm = mean.const_data_ptr<Acc>(), *pv = var.const_data_ptr<Acc>();
    AlignedVector<Acc> invstd(g.c), a(g.c), b(g.c, Acc(0)), d(g.c, Acc(0));
    const Acc* pg = gamma.const_data_ptr<Acc>();
    for (int64_t c = 0; c < g.c; ++c) {
      invstd[c] = Acc(1) / std::sqrt(pv[c] + Acc(eps));
      a[c] = pg[c] * invstd[c];
    }
    const BnParams<Acc> bn{pm, invstd.data(), pg, beta.const_data_ptr<Acc>()};

    // The batch statistics' share of dL/dz, from the sums of dL/du and dL/du * x_hat over the
    // batch (this call's own, or the process group's in batch_sums).
    const auto batch_terms = [&](int64_t c, double sum_gu, double sum_gu_xhat, double count) {
      b[c] = a[c] * Acc(sum_gu / count);
      d[c] = a[c] * Acc(sum_gu_xhat / count);
    };
    // Pass 1 keeps z for pass 2 in dL/dx's memory (an image's z in the image's part) where that is
    // wanted, has z's dtype and z is no larger than x: pass 2 reads an image's z (a channel block
    // of it) into dL/dz before it writes that part of dL/dx. Convolving z again instead made the
    // backward 1.09-1.20x slower (bench/results/2026-12-07-training-convs.md).
    const bool pass_1 = (training && !batch_sums.has_value()) || output_mask[2];
    const bool keep_z = pass_1 && output_mask[0] && std::is_same_v<scalar_t, Acc> && g.ho * g.wo <= g.h * g.w;
    Acc* z_kept = keep_z ? reinterpret_cast<Acc*>(grad_x.nhwc.mutable_data_ptr<scalar_t>()) : nullptr;
    if (pass_1) {
      const int threads = at::get_num_threads();
      std::vector<double> sums(2 * threads * g.c, 0.0);
      at::parallel_for(0, g.n * g.ho, row_grain(g), [&](int64_t begin, int64_t end) {
        double* s = sums.data() + 2 * at::get_thread_num() * g.c;
        thread_local AlignedVector<Acc> x_rows, gy_rows;
        for_image_bands(g, begin, end, [&](int64_t n, int64_t oh0, int64_t oh1) {
          const auto [lo, hi] = input_rows(g, oh0, oh1);
          const Acc* x_img = rows_as_acc(kernels, x_data + n * g.h * in_row, lo, hi, in_row, g.c, 0, g.c, x_rows);
          const Acc* gy_img = rows_as_acc(kernels, gy_data + n * g.ho * out_row, oh0, oh1, out_row, g.c, 0, g.c, gy_rows);
          kernels.grad_sums_rows(s, s + g.c, z_kept != nullptr ? z_kept + n * g.h * in_row : nullptr, gy_img, x_img, w, bn, g, act, oh0, oh1);
        });
      });
      Acc *grad_beta_values = grad_beta.mutable_data_ptr<Acc>(), *grad_gamma_values = grad_gamma.mutable_data_ptr<Acc>();
      for_each_channel_grad_sums(sums, g.c, g.c, [&](int64_t c, double sum_gu, double sum_gu_xhat) {
        if (output_mask[2]) {
          grad_beta_values[c] = Acc(sum_gu);
          grad_gamma_values[c] = Acc(sum_gu_xhat);
        }
        if (training && !batch_sums.has_value()) batch_terms(c, sum_gu, sum_gu_xhat, double(values));
      });
    }
    if (training && batch_sums.has_value()) {
      const Tensor group_sums = batch_sums->to(at::kDouble).contiguous();
      const double* sums = group_sums.const_data_ptr<double>();
      for (int64_t c = 0; c < g.c; ++c) batch_terms(c, sums[c], sums[g.c + c], double(batch_count));
    }
    if (!output_mask[0] && !output_mask[1]) return;

    Tensor gw_partials = output_mask[1] ? at::zeros({at::get_num_threads(), taps * g.c}, acc_options.dtype(at::kDouble)) : Tensor();
    const TapSources rows(g.h, g.kh, g.sh, g.ph, g.dh, g.ho), cols(g.w, g.kw, g.sw, g.pw, g.dw, g.wo);
    // Whole images (every channel: grad_y and x rows read contiguously) when they share out
    // evenly between the threads, else channel blocks of each image.
    const int threads = at::get_num_threads();
    const int64_t block = g.n % threads == 0 || g.n >= 4 * threads ? g.c : kBlock;
    const AlignedVector<Acc> flipped = output_mask[0] ? flipped_blocks(w, g, block) : AlignedVector<Acc>();
    const int64_t blocks = (g.c + block - 1) / block;
    scalar_t* gx_data = output_mask[0] ? grad_x.nhwc.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, g.n * blocks, 1, [&](int64_t begin, int64_t end) {
      thread_local AlignedVector<Acc> gz, x_rows, gy_rows, gx_rows;
      BlockArgs<Acc> args{nullptr, nullptr, nullptr, nullptr, nullptr, w, flipped.empty() ? nullptr : flipped.data(), bn,
                          a.data(), b.data(), d.data(), &rows, &cols, g, act};
      args.gw = output_mask[1] ? gw_partials.mutable_data_ptr<double>() + at::get_thread_num() * taps * g.c : nullptr;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, c0 = (task % blocks) * block, nc = std::min(block, g.c - c0);
        args.x = rows_as_acc(kernels, x_data + n * g.h * in_row, 0, g.h, in_row, g.c, c0, nc, x_rows);
        args.gy = rows_as_acc(kernels, gy_data + n * g.ho * out_row, 0, g.ho, out_row, g.c, c0, nc, gy_rows);
        scalar_t* gx_img = gx_data != nullptr ? gx_data + n * g.h * in_row : nullptr;
        args.gx = gx_img != nullptr ? output_rows(gx_img, 0, g.h, in_row, gx_rows) : nullptr;
        args.z = z_kept != nullptr ? z_kept + n * g.h * in_row : nullptr;
        kernels.grad_input_weight_block(args, gz, c0, nc);
        if (gx_img != nullptr) store_rows(kernels, gx_img, args.gx, 0, g.h, in_row, g.c, c0, nc);
      }
    });
    if (output_mask[1]) {  // [threads][taps][C] partials -> (C, 1, kH, kW)
      const Tensor summed = gw_partials.sum(0).reshape({taps, g.c}).t();
      grad_weight.copy_(summed.reshape(weight.sizes()));
    }
  });
  return {grad_x.finish(), grad_weight, grad_gamma.to(affine_type), grad_beta.to(affine_type)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmb, CPU, m) { m.impl("dwconv_bn_act_backward", &dwconv_bn_act_backward); }

}  // namespace fastmb::cpu::dwconv
