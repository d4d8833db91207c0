// Shared by the CPU kernels: activations, function multiversioning, NHWC layout helpers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string_view>
#include <type_traits>

// The hot loops are plain C++ written for the auto-vectoriser; on x86-64 GCC and Clang compile
// each for AVX-512, AVX2+FMA and baseline SSE2 and pick one at load time, so one build runs
// fast on any x86-64 CPU. Elsewhere (ARM: NEON is baseline) they are compiled once.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(FASTMB_NO_MULTIVERSION)
#define FASTMB_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTMB_MULTIVERSION
#endif
#define FASTMB_INLINE inline __attribute__((always_inline))

namespace fastmb::cpu {

// A 32-byte vector of Acc (GCC/Clang vector extension): AVX2 registers on x86-64 (AVX-512
// machines use them too, from the same clone), two NEON registers on ARM. Loops keep
// accumulators of this type in registers, which the auto-vectoriser does not reliably do.
template <typename Acc>
struct Vec {
  typedef Acc type __attribute__((vector_size(32)));
  static constexpr int kLanes = 32 / sizeof(Acc);

  template <typename T>
  static FASTMB_INLINE type load(const T* p) {
    type v;
    if constexpr (std::is_same_v<T, Acc>) {
      std::memcpy(&v, p, sizeof v);
    } else {  // bfloat16 -> float: the 16 bits are the float's top half
      static_assert(std::is_same_v<T, c10::BFloat16> && std::is_same_v<Acc, float>);
      typedef uint16_t half_bits __attribute__((vector_size(16)));
      typedef uint32_t bits __attribute__((vector_size(32)));
      half_bits h;
      std::memcpy(&h, p, sizeof h);
      const bits b = __builtin_convertvector(h, bits) << 16;
      std::memcpy(&v, &b, sizeof v);
    }
    return v;
  }
  static FASTMB_INLINE void store(Acc* p, type v) { std::memcpy(p, &v, sizeof v); }
};

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
FASTMB_INLINE T activate(Activation a, T u) {
  switch (a) {
    case Activation::kHardswish:
      return u * std::min(std::max(u + T(3), T(0)), T(6)) / T(6);
    case Activation::kRelu:
      return u < T(0) ? T(0) : u;
    case Activation::kRelu6:
      return u < T(0) ? T(0) : (u > T(6) ? T(6) : u);
    default:
      return u;
  }
}

template <typename T>
FASTMB_INLINE T activation_grad(Activation a, T grad, T u) {
  switch (a) {
    case Activation::kHardswish:
      return u < T(-3) ? T(0) : (u <= T(3) ? grad * (u / T(3) + T(0.5)) : grad);
    case Activation::kRelu:
      return u > T(0) ? grad : T(0);
    case Activation::kRelu6:
      return (u > T(0) && u < T(6)) ? grad : T(0);
    default:
      return grad;
  }
}

template <typename T>
inline T gate_forward(Gate g, T a) {
  if (g == Gate::kHardsigmoid) return std::min(std::max(a + T(3), T(0)), T(6)) / T(6);
  return T(1) / (T(1) + std::exp(-a));
}

template <typename T>
inline T gate_grad(Gate g, T grad, T a) {
  if (g == Gate::kHardsigmoid) return (a > T(-3) && a < T(3)) ? grad / T(6) : T(0);
  const T s = T(1) / (T(1) + std::exp(-a));
  return grad * s * (T(1) - s);
}

// The kernels pick their own precisions: ATen calls inside them must not be autocast.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// x in NHWC order: channels_last memory, dense.
inline at::Tensor as_nhwc(const at::Tensor& x) { return x.contiguous(at::MemoryFormat::ChannelsLast); }

// An output of `shape` laid out in `format`, and (for 4-D shapes) the NHWC buffer the kernels write: the output
// itself when it is channels_last, else a temporary copied over by finish_output().
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

// A [num_threads][n] scratch buffer of zeros for per-thread partial reductions.
template <typename T>
at::Tensor per_thread_zeros(int64_t n, const at::Tensor& like) {
  return at::zeros({at::get_num_threads(), n}, like.options().dtype(c10::CppTypeToScalarType<T>::value));
}

}  // namespace fastmb::cpu
