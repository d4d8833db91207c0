// fastmb::full_conv and fastmb::full_conv_input_grad on the CPU: a plain conv's forward
// z = conv2d(x, weight) (no groups, no bias) and its input gradient, float32, channels_last:
// training's convs that are neither depthwise nor 1x1 (_FullConv in fastmb/nn/conv_bn_act.py).
// Both are pointwise GEMMs (pointwise/kernels.h) per row of their output whose `a` rows are read
// straight from their input, a run of taps that lie side by side in it at a time:
//   forward         per kernel row, the taps of output pixel ow start s * C_in values after
//                   those of pixel ow - 1;
//   input gradient  per kernel row that reaches the input row, and per residue class of input
//                   columns mod the stride (the taps j that reach them), dL/dz's pixels ow
//                   that the class's taps read, in a run of C_out values each, written to
//                   every s-th pixel of dL/dx: no col2im, no zeros stuffed between pixels.
// The runs add into the output row through the GEMM's residual; pixels whose run would read past
// a row's ends take it from a buffer with the padding's zeros. MobileNetV4's first conv (3x3,
// stride 2, 32 -> 32 channels, 112x112 in, batch 16, 2 threads, AMD Zen 4): oneDNN's forward
// took 6.7-6.9 ms, this 5.4-5.6; the input gradient 6.3 against 5.8-5.9
// (bench/results/2026-12-07-training-convs.md).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "../common.h"
#include "aligned_vector.h"
#include "pointwise/kernels.h"

namespace fastmb::cpu {
namespace {

using at::Tensor;

// A run of taps of kernel row i that lie side by side in the GEMM's input: the weights of taps
// j[0], j[1], ... packed as the GEMM's panels ([panel][t * c_k + kk][16], zero past n).
struct TapRun {
  int64_t i;
  std::vector<int64_t> j;
  AlignedVector<float> packed;
};

// The run of taps j of kernel row i of weight w (C_out, C_in, kH, kW; g.c = C_in), packed for the
// forward (C_in values a tap into C_out columns) or for the input gradient (C_out into C_in).
TapRun tap_run(const float* w, const Geometry& g, int64_t c_out, int64_t i, std::vector<int64_t> j, bool input_grad) {
  const int64_t c_in = g.c, c_k = input_grad ? c_out : c_in, n = input_grad ? c_in : c_out, k = int64_t(j.size()) * c_k;
  AlignedVector<float> packed(pointwise::panels_of(n) * k * pointwise::kPanel, 0.0f);
  for (int64_t col = 0; col < n; ++col)
    for (size_t t = 0; t < j.size(); ++t)
      for (int64_t kk = 0; kk < c_k; ++kk) {
        const int64_t co = input_grad ? kk : col, ci = input_grad ? col : kk;
        packed[pointwise::packed_at(int64_t(t) * c_k + kk, col, k)] = w[((co * c_in + ci) * g.kh + i) * g.kw + j[t]];
      }
  return {i, std::move(j), std::move(packed)};
}

// One output row's share of a run: out pixels [0, count) (ldc apart, n values each) from the
// run's `a` rows, pixel q's at a0 + q * lda with its taps c_k values apart, where pixels
// [lo, hi) read inside `in_pixels` pixels of the input row and the others are gathered with
// zeros (tap t of pixel q at input pixel first(q) + t * tap_step). Added to the row unless
// `first`.
struct RowProduct {
  pointwise::GemmPanels gemm;
  const float* zero_bias;
  int64_t n, c_k;
  AlignedVector<float>* border;

  void operator()(const TapRun& run, const float* in_row, int64_t in_pixels, int64_t first_pixel, int64_t lda_pixels, int64_t tap_step,
                  float* out, int64_t ldc, int64_t count, int64_t lo, int64_t hi, bool first) const {
    const int64_t taps = int64_t(run.j.size()), k = taps * c_k, panels = pointwise::panels_of(n);
    const auto product = [&](const float* a, int64_t lda, int64_t q0, int64_t m) {
      float* c = out + q0 * ldc;
      gemm({a, lda, run.packed.data(), zero_bias, first ? nullptr : c, ldc, c, ldc, m, n, k, Activation::kIdentity}, 0, panels);
    };
    if (lo < hi) product(in_row + (first_pixel + lo * lda_pixels) * c_k, lda_pixels * c_k, lo, hi - lo);
    for (const auto& [q0, q1] : {std::pair{int64_t(0), lo}, std::pair{hi, count}}) {
      if (q0 >= q1) continue;
      border->assign((q1 - q0) * k, 0.0f);
      for (int64_t q = q0; q < q1; ++q)
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t pixel = first_pixel + q * lda_pixels + t * tap_step;
          if (pixel >= 0 && pixel < in_pixels) std::copy_n(in_row + pixel * c_k, c_k, border->data() + (q - q0) * k + t * c_k);
        }
      product(border->data(), k, q0, q1 - q0);
    }
  }
};

// The pixels q in [0, count) whose run starts at first + q * step (step >= 1) and spans `extent`
// pixels inside [0, pixels).
std::pair<int64_t, int64_t> inside(int64_t first, int64_t step, int64_t extent, int64_t pixels, int64_t count) {
  const int64_t lo = std::min(count, first >= 0 ? 0 : (-first + step - 1) / step);
  const int64_t last = pixels - extent - first;  // the last start inside, less first
  return {lo, std::max(lo, last < 0 ? 0 : std::min(count, last / step + 1))};
}

// `name` (x or grad_z) and the weight: float32 CPU tensors, the weight (C_out, C_in, kH, kW).
void check_conv(const char* op, const char* name, const Tensor& t, const Tensor& weight, int64_t c_in) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == c_in && weight.size(2) >= 1 && weight.size(3) >= 1, "fastmb::", op,
              ": weight must be (C_out, C_in, kH, kW) with C_in = ", c_in, " and a kernel of at least 1x1, got shape ", weight.sizes());
  TORCH_CHECK(t.device().is_cpu() && weight.device().is_cpu(), "fastmb::", op, ": the CPU kernel takes CPU tensors, got ", name, " on ",
              t.device(), " and weight on ", weight.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "fastmb::", op, ": the CPU kernel takes float32 ",
              name, " and weight, got ", t.scalar_type(), " and ", weight.scalar_type());
}

Tensor full_conv(const Tensor& x_in, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x_in.dim() == 4, "fastmb::full_conv: x must be (N, C_in, H, W), got shape ", x_in.sizes());
  check_conv("full_conv", "x", x_in, weight, x_in.size(1));
  const Geometry g = dwconv_geometry_of("full_conv", x_in.sizes(), weight.sizes().slice(2), stride, padding, dilation);
  const int64_t c_in = g.c, c_out = weight.size(0);
  const NoAutocast no_autocast;
  Tensor z = at::empty({g.n, c_out, g.ho, g.wo}, x_in.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (z.numel() == 0) return z;
  if (c_in == 0) return z.zero_();

  const Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast), w = weight.contiguous();
  const float* wd = w.const_data_ptr<float>();
  // Runs: a whole kernel row, or each tap where the columns are dilated.
  std::vector<TapRun> runs;
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j0 = 0; j0 < g.kw; j0 += g.dw == 1 ? g.kw : 1) {
      std::vector<int64_t> taps;
      for (int64_t j = j0; j < (g.dw == 1 ? g.kw : j0 + 1); ++j) taps.push_back(j);
      runs.push_back(tap_run(wd, g, c_out, i, std::move(taps), false));
    }
  const AlignedVector<float> zero_bias(c_out, 0.0f);
  const pointwise::GemmPanels gemm = pointwise::select_gemm();
  const float* xd = x.const_data_ptr<float>();
  float* zd = z.mutable_data_ptr<float>();
  at::parallel_for(0, g.n * g.ho, 1, [&](int64_t begin, int64_t end) {
    AlignedVector<float> border;
    const RowProduct row_product{gemm, zero_bias.data(), c_out, c_in, &border};
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.ho, oh = row % g.ho;
      float* z_row = zd + row * g.wo * c_out;
      bool first = true;
      for (const TapRun& run : runs) {
        const int64_t ih = oh * g.sh - g.ph + run.i * g.dh;
        if (ih < 0 || ih >= g.h) continue;  // the padding's zeros add nothing
        const int64_t first_pixel = run.j[0] * g.dw - g.pw, extent = (int64_t(run.j.size()) - 1) * g.dw + 1;
        const auto [lo, hi] = inside(first_pixel, g.sw, extent, g.w, g.wo);
        row_product(run, xd + (n * g.h + ih) * g.w * c_in, g.w, first_pixel, g.sw, g.dw, z_row, c_out, g.wo, lo, hi, first);
        first = false;
      }
      if (first) std::fill(z_row, z_row + g.wo * c_out, 0.0f);  // every kernel row in the padding
    }
  });
  return z;
}

Tensor full_conv_input_grad(const Tensor& grad_z_in, const Tensor& weight, at::IntArrayRef x_size, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "full_conv_input_grad";
  TORCH_CHECK(x_size.size() == 4 && x_size[0] >= 0 && x_size[1] >= 0 && x_size[2] >= 1 && x_size[3] >= 1, "fastmb::", op,
              ": x_size must be (N, C_in, H, W) with H and W at least 1, got ", x_size);
  check_conv(op, "grad_z", grad_z_in, weight, x_size[1]);
  const Geometry g = dwconv_geometry_of(op, x_size, weight.sizes().slice(2), stride, padding, dilation);
  const int64_t c_in = g.c, c_out = weight.size(0);
  TORCH_CHECK(grad_z_in.sizes() == at::IntArrayRef({g.n, c_out, g.ho, g.wo}), "fastmb::", op,
              ": grad_z must have the conv output's shape (", g.n, ", ", c_out, ", ", g.ho, ", ", g.wo, "), got ", grad_z_in.sizes());
  const NoAutocast no_autocast;
  Tensor grad_x = at::empty(x_size, weight.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (grad_x.numel() == 0) return grad_x;
  if (c_out == 0) return grad_x.zero_();

  const Tensor gz = grad_z_in.contiguous(at::MemoryFormat::ChannelsLast), w = weight.contiguous();
  const float* wd = w.const_data_ptr<float>();
  // Per kernel row i and residue class r of input columns ((iw + pw) mod sw), the taps j that
  // reach them ((j * dw) mod sw = r), in decreasing j: their pixels ow = (iw + pw - j * dw) / sw
  // then lie in increasing order, side by side where dw = 1. Each tap alone where they do not.
  std::vector<std::vector<TapRun>> runs(g.kh * g.sw);
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t r = 0; r < g.sw; ++r) {
      std::vector<int64_t> taps;
      for (int64_t j = g.kw - 1; j >= 0; --j)
        if (j * g.dw % g.sw == r) taps.push_back(j);
      for (size_t t0 = 0; t0 < taps.size(); t0 += g.dw == 1 ? taps.size() : 1)
        runs[i * g.sw + r].push_back(tap_run(wd, g, c_out, i, {taps.begin() + t0, g.dw == 1 ? taps.end() : taps.begin() + t0 + 1}, true));
    }
  const AlignedVector<float> zero_bias(c_in, 0.0f);
  const pointwise::GemmPanels gemm = pointwise::select_gemm();
  const float* gzd = gz.const_data_ptr<float>();
  float* gxd = grad_x.mutable_data_ptr<float>();
  at::parallel_for(0, g.n * g.h, 1, [&](int64_t begin, int64_t end) {
    AlignedVector<float> border;
    const RowProduct row_product{gemm, zero_bias.data(), c_in, c_out, &border};
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.h, ih = row % g.h;
      float* gx_row = gxd + row * g.w * c_in;
      for (int64_t r = 0; r < g.sw; ++r) {
        // The class's columns iw = iw0 + q * sw
        const int64_t iw0 = ((r - g.pw) % g.sw + g.sw) % g.sw;
        if (iw0 >= g.w) continue;
        const int64_t count = (g.w - iw0 + g.sw - 1) / g.sw;
        bool first = true;
        for (int64_t i = 0; i < g.kh; ++i) {
          const int64_t rows_from = ih + g.ph - i * g.dh;  // oh * sh
          if (rows_from < 0 || rows_from % g.sh != 0 || rows_from / g.sh >= g.ho) continue;
          const float* gz_row = gzd + (n * g.ho + rows_from / g.sh) * g.wo * c_out;
          for (const TapRun& run : runs[i * g.sw + r]) {
            // Tap j of column iw0 + q * sw reads pixel (iw0 + pw - j * dw) / sw + q; the run's
            // first tap (the largest j) the leftmost of them.
            const int64_t first_pixel = (iw0 + g.pw - run.j[0] * g.dw) / g.sw, extent = int64_t(run.j.size());
            const auto [lo, hi] = inside(first_pixel, 1, extent, g.wo, count);
            row_product(run, gz_row, g.wo, first_pixel, 1, 1, gx_row + iw0 * c_in, g.sw * c_in, count, lo, hi, first);
            first = false;
          }
        }
        if (first)  // no tap reaches these columns of this row
          for (int64_t q = 0; q < count; ++q) std::fill_n(gx_row + (iw0 + q * g.sw) * c_in, c_in, 0.0f);
      }
    }
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmb, CPU, m) {
  m.impl("full_conv", &full_conv);
  m.impl("full_conv_input_grad", &full_conv_input_grad);
}

}  // namespace fastmb::cpu
