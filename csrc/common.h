// Shared by the CPU and CUDA kernels: activation names and formulas (host and device), and the
// ATen-level layout helpers of the operators' entry points.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <optional>
#include <string>
#include <string_view>

namespace fastmb {

enum class Activation { kHardswish, kRelu, kRelu6, kIdentity };
enum class Gate { kHardsigmoid, kSigmoid };

// c10::string_view is std::string_view in recent torch and its own class in older releases:
// compare through std::string_view built from data() and size(), which works with both.
inline Activation parse_activation(c10::string_view name_in) {
  const std::string_view name(name_in.data(), name_in.size());
  if (name == "hardswish") return Activation::kHardswish;
  if (name == "relu") return Activation::kRelu;
  if (name == "relu6") return Activation::kRelu6;
  TORCH_CHECK(name == "identity", "fastmb: unknown activation '", std::string(name), "'");
  return Activation::kIdentity;
}

inline Gate parse_gate(c10::string_view name_in) {
  const std::string_view name(name_in.data(), name_in.size());
  if (name == "hardsigmoid") return Gate::kHardsigmoid;
  TORCH_CHECK(name == "sigmoid", "fastmb: unknown gate '", std::string(name), "'");
  return Gate::kSigmoid;
}

// Activations and their derivatives with PyTorch's conventions at the kinks (the gradient of
// relu at 0 is 0, of hardswish at -3 is 0 and at +3 is 1.5, of relu6 at 0 and 6 is 0).
// NaN propagates as in PyTorch: comparisons with NaN are false, so NaN falls through to u.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T clamp_0_6(T v) {
  v = v < T(0) ? T(0) : v;
  return v > T(6) ? T(6) : v;
}

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T activate(Activation a, T u) {
  switch (a) {
    case Activation::kHardswish:  // * (1/6): a division would dominate the CPU kernels' epilogue
      return u * clamp_0_6(u + T(3)) * T(1.0 / 6.0);
    case Activation::kRelu:
      return u < T(0) ? T(0) : u;
    case Activation::kRelu6:
      return clamp_0_6(u);
    default:
      return u;
  }
}

// The SE gate: hardsigmoid (clamp(v + 3, 0, 6) / 6, NaN through) or the logistic sigmoid.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T gate_value(Gate g, T v) {
  return g == Gate::kHardsigmoid ? clamp_0_6(v + T(3)) / T(6) : T(1) / (T(1) + std::exp(-v));
}

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T activation_grad(Activation a, T grad, T u) {
  switch (a) {
    case Activation::kHardswish:
      return u < T(-3) ? T(0) : (u <= T(3) ? grad * (u * T(1.0 / 3.0) + T(0.5)) : grad);  // * (1/3): no division
    case Activation::kRelu:
      return u > T(0) ? grad : T(0);
    case Activation::kRelu6:
      return (u > T(0) && u < T(6)) ? grad : T(0);
    default:
      return grad;
  }
}

// The kernels pick their own precisions: ATen calls inside them must not be autocast.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// x in NHWC order: channels_last memory, dense.
inline at::Tensor as_nhwc(const at::Tensor& x) { return x.contiguous(at::MemoryFormat::ChannelsLast); }

// An output of `shape` laid out in `format`, and (for 4-D shapes) the NHWC buffer the kernels
// write: the output itself when it is channels_last, else a temporary copied over by finish().
struct Nhwc4dOutput {
  at::Tensor output, nhwc;
  Nhwc4dOutput(at::IntArrayRef shape, const at::TensorOptions& options, at::MemoryFormat format)
      : output(at::empty(shape, options.memory_format(format))),
        nhwc(format == at::MemoryFormat::ChannelsLast || shape.size() != 4
                 ? output
                 : at::empty(shape, options.memory_format(at::MemoryFormat::ChannelsLast))) {}
  at::Tensor finish() {
    if (!nhwc.is_same(output)) output.copy_(nhwc);
    return output;
  }
};

// The shape of a depthwise conv: input (n, c, h, w), output (ho, wo), kernel, stride, padding,
// dilation; pixels = n * ho * wo, the output pixels.
struct Geometry {
  int64_t n, c, h, w, ho, wo, pixels;
  int kh, kw, sh, sw, ph, pw, dh, dw;
};

inline Geometry dwconv_geometry(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation) {
  Geometry g{};
  g.n = x.size(0), g.c = x.size(1), g.h = x.size(2), g.w = x.size(3);
  g.kh = int(weight.size(2)), g.kw = int(weight.size(3));
  g.sh = int(stride[0]), g.sw = int(stride[1]), g.ph = int(padding[0]), g.pw = int(padding[1]);
  g.dh = int(dilation[0]), g.dw = int(dilation[1]);
  g.ho = (g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.wo = (g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  g.pixels = g.n * g.ho * g.wo;
  return g;
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
