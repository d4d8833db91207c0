// Shared by the CPU and CUDA operators' entry points: argument parsing and the ATen-level layout
// helpers. The kernels' own headers (activations.h, geometry.h) need no ATen.
#pragma once

// ATen's Tensor and the factories the operators call, not <ATen/ATen.h>: that header declares
// every ATen op, and took 8 s of each translation unit's compile.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <initializer_list>
#include <numeric>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "activations.h"
#include "geometry.h"
#include "output_cache.h"

namespace fastmb {

// c10::string_view is std::string_view in recent torch and its own class in older releases:
// compare through std::string_view built from data() and size(), which works with both.
inline Activation parse_activation(c10::string_view name_in) {
  const std::string_view name(name_in.data(), name_in.size());
  if (name == "hardswish") return Activation::kHardswish;
  if (name == "relu") return Activation::kRelu;
  if (name == "relu6") return Activation::kRelu6;
  if (name == "silu") return Activation::kSilu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  TORCH_CHECK(name == "identity", "fastmb: unknown activation '", std::string(name), "'");
  return Activation::kIdentity;
}

inline Gate parse_gate(c10::string_view name_in) {
  const std::string_view name(name_in.data(), name_in.size());
  if (name == "hardsigmoid") return Gate::kHardsigmoid;
  TORCH_CHECK(name == "sigmoid", "fastmb: unknown gate '", std::string(name), "'");
  return Gate::kSigmoid;
}

// The kernels pick their own precisions: ATen calls inside them must not be autocast.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// Parts to split each of n images into so that the n * parts tasks share out evenly over
// `threads`: 1 where n is a multiple of them, `threads` at batch 1, 2 for 3 images on 2 threads
// (whole images left one thread idle a third of the time).
inline int64_t even_parts(int64_t n, int64_t threads) { return threads / std::gcd(std::max<int64_t>(n, 1), threads); }

// x in NHWC order: channels_last memory, dense.
inline at::Tensor as_nhwc(const at::Tensor& x) { return x.contiguous(at::MemoryFormat::ChannelsLast); }

// An output tensor, and (for 4-D ones) the NHWC buffer the kernels write: the output itself when
// its memory is in NHWC order, else a temporary copied over by finish().
struct Nhwc4dOutput {
  at::Tensor output, nhwc;
  explicit Nhwc4dOutput(at::Tensor out)
      : output(std::move(out)),
        nhwc(output.dim() != 4 || output.is_contiguous(at::MemoryFormat::ChannelsLast)
                 ? output
                 : cached_empty(output.sizes(), output.options(), at::MemoryFormat::ChannelsLast)) {}
  // An output of `shape` laid out in `format`.
  Nhwc4dOutput(at::IntArrayRef shape, const at::TensorOptions& options, at::MemoryFormat format)
      : Nhwc4dOutput(cached_empty(shape, options, format)) {}
  at::Tensor finish() {
    if (!nhwc.is_same(output)) output.copy_(nhwc);
    return output;
  }
};

// The operators are public through torch.ops.fastmb, so each entry point checks every shape, size
// and range its kernels rely on; `op` names the operator in the message.
inline void check_vector(const char* op, const char* name, const std::optional<at::Tensor>& v, int64_t length, const at::Tensor& x) {
  if (!v.has_value()) return;
  TORCH_CHECK(v->dim() == 1 && v->size(0) == length, "fastmb::", op, ": ", name, " must be a vector of ", length,
              " elements, got shape ", v->sizes());
  TORCH_CHECK(v->is_floating_point(), "fastmb::", op, ": ", name, " must be floating point, got ", v->scalar_type());
  TORCH_CHECK(v->device() == x.device(), "fastmb::", op, ": ", name, " is on ", v->device(), " but x is on ", x.device());
}

// The geometry of a depthwise conv over an input of x_sizes (N, C, H, W) with a kernel (kH, kW),
// every size computed in 64 bits without overflow.
inline Geometry dwconv_geometry_of(const char* op, at::IntArrayRef x_sizes, at::IntArrayRef kernel, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(stride.size() == 2 && (padding.size() == 2 || padding.size() == 4) && dilation.size() == 2, "fastmb::", op,
              ": stride and dilation must have two values each, padding two (h, w) or four (top, bottom, left, right)");
  Geometry g{};
  g.n = x_sizes[0], g.c = x_sizes[1], g.h = x_sizes[2], g.w = x_sizes[3];
  g.kh = kernel[0], g.kw = kernel[1];
  // The kernels read the top and left padding; the bottom and right only set the output size.
  const bool sides = padding.size() == 4;
  const int64_t bottom = sides ? padding[1] : padding[0], right = sides ? padding[3] : padding[1];
  g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[sides ? 2 : 1], g.dh = dilation[0], g.dw = dilation[1];
  TORCH_CHECK(g.sh >= 1 && g.sw >= 1, "fastmb::", op, ": stride must be at least 1, got ", stride);
  TORCH_CHECK(g.ph >= 0 && g.pw >= 0 && bottom >= 0 && right >= 0, "fastmb::", op, ": padding must be at least 0, got ", padding);
  TORCH_CHECK(g.dh >= 1 && g.dw >= 1, "fastmb::", op, ": dilation must be at least 1, got ", dilation);
  const auto output_size = [&](int64_t size, int64_t k, int64_t s, int64_t p_begin, int64_t p_end, int64_t d) {
    int64_t p, padded, span;  // both sides' padding, size + p, and the kernel's extent (k - 1) * d + 1
    const bool overflow = __builtin_add_overflow(p_begin, p_end, &p) || __builtin_add_overflow(size, p, &padded) ||
                          __builtin_mul_overflow(k - 1, d, &span);
    TORCH_CHECK(!overflow, "fastmb::", op, ": padding ", padding, " or dilation ", dilation, " overflow 64-bit sizes");
    TORCH_CHECK(padded > span, "fastmb::", op, ": the output would be empty: input ", x_sizes, ", kernel ", kernel, ", stride ",
                stride, ", padding ", padding, ", dilation ", dilation);
    return (padded - span - 1) / s + 1;
  };
  g.ho = output_size(g.h, g.kh, g.sh, g.ph, bottom, g.dh);
  g.wo = output_size(g.w, g.kw, g.sw, g.pw, right, g.dw);
  int64_t rows;
  TORCH_CHECK(!__builtin_mul_overflow(g.n, g.ho, &rows) && !__builtin_mul_overflow(rows, g.wo, &g.pixels), "fastmb::", op,
              ": the output's size overflows 64 bits");
  return g;
}

// The data of a dense float32 CPU tensor of the given shape, or an error naming it (the
// whole-block CPU ops take their packed arguments this way).
inline const float* checked_dense_float(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, "fastmb::", op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous(), "fastmb::", op, ": ", name,
              " must be a contiguous float32 CPU tensor");
  return t.const_data_ptr<float>();
}

// x (N, C, H, W) and depthwise weight (C, 1, kH, kW) of one dtype and device, and the optional
// per-channel vectors; returns the geometry.
inline Geometry dwconv_geometry(const char* op, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                std::initializer_list<std::pair<const char*, const std::optional<at::Tensor>*>> vectors = {}) {
  TORCH_CHECK(x.dim() == 4, "fastmb::", op, ": x must be (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1 && weight.size(2) >= 1 && weight.size(3) >= 1,
              "fastmb::", op, ": weight must be (C, 1, kH, kW) with C = ", x.size(1), " and a kernel of at least 1x1, got shape ",
              weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "fastmb::", op, ": x and weight dtypes differ (", x.scalar_type(), ", ",
              weight.scalar_type(), ")");
  TORCH_CHECK(weight.device() == x.device(), "fastmb::", op, ": weight is on ", weight.device(), " but x is on ", x.device());
  for (const auto& [name, vector] : vectors) check_vector(op, name, *vector, x.size(1), x);
  return dwconv_geometry_of(op, x.sizes(), weight.sizes().slice(2), stride, padding, dilation);
}

// The backward's grad_y (the forward's output shape), saved statistics (a value per channel) and
// optional process-group sums.
template <typename G>  // a Geometry or the CUDA kernels' BasicGeometry<int>
void check_dwconv_backward(const at::Tensor& grad_y, const at::Tensor& x, const G& g, const at::Tensor& mean, const at::Tensor& var,
                           const std::optional<at::Tensor>& batch_sums, int64_t batch_count) {
  if (batch_sums.has_value()) {
    TORCH_CHECK(batch_sums->dim() == 2 && batch_sums->size(0) == 2 && batch_sums->size(1) == g.c && batch_sums->is_floating_point() &&
                    batch_sums->device() == x.device(),
                "fastmb::dwconv_bn_act_backward: batch_sums must be (2, ", g.c, ") on x's device, got shape ", batch_sums->sizes());
    TORCH_CHECK(batch_count >= 1, "fastmb::dwconv_bn_act_backward: batch_count must be at least 1 with batch_sums, got ", batch_count);
  }
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef({g.n, g.c, g.ho, g.wo}), "fastmb::dwconv_bn_act_backward: grad_y must have the ",
              "output's shape (", g.n, ", ", g.c, ", ", g.ho, ", ", g.wo, "), got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
              "fastmb::dwconv_bn_act_backward: grad_y must have x's dtype and device");
  check_vector("dwconv_bn_act_backward", "mean", mean, g.c, x);
  check_vector("dwconv_bn_act_backward", "var", var, g.c, x);
}

// A depthwise weight (C, 1, kH, kW) as [kH * kW][C] in dtype `acc`: a vector of channels per tap.
inline at::Tensor taps_major(const at::Tensor& weight, at::ScalarType acc) {
  return weight.to(acc).reshape({weight.size(0), -1}).t().contiguous();
}

// The optional per-channel vector `v` in dtype `acc`, or `fill` everywhere when it is absent.
inline at::Tensor vector_or(const std::optional<at::Tensor>& v, int64_t c, at::ScalarType acc, const at::Tensor& like, double fill) {
  return v.has_value() ? v->to(acc).contiguous() : at::full({c}, fill, like.options().dtype(acc));
}

}  // namespace fastmb
