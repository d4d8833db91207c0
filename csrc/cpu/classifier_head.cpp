// fastmb::classifier_head on the CPU: a MobileNet's last 1x1 conv (BN folded) + activation,
// global average pooling and the classifier's linear layers, in eval, float32, in one call:
//   pooled = mean_hw(act(conv1x1(x))); h = act1(fc1(pooled)); ... -> (N, classes)
// The conv runs on the pointwise GEMM (its weights packed once by the caller) into a per-thread
// buffer that is summed while in cache: the conv's output never reaches memory. With one image,
// the first linear layer can run group by group under the conv (conv_pool_linear). At batch 1 the
// linear layers read megabytes of weights for a few multiply-adds each, so their rows are split
// between the threads (ATen's GEMM ran them on one: 0.39 ms for 960 -> 1280 from DRAM); with
// more images they are GEMMs (ATen's).
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <torch/library.h>

#include <vector>

#include "../common.h"
#include "aligned_vector.h"
#include "classifier_head.h"
#include "pointwise/kernels.h"
#include "vec.h"

namespace fastmb::cpu {
namespace {

using at::Tensor;

// The first linear layer's inputs per group in fc1_by_groups (conv_pool_linear).
constexpr int64_t kInputGroup = 64;

// Images up to which the linear layers are split by output rows (matrix-vector products that
// read each weight row once for all the images), and up to which, past that, they run on the
// pointwise GEMM with the roles swapped (swapped_linear); beyond, ATen's GEMM.
constexpr int64_t kRowSplitImages = 4, kSwappedImages = 64;

// sums[k] += the sum of `pixels` rows (ld apart) of values k < count.
FASTMB_MULTIVERSION void add_rows(float* sums, const float* rows, int64_t pixels, int64_t ld, int64_t count) {
  add_column_sums(sums, pixels, count, [&](int64_t p, int64_t k, auto width) __attribute__((always_inline)) {
    return load_values<float, decltype(width)::value>(rows + p * ld + k);
  });
}

// y = act(in * weight^T + bias) for n images as y^T = weight * in^T on the pointwise GEMM: the
// weight's rows (out, in) are its row-major `a`, and the images, transposed into panels of 16,
// its packed `w`, so each weight row is read once and nothing of the weight is repacked. ATen's
// GEMM (MKL) packed the 4-5 MB weight at every call and ran at half the FMA peak: V3-Large's
// classifier at batch 16, AMD Zen 4, 2 threads, 343 + 355 us.
Tensor swapped_linear(const Tensor& in, const Tensor& weight, const Tensor& bias, Activation act, pointwise::GemmPanels gemm) {
  const int64_t n = in.size(0), out_features = weight.size(0), in_features = weight.size(1);
  const int64_t panels = pointwise::panels_of(n), ld = panels * pointwise::kPanel;
  // in^T packed [panel][k][16], zero past the last image; y^T as (out_features, ld); a zero bias
  // for the GEMM's columns (the images): the layer's bias is per row, added with the activation.
  Tensor packed = at::zeros({panels, in_features, pointwise::kPanel}, in.options());
  Tensor transposed = at::empty({out_features, ld}, in.options()), no_bias = at::zeros({ld}, in.options());
  const float *x = in.const_data_ptr<float>(), *w = weight.const_data_ptr<float>(), *b = bias.const_data_ptr<float>();
  float *p = packed.mutable_data_ptr<float>(), *yt = transposed.mutable_data_ptr<float>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < in_features; ++k) p[pointwise::packed_at(k, i, in_features)] = x[i * in_features + k];
  Tensor out = at::empty({n, out_features}, in.options());
  float* y = out.mutable_data_ptr<float>();
  at::parallel_for(0, out_features, 64, [&](int64_t r0, int64_t r1) {
    const pointwise::Gemm g{w + r0 * in_features, in_features, p, no_bias.const_data_ptr<float>(), nullptr, 0, yt + r0 * ld, ld, r1 - r0, n,
                            in_features, Activation::kIdentity};
    gemm(g, 0, panels);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = r0; r < r1; ++r) y[i * out_features + r] = activate(act, yt[r * ld + i] + b[r]);
  });
  return out;
}

Tensor linear(const Tensor& in, const Tensor& weight, const Tensor& bias, Activation act, pointwise::GemmPanels gemm) {
  const int64_t n = in.size(0), out_features = weight.size(0), in_features = weight.size(1);
  if (n > kSwappedImages) {
    Tensor out = at::addmm(bias, in, weight.t());
    if (act != Activation::kIdentity) {
      float* data = out.mutable_data_ptr<float>();
      at::parallel_for(0, out.numel(), 4096, [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) data[k] = activate(act, data[k]);
      });
    }
    return out;
  }
  if (n > kRowSplitImages) return swapped_linear(in, weight, bias, act, gemm);
  Tensor out = at::empty({n, out_features}, in.options());
  const float *x = in.const_data_ptr<float>(), *w = weight.const_data_ptr<float>(), *b = bias.const_data_ptr<float>();
  float* y = out.mutable_data_ptr<float>();
  at::parallel_for(0, out_features, 64, [&](int64_t r0, int64_t r1) {
    dot_rows(y, x, n, w, b, out_features, in_features, r0, r1, [act](float v) { return activate(act, v); });
  });
  return out;
}

// The first linear layer of one image, y (rows) = act(fc_w * mean_hw(conv act(x * w + bias)) +
// fc_b), with the layer's weight by groups of 64 of its inputs (fc_groups: [group][panel][64][16],
// see classifier_head): each thread takes a share of the groups, and runs each group's conv
// panels, pools them and multiplies the 64 means into the layer's rows at once, while the
// group's conv tiles prefetch that group's layer weights (Gemm::stream). The layer's megabytes
// then stream in from memory under the conv's arithmetic, not after it. The threads' partial
// sums are added at the end. V2's head (320 -> 1280 at 7x7, then 1280 -> 1000), 2 threads, Zen 4,
// after its chain as in the model: 372 -> 319 us on a busy host, 287-313 -> 259-278 on a quieter
// one. V3's convs are too short to hide their first layer (and their groups split unevenly
// between two threads): they keep conv_pool.
Tensor conv_pool_linear(const Tensor& x, const float* w, const float* bias, Activation act, int64_t c, const float* fc_groups,
                        const float* fc_bias, int64_t rows, Activation fc_act, int parts, pointwise::GemmPanels gemm) {
  constexpr int64_t kGroup = kInputGroup, kGroupPanels = kGroup / pointwise::kPanel;
  const int64_t cin = x.size(1), pixels = x.size(2) * x.size(3), groups = c / kGroup;
  const int64_t row_panels = pointwise::panels_of(rows), ld = row_panels * pointwise::kPanel, slice = row_panels * kGroup * pointwise::kPanel;
  AlignedVector<float> partial(parts * ld), zeros(ld, 0.0f);
  const float* data = x.const_data_ptr<float>();
  const float inv = 1.0f / float(pixels);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    thread_local AlignedVector<float> buffer;
    if (int64_t(buffer.size()) < pixels * kGroup) buffer.resize(pixels * kGroup);
    alignas(64) float pooled[kGroup];
    for (int64_t part = begin; part < end; ++part) {
      float* y = partial.data() + part * ld;
      for (int64_t q = part * groups / parts; q < (part + 1) * groups / parts; ++q) {
        const float* layer = fc_groups + q * slice;
        // The kernel addresses output columns absolutely: the buffer stands for columns [64q, ...).
        const pointwise::Gemm conv{data, cin, w, bias, nullptr, 0, buffer.data() - q * kGroup, kGroup, pixels, c, cin, act, true,
                                   layer, slice / pointwise::kPanel};
        gemm(conv, q * kGroupPanels, (q + 1) * kGroupPanels);
        std::fill(pooled, pooled + kGroup, 0.0f);
        add_rows(pooled, buffer.data(), pixels, kGroup, kGroup);
        for (float& v : pooled) v *= inv;
        // y += the layer's columns of this group times their means (y itself as the residual).
        const bool first = q == part * groups / parts;
        const pointwise::Gemm linear{pooled, kGroup, layer, zeros.data(), first ? nullptr : y, ld, y, ld, 1, rows, kGroup, Activation::kIdentity};
        gemm(linear, 0, row_panels);
      }
    }
  });
  Tensor out = at::empty({1, rows}, x.options().memory_format(at::MemoryFormat::Contiguous));
  float* h = out.mutable_data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    float sum = fc_bias[r];
    for (int part = 0; part < parts; ++part) sum += partial[part * ld + r];
    h[r] = activate(fc_act, sum);
  }
  return out;
}

// pooled (n, c) = mean over each image's pixels of act(x * w + bias).
void conv_pool(const Tensor& x, const float* w, const float* bias, Activation act, int64_t c, pointwise::GemmPanels gemm, float* pooled) {
  const int64_t n = x.size(0), cin = x.size(1), pixels = x.size(2) * x.size(3);
  const int64_t panels = pointwise::panels_of(c);
  // Where the images do not share out evenly over the threads (fewer of them, or not a multiple),
  // each image's panels are split between the threads.
  const int64_t chunks = std::min<int64_t>(panels, even_parts(n, at::get_num_threads()));
  const int64_t chunk_panels = (panels + chunks - 1) / chunks;
  const float* data = x.const_data_ptr<float>();
  const float inv = 1.0f / float(pixels);
  at::parallel_for(0, n * chunks, 1, [&](int64_t begin, int64_t end) {
    thread_local AlignedVector<float> buffer;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / chunks, p0 = (task % chunks) * chunk_panels, p1 = std::min(panels, p0 + chunk_panels);
      if (p0 >= p1) continue;
      const int64_t width = (p1 - p0) * pointwise::kPanel, col0 = p0 * pointwise::kPanel, cols = std::min(c, p1 * pointwise::kPanel) - col0;
      // Rows of 256 pixels at a time: the GEMM's output stays in L2 while it is summed.
      const int64_t rows = std::min<int64_t>(pixels, 256);
      if (int64_t(buffer.size()) < rows * width) buffer.resize(rows * width);
      float* sums = pooled + image * c + col0;
      std::fill(sums, sums + cols, 0.0f);
      for (int64_t q = 0; q < pixels; q += rows) {
        const int64_t m = std::min(rows, pixels - q);
        // The kernel addresses output columns absolutely: the buffer stands for columns [col0, ...).
        // Split into chunks (few images a thread), each weight is read about once a call: cold.
        const pointwise::Gemm g{data + (image * pixels + q) * cin, cin, w, bias, nullptr, 0, buffer.data() - col0, width, m, c, cin, act,
                                chunks > 1};
        gemm(g, p0, p1);
        add_rows(sums, buffer.data(), m, width, cols);
      }
      for (int64_t k = 0; k < cols; ++k) sums[k] *= inv;
    }
  });
}

}  // namespace

Tensor classifier_head(const Tensor& x, const Tensor& conv_weight, const Tensor& conv_bias, c10::string_view conv_activation,
                       at::TensorList fc_weights, at::TensorList fc_biases, const std::vector<std::string>& fc_activations,
                       const std::optional<Tensor>& fc1_by_groups) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "fastmb::classifier_head: x must be a channels_last float32 CPU (N, C, H, W) tensor");
  TORCH_CHECK(x.size(2) * x.size(3) >= 1, "fastmb::classifier_head: x has no pixels to pool");
  TORCH_CHECK(fc_weights.size() == fc_biases.size() && fc_weights.size() == fc_activations.size() && !fc_weights.empty(),
              "fastmb::classifier_head: fc_weights, fc_biases and fc_activations must be as many, at least one");
  const NoAutocast no_autocast;
  const int64_t n = x.size(0), cin = x.size(1);
  TORCH_CHECK(conv_bias.dim() == 1, "fastmb::classifier_head: conv_bias must be a vector");
  const int64_t c = conv_bias.size(0);
  const float* w = checked_dense_float("classifier_head", "conv_weight", conv_weight, {pointwise::panels_of(c), cin, pointwise::kPanel});
  const float* bias = checked_dense_float("classifier_head", "conv_bias", conv_bias, {c});
  int64_t features = c;
  std::vector<Activation> fc_acts;
  for (size_t i = 0; i < fc_weights.size(); ++i) {
    TORCH_CHECK(fc_weights[i].dim() == 2, "fastmb::classifier_head: fc_weights[", i, "] must be a matrix");
    checked_dense_float("classifier_head", "fc_weights[i]", fc_weights[i], {fc_weights[i].size(0), features});
    features = fc_weights[i].size(0);
    checked_dense_float("classifier_head", "fc_biases[i]", fc_biases[i], {features});
    fc_acts.push_back(parse_activation(fc_activations[i]));
  }
  const Activation act = parse_activation(conv_activation);
  const pointwise::GemmPanels gemm = pointwise::select_gemm();
  const float* fc_groups = nullptr;
  if (fc1_by_groups.has_value()) {
    const int64_t rows = fc_weights[0].size(0);
    TORCH_CHECK(c % kInputGroup == 0, "fastmb::classifier_head: fc1_by_groups needs the conv's output channels in groups of ", kInputGroup,
                ", got ", c);
    fc_groups = checked_dense_float("classifier_head", "fc1_by_groups", *fc1_by_groups,
                                    {c / kInputGroup, pointwise::panels_of(rows), kInputGroup, pointwise::kPanel});
  }
  // One image whose groups share out evenly over the threads: the first layer under the conv.
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t groups = c / kInputGroup;
  size_t first = 0;
  Tensor h;
  if (fc_groups != nullptr && n == 1 && threads > 1 && groups >= threads && groups % threads == 0) {
    h = conv_pool_linear(x, w, bias, act, c, fc_groups, fc_biases[0].const_data_ptr<float>(), fc_weights[0].size(0), fc_acts[0], threads, gemm);
    first = 1;
  } else {
    h = at::empty({n, c}, x.options().memory_format(at::MemoryFormat::Contiguous));
    if (n > 0) conv_pool(x, w, bias, act, c, gemm, h.mutable_data_ptr<float>());
  }
  for (size_t i = first; i < fc_weights.size(); ++i) h = linear(h, fc_weights[i], fc_biases[i], fc_acts[i], gemm);
  return h;
}

TORCH_LIBRARY_IMPL(fastmb, CPU, m) { m.impl("classifier_head", &classifier_head); }

}  // namespace fastmb::cpu
