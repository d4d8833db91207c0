// The activations and SE gates of the fused kernels (CPU and CUDA), with PyTorch's conventions
// at the kinks and for NaN. One form for scalars and GCC vector types alike; no ATen (the CPU's
// per-instruction-set translation units include it). The names are tabled in Python
// (fastmb/ops/activations.py), whose codes are the enumerators' values.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <type_traits>

namespace fastmb {

enum class Activation { kHardswish = 0, kRelu = 1, kRelu6 = 2, kIdentity = 3, kSilu = 4, kGelu = 5, kGeluTanh = 6 };

// silu, gelu (erf form) and gelu_tanh are smooth: no clamp form, computed from exp and erfc.
C10_HOST_DEVICE constexpr bool is_smooth(Activation a) {
  return a == Activation::kSilu || a == Activation::kGelu || a == Activation::kGeluTanh;
}

// The transcendental kernels of the smooth activations for scalars (std:: functions, also on
// CUDA devices); the CPU's vector kernels (cpu/vec_math.h) have the same three members.
struct ScalarMath {
  template <typename T>
  static C10_HOST_DEVICE C10_ALWAYS_INLINE T exp(T v) {
    return std::exp(v);
  }
  template <typename T>  // Phi(v), the standard normal CDF, through erfc: accurate for v << 0 too
  static C10_HOST_DEVICE C10_ALWAYS_INLINE T normal_cdf(T v) {
    return T(0.5) * std::erfc(v * T(-0.70710678118654752440));
  }
  template <typename T>
  static C10_HOST_DEVICE C10_ALWAYS_INLINE T normal_pdf(T v) {
    return T(0.39894228040143267794) * std::exp(T(-0.5) * v * v);
  }
};

// gelu_tanh's 0.5 u (1 + tanh(k)), k = sqrt(2 / pi) (u + 0.044715 u^3), as the exact identity
// u * sigmoid(2k): no tanh kernel, and no cancellation in 1 + tanh for u << 0.
constexpr double kGeluTanhScale = 2 * 0.79788456080286535588, kGeluTanhCubic = 0.044715;

// The logistic sigmoid s(v) and 1 - s(v) from e = exp(-|v|) <= 1 (no overflow): the smaller of
// the two is e / (1 + e), so 1 - s keeps its relative accuracy where s is near 1 (derivatives
// multiply it by large u), and s where it is near 0.
template <typename Math, typename Acc, typename V>
struct Sigmoid {
  V s, one_minus_s;
  C10_HOST_DEVICE C10_ALWAYS_INLINE explicit Sigmoid(V v) {
    const V zero{};
    const V e = Math::exp(v < zero ? v : -v);
    const V r = Acc(1) / (e + Acc(1)), small = e * r;
    s = v < zero ? small : r;
    one_minus_s = v < zero ? r : small;
  }
};

template <typename Acc, typename V>
C10_HOST_DEVICE C10_ALWAYS_INLINE V gelu_tanh_argument(V u) {
  return u * (Acc(kGeluTanhScale) + Acc(kGeluTanhScale * kGeluTanhCubic) * u * u);
}

// act(u) for a smooth activation; V a scalar or (with cpu::VecMath) a GCC vector of Acc.
template <typename Math, typename Acc, typename V>
C10_HOST_DEVICE C10_ALWAYS_INLINE V smooth_activation(Activation a, V u) {
  if (a == Activation::kSilu) return u * Sigmoid<Math, Acc, V>(u).s;
  if (a == Activation::kGelu) return u * Math::normal_cdf(u);
  return u * Sigmoid<Math, Acc, V>(gelu_tanh_argument<Acc>(u)).s;
}

// d act(u)/du * grad for a smooth activation, PyTorch's formulas: silu' = s (1 + u (1 - s));
// gelu' = Phi(u) + u phi(u); gelu_tanh' = s + u s (1 - s) 2 sqrt(2/pi) (1 + 3 * 0.044715 u^2).
template <typename Math, typename Acc, typename V>
C10_HOST_DEVICE C10_ALWAYS_INLINE V smooth_activation_grad(Activation a, V grad, V u) {
  if (a == Activation::kSilu) {
    const Sigmoid<Math, Acc, V> sig(u);
    return grad * (sig.s * (u * sig.one_minus_s + Acc(1)));
  }
  if (a == Activation::kGelu) return grad * (Math::normal_cdf(u) + u * Math::normal_pdf(u));
  const Sigmoid<Math, Acc, V> sig(gelu_tanh_argument<Acc>(u));
  const V slope = Acc(kGeluTanhScale) + Acc(3 * kGeluTanhScale * kGeluTanhCubic) * u * u;
  return grad * (sig.s + u * sig.s * sig.one_minus_s * slope);
}
enum class Gate { kHardsigmoid = 0, kSigmoid = 1 };

// act(u) = clamp(u + offset, lo, hi), times u / 6 for hardswish: the four piecewise-linear
// activations in one branch-free form, so a kernel takes the activation as data instead of being
// compiled once per activation. Comparisons with NaN are false, so NaN falls through, as in
// PyTorch. A smooth activation is not one of them: built from one, this is the identity, and the
// kernel applies smooth_activation to what it stored.
template <typename Acc>
struct ActivationFn {
  Acc offset, lo, hi;
  bool times_input;  // hardswish

  C10_HOST_DEVICE explicit ActivationFn(Activation a)
      : offset(a == Activation::kHardswish ? 3 : 0),
        lo(a == Activation::kIdentity || is_smooth(a) ? -INFINITY : 0),
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
  return is_smooth(a) ? smooth_activation<ScalarMath, Acc>(a, u) : ActivationFn<Acc>(a)(u);
}

// d act(u)/du * grad for a compile-time activation, V a scalar or (with Math = cpu::VecMath) a
// GCC vector of Acc. PyTorch's
// values at the kinks: relu' (0) = 0; hardswish' is 0 below -3, u / 3 + 1/2 up to 3 included, 1
// above; relu6' is 0 at 0 and 6. At u = NaN, as PyTorch's vectorised CPU kernels: relu passes
// grad through, relu6 gives 0, hardswish NaN (comparisons with NaN are false).
template <Activation A, typename Acc, typename Math = ScalarMath, typename V>
C10_HOST_DEVICE C10_ALWAYS_INLINE V activation_grad(V grad, V u) {
  const V zero = {}, three = zero + Acc(3), six = zero + Acc(6);
  if constexpr (is_smooth(A)) {
    return smooth_activation_grad<Math, Acc>(A, grad, u);
  } else if constexpr (A == Activation::kHardswish) {
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
    case Activation::kSilu: return f(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kGelu: return f(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh: return f(std::integral_constant<Activation, Activation::kGeluTanh>{});
    default: return f(std::integral_constant<Activation, Activation::kIdentity>{});
  }
}

template <typename Acc>
C10_HOST_DEVICE C10_ALWAYS_INLINE Acc activation_grad(Activation a, Acc grad, Acc u) {
  switch (a) {
    case Activation::kHardswish: return activation_grad<Activation::kHardswish, Acc>(grad, u);
    case Activation::kRelu: return activation_grad<Activation::kRelu, Acc>(grad, u);
    case Activation::kRelu6: return activation_grad<Activation::kRelu6, Acc>(grad, u);
    case Activation::kIdentity: return grad;
    default: return smooth_activation_grad<ScalarMath, Acc>(a, grad, u);
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
