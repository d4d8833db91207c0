// Shared by the CPU operators fastmb::dwconv_bn_act (forward.cpp) and its backward
// (backward.cpp): checks, the weight in taps-major order, the parallel split into image row
// bands, and the bfloat16 <-> float conversion a band at a time (the passes run on float).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../../common.h"
#include "../vec.h"
#include "kernels.h"

namespace fastmb::cpu::dwconv {

// dwconv_geometry's checks, and a dtype the CPU kernels have.
inline Geometry checked_geometry(const char* op, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, const std::optional<at::Tensor>& bn_weight,
                                 const std::optional<at::Tensor>& bn_bias) {
  const Geometry g = dwconv_geometry(op, x, weight, stride, padding, dilation, {{"bn_weight", &bn_weight}, {"bn_bias", &bn_bias}});
  TORCH_CHECK(x.device().is_cpu(), "fastmb::", op, ": the CPU kernels take CPU tensors, got ", x.device());
  TORCH_CHECK(g.kh <= INT32_MAX && g.kw <= INT32_MAX, "fastmb::", op, ": the CPU kernels take kernels of up to 2^31 - 1 taps a side");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16, "fastmb::", op,
              ": the CPU kernels take float32, float64 and bfloat16, got ", x.scalar_type(), " (the reference backend takes the rest)");
  return g;
}

// weight (C, 1, kH, kW) as [kH * kW][C] in Acc, in a buffer the calling thread reuses from call
// to call (valid until its next call): the eval path allocates nothing beyond the op's outputs.
template <typename T, typename Acc>
const Acc* taps_major_scratch(const at::Tensor& weight) {
  thread_local AlignedVector<Acc> buffer;
  const int64_t channels = weight.size(0), taps = weight.size(2) * weight.size(3);
  buffer.resize(channels * taps);
  const at::Tensor dense = weight.contiguous();
  const T* src = dense.const_data_ptr<T>();
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t t = 0; t < taps; ++t) buffer[t * channels + c] = Acc(src[c * taps + t]);
  return buffer.data();
}

// Output rows (n * Ho + oh) per parallel task: about 64K multiply-adds.
inline int64_t row_grain(const Geometry& g) {
  const double row_work = double(g.wo) * double(g.c) * double(g.kh) * double(g.kw);  // in double: no overflow
  return row_work >= 65536.0 ? 1 : int64_t(65536.0 / std::max(row_work, 1.0));
}

// Calls band(n, oh0, oh1) for each image's share of output rows [begin, end) (row = n * Ho + oh).
template <typename Band>
void for_image_bands(const Geometry& g, int64_t begin, int64_t end, const Band& band) {
  for (int64_t row = begin; row < end;) {
    const int64_t n = row / g.ho, oh0 = row % g.ho, oh1 = std::min(g.ho, oh0 + end - row);
    band(n, oh0, oh1);
    row += oh1 - oh0;
  }
}

// The input rows [lo, hi) that output rows [oh0, oh1) read.
inline std::pair<int64_t, int64_t> input_rows(const Geometry& g, int64_t oh0, int64_t oh1) {
  const int64_t lo = std::max<int64_t>(0, oh0 * g.sh - g.ph);
  const int64_t hi = std::min<int64_t>(g.h, (oh1 - 1) * g.sh - g.ph + int64_t(g.kh - 1) * g.dh + 1);
  return {lo, std::max(lo, hi)};
}

// Channels [c0, c0 + nc) of `pixels` pixels (c apart) from src to dst through convert(src, dst, n).
template <typename S, typename D>
void convert_channels(void (*convert)(const S*, D*, int64_t), const S* src, D* dst, int64_t pixels, int64_t c, int64_t c0, int64_t nc) {
  if (nc == c) return convert(src, dst, pixels * c);
  for (int64_t p = 0; p < pixels; ++p) convert(src + p * c + c0, dst + p * c + c0, nc);
}

// Rows [lo, hi) of an NHWC image of `row_values` values per row, as the passes (in Acc) read
// them: the image itself when T is Acc, else those rows converted into `buffer` (channels
// [c0, c0 + nc)), addressed as if it held the whole image (only rows [lo, hi) are read).
template <typename T, typename Acc>
const Acc* rows_as_acc(const Kernels<Acc>& kernels, const T* image, int64_t lo, int64_t hi, int64_t row_values, int64_t c, int64_t c0,
                       int64_t nc, AlignedVector<Acc>& buffer) {
  if constexpr (std::is_same_v<T, Acc>) {
    return image;
  } else {
    buffer.resize((hi - lo) * row_values);
    convert_channels(kernels.from_bfloat16, image + lo * row_values, buffer.data(), (hi - lo) * row_values / c, c, c0, nc);
    return buffer.data() - lo * row_values;
  }
}

// Where the passes write rows [lo, hi) of an output image in Acc: the output itself when T is Acc,
// else `buffer`, addressed as the whole image; store_rows then converts them into the output.
template <typename T, typename Acc>
Acc* output_rows(T* image, int64_t lo, int64_t hi, int64_t row_values, AlignedVector<Acc>& buffer) {
  if constexpr (std::is_same_v<T, Acc>) {
    return image;
  } else {
    buffer.resize((hi - lo) * row_values);
    return buffer.data() - lo * row_values;
  }
}

template <typename T, typename Acc>
void store_rows(const Kernels<Acc>& kernels, T* image, const Acc* rows, int64_t lo, int64_t hi, int64_t row_values, int64_t c, int64_t c0,
                int64_t nc) {
  if constexpr (!std::is_same_v<T, Acc>)
    convert_channels(kernels.to_bfloat16, rows + lo * row_values, image + lo * row_values, (hi - lo) * row_values / c, c, c0, nc);
}

// Training's pass 2 over `pixels` pixels: y = act(z * scale + shift), in place when y is z (T is
// Acc), else a chunk at a time through an L1-sized buffer into T.
template <typename T, typename Acc>
void normalize_into(const Kernels<Acc>& kernels, T* y, Acc* z, const Acc* scale, const Acc* shift, Activation act, int64_t pixels, int64_t c) {
  if constexpr (std::is_same_v<T, Acc>) {
    kernels.normalize(y, z, scale, shift, act, pixels, c);
  } else {
    thread_local AlignedVector<Acc> chunk;
    const int64_t chunk_pixels = std::max<int64_t>(1, 4096 / c);
    chunk.resize(chunk_pixels * c);
    for (int64_t p = 0; p < pixels; p += chunk_pixels) {
      const int64_t n = std::min(chunk_pixels, pixels - p);
      kernels.normalize(chunk.data(), z + p * c, scale, shift, act, n, c);
      kernels.to_bfloat16(chunk.data(), y + p * c, n * c);
    }
  }
}

// A batch norm with these statistics as a per-channel scale and shift:
// scale = gamma / sqrt(var + eps), shift = beta - mean * scale.
template <typename Acc>
inline void fold_batch_norm(Acc* scale, Acc* shift, const Acc* mean, const Acc* var, const Acc* gamma, const Acc* beta, double eps,
                            int64_t c) {
  for (int64_t k = 0; k < c; ++k) {
    scale[k] = gamma[k] / std::sqrt(var[k] + Acc(eps));
    shift[k] = beta[k] - mean[k] * scale[k];
  }
}

// The batch mean and biased variance from the threads' moments (Chan's merge, in double).
template <typename Acc>
inline void merge_moments(Acc* mean, Acc* var, const std::vector<double>& means, const std::vector<double>& m2s,
                          const std::vector<int64_t>& counts, int64_t c) {
  const int threads = int(counts.size());
  for (int64_t k = 0; k < c; ++k) {
    double m = 0.0, m2 = 0.0, n = 0.0;
    for (int t = 0; t < threads; ++t) {
      const double nb = double(counts[t]);
      if (nb == 0.0) continue;
      const double delta = means[t * c + k] - m, total = n + nb;
      m += delta * nb / total;
      m2 += m2s[t * c + k] + delta * delta * n * nb / total;
      n = total;
    }
    mean[k] = Acc(m);
    var[k] = Acc(m2 / n);
  }
}

// Calls f(c, sum_gu, sum_gu_xhat) for each of the c channels with the backward's two sums over
// the threads' partials (thread t's sums of dL/du at sums[2 * t * ld], of dL/du * x_hat at
// sums[(2 * t + 1) * ld]).
template <typename F>
inline void for_each_channel_grad_sums(const std::vector<double>& sums, int64_t ld, int64_t c, const F& f) {
  const int64_t threads = int64_t(sums.size()) / (2 * ld);
  for (int64_t k = 0; k < c; ++k) {
    double sum_gu = 0.0, sum_gu_xhat = 0.0;
    for (int64_t t = 0; t < threads; ++t) {
      sum_gu += sums[2 * t * ld + k];
      sum_gu_xhat += sums[(2 * t + 1) * ld + k];
    }
    f(k, sum_gu, sum_gu_xhat);
  }
}

}  // namespace fastmb::cpu::dwconv
