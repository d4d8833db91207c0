// fastmb::stem_conv_bn_act on the CPU: y = act(batch_norm(conv(x))) in training, with the batch's
// statistics, and its backward, for a full conv over few input channels: the RGB stem of every
// MobileNet. z = conv(x) is not kept for backward (DESIGN.md's depthwise plan: a stem value costs
// C_in * kH * kW (27) multiply-adds to recompute); the passes:
//   forward   pass 1: z into y's memory, a chunk of output pixels at a time from the chunk's
//             patches (im2col, in L1), and z's per-thread moments (Chan merges);
//             pass 2: y = act(z * scale + shift) in place
//   backward  pass 1: z again, into a workspace, and the sums of dL/du and dL/du * x_hat;
//             pass 2: dL/dz in place of z; then the weight gradient patches^T . dL/dz
//             (conv_weight_grad.cpp)
// Eager keeps z and u for backward: two stem-sized tensors where this keeps none but y, which the
// next layer keeps anyway. The backward's workspace lives while the stem's backward runs, the last
// of a backward pass, when the layers' saved tensors are freed. Computing z in every pass instead
// (four times a step) took mobilenetv4_conv_small's stem 13.9-15.7 ms a training step alone, this
// 11.8-11.9 (bench/results/2026-12-06-full-conv-weight-grad.md). x takes no gradient (an
// image): the module runs eager's ops where it needs one. The batch norm passes are the
// depthwise kernels' (dwconv/passes.h), the patch GEMMs patch_gemms.h's.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "conv_weight_grad.h"
#include "dwconv/operator.h"
#include "patch_gemms.h"
#include "stem_rows.h"

namespace fastmb::cpu {
namespace {

using at::Tensor;
using dwconv::BnParams;
using dwconv::Kernels;
using dwconv::Moments;
using namespace patches;

// The eval stem's z store for a clamp activation (ReLU, ReLU6, hardswish, identity):
// act(z * scale + shift) as the tiles leave the registers; at(co): from channel co on. A smooth
// activation is a pass over the stored chunk instead (EvalStemRows): inlined into every tile
// shape of three instruction sets, it made this unit 1.3 MB of code and a minute of compile.
template <typename Acc>
struct StoreNormalized {
  const Acc *scale, *shift;
  ActivationFn<Acc> clamp;
  StoreNormalized(const Acc* scale_, const Acc* shift_, ActivationFn<Acc> clamp_) : scale(scale_), shift(shift_), clamp(clamp_) {}
  StoreNormalized at(int64_t co) const { return {scale + co, shift + co, clamp}; }
  // Channels [col, col + lanes) of one pixel.
  template <typename VT>
  FASTMB_INLINE VT operator()(VT z, int64_t col) const {
    using V = Vec<Acc, sizeof(VT)>;
    return clamp(z * V::load(scale + col) + V::load(shift + col));
  }
};

// A thread's chunk buffers: border patches, z and dL/dy rows (cp apart).
template <typename Acc>
struct ChunkBuffers {
  AlignedVector<Acc> patches, z, rows;
  explicit ChunkBuffers(const ConvPatches& s) : patches(s.chunk * s.taps_padded), z(s.chunk * s.cp), rows(s.chunk * s.cp) {}
};

// Calls chunk(buffers, z, count, offset) for every chunk of the output's pixels, in parallel over
// output rows, after computing its z (rows cp apart) into `z_at(buffers, offset)`; offset is the
// chunk's first pixel's index.
template <typename Acc, typename ZAt, typename Chunk>
void for_each_chunk(const ConvPatches& s, const Acc* x, at::IntArrayRef xs, const Acc* w, const ZAt& z_at, const Chunk& chunk) {
  const Geometry& g = s.g;
  at::parallel_for(0, g.n * g.ho, 1, [&](int64_t begin, int64_t end) {
    ChunkBuffers<Acc> buffers(s);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.ho, oh = row % g.ho;
      for (int64_t ow0 = 0; ow0 < g.wo; ow0 += s.chunk) {
        const int64_t count = std::min(s.chunk, g.wo - ow0), offset = row * g.wo + ow0;
        Acc* z = z_at(buffers, offset);
        for_each_run(s, x, xs, n, oh, ow0, count, buffers.patches.data(), [&](const auto& patches, int64_t p0, int64_t np) {
          convolve(z + p0 * s.cp, patches, w, np, s.taps, s.cp);
        });
        chunk(buffers, z, count, offset);
      }
    }
  });
}

// Where for_each_chunk computes a chunk's z: straight into the dense rows (c values a pixel) at
// `dense` where C is whole vectors, else into the chunk buffer, for store_dense_rows to copy.
template <typename Acc>
auto z_into(Acc* dense, const ConvPatches& s) {
  return [dense, &s](ChunkBuffers<Acc>& buffers, int64_t offset) { return s.cp == s.c ? dense + offset * s.c : buffers.z.data(); };
}

// z's rows (cp apart) into dense rows of c values at `to`, where cp is not c.
template <typename Acc>
void store_dense_rows(Acc* to, const Acc* z, int64_t count, const ConvPatches& s) {
  if (s.cp != s.c)
    for (int64_t p = 0; p < count; ++p) std::copy_n(z + p * s.cp, s.c, to + p * s.c);
}

// Pixels per task of the elementwise passes over stored rows.
constexpr int64_t kRowsGrain = 1024;

// A per-channel vector of c values padded with `fill` to cp.
template <typename Acc>
AlignedVector<Acc> padded(const Acc* values, int64_t c, int64_t cp, Acc fill) {
  AlignedVector<Acc> out(cp, fill);
  std::copy(values, values + c, out.begin());
  return out;
}

// The weight (C_out, C_in, kH, kW) as [taps][cp], zero in the padding channels.
template <typename Acc>
AlignedVector<Acc> taps_major_weight(const Tensor& weight, const ConvPatches& s) {
  const Tensor dense = weight.contiguous();
  const Acc* src = dense.const_data_ptr<Acc>();
  AlignedVector<Acc> w(s.taps * s.cp, Acc(0));
  for (int64_t co = 0; co < s.c; ++co)
    for (int64_t t = 0; t < s.taps; ++t) w[t * s.cp + co] = src[co * s.taps + s.weight_tap[t]];
  return w;
}

// x (N, C_in, H, W) and weight (C_out, C_in, kH, kW): CPU float32/64 of one dtype; the geometry.
Geometry checked_stem(const char* op, const Tensor& x, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, const std::optional<Tensor>& bn_weight, const std::optional<Tensor>& bn_bias) {
  TORCH_CHECK(x.dim() == 4, "fastmb::", op, ": x must be (N, C_in, H, W), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(0) >= 1 && weight.size(2) >= 1 && weight.size(3) >= 1,
              "fastmb::", op, ": weight must be (C_out, C_in, kH, kW) with C_in = ", x.size(1), ", got shape ", weight.sizes());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "fastmb::", op, ": the CPU kernel takes CPU tensors, got x on ",
              x.device(), " and weight on ", weight.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "fastmb::", op,
              ": the CPU kernel takes float32 and float64, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "fastmb::", op, ": x and weight dtypes differ (", x.scalar_type(), ", ",
              weight.scalar_type(), ")");
  TORCH_CHECK(x.size(1) >= 1, "fastmb::", op, ": x must have at least one channel");
  check_vector(op, "bn_weight", bn_weight, weight.size(0), weight);
  check_vector(op, "bn_bias", bn_bias, weight.size(0), weight);
  return dwconv_geometry_of(op, x.sizes(), weight.sizes().slice(2), stride, padding, dilation);
}

std::tuple<Tensor, Tensor, Tensor> stem_conv_bn_act(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bn_weight,
                                                    const std::optional<Tensor>& bn_bias, at::IntArrayRef stride, at::IntArrayRef padding,
                                                    at::IntArrayRef dilation, double eps, c10::string_view activation) {
  const Geometry g = checked_stem("stem_conv_bn_act", x, weight, stride, padding, dilation, bn_weight, bn_bias);
  const NoAutocast no_autocast;
  const Activation act = parse_activation(activation);
  const int64_t c = weight.size(0);
  const auto options = x.options();
  Tensor y = cached_empty({g.n, c, g.ho, g.wo}, options, at::MemoryFormat::ChannelsLast);
  Tensor mean = at::zeros({c}, options), var = at::ones({c}, options);
  if (g.pixels == 0) return {y, mean, var};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmb_stem_conv_bn_act", [&] {
    using Acc = scalar_t;
    const ConvPatches s(g, c, gemm_vector_bytes() / int(sizeof(Acc)), x.strides());
    const Kernels<Acc> kernels = dwconv::select_elementwise_kernels<Acc>();
    const AlignedVector<Acc> w = taps_major_weight<Acc>(weight, s);
    const Acc* x_data = x.const_data_ptr<Acc>();
    Acc* y_data = y.mutable_data_ptr<Acc>();
    const int threads = at::get_num_threads();
    std::vector<double> means(threads * s.cp, 0.0), m2s(threads * s.cp, 0.0);
    std::vector<int64_t> counts(threads, 0);
    for_each_chunk(s, x_data, x.strides(), w.data(), z_into(y_data, s), [&](ChunkBuffers<Acc>&, const Acc* z, int64_t count, int64_t offset) {
      const int t = at::get_thread_num();
      Moments moments{means.data() + t * s.cp, m2s.data() + t * s.cp, counts[t]};
      kernels.batch_norm_moments(moments, z, count, s.cp);
      counts[t] = moments.count;
      store_dense_rows(y_data + offset * c, z, count, s);
    });
    AlignedVector<Acc> mean_p(s.cp), var_p(s.cp);
    dwconv::merge_moments(mean_p.data(), var_p.data(), means, m2s, counts, s.cp);
    std::copy_n(mean_p.data(), c, mean.mutable_data_ptr<Acc>());
    std::copy_n(var_p.data(), c, var.mutable_data_ptr<Acc>());

    const Tensor gamma = vector_or(bn_weight, c, x.scalar_type(), x, 1.0), beta = vector_or(bn_bias, c, x.scalar_type(), x, 0.0);
    const AlignedVector<Acc> gamma_p = padded(gamma.const_data_ptr<Acc>(), c, s.cp, Acc(0)), beta_p = padded(beta.const_data_ptr<Acc>(), c, s.cp, Acc(0));
    AlignedVector<Acc> scale(s.cp), shift(s.cp);
    dwconv::fold_batch_norm(scale.data(), shift.data(), mean_p.data(), var_p.data(), gamma_p.data(), beta_p.data(), eps, s.cp);
    at::parallel_for(0, g.pixels, kRowsGrain, [&](int64_t begin, int64_t end) {
      kernels.normalize(y_data + begin * c, y_data + begin * c, scale.data(), shift.data(), act, end - begin, c);
    });
  });
  return {y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> stem_conv_bn_act_backward(const Tensor& grad_y_in, const Tensor& x, const Tensor& weight,
                                                             const std::optional<Tensor>& bn_weight, const std::optional<Tensor>& bn_bias,
                                                             const Tensor& mean, const Tensor& var, at::IntArrayRef stride,
                                                             at::IntArrayRef padding, at::IntArrayRef dilation, double eps,
                                                             c10::string_view activation, std::array<bool, 2> output_mask) {
  const char* op = "stem_conv_bn_act_backward";
  const Geometry g = checked_stem(op, x, weight, stride, padding, dilation, bn_weight, bn_bias);
  const int64_t c = weight.size(0);
  TORCH_CHECK(grad_y_in.sizes() == at::IntArrayRef({g.n, c, g.ho, g.wo}), "fastmb::", op, ": grad_y must have the output's shape (",
              g.n, ", ", c, ", ", g.ho, ", ", g.wo, "), got ", grad_y_in.sizes());
  TORCH_CHECK(grad_y_in.scalar_type() == x.scalar_type() && grad_y_in.device() == x.device(), "fastmb::", op,
              ": grad_y must have x's dtype and device");
  check_vector(op, "mean", mean, c, x);
  check_vector(op, "var", var, c, x);
  const NoAutocast no_autocast;
  const Activation act = parse_activation(activation);
  const auto options = x.options();
  const at::ScalarType affine_type = bn_weight.has_value() ? bn_weight->scalar_type() : x.scalar_type();
  Tensor grad_weight = at::zeros(output_mask[0] ? weight.sizes() : at::IntArrayRef{0}, options);
  Tensor grad_gamma = at::zeros({output_mask[1] ? c : 0}, options), grad_beta = at::zeros_like(grad_gamma);
  if (g.pixels == 0 || !(output_mask[0] || output_mask[1])) return {grad_weight, grad_gamma.to(affine_type), grad_beta.to(affine_type)};

  const Tensor grad_y = as_nhwc(grad_y_in);
  const Tensor z_rows = cached_empty({g.n, c, g.ho, g.wo}, options, at::MemoryFormat::ChannelsLast);  // z, then dL/dz
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmb_stem_conv_bn_act_backward", [&] {
    using Acc = scalar_t;
    const ConvPatches s(g, c, gemm_vector_bytes() / int(sizeof(Acc)), x.strides());
    const Kernels<Acc> kernels = dwconv::select_elementwise_kernels<Acc>();
    const AlignedVector<Acc> w = taps_major_weight<Acc>(weight, s);
    const Acc *x_data = x.const_data_ptr<Acc>(), *gy_data = grad_y.const_data_ptr<Acc>();
    const Tensor gamma = vector_or(bn_weight, c, x.scalar_type(), x, 1.0), beta = vector_or(bn_bias, c, x.scalar_type(), x, 0.0);
    const Tensor mean_acc = mean.to(x.scalar_type()).contiguous(), var_acc = var.to(x.scalar_type()).contiguous();
    const AlignedVector<Acc> mean_p = padded(mean_acc.const_data_ptr<Acc>(), c, s.cp, Acc(0));
    const AlignedVector<Acc> gamma_p = padded(gamma.const_data_ptr<Acc>(), c, s.cp, Acc(0)), beta_p = padded(beta.const_data_ptr<Acc>(), c, s.cp, Acc(0));
    AlignedVector<Acc> invstd(s.cp, Acc(1)), a(s.cp, Acc(0)), b(s.cp, Acc(0)), d(s.cp, Acc(0));
    const Acc* pv = var_acc.const_data_ptr<Acc>();
    for (int64_t k = 0; k < c; ++k) {
      invstd[k] = Acc(1) / std::sqrt(pv[k] + Acc(eps));
      a[k] = gamma_p[k] * invstd[k];
    }
    const BnParams<Acc> bn{mean_p.data(), invstd.data(), gamma_p.data(), beta_p.data()};
    Acc* z_data = z_rows.mutable_data_ptr<Acc>();
    // dL/dy's rows for a chunk, cp apart: grad_y itself, or copied beside zero padding channels.
    const auto grad_rows = [&](ChunkBuffers<Acc>& buffers, int64_t count, int64_t offset) -> const Acc* {
      if (s.cp == c) return gy_data + offset * c;
      for (int64_t p = 0; p < count; ++p) std::copy_n(gy_data + (offset + p) * c, c, buffers.rows.data() + p * s.cp);
      return buffers.rows.data();
    };

    const int threads = at::get_num_threads();
    std::vector<double> sums(2 * threads * s.cp, 0.0);
    for_each_chunk(s, x_data, x.strides(), w.data(), z_into(z_data, s), [&](ChunkBuffers<Acc>& buffers, const Acc* z, int64_t count, int64_t offset) {
      double* sum = sums.data() + 2 * at::get_thread_num() * s.cp;
      kernels.batch_norm_grad_sums(sum, sum + s.cp, z, grad_rows(buffers, count, offset), bn, act, count, s.cp);
      store_dense_rows(z_data + offset * c, z, count, s);
    });
    const double values = double(g.pixels);
    Acc *grad_beta_values = grad_beta.mutable_data_ptr<Acc>(), *grad_gamma_values = grad_gamma.mutable_data_ptr<Acc>();
    dwconv::for_each_channel_grad_sums(sums, s.cp, c, [&](int64_t k, double sum_gu, double sum_gu_xhat) {
      if (output_mask[1]) {
        grad_beta_values[k] = Acc(sum_gu);
        grad_gamma_values[k] = Acc(sum_gu_xhat);
      }
      b[k] = a[k] * Acc(sum_gu / values);
      d[k] = a[k] * Acc(sum_gu_xhat / values);
    });
    if (!output_mask[0]) return;
    // dL/dz in place of z (each value read before it is written), then the weight gradient
    at::parallel_for(0, g.pixels, kRowsGrain, [&](int64_t begin, int64_t end) {
      Acc* rows = z_data + begin * c;
      kernels.batch_norm_grad_values(rows, rows, gy_data + begin * c, bn, a.data(), b.data(), d.data(), act, end - begin, c);
    });
    grad_weight = conv_weight_grad(z_rows, x, weight.sizes(), stride, padding, dilation);
  });
  return {grad_weight, grad_gamma.to(affine_type), grad_beta.to(affine_type)};
}

// The eval stem (stem_rows.h): a chunk of an output row at a time, its batch norm and activation
// applied as the tiles leave the registers (into the output itself when C fills whole vectors).
class EvalStemRows final : public StemRows {
 public:
  EvalStemRows(const Tensor& x, const Tensor& weight, const Tensor& scale, const Tensor& shift, const Geometry& g, Activation act)
      : s_(g, weight.size(0), gemm_vector_bytes() / int(sizeof(float)), x.strides()),
        x_strides_(x.strides().vec()),
        w_(taps_major_weight<float>(weight, s_)),
        scale_(padded(scale.const_data_ptr<float>(), s_.c, s_.cp, 0.0f)),
        shift_(padded(shift.const_data_ptr<float>(), s_.c, s_.cp, 0.0f)),
        act_(act),
        normalize_(dwconv::select_elementwise_kernels<float>().normalize) {}

  const Geometry& geometry() const override { return s_.g; }
  int64_t channels() const override { return s_.c; }

  void rows(float* out, const float* x, int64_t n, int64_t oh0, int64_t oh1) const override {
    thread_local AlignedVector<float> patches, z;
    if (int64_t(patches.size()) < s_.chunk * s_.taps_padded) patches.resize(s_.chunk * s_.taps_padded);
    if (s_.cp != s_.c && int64_t(z.size()) < s_.chunk * s_.cp) z.resize(s_.chunk * s_.cp);
    const Geometry& g = s_.g;
    const StoreNormalized<float> store(scale_.data(), shift_.data(), ActivationFn<float>(act_));
    const bool smooth = is_smooth(act_);
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      if (oh + kPrefetchRows < oh1) prefetch_input_rows(x, n, oh + kPrefetchRows);
      for (int64_t ow0 = 0; ow0 < g.wo; ow0 += s_.chunk) {
        const int64_t count = std::min(s_.chunk, g.wo - ow0);
        float* y = out + ((oh - oh0) * g.wo + ow0) * s_.c;
        float* chunk = s_.cp == s_.c ? y : z.data();
        for_each_run(s_, x, x_strides_, n, oh, ow0, count, patches.data(), [&](const auto& p, int64_t p0, int64_t np) {
          if (smooth) convolve(chunk + p0 * s_.cp, p, w_.data(), np, s_.taps, s_.cp);
          else convolve(chunk + p0 * s_.cp, p, w_.data(), np, s_.taps, s_.cp, store);
        });
        if (smooth) normalize_(chunk, chunk, scale_.data(), shift_.data(), act_, count, s_.cp);
        if (chunk != y)
          for (int64_t p = 0; p < count; ++p) std::copy_n(chunk + p * s_.cp, s_.c, y + p * s_.c);
      }
    }
  }

  // Output rows ahead whose new input rows are prefetched: the image comes from memory at the
  // start of a forward (the last one's weights went through the caches), and the hardware
  // prefetchers did not keep up with the three rows a patch spans. The stem and first block of
  // V3-Large after a 40 MB sweep, 2 threads: 233-290 -> 190-252 us; whole forwards at batch 1
  // 1.01-1.02x.
  static constexpr int64_t kPrefetchRows = 4;

  // Prefetches the input rows output row oh (> 0) reads and row oh - 1 does not (image n of x), into L2.
  void prefetch_input_rows(const float* x, int64_t n, int64_t oh) const {
    const Geometry& g = s_.g;
    const int64_t top = oh * g.sh - g.ph, bottom = top + int64_t(g.kh - 1) * g.dh;  // row oh - 1's bottom is bottom - sh
    patches::prefetch_input_rows(x, x_strides_, g, n, std::max<int64_t>(top, bottom - g.sh + 1), bottom);
  }

 private:
  ConvPatches s_;
  std::vector<int64_t> x_strides_;
  AlignedVector<float> w_, scale_, shift_;
  Activation act_;
  decltype(Kernels<float>::normalize) normalize_;  // the smooth activations' pass
};

}  // namespace

std::unique_ptr<StemRows> StemRows::make(const char* op, const Tensor& x, const Tensor& weight, const Tensor& scale,
                                         const Tensor& shift, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                         Activation act) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "fastmb::", op,
              ": with a stem, x must be a float32 CPU (N, C_in, H, W) image");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(0) >= 1 && weight.scalar_type() == at::kFloat &&
                  weight.device().is_cpu(),
              "fastmb::", op, ": stem_weight must be a float32 CPU (C, ", x.size(1), ", kH, kW) tensor, got shape ", weight.sizes());
  const int64_t c = weight.size(0);
  checked_dense_float(op, "stem_scale", scale, {c});
  checked_dense_float(op, "stem_shift", shift, {c});
  const Geometry g = dwconv_geometry_of(op, x.sizes(), weight.sizes().slice(2), stride, padding, dilation);
  return std::make_unique<EvalStemRows>(x, weight, scale, shift, g, act);
}

TORCH_LIBRARY_IMPL(fastmb, CPU, m) {
  m.impl("stem_conv_bn_act", &stem_conv_bn_act);
  m.impl("stem_conv_bn_act_backward", &stem_conv_bn_act_backward);
}

}  // namespace fastmb::cpu
