// fastmb::inverted_residual on the CPU: a whole MobileNet V2/V3 block in eval, float32,
// channels_last, in one call:
//   expand 1x1 conv (BN folded) + act -> depthwise conv + BN + act -> [SE] -> project 1x1 conv
//   (BN folded) [+ x]
// Work goes image by image (or, with fewer images than threads, in row parts of an image) and
// in bands of output rows: each band's expanded rows are computed just before the depthwise conv
// reads them, and, without SE, its depthwise output is projected at once, so the expanded
// activation stays in L2 instead of making four round trips to memory. With SE the depthwise
// output is kept once per image (its channel sums are taken band by band), the gate is folded
// into the projection weights per image, and the image is projected. The 1x1 convs are GEMMs
// through the BLAS PyTorch links (MKL's sgemm on x86: faster on these shapes than a micro-
// kernel of ours would be, bench/results/), with each epilogue applied to rows still in cache.
// Buffers are per-thread and reused: a call allocates only its output.
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <vector>

#include "../common.h"
#include "dwconv/operator.h"
#include "vec.h"

namespace fastmb::cpu {
namespace {

using at::Tensor;

// Fortran BLAS sgemm, looked up at load time in what PyTorch linked (MKL or OpenBLAS); null in a
// build without a BLAS, where the GEMMs go through at::mm_out instead.
using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
                         const float*, const int*, const float*, float*, const int*);
SgemmFn blas_sgemm() {
  static const SgemmFn fn = reinterpret_cast<SgemmFn>(dlsym(RTLD_DEFAULT, "sgemm_"));
  return fn;
}

// c (m, n) = a (m, k) * b (n, k)^T, row-major, a and b dense, c's rows ldc apart. In BLAS's
// column-major terms that is c^T = b * a^T.
void gemm_abt(int64_t m, int64_t n, int64_t k, const float* a, const float* b, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (const SgemmFn sgemm = blas_sgemm(); sgemm != nullptr && std::max({m, n, k, ldc}) <= INT32_MAX) {
    const int mi = int(m), ni = int(n), ki = int(k), ldci = int(ldc);
    const float one = 1.0f, zero = 0.0f;
    sgemm("T", "N", &ni, &mi, &ki, &one, b, &ki, a, &ki, &zero, c, &ldci);
    return;
  }
  const auto options = at::TensorOptions().dtype(at::kFloat);
  Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  at::mm_out(out, at::from_blob(const_cast<float*>(a), {m, k}, options), at::from_blob(const_cast<float*>(b), {n, k}, options).t());
}
void gemm_abt(int64_t m, int64_t n, int64_t k, const float* a, const float* b, float* c) { gemm_abt(m, n, k, a, b, c, n); }

// gemm_abt on every thread, each computing a block of c's columns (whole vectors of 16): each
// reads only its share of b, the weights, which at batch 1 are most of the bytes moved. The
// BLAS's own threading splits such small products less well (1.5x on two threads at m = 49).
void gemm_abt_by_columns(int64_t m, int64_t n, int64_t k, const float* a, const float* b, float* c) {
  const int64_t blocks = (n + 15) / 16;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * 16, n1 = std::min(n, b1 * 16);
    gemm_abt(m, n1 - n0, k, a, b + n0 * k, c + n0, n);
  });
}

// y[p][k] = act(y[p][k] + bias[k]) (+ residual[p][k]) for `pixels` rows of c values.
FASTMB_MULTIVERSION void bias_activate(float* y, const float* bias, const float* residual, Activation activation, int64_t c,
                                       int64_t pixels) {
  using V = Vec<float>;
  const ActivationFn<float> act(activation);
  const bool smooth = is_smooth(activation);
  for (int64_t p = 0; p < pixels; ++p) {
    float* row = y + p * c;
    const float* res = residual == nullptr ? nullptr : residual + p * c;
    int64_t k = 0;
    for (; k + V::kLanes <= c; k += V::kLanes) {
      const V::type u = V::load(row + k) + V::load(bias + k);
      V::type v = smooth ? smooth_activation<VecMath, float>(activation, u) : act(u);
      if (res != nullptr) v += V::load(res + k);
      V::store(row + k, v);
    }
    for (; k < c; ++k) {
      const float u = row[k] + bias[k];
      row[k] = (smooth ? smooth_activation<VecMath, float>(activation, u) : act(u)) + (res != nullptr ? res[k] : 0.0f);
    }
  }
}

// sums[k] += the sum of `pixels` rows of c values.
FASTMB_MULTIVERSION void add_channel_sums(float* sums, const float* rows, int64_t pixels, int64_t c) {
  add_column_sums(sums, pixels, c, [&](int64_t p, int64_t k, auto width) __attribute__((always_inline)) {
    return load_values<float, decltype(width)::value>(rows + p * c + k);
  });
}

// dst[o][k] = w[o][k] * gate[k]: the SE gate folded into the (out, c) projection weights.
FASTMB_MULTIVERSION void scale_columns(float* dst, const float* w, const float* gate, int64_t out, int64_t c) {
  for (int64_t o = 0; o < out; ++o)
    for (int64_t k = 0; k < c; ++k) dst[o * c + k] = w[o * c + k] * gate[k];
}

// Everything one call reads, as raw pointers: the arguments checked and made dense.
struct Block {
  Geometry g;  // the depthwise conv's, over the expanded channels
  int64_t cin, cout, squeeze;
  const float *x, *expand_w, *expand_b, *dw_taps, *dw_scale, *dw_shift, *fc1_w, *fc1_b, *fc2_w, *fc2_b, *project_w, *project_b;
  Activation expand_act, dw_act, se_act;
  Gate gate;
  bool residual;
  dwconv::Kernels<float> dw;
  float* y;

  bool expands() const { return expand_w != nullptr; }
  bool has_se() const { return fc1_w != nullptr; }
  const float* image(int64_t n) const { return x + n * g.h * g.w * cin; }
};

// A thread's reusable buffers (grown, never shrunk).
struct Workspace {
  std::vector<float> expanded, depthwise, partial, weights;
};
Workspace& thread_workspace() {
  thread_local Workspace workspace;
  return workspace;
}
float* sized(std::vector<float>& buffer, int64_t size) {
  if (int64_t(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

// Output rows per band: at least 256 pixels (the GEMMs' rows; fewer cost more per call than they
// save), else about 128 KB of expanded values, so a band's rows stay in L2.
int64_t band_rows(const Block& b) {
  const int64_t pixels = std::max<int64_t>(256, 32768 / std::max<int64_t>(b.g.c, 1));
  return std::clamp<int64_t>(pixels / std::max<int64_t>(b.g.wo, 1), 1, b.g.ho);
}

// y rows (pixels [p0, p1) of image n) = d * w^T + bias (+ x): the projection and its epilogue.
void project(const Block& b, int64_t n, const float* d, const float* w, int64_t p0, int64_t p1) {
  const int64_t pixels_out = b.g.ho * b.g.wo;
  float* y = b.y + (n * pixels_out + p0) * b.cout;
  gemm_abt(p1 - p0, b.cout, b.g.c, d + p0 * b.g.c, w, y);
  const float* residual = b.residual ? b.image(n) + p0 * b.cin : nullptr;
  bias_activate(y, b.project_b, residual, Activation::kIdentity, b.cout, p1 - p0);
}

// Output rows [oh0, oh1) of image n through the expansion and the depthwise conv, band by band.
// Without SE each band is projected into y at once; with SE the depthwise output goes to
// `depthwise` (the image's, addressed from its first pixel) and its channel sums into `sums`.
void expand_depthwise_rows(const Block& b, int64_t n, int64_t oh0, int64_t oh1, float* depthwise, float* sums) {
  const Geometry& g = b.g;
  Workspace& ws = thread_workspace();
  const int64_t in_row = g.w * g.c, out_row = g.wo * g.c, band = band_rows(b);
  // The expanded rows this part reads, addressed as the whole image's (only rows [lo, hi) exist).
  const auto [lo, hi] = dwconv::input_rows(g, oh0, oh1);
  const float* expanded = b.image(n);
  float* expanded_rows = nullptr;
  if (b.expands()) {
    expanded_rows = sized(ws.expanded, (hi - lo) * in_row) - lo * in_row;
    expanded = expanded_rows;
  }
  float* band_out = b.has_se() ? nullptr : sized(ws.depthwise, band * out_row);
  float* partial = b.has_se() ? sized(ws.partial, g.c) : nullptr;
  int64_t next = lo;  // the first expanded row not yet computed
  for (int64_t ob = oh0; ob < oh1; ob += band) {
    const int64_t ob1 = std::min(oh1, ob + band);
    const auto [need_lo, need_hi] = dwconv::input_rows(g, ob, ob1);
    if (b.expands() && need_hi > next) {
      const int64_t r0 = std::max(next, need_lo);
      float* e = expanded_rows + r0 * in_row;
      gemm_abt((need_hi - r0) * g.w, g.c, b.cin, b.image(n) + r0 * g.w * b.cin, b.expand_w, e);
      bias_activate(e, b.expand_b, nullptr, b.expand_act, g.c, (need_hi - r0) * g.w);
      next = need_hi;
    }
    float* out = b.has_se() ? depthwise : band_out - ob * out_row;
    b.dw.eval_rows(out, expanded, b.dw_taps, b.dw_scale, b.dw_shift, g, b.dw_act, ob, ob1);
    if (b.has_se()) {
      std::fill(partial, partial + g.c, 0.0f);  // per band, then into sums: closer to eager's fp32 mean
      add_channel_sums(partial, out + ob * out_row, (ob1 - ob) * g.wo, g.c);
      for (int64_t k = 0; k < g.c; ++k) sums[k] += partial[k];
    } else {
      project(b, n, out, b.project_w, ob * g.wo, ob1 * g.wo);
    }
  }
}

// out[r] = finish(bias[r] + dot(w[r], in)) for rows [r0, r1) of the (rows, k) matrix w: one SE
// FC layer of one image, its weights read once (at batch 1 they come from beyond L2).
template <typename Finish>
FASTMB_MULTIVERSION void fc_rows(float* out, const float* in, const float* w, const float* bias, int64_t k, int64_t r0, int64_t r1,
                                 Finish finish) {
  for (int64_t r = r0; r < r1; ++r) out[r] = finish(bias[r] + dot(w + r * k, in, k));
}

// The SE gate of one image from its depthwise output's channel sums, folded into the projection
// weights: weights (cout, c) = project_w * gate. Split between the threads when `threaded`.
void fold_gate(const Block& b, const float* sums, float* weights, bool threaded) {
  const int64_t c = b.g.c, s = b.squeeze;
  std::vector<float> mean(c), hidden(s), gate(c);
  const float inv = 1.0f / float(b.g.ho * b.g.wo);
  for (int64_t k = 0; k < c; ++k) mean[k] = sums[k] * inv;
  const auto rows = [&](int64_t count, const auto& body) {
    if (threaded) at::parallel_for(0, count, 16, body);
    else body(0, count);
  };
  const Activation act = b.se_act;
  const Gate gate_kind = b.gate;
  rows(s, [&](int64_t r0, int64_t r1) { fc_rows(hidden.data(), mean.data(), b.fc1_w, b.fc1_b, c, r0, r1, [act](float v) { return activate(act, v); }); });
  rows(c, [&](int64_t r0, int64_t r1) { fc_rows(gate.data(), hidden.data(), b.fc2_w, b.fc2_b, s, r0, r1, [gate_kind](float v) { return gate_value(gate_kind, v); }); });
  rows(b.cout, [&](int64_t o0, int64_t o1) { scale_columns(weights + o0 * c, b.project_w + o0 * c, gate.data(), o1 - o0, c); });
}

// Image n stage by stage, each stage on every thread: the expansion and the projection as GEMMs
// that the BLAS splits between its threads, the depthwise conv in row ranges. For images too
// small to split into row parts (each part would recompute its neighbours' halo rows of the
// expansion: a third more work at 14x14 with 5x5 kernels).
void run_image_staged(const Block& b, int64_t n) {
  const Geometry& g = b.g;
  Workspace& ws = thread_workspace();
  const int64_t pixels_in = g.h * g.w, pixels_out = g.ho * g.wo;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(g.c, 1));
  const float* expanded = b.image(n);
  if (b.expands()) {
    float* e = sized(ws.expanded, pixels_in * g.c);
    gemm_abt_by_columns(pixels_in, g.c, b.cin, b.image(n), b.expand_w, e);
    at::parallel_for(0, pixels_in, grain, [&](int64_t p0, int64_t p1) {
      bias_activate(e + p0 * g.c, b.expand_b, nullptr, b.expand_act, g.c, p1 - p0);
    });
    expanded = e;
  }
  float* depthwise = sized(ws.depthwise, pixels_out * g.c);
  at::parallel_for(0, g.ho, std::max<int64_t>(1, grain / g.wo), [&](int64_t oh0, int64_t oh1) {
    b.dw.eval_rows(depthwise, expanded, b.dw_taps, b.dw_scale, b.dw_shift, g, b.dw_act, oh0, oh1);
  });
  const float* weights = b.project_w;
  if (b.has_se()) {
    std::vector<float> sums(g.c, 0.0f);
    for (int64_t p0 = 0; p0 < pixels_out; p0 += 256) {  // partial sums of 256 pixels, as the banded path
      float* partial = sized(ws.partial, g.c);
      std::fill(partial, partial + g.c, 0.0f);
      add_channel_sums(partial, depthwise + p0 * g.c, std::min<int64_t>(256, pixels_out - p0), g.c);
      for (int64_t k = 0; k < g.c; ++k) sums[k] += partial[k];
    }
    float* gated = sized(ws.weights, b.cout * g.c);
    fold_gate(b, sums.data(), gated, true);
    weights = gated;
  }
  float* y = b.y + n * pixels_out * b.cout;
  gemm_abt_by_columns(pixels_out, b.cout, g.c, depthwise, weights, y);
  at::parallel_for(0, pixels_out, grain, [&](int64_t p0, int64_t p1) {
    const float* residual = b.residual ? b.image(n) + p0 * b.cin : nullptr;
    bias_activate(y + p0 * b.cout, b.project_b, residual, Activation::kIdentity, b.cout, p1 - p0);
  });
}

// Output rows per part below which an image is run stage by stage instead of in row parts.
constexpr int64_t kMinPartRows = 16;

void run_block(const Block& b) {
  const Geometry& g = b.g;
  const int threads = at::get_num_threads();
  const int64_t image_values = g.ho * g.wo * g.c, pixels_out = g.ho * g.wo;
  // With fewer images than threads each image is split into row parts, one per thread, or run
  // stage by stage when it is too small for that.
  const int64_t parts = g.n >= threads ? 1 : std::min<int64_t>(g.ho, (threads + g.n - 1) / g.n);
  if (parts > 1 && g.ho / parts < kMinPartRows) {
    for (int64_t n = 0; n < g.n; ++n) run_image_staged(b, n);
    return;
  }
  const int64_t part_rows = (g.ho + parts - 1) / parts;
  std::vector<float> sums(b.has_se() ? g.n * parts * g.c : 0, 0.0f);
  // SE with parts: the images' depthwise outputs and gated weights outlive the parallel region.
  std::vector<float>& shared_depthwise = thread_workspace().depthwise;
  std::vector<float> shared_weights;
  if (b.has_se() && parts > 1) {
    sized(shared_depthwise, g.n * image_values);
    shared_weights.resize(g.n * b.cout * g.c);
  }
  at::parallel_for(0, g.n * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / parts, oh0 = (task % parts) * part_rows, oh1 = std::min(g.ho, oh0 + part_rows);
      if (oh0 >= oh1) continue;
      float* sum = b.has_se() ? sums.data() + task * g.c : nullptr;
      if (!b.has_se()) {
        expand_depthwise_rows(b, n, oh0, oh1, nullptr, nullptr);
      } else if (parts > 1) {
        expand_depthwise_rows(b, n, oh0, oh1, shared_depthwise.data() + n * image_values, sum);
      } else {  // the whole image on this thread: SE and the projection follow at once
        Workspace& ws = thread_workspace();
        float* depthwise = sized(ws.depthwise, image_values);
        expand_depthwise_rows(b, n, 0, g.ho, depthwise, sum);
        float* weights = sized(ws.weights, b.cout * g.c);
        fold_gate(b, sum, weights, false);
        project(b, n, depthwise, weights, 0, pixels_out);
      }
    }
  });
  if (!b.has_se() || parts == 1) return;
  for (int64_t n = 0; n < g.n; ++n) {
    float* total = sums.data() + n * parts * g.c;
    for (int64_t part = 1; part < parts; ++part)
      for (int64_t k = 0; k < g.c; ++k) total[k] += total[part * g.c + k];
    fold_gate(b, total, shared_weights.data() + n * b.cout * g.c, false);
  }
  const int64_t chunk = (pixels_out + parts - 1) / parts;
  at::parallel_for(0, g.n * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / parts, p0 = (task % parts) * chunk, p1 = std::min(pixels_out, p0 + chunk);
      if (p0 < p1)
        project(b, n, shared_depthwise.data() + n * image_values, shared_weights.data() + n * b.cout * g.c, p0, p1);
    }
  });
}

// A dense float32 CPU matrix or vector of the given shape, or an error naming it.
const float* checked(const char* name, const Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, "fastmb::inverted_residual: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous(), "fastmb::inverted_residual: ", name,
              " must be a contiguous float32 CPU tensor");
  return t.const_data_ptr<float>();
}

Tensor inverted_residual(const Tensor& x, const std::optional<Tensor>& expand_weight, const std::optional<Tensor>& expand_bias,
                         c10::string_view expand_activation, const Tensor& dw_weight, const Tensor& dw_scale, const Tensor& dw_shift,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view dw_activation,
                         const std::optional<Tensor>& fc1_weight, const std::optional<Tensor>& fc1_bias,
                         const std::optional<Tensor>& fc2_weight, const std::optional<Tensor>& fc2_bias, c10::string_view se_activation,
                         c10::string_view se_gate, const Tensor& project_weight, const Tensor& project_bias, bool residual) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "fastmb::inverted_residual: x must be a channels_last float32 CPU (N, C, H, W) tensor");
  TORCH_CHECK(expand_weight.has_value() == expand_bias.has_value(), "fastmb::inverted_residual: expand_weight and expand_bias go together");
  const int se_tensors = fc1_weight.has_value() + fc1_bias.has_value() + fc2_weight.has_value() + fc2_bias.has_value();
  TORCH_CHECK(se_tensors == 0 || se_tensors == 4,
              "fastmb::inverted_residual: the four SE tensors are given together or not at all");
  const NoAutocast no_autocast;
  Block b{};
  b.cin = x.size(1);
  const int64_t c = expand_weight.has_value() ? expand_weight->size(0) : b.cin;
  TORCH_CHECK(dw_weight.dim() == 4 && dw_weight.size(0) == c && dw_weight.size(1) == 1 && dw_weight.size(2) >= 1 && dw_weight.size(3) >= 1,
              "fastmb::inverted_residual: dw_weight must be (", c, ", 1, kH, kW), got shape ", dw_weight.sizes());
  // The depthwise conv's geometry over the expanded channels, with dwconv_bn_act's checks.
  b.g = dwconv_geometry_of("inverted_residual", {x.size(0), c, x.size(2), x.size(3)}, dw_weight.sizes().slice(2), stride, padding, dilation);
  b.cout = project_weight.size(0);
  b.x = x.const_data_ptr<float>();
  if (expand_weight.has_value()) {
    b.expand_w = checked("expand_weight", *expand_weight, {c, b.cin});
    b.expand_b = checked("expand_bias", *expand_bias, {c});
  }
  b.expand_act = parse_activation(expand_activation);
  // The depthwise weight taps-major, [kH * kW][C], as the kernels read it: in place when its
  // strides are already those (a view of a packed (kH * kW, C) tensor), else repacked here.
  const Tensor taps = dw_weight.reshape({c, -1}).t().contiguous();
  b.dw_taps = checked("dw_weight", taps, {b.g.kh * b.g.kw, c});
  b.dw_scale = checked("dw_scale", dw_scale, {c});
  b.dw_shift = checked("dw_shift", dw_shift, {c});
  b.dw_act = parse_activation(dw_activation);
  if (fc1_weight.has_value()) {
    b.squeeze = fc1_weight->size(0);
    b.fc1_w = checked("fc1_weight", *fc1_weight, {b.squeeze, c});
    b.fc1_b = checked("fc1_bias", *fc1_bias, {b.squeeze});
    b.fc2_w = checked("fc2_weight", *fc2_weight, {c, b.squeeze});
    b.fc2_b = checked("fc2_bias", *fc2_bias, {c});
  }
  b.se_act = parse_activation(se_activation);
  b.gate = parse_gate(se_gate);
  b.project_w = checked("project_weight", project_weight, {b.cout, c});
  b.project_b = checked("project_bias", project_bias, {b.cout});
  b.residual = residual;
  TORCH_CHECK(!residual || (b.cout == b.cin && b.g.ho == b.g.h && b.g.wo == b.g.w), "fastmb::inverted_residual: residual needs the ",
              "output's shape to be x's, got ", b.cout, " channels of ", b.g.ho, "x", b.g.wo, " from x ", x.sizes());
  Tensor y = at::empty({b.g.n, b.cout, b.g.ho, b.g.wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  b.y = y.mutable_data_ptr<float>();
  b.dw = dwconv::select_kernels<float>(b.g);
  run_block(b);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmb, CPU, m) { m.impl("inverted_residual", &inverted_residual); }

}  // namespace fastmb::cpu
