// The transcendental kernels of the smooth activations (activations.h: smooth_activation) for
// the CPU's GCC vectors: exp and the normal CDF and density. float vectors
// take polynomial forms (a few ulp, like the vectorised kernels PyTorch's own activations use);
// scalars and double vectors take the std:: functions lane by lane (float64 is the checks' type,
// where accuracy, not speed, counts). No ATen: the per-ISA translation units include it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../activations.h"

namespace fastmb::cpu {

// Compiled for the baseline instruction set (included before any target pragma, by
// dwconv/kernels.h) and always inlined, so each caller compiles it for its own: an out-of-line
// copy, shared by name between the per-ISA units and target clones, was called with another
// instruction set's vector ABI (it crashed the AVX-512 clone of a caller).
struct VecMath {
  template <typename V>
  static auto lane_of() {
    if constexpr (std::is_floating_point_v<V>) return V{};
    else return std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V>()[0])>>{};
  }
  template <typename V>
  using Lane = decltype(lane_of<V>());  // V's element type; V itself for a scalar

  template <typename V, typename F>
  static C10_ALWAYS_INLINE V per_lane(V v, F f) {
    constexpr int lanes = sizeof(V) / sizeof(v[0]);
    for (int i = 0; i < lanes; ++i) v[i] = f(v[i]);
    return v;
  }

  // exp(x) for float vectors: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so n ln2 is
  // exact), exp(r) by its Taylor series to r^7 (error below 1e-8 relative), times 2^n built in
  // the exponent bits, for x where 2^n is a normal float; NaN stays NaN.
  template <typename V>
  static C10_ALWAYS_INLINE V exp(V x) {
    if constexpr (std::is_floating_point_v<V>) {
      return std::exp(x);
    } else if constexpr (!std::is_same_v<Lane<V>, float>) {
      return per_lane(x, [](auto v) { return std::exp(v); });
    } else {
      using Bits = decltype(x < x);  // GCC's lane mask type: int32 lanes for float
      const V lo = V{} - 87.0f, hi = V{} + 88.5f, input = x;
      x = x < lo ? lo : x;
      x = x > hi ? hi : x;
      // n = round(x / ln2): adding 1.5 * 2^23 leaves it in the low mantissa bits
      const V shifter = V{} + 12582912.0f;
      const V t = x * 1.44269504088896341f + shifter;
      const V n = t - shifter;
      Bits n_bits;
      std::memcpy(&n_bits, &t, sizeof t);
      n_bits -= 0x4B400000;
      const V r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
      V p = V{} + 1.0f / 5040;
      p = p * r + 1.0f / 720;
      p = p * r + 1.0f / 120;
      p = p * r + 1.0f / 24;
      p = p * r + 1.0f / 6;
      p = p * r + 0.5f;
      p = p * r + 1.0f;
      p = p * r + 1.0f;
      const Bits scale_bits = (n_bits + 127) << 23;
      V scale;
      std::memcpy(&scale, &scale_bits, sizeof scale);
      const V result = p * scale;
      // beyond the clamp: 0 (below 1e-38: flushed, so -inf gives 0) and inf, as std::exp's limits
      return input < lo ? V{} : input > hi ? V{} + INFINITY : result;
    }
  }

  // Phi(v) = erfc(-v / sqrt 2) / 2. With t = |v| / sqrt 2: for t < 0.5, erf(t) by its Taylor
  // series to t^11; above, erfc(t) = exp(-t^2) R(w), R a degree-9 least-squares fit in
  // w = 1 / (1 + t / 2) on [0.5, 10] (relative error 5e-9). Phi keeps its relative accuracy for
  // v << 0, where 1 + erf would cancel.
  template <typename V>
  static C10_ALWAYS_INLINE V normal_cdf(V v) {
    if constexpr (std::is_floating_point_v<V>) {
      return ScalarMath::normal_cdf(v);
    } else if constexpr (!std::is_same_v<Lane<V>, float>) {
      return per_lane(v, [](auto s) { return ScalarMath::normal_cdf(s); });
    } else {
      const V zero = {};
      const V t = (v < zero ? -v : v) * 0.70710678118654752f;
      const V t2 = t * t;
      V e = V{} - 1.0f / (120 * 11);  // erf(t) * sqrt(pi) / 2 / t = sum (-1)^k t^2k / (k! (2k + 1))
      e = e * t2 + 1.0f / (24 * 9);
      e = e * t2 - 1.0f / (6 * 7);
      e = e * t2 + 1.0f / (2 * 5);
      e = e * t2 - 1.0f / 3;
      e = e * t2 + 1.0f;
      const V erfc_small = 1.0f - e * t * 1.12837916709551257f;
      const V w = 1.0f / (t * 0.5f + 1.0f);
      V r = V{} - 7.656751749e-02f;
      r = r * w + 3.602473627e-01f;
      r = r * w - 6.272539494e-01f;
      r = r * w + 4.230932450e-01f;
      r = r * w - 1.188382944e-01f;
      r = r * w + 2.398695647e-01f;
      r = r * w + 2.336315449e-01f;
      r = r * w + 2.838407710e-01f;
      r = r * w + 2.819617362e-01f;
      r = r * w + 4.440584438e-06f;
      const V erfc_large = exp(-t2) * r;
      const V half_erfc = (t < 0.5f ? erfc_small : erfc_large) * 0.5f;
      const V phi = v > zero ? 1.0f - half_erfc : half_erfc;
      return v != v ? v : phi;  // NaN in, NaN out
    }
  }

  template <typename V>
  static C10_ALWAYS_INLINE V normal_pdf(V v) {
    using E = Lane<V>;
    return E(0.39894228040143267794) * exp(E(-0.5) * v * v);
  }
};

}  // namespace fastmb::cpu
