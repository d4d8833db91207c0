// The activations and SE gates of the fused kernels (CPU and CUDA), with PyTorch's conventions
// at the kinks and for NaN. One form for scalars and GCC vector types alike; no ATen (the CPU's
// per-instruction-set translation units include it). The names are tabled in Python
// (fastmb/ops/activations.py), whose codes are the enumerators' values.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <type_traits>

namespace fastmb {

enum class Activation { kHardswish = 0, kRelu = 1, kRelu6 = 2, kIdentity = 3 };
enum class Gate { kHardsigmoid = 0, kSigmoid = 1 };

// act(u) = clamp(u + offset, lo, hi), times u / 6 for hardswish: the four activations in one
// branch-free form, so a kernel takes the activation as data instead of being compiled once per
// activation. Comparisons with NaN are false, so NaN falls through, as in PyTorch.
template <typename Acc>
struct ActivationFn {
  Acc offset, lo, hi;
  bool times_input;  // hardswish

  C10_HOST_DEVICE explicit ActivationFn(Activation a)
      : offset(a == Activation::kHardswish ? 3 : 0),
        lo(a == Activation::kIdentity ? -INFINITY : 0),
        hi(a == Activation::kHardswish || a == Activation::kRelu6 ? 6 : INFINITY),
        times_input(a == Activation::kHardswish) {}

  template <typename V>  // Acc or a GCC vector of Acc
  C10_HOST_DEVICE C10_ALWAYS_INLINE V operator()(V u) const {
    const V lo_v = V{} + lo, hi_v = V{} + hi;
    V h = u + offset;
    h = h < lo_v ? lo_v : h;
    h = h > hi_v ? hi_v : h;
    return times_input ? u * h * Acc(1.0 / 6.0) : h;  // * (1/6): a division would dominate the epilogue
  }
};

template <typename Acc>
C10_HOST_DEVICE C10_ALWAYS_INLINE Acc activate(Activation a, Acc u) {
  return ActivationFn<Acc>(a)(u);
}

// d act(u)/du * grad for a compile-time activation, V a scalar or a GCC vector of Acc. PyTorch's
// values at the kinks: relu' (0) = 0; hardswish' is 0 below -3, u / 3 + 1/2 up to 3 included, 1
// above; relu6' is 0 at 0 and 6. At u = NaN, as PyTorch's vectorised CPU kernels: relu passes
// grad through, relu6 gives 0, hardswish NaN (comparisons with NaN are false).
template <Activation A, typename Acc, typename V>
C10_HOST_DEVICE C10_ALWAYS_INLINE V activation_grad(V grad, V u) {
  const V zero = {}, three = zero + Acc(3), six = zero + Acc(6);
  if constexpr (A == Activation::kHardswish) {
    const V inner = u > three ? grad : grad * (u * Acc(1.0 / 3.0) + Acc(0.5));  // * (1/3): no division
    return u < -three ? zero : inner;
  } else if constexpr (A == Activation::kRelu) {
    return u <= zero ? zero : grad;
  } else if constexpr (A == Activation::kRelu6) {
    return (u > zero) & (u < six) ? grad : zero;
  } else {
    return grad;
  }
}

// Calls f(std::integral_constant<Activation, A>{}) with the activation as a compile-time constant.
template <typename F>
C10_ALWAYS_INLINE void dispatch_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::kHardswish: return f(std::integral_constant<Activation, Activation::kHardswish>{});
    case Activation::kRelu: return f(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kRelu6: return f(std::integral_constant<Activation, Activation::kRelu6>{});
    default: return f(std::integral_constant<Activation, Activation::kIdentity>{});
  }
}

template <typename Acc>
C10_HOST_DEVICE C10_ALWAYS_INLINE Acc activation_grad(Activation a, Acc grad, Acc u) {
  switch (a) {
    case Activation::kHardswish: return activation_grad<Activation::kHardswish, Acc>(grad, u);
    case Activation::kRelu: return activation_grad<Activation::kRelu, Acc>(grad, u);
    case Activation::kRelu6: return activation_grad<Activation::kRelu6, Acc>(grad, u);
    default: return grad;
  }
}

// The SE gate: hardsigmoid (clamp(v + 3, 0, 6) / 6, NaN through) or the logistic sigmoid.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T gate_value(Gate g, T v) {
  if (g == Gate::kSigmoid) return T(1) / (T(1) + std::exp(-v));
  const T h = ActivationFn<T>(Activation::kRelu6)(v + T(3));
  return h / T(6);
}

}  // namespace fastmb
