// Shared by the CPU and CUDA operators' entry points: argument parsing and the ATen-level layout
// helpers. The kernels' own headers (activations.h, geometry.h) need no ATen.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <utility>
#include <string_view>

#include "activations.h"
#include "geometry.h"

namespace fastmb {

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

// The kernels pick their own precisions: ATen calls inside them must not be autocast.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

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
                 : at::empty(output.sizes(), output.options().memory_format(at::MemoryFormat::ChannelsLast))) {}
  // An output of `shape` laid out in `format`.
  Nhwc4dOutput(at::IntArrayRef shape, const at::TensorOptions& options, at::MemoryFormat format)
      : Nhwc4dOutput(at::empty(shape, options.memory_format(format))) {}
  at::Tensor finish() {
    if (!nhwc.is_same(output)) output.copy_(nhwc);
    return output;
  }
};

// The geometry of depthwise conv `weight` over x.
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
