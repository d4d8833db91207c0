// Fused depthwise conv + BatchNorm + activation on the CPU, forward and backward.
//
// NHWC throughout (other layouts are converted on entry): every loop runs over a block of
// channels at one pixel, contiguous in memory, so it vectorises; z = conv(x) is recomputed
// where needed instead of being stored (DESIGN.md's kernel plan):
//   eval forward      one pass: y = act(z * scale + shift), BN folded per channel
//   train forward     pass 1: per-channel mean and M2 of z (two-pass per row, Chan merges);
//                     pass 2: as eval with the batch statistics
//   backward          pass 1: sums of dL/du and dL/du * x_hat per channel;
//                     pass 2, per (image, channel block): dL/dz, the weight gradient
//                     (per-thread partials) and dL/dx (scatter over the taps)
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "cpu_utils.h"

namespace fastmb::cpu {
namespace {

using at::Tensor;

constexpr int64_t kBlock = 32;  // channels per register block

struct Geometry {
  int64_t n, c, h, w, ho, wo;
  int kh, kw, sh, sw, ph, pw, dh, dw;
};

// The kernel taps [lo, hi) of one dimension that fall inside the input at output position o.
FASTMB_INLINE void valid_taps(int64_t o, int stride, int pad, int dil, int k, int64_t size, int& lo, int& hi) {
  const int64_t base = o * stride - pad;
  lo = 0;
  hi = k;
  while (lo < k && base + int64_t(lo) * dil < 0) ++lo;
  while (hi > lo && base + int64_t(hi - 1) * dil >= size) --hi;
}

// acc[0:nc] = depthwise conv at output pixel (oh, ow) for channels c0..c0+nc of one image.
// K > 0: a square K x K kernel known at compile time; NC > 0: nc == NC at compile time.
template <int K, int NC, typename T, typename Acc>
FASTMB_INLINE void conv_block(Acc* acc, int64_t nc, const T* x_img, const Acc* w, const Geometry& g, int64_t oh, int64_t ow, int64_t c0) {
  const int kh = K ? K : g.kh, kw = K ? K : g.kw;
  const int64_t count = NC ? NC : nc;
  int h_lo, h_hi, w_lo, w_hi;
  valid_taps(oh, g.sh, g.ph, g.dh, kh, g.h, h_lo, h_hi);
  valid_taps(ow, g.sw, g.pw, g.dw, kw, g.w, w_lo, w_hi);
  for (int64_t c = 0; c < count; ++c) acc[c] = Acc(0);
  for (int i = h_lo; i < h_hi; ++i) {
    const int64_t ih = oh * g.sh - g.ph + int64_t(i) * g.dh;
    for (int j = w_lo; j < w_hi; ++j) {
      const int64_t iw = ow * g.sw - g.pw + int64_t(j) * g.dw;
      const T* xp = x_img + (ih * g.w + iw) * g.c + c0;
      const Acc* wp = w + (int64_t(i) * kw + j) * g.c + c0;
      for (int64_t c = 0; c < count; ++c) acc[c] += Acc(xp[c]) * wp[c];
    }
  }
}

// out = act(acc * scale + shift), the activation's switch hoisted out of the channel loop.
template <int NC, typename T, typename Acc>
FASTMB_INLINE void store_activated(T* out, const Acc* acc, const Acc* scale, const Acc* shift, Activation act, int64_t nc) {
  const int64_t count = NC ? NC : nc;
#define FASTMB_STORE(A) \
  for (int64_t c = 0; c < count; ++c) out[c] = T(activate<Acc>(A, acc[c] * scale[c] + shift[c]))
  switch (act) {
    case Activation::kHardswish: FASTMB_STORE(Activation::kHardswish); break;
    case Activation::kRelu: FASTMB_STORE(Activation::kRelu); break;
    case Activation::kRelu6: FASTMB_STORE(Activation::kRelu6); break;
    default: FASTMB_STORE(Activation::kIdentity);
  }
#undef FASTMB_STORE
}

template <int V>
using Int = std::integral_constant<int, V>;

// Calls f(Int<NC>, c0, nc) for each channel block, with NC = kBlock for full blocks (constant
// trip counts: the accumulators stay in registers) and 0 for the tail.
template <typename F>
FASTMB_INLINE void for_each_block(int64_t channels, F&& f) {
  int64_t c0 = 0;
  for (; c0 + kBlock <= channels; c0 += kBlock) f(Int<kBlock>{}, c0, kBlock);
  if (c0 < channels) f(Int<0>{}, c0, channels - c0);
}

template <int K, typename T, typename Acc>
FASTMB_MULTIVERSION void forward_rows(T* y, const T* x, const Acc* w, const Acc* scale, const Acc* shift, Geometry g,
                                      Activation act, int64_t begin, int64_t end) {
  alignas(64) Acc acc[kBlock];
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / g.ho, oh = row % g.ho;
    const T* x_img = x + n * g.h * g.w * g.c;
    for (int64_t ow = 0; ow < g.wo; ++ow) {
      T* out = y + (row * g.wo + ow) * g.c;
      for_each_block(g.c, [&](auto block, int64_t c0, int64_t nc) {
        constexpr int NC = decltype(block)::value;
        conv_block<K, NC>(acc, nc, x_img, w, g, oh, ow, c0);
        store_activated<NC>(out + c0, acc, scale + c0, shift + c0, act, nc);
      });
    }
  }
}

// Per-channel mean and M2 of z over rows [begin, end), Chan-merged into (count, mean, m2).
template <int K, typename T, typename Acc>
FASTMB_MULTIVERSION void statistics_rows(double* mean, double* m2, int64_t& count, const T* x, const Acc* w, Geometry g,
                                         int64_t begin, int64_t end) {
  std::vector<Acc> z(g.wo * g.c), row_mean(g.c), row_m2(g.c);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / g.ho, oh = row % g.ho;
    const T* x_img = x + n * g.h * g.w * g.c;
    for (int64_t ow = 0; ow < g.wo; ++ow) {
      Acc* zp = z.data() + ow * g.c;
      for_each_block(g.c, [&](auto block, int64_t c0, int64_t nc) {
        conv_block<K, decltype(block)::value>(zp + c0, nc, x_img, w, g, oh, ow, c0);
      });
    }
    std::fill(row_mean.begin(), row_mean.end(), Acc(0));
    std::fill(row_m2.begin(), row_m2.end(), Acc(0));
    for (int64_t ow = 0; ow < g.wo; ++ow)
      for (int64_t c = 0; c < g.c; ++c) row_mean[c] += z[ow * g.c + c];
    for (int64_t c = 0; c < g.c; ++c) row_mean[c] /= Acc(g.wo);
    for (int64_t ow = 0; ow < g.wo; ++ow)
      for (int64_t c = 0; c < g.c; ++c) {
        const Acc d = z[ow * g.c + c] - row_mean[c];
        row_m2[c] += d * d;
      }
    const double na = double(count), nb = double(g.wo), total = na + nb;
    for (int64_t c = 0; c < g.c; ++c) {
      const double delta = double(row_mean[c]) - mean[c];
      mean[c] += delta * nb / total;
      m2[c] += double(row_m2[c]) + delta * delta * na * nb / total;
    }
    count += g.wo;
  }
}

// Backward pass 1: per-channel sums of dL/du and dL/du * x_hat over rows [begin, end).
template <int K, typename T, typename Acc>
FASTMB_MULTIVERSION void grad_sums_rows(double* sum_gu, double* sum_gu_xhat, const T* gy, const T* x, const Acc* w,
                                        const Acc* mean, const Acc* invstd, const Acc* gamma, const Acc* beta, Geometry g,
                                        Activation act, int64_t begin, int64_t end) {
  alignas(64) Acc acc[kBlock];
  std::vector<Acc> row_gu(g.c), row_gu_xhat(g.c);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / g.ho, oh = row % g.ho;
    const T* x_img = x + n * g.h * g.w * g.c;
    std::fill(row_gu.begin(), row_gu.end(), Acc(0));
    std::fill(row_gu_xhat.begin(), row_gu_xhat.end(), Acc(0));
    for (int64_t ow = 0; ow < g.wo; ++ow) {
      const T* gyp = gy + (row * g.wo + ow) * g.c;
      for_each_block(g.c, [&](auto block, int64_t c0, int64_t nc) {
        constexpr int NC = decltype(block)::value;
        conv_block<K, NC>(acc, nc, x_img, w, g, oh, ow, c0);
        for (int64_t c = 0; c < (NC ? NC : nc); ++c) {
          const int64_t k = c0 + c;
          const Acc x_hat = (acc[c] - mean[k]) * invstd[k];
          const Acc gu = activation_grad<Acc>(act, Acc(gyp[k]), x_hat * gamma[k] + beta[k]);
          row_gu[k] += gu;
          row_gu_xhat[k] += gu * x_hat;
        }
      });
    }
    for (int64_t c = 0; c < g.c; ++c) {
      sum_gu[c] += row_gu[c];
      sum_gu_xhat[c] += row_gu_xhat[c];
    }
  }
}

// Backward pass 2 for image n, channels [c0, c0 + nc): dL/dz = a * dL/du - b - x_hat * d per
// channel (a = gamma * invstd; b, d: the batch-statistics terms, zero in eval), accumulated
// into the weight gradient gw ([taps][C], this thread's partial) and scattered into gx_acc
// (dL/dx of this image and block, [H][W][nc], zeroed here).
template <int K, typename T, typename Acc>
FASTMB_MULTIVERSION void grad_input_weight_block(Acc* gx_acc, Acc* gw, const T* gy, const T* x, const Acc* w, const Acc* mean,
                                                 const Acc* invstd, const Acc* gamma, const Acc* beta, const Acc* a,
                                                 const Acc* b, const Acc* d, Geometry g, Activation act, int64_t n, int64_t c0,
                                                 int64_t nc) {
  const int kh = K ? K : g.kh, kw = K ? K : g.kw;
  const T* x_img = x + n * g.h * g.w * g.c;
  if (gx_acc != nullptr) std::fill(gx_acc, gx_acc + g.h * g.w * nc, Acc(0));
  alignas(64) Acc acc[kBlock];
  for (int64_t oh = 0; oh < g.ho; ++oh) {
    for (int64_t ow = 0; ow < g.wo; ++ow) {
      conv_block<K, 0>(acc, nc, x_img, w, g, oh, ow, c0);
      const T* gyp = gy + ((n * g.ho + oh) * g.wo + ow) * g.c + c0;
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t k = c0 + c;
        const Acc x_hat = (acc[c] - mean[k]) * invstd[k];
        const Acc gu = activation_grad<Acc>(act, Acc(gyp[c]), x_hat * gamma[k] + beta[k]);
        acc[c] = a[k] * gu - b[k] - x_hat * d[k];  // acc now holds dL/dz
      }
      int h_lo, h_hi, w_lo, w_hi;
      valid_taps(oh, g.sh, g.ph, g.dh, kh, g.h, h_lo, h_hi);
      valid_taps(ow, g.sw, g.pw, g.dw, kw, g.w, w_lo, w_hi);
      for (int i = h_lo; i < h_hi; ++i) {
        const int64_t ih = oh * g.sh - g.ph + int64_t(i) * g.dh;
        for (int j = w_lo; j < w_hi; ++j) {
          const int64_t iw = ow * g.sw - g.pw + int64_t(j) * g.dw;
          const int64_t tap = int64_t(i) * kw + j;
          if (gw != nullptr) {
            const T* xp = x_img + (ih * g.w + iw) * g.c + c0;
            Acc* gwp = gw + tap * g.c + c0;
            for (int64_t c = 0; c < nc; ++c) gwp[c] += acc[c] * Acc(xp[c]);
          }
          if (gx_acc != nullptr) {
            const Acc* wp = w + tap * g.c + c0;
            Acc* gxp = gx_acc + (ih * g.w + iw) * nc;
            for (int64_t c = 0; c < nc; ++c) gxp[c] += acc[c] * wp[c];
          }
        }
      }
    }
  }
}

// Calls f(Int<K>) with the kernel-size specialisation: 3, 5, 7 compiled for, else generic (0).
template <typename F>
void dispatch_kernel_size(const Geometry& g, F&& f) {
  const int k = g.kh == g.kw ? g.kh : 0;
  if (k == 3) f(Int<3>{});
  else if (k == 5) f(Int<5>{});
  else if (k == 7) f(Int<7>{});
  else f(Int<0>{});
}

Geometry geometry(const Tensor& x, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  Geometry g{};
  g.n = x.size(0), g.c = x.size(1), g.h = x.size(2), g.w = x.size(3);
  g.kh = int(weight.size(2)), g.kw = int(weight.size(3));
  g.sh = int(stride[0]), g.sw = int(stride[1]), g.ph = int(padding[0]), g.pw = int(padding[1]);
  g.dh = int(dilation[0]), g.dw = int(dilation[1]);
  g.ho = (g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.wo = (g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  return g;
}

// Rows of work per parallel chunk: about 64K multiply-adds.
int64_t row_grain(const Geometry& g) { return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, g.wo * g.c * g.kh * g.kw)); }

void check_inputs(const Tensor& x, const Tensor& weight) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1,
              "fastmb::dwconv_bn_act: x must be (N, C, H, W) and weight (C, 1, kH, kW)");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "fastmb::dwconv_bn_act: x and weight dtypes differ");
  TORCH_CHECK(x.scalar_type() != at::kHalf, "fastmb::dwconv_bn_act: the CPU kernels have no float16 path; use the reference backend");
}

// weight (C, 1, kH, kW) as [kH * kW][C] in the accumulation dtype.
Tensor taps_major(const Tensor& weight, at::ScalarType acc) {
  return weight.to(acc).reshape({weight.size(0), -1}).t().contiguous();
}

Tensor vector_or(const std::optional<Tensor>& v, int64_t c, at::ScalarType acc, const Tensor& like, double fill) {
  return v.has_value() ? v->to(acc).contiguous() : at::full({c}, fill, like.options().dtype(acc));
}

std::tuple<Tensor, Tensor, Tensor> dwconv_bn_act_forward(
    const Tensor& x_in, const Tensor& weight, const std::optional<Tensor>& bn_weight, const std::optional<Tensor>& bn_bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, double eps, bool training, c10::string_view activation) {
  check_inputs(x_in, weight);
  const NoAutocast no_autocast;
  const Activation act = parse_activation(activation);
  const Geometry g = geometry(x_in, weight, stride, padding, dilation);
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
  const Tensor w = taps_major(weight, acc_type);
  const Tensor gamma = vector_or(bn_weight, g.c, acc_type, x, 1.0), beta = vector_or(bn_bias, g.c, acc_type, x, 0.0);
  const int64_t rows = g.n * g.ho;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastmb_dwconv_bn_act_forward", [&] {
    using Acc = at::opmath_type<scalar_t>;
    dispatch_kernel_size(g, [&](auto kernel) {
      constexpr int K = decltype(kernel)::value;
      if (training) {
        // Pass 1: per-thread Welford states, merged with Chan's formula.
        const int threads = at::get_num_threads();
        std::vector<double> means(threads * g.c, 0.0), m2s(threads * g.c, 0.0);
        std::vector<int64_t> counts(threads, 0);
        at::parallel_for(0, rows, row_grain(g), [&](int64_t begin, int64_t end) {
          const int t = at::get_thread_num();
          statistics_rows<K>(means.data() + t * g.c, m2s.data() + t * g.c, counts[t], x.const_data_ptr<scalar_t>(),
                             w.const_data_ptr<Acc>(), g, begin, end);
        });
        mean = at::empty({g.c}, stats_options);
        var = at::empty({g.c}, stats_options);
        for (int64_t c = 0; c < g.c; ++c) {
          double m = 0.0, m2 = 0.0, n = 0.0;
          for (int t = 0; t < threads; ++t) {
            const double nb = double(counts[t]);
            if (nb == 0.0) continue;
            const double delta = means[t * g.c + c] - m, total = n + nb;
            m += delta * nb / total;
            m2 += m2s[t * g.c + c] + delta * delta * n * nb / total;
            n = total;
          }
          mean.mutable_data_ptr<Acc>()[c] = Acc(m);
          var.mutable_data_ptr<Acc>()[c] = Acc(m2 / n);
        }
      }
      // Fold BN into a per-channel scale and shift.
      std::vector<Acc> scale(g.c), shift(g.c);
      const Acc *m = mean.const_data_ptr<Acc>(), *v = var.const_data_ptr<Acc>();
      for (int64_t c = 0; c < g.c; ++c) {
        scale[c] = gamma.const_data_ptr<Acc>()[c] / std::sqrt(v[c] + Acc(eps));
        shift[c] = beta.const_data_ptr<Acc>()[c] - m[c] * scale[c];
      }
      at::parallel_for(0, rows, row_grain(g), [&](int64_t begin, int64_t end) {
        forward_rows<K>(out.nhwc.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), w.const_data_ptr<Acc>(),
                        scale.data(), shift.data(), g, act, begin, end);
      });
    });
  });
  return {out.finish(), mean, var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dwconv_bn_act_backward(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& weight, const std::optional<Tensor>& bn_weight,
    const std::optional<Tensor>& bn_bias, const Tensor& mean_in, const Tensor& var_in, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, double eps, bool training, c10::string_view activation,
    std::array<bool, 3> output_mask) {
  check_inputs(x_in, weight);
  const NoAutocast no_autocast;
  const Activation act = parse_activation(activation);
  const Geometry g = geometry(x_in, weight, stride, padding, dilation);
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
  const Tensor w = taps_major(weight, acc_type);
  const Tensor mean = mean_in.to(acc_type).contiguous(), var = var_in.to(acc_type).contiguous();
  const Tensor gamma = vector_or(bn_weight, g.c, acc_type, x, 1.0), beta = vector_or(bn_bias, g.c, acc_type, x, 0.0);
  const int taps = g.kh * g.kw;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastmb_dwconv_bn_act_backward", [&] {
    using Acc = at::opmath_type<scalar_t>;
    std::vector<Acc> invstd(g.c), a(g.c), b(g.c, Acc(0)), d(g.c, Acc(0));
    for (int64_t c = 0; c < g.c; ++c) {
      invstd[c] = Acc(1) / std::sqrt(var.const_data_ptr<Acc>()[c] + Acc(eps));
      a[c] = gamma.const_data_ptr<Acc>()[c] * invstd[c];
    }
    const Acc *pm = mean.const_data_ptr<Acc>(), *pg = gamma.const_data_ptr<Acc>(), *pb = beta.const_data_ptr<Acc>();
    dispatch_kernel_size(g, [&](auto kernel) {
      constexpr int K = decltype(kernel)::value;
      if (training || output_mask[2]) {
        const int threads = at::get_num_threads();
        std::vector<double> sums(2 * threads * g.c, 0.0);
        at::parallel_for(0, g.n * g.ho, row_grain(g), [&](int64_t begin, int64_t end) {
          double* s = sums.data() + 2 * at::get_thread_num() * g.c;
          grad_sums_rows<K>(s, s + g.c, grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), w.const_data_ptr<Acc>(),
                            pm, invstd.data(), pg, pb, g, act, begin, end);
        });
        for (int64_t c = 0; c < g.c; ++c) {
          double sum_gu = 0.0, sum_gu_xhat = 0.0;
          for (int t = 0; t < threads; ++t) {
            sum_gu += sums[2 * t * g.c + c];
            sum_gu_xhat += sums[(2 * t + 1) * g.c + c];
          }
          if (output_mask[2]) {
            grad_beta.mutable_data_ptr<Acc>()[c] = Acc(sum_gu);
            grad_gamma.mutable_data_ptr<Acc>()[c] = Acc(sum_gu_xhat);
          }
          if (training) {  // the batch statistics' share of dL/dz
            b[c] = a[c] * Acc(sum_gu / double(values));
            d[c] = a[c] * Acc(sum_gu_xhat / double(values));
          }
        }
      }
      if (!output_mask[0] && !output_mask[1]) return;
      Tensor gw_partials = output_mask[1] ? per_thread_zeros<Acc>(taps * g.c, x) : Tensor();
      const int64_t blocks = (g.c + kBlock - 1) / kBlock;
      at::parallel_for(0, g.n * blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<Acc> gx_acc(output_mask[0] ? g.h * g.w * kBlock : 0);
        Acc* gw = output_mask[1] ? gw_partials.mutable_data_ptr<Acc>() + at::get_thread_num() * taps * g.c : nullptr;
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / blocks, c0 = (task % blocks) * kBlock, nc = std::min(kBlock, g.c - c0);
          grad_input_weight_block<K>(output_mask[0] ? gx_acc.data() : nullptr, gw, grad_y.const_data_ptr<scalar_t>(),
                                     x.const_data_ptr<scalar_t>(), w.const_data_ptr<Acc>(), pm, invstd.data(), pg, pb, a.data(),
                                     b.data(), d.data(), g, act, n, c0, nc);
          if (output_mask[0]) {
            scalar_t* gx = grad_x.nhwc.mutable_data_ptr<scalar_t>() + n * g.h * g.w * g.c + c0;
            for (int64_t p = 0; p < g.h * g.w; ++p)
              for (int64_t c = 0; c < nc; ++c) gx[p * g.c + c] = scalar_t(gx_acc[p * nc + c]);
          }
        }
      });
      if (output_mask[1]) {  // [threads][taps][C] partials -> (C, 1, kH, kW)
        const Tensor summed = gw_partials.sum(0).reshape({taps, g.c}).t();
        grad_weight.copy_(summed.reshape(weight.sizes()));
      }
    });
  });
  return {grad_x.finish(), grad_weight, grad_gamma.to(affine_type), grad_beta.to(affine_type)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmb, CPU, m) {
  m.impl("dwconv_bn_act", &dwconv_bn_act_forward);
  m.impl("dwconv_bn_act_backward", &dwconv_bn_act_backward);
}

}  // namespace fastmb::cpu
