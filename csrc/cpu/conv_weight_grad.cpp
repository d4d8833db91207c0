// fastmb::conv_weight_grad on the CPU: dL/dweight of a full conv (no groups) from its input x and
// dL/dz, as patches^T . dL/dz with the stem's patch GEMMs (patch_gemms.h): interior patches are
// read straight from x, a band of output rows per call, with no im2col of the whole input. The
// training convs that are neither depthwise nor 1x1 take their input gradient from oneDNN and
// this weight gradient (fastmb/nn/conv_bn_act.py's _FullConv): on MobileNetV4's first 3x3
// stride-2 conv (32 -> 32 channels, 112x112 in, batch 16, 2 threads) oneDNN's weight gradient
// ran at 58-68 G MAC/s, this at 77-92; on its 32 -> 96 one both at 85-100
// (bench/results/2026-12-06-full-conv-weight-grad.md). Sums are taken in Acc over
// kWeightGradPixels pixels, then per thread in double.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "conv_weight_grad.h"

#include "aligned_vector.h"
#include "patch_gemms.h"

namespace fastmb::cpu {
namespace {

using at::Tensor;
using namespace patches;

// A thread's weight gradient sums ([taps_padded][cp]): in Acc over up to kWeightGradPixels
// pixels, then added to its double partial. The border's pixels (their patches gathered with the
// padding's zeros) wait in a buffer until it is full: one or two a row, each a run of its own,
// would cost each tile its setup and its stores for one pixel's work.
template <typename Acc>
class WeightGradSums {
 public:
  WeightGradSums(const ConvPatches& s, double* partial)
      : s_(s), partial_(partial), sums_(s.taps_padded * s.cp, Acc(0)), patches_(kBorderPixels * s.taps_padded), rows_(kBorderPixels * s.cp, Acc(0)) {}

  // `rows` output rows of `count` pixels whose patches lie inside x, dL/dz's rows cp apart and
  // its output rows ldz_row apart.
  void add(const XPatches<Acc>& patches, const Acc* gz, int64_t count, int64_t rows, int64_t ldz_row) {
    weight_grad(sums_.data(), patches, gz, count, s_.taps_padded, s_.cp, rows, ldz_row);
    counted(count * rows);
  }

  // Output columns [first, last) of row oh of image n, dL/dz's rows of the row at gz (c apart).
  void add_border(const Acc* x, at::IntArrayRef xs, const Acc* gz, int64_t n, int64_t oh, int64_t first, int64_t last) {
    while (first < last) {
      const int64_t count = std::min(last - first, kBorderPixels - waiting_);
      gather_patches(patches_.data() + waiting_ * s_.taps_padded, x, xs, s_, n, oh, first, count);
      for (int64_t p = 0; p < count; ++p) std::copy_n(gz + (first + p) * s_.c, s_.c, rows_.data() + (waiting_ + p) * s_.cp);
      waiting_ += count, first += count;
      if (waiting_ == kBorderPixels) add_waiting();
    }
  }

  void finish() {
    add_waiting();
    add_to_partial();
  }

 private:
  static constexpr int64_t kBorderPixels = 48;

  void add_waiting() {
    if (waiting_ == 0) return;
    weight_grad(sums_.data(), GatheredPatches<Acc>{patches_.data(), s_.taps_padded}, rows_.data(), waiting_, s_.taps_padded, s_.cp);
    counted(waiting_);
    waiting_ = 0;
  }
  void counted(int64_t count) {
    summed_ += count;
    if (summed_ >= kWeightGradPixels) add_to_partial();
  }
  void add_to_partial() {
    for (size_t i = 0; i < sums_.size(); ++i) partial_[i] += double(sums_[i]);
    std::fill(sums_.begin(), sums_.end(), Acc(0));
    summed_ = 0;
  }

  const ConvPatches& s_;
  double* partial_;
  AlignedVector<Acc> sums_, patches_, rows_;
  int64_t waiting_ = 0, summed_ = 0;
};

// Output rows one weight-gradient call takes, at most, and the pixels it aims at: each tap tile
// passes over the band's dL/dz for its channels (up to 256 bytes a pixel), in L1 at 64 pixels;
// bands of up to 1024 read it from L2 once a tile (AVX2: MobileNetV4's stride-2 convs and stem
// 1.02-1.16x, bench/results/2026-12-08-avx2-probes.md).
constexpr int64_t kBandRows = 8;
constexpr int64_t kBandPixels = 64;

}  // namespace

Tensor conv_weight_grad(const Tensor& grad_z_in, const Tensor& x, at::IntArrayRef weight_size, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "conv_weight_grad";
  TORCH_CHECK(x.dim() == 4, "fastmb::", op, ": x must be (N, C_in, H, W), got shape ", x.sizes());
  TORCH_CHECK(weight_size.size() == 4 && weight_size[0] >= 1 && weight_size[1] == x.size(1) && weight_size[2] >= 1 && weight_size[3] >= 1,
              "fastmb::", op, ": weight_size must be (C_out, C_in, kH, kW) with C_in = ", x.size(1), " and every entry at least 1, got ",
              weight_size);
  TORCH_CHECK(x.device().is_cpu() && grad_z_in.device().is_cpu(), "fastmb::", op, ": the CPU kernel takes CPU tensors, got x on ",
              x.device(), " and grad_z on ", grad_z_in.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "fastmb::", op,
              ": the CPU kernel takes float32 and float64, got ", x.scalar_type());
  const Geometry g = dwconv_geometry_of(op, x.sizes(), weight_size.slice(2), stride, padding, dilation);
  const int64_t c = weight_size[0];
  TORCH_CHECK(grad_z_in.sizes() == at::IntArrayRef({g.n, c, g.ho, g.wo}), "fastmb::", op, ": grad_z must have the conv output's shape (",
              g.n, ", ", c, ", ", g.ho, ", ", g.wo, "), got ", grad_z_in.sizes());
  TORCH_CHECK(grad_z_in.scalar_type() == x.scalar_type(), "fastmb::", op, ": grad_z must have x's dtype ", x.scalar_type(), ", got ",
              grad_z_in.scalar_type());
  const NoAutocast no_autocast;
  Tensor grad_weight = at::zeros(weight_size, x.options());
  if (g.pixels == 0 || x.size(1) == 0) return grad_weight;

  const Tensor grad_z = as_nhwc(grad_z_in);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmb_conv_weight_grad", [&] {
    using Acc = scalar_t;
    const ConvPatches s(g, c, gemm_vector_bytes() / int(sizeof(Acc)), x.strides());
    const Acc *x_data = x.const_data_ptr<Acc>(), *gz_data = grad_z.const_data_ptr<Acc>();
    const int threads = at::get_num_threads();
    const int64_t sums_size = s.taps_padded * s.cp;
    const bool x_rows_contiguous = x.stride(1) == 1 && x.stride(3) == g.c;  // channels_last: prefetched
    std::vector<double> partials(threads * sums_size, 0.0);
    at::parallel_for(0, g.n * g.ho, 1, [&](int64_t begin, int64_t end) {
      WeightGradSums<Acc> sums(s, partials.data() + at::get_thread_num() * sums_size);
      // dL/dz's rows of a band's interior, cp apart: grad_z itself, or copied beside zero padding channels
      AlignedVector<Acc> padded_rows(s.cp == c ? 0 : kBandRows * g.wo * s.cp, Acc(0));
      for (int64_t row = begin; row < end;) {
        const int64_t n = row / g.ho, oh = row % g.ho;
        const auto [lo, hi] = interior_columns(s, oh, 0, g.wo);
        // A band of rows of one image with this interior, whose pixels one call takes: about
        // kBandPixels of them, at least a row
        const int64_t most = lo < hi ? std::clamp<int64_t>(kBandPixels / (hi - lo), 1, kBandRows) : 1;
        int64_t band = 1;
        while (band < most && row + band < end && oh + band < g.ho && interior_columns(s, oh + band, 0, g.wo) == std::pair{lo, hi}) ++band;
        if (row + band < end && x_rows_contiguous) {  // the next band's input rows, as many
          const int64_t next = row + band, next_oh = next % g.ho, next_end = std::min(next_oh + band, g.ho);
          prefetch_input_rows(x_data, x.strides(), g, next / g.ho, next_oh * g.sh - g.ph, (next_end - 1) * g.sh - g.ph + (g.kh - 1) * g.dh);
        }
        const Acc* gz = gz_data + row * g.wo * c;
        if (lo < hi) {
          const Acc* rows = gz + lo * c;
          int64_t ldz_row = g.wo * c;
          if (s.cp != c) {
            ldz_row = (hi - lo) * s.cp;
            for (int64_t b = 0; b < band; ++b)
              for (int64_t p = lo; p < hi; ++p) std::copy_n(gz + b * g.wo * c + p * c, c, padded_rows.data() + b * ldz_row + (p - lo) * s.cp);
            rows = padded_rows.data();
          }
          XPatches<Acc> patches = x_patches(s, x_data, x.strides(), n, oh, lo);
          patches.row_step = g.sh * x.stride(2);
          sums.add(patches, rows, hi - lo, band, ldz_row);
        }
        for (int64_t b = 0; b < band; ++b) {
          sums.add_border(x_data, x.strides(), gz + b * g.wo * c, n, oh + b, 0, lo);
          sums.add_border(x_data, x.strides(), gz + b * g.wo * c, n, oh + b, hi, g.wo);
        }
        row += band;
      }
      sums.finish();
    });
    Acc* gw = grad_weight.mutable_data_ptr<Acc>();  // (C_out, C_in, kH, kW), contiguous
    for (int64_t co = 0; co < c; ++co)
      for (int64_t t = 0; t < s.taps; ++t) {
        double sum = 0.0;
        for (int th = 0; th < threads; ++th) sum += partials[th * sums_size + t * s.cp + co];
        gw[co * s.taps + s.weight_tap[t]] = Acc(sum);
      }
  });
  return grad_weight;
}

TORCH_LIBRARY_IMPL(fastmb, CPU, m) { m.impl("conv_weight_grad", &conv_weight_grad); }

}  // namespace fastmb::cpu
