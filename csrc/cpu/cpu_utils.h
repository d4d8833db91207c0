// Shared by the CPU kernels: function multiversioning, vector types, scratch buffers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "../common.h"

// The hot loops are plain C++ written for the auto-vectoriser; on x86-64 GCC and Clang compile
// each for AVX-512, AVX2+FMA and baseline SSE2 and pick one at load time, so one build runs
// fast on any x86-64 CPU. Elsewhere (ARM: NEON is baseline) they are compiled once.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(FASTMB_NO_MULTIVERSION)
#define FASTMB_X86_CLONES 1
#define FASTMB_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
// Loops over 64-byte vectors are compiled for AVX-512 alone (not cloned: the other clones could
// only split them and spill), and called where has_32_vector_registers().
#define FASTMB_AVX512 __attribute__((target("arch=x86-64-v4"), noinline))
#else
#define FASTMB_X86_CLONES 0
#define FASTMB_MULTIVERSION
#define FASTMB_AVX512
#endif
#define FASTMB_INLINE inline __attribute__((always_inline))

namespace fastmb::cpu {

// Whether the CPU has AVX-512's 32 vector registers, so that the FASTMB_AVX512 loops can run
// (AVX2 and SSE2 have 16; ARM's 32 NEON registers hold 16 32-byte Vecs).
inline bool has_32_vector_registers() {
#if FASTMB_X86_CLONES
  static const bool value = __builtin_cpu_supports("avx512vl");
  return value;
#elif defined(__AVX512VL__)
  return true;
#else
  return false;
#endif
}

// Whether the build has the FASTMB_AVX512 loops (multiversioned x86-64, or built for AVX-512).
#if FASTMB_X86_CLONES || defined(__AVX512VL__)
inline constexpr bool kAvx512Loops = true;
#else
inline constexpr bool kAvx512Loops = false;
#endif

// A vector of Bytes of E. (GCC drops vector_size from a typedef in a function template when
// the size depends on a template parameter; in a class it keeps it.)
template <typename E, int Bytes>
struct VectorOf {
  typedef E type __attribute__((vector_size(Bytes)));
};

// A vector of Acc (GCC/Clang vector extension), 32 bytes unless said: AVX2 registers on x86-64
// (AVX-512 machines use them too, from the same clone), two NEON registers on ARM; 64 bytes:
// one AVX-512 register (kAvx512Loops). Loops keep accumulators of this type in registers, which
// the auto-vectoriser does not reliably do.
template <typename Acc, int Bytes = 32>
struct Vec {
  typedef Acc type __attribute__((vector_size(Bytes)));
  static constexpr int kLanes = Bytes / sizeof(Acc);
  // Loads and stores go through this type, which may alias only Acc: a memcpy may alias
  // anything, so after each store the compiler reloaded every pointer and size the loop kept
  // in memory (a kernel's parameters, a Store's fields).
  typedef Acc unaligned __attribute__((vector_size(Bytes), aligned(alignof(Acc))));

  template <typename T>
  static FASTMB_INLINE type load(const T* p) {
    type v;
    if constexpr (std::is_same_v<T, Acc>) {
      v = *reinterpret_cast<const unaligned*>(p);
    } else {  // bfloat16 -> float: the 16 bits are the float's top half
      static_assert(std::is_same_v<T, c10::BFloat16> && std::is_same_v<Acc, float>);
      using half_bits = typename VectorOf<uint16_t, Bytes / 2>::type;
      using bits = typename VectorOf<uint32_t, Bytes>::type;
      half_bits h;
      std::memcpy(&h, p, sizeof h);
      const bits b = __builtin_convertvector(h, bits) << 16;
      std::memcpy(&v, &b, sizeof v);
    }
    return v;
  }
  static FASTMB_INLINE void store(Acc* p, type v) { *reinterpret_cast<unaligned*>(p) = v; }
  template <typename T>
  static FASTMB_INLINE void store(T* p, type v) {  // to bfloat16: rounded as c10 does, lane by lane
    static_assert(std::is_same_v<T, c10::BFloat16> && std::is_same_v<Acc, float>);
    for (int k = 0; k < kLanes; ++k) p[k] = T(v[k]);
  }
};

// activate(A, v) (../common.h) on a whole vector, with the same NaN behaviour: comparisons
// with NaN are false, so NaN falls through.
template <Activation A, typename Acc, typename VT>
FASTMB_INLINE VT activate_vector(VT u) {
  const VT zero = {}, three = zero + Acc(3), six = zero + Acc(6);
  const auto clamp_0_6 = [&](VT v) { v = v < zero ? zero : v; return v > six ? six : v; };
  if constexpr (A == Activation::kHardswish) return u * clamp_0_6(u + three) * Acc(1.0 / 6.0);
  else if constexpr (A == Activation::kRelu) return u < zero ? zero : u;
  else if constexpr (A == Activation::kRelu6) return clamp_0_6(u);
  else return u;
}

// activation_grad (../common.h) on a whole vector, with the same comparisons: NaN fails them all.
template <Activation A, typename Acc, typename VT>
FASTMB_INLINE VT activation_grad_vector(VT grad, VT u) {
  const VT zero = {}, three = zero + Acc(3), six = zero + Acc(6);
  if constexpr (A == Activation::kHardswish) {
    const VT inner = u <= three ? grad * (u * Acc(1.0 / 3.0) + Acc(0.5)) : grad;
    return u < -three ? zero : inner;
  } else if constexpr (A == Activation::kRelu) {
    return u > zero ? grad : zero;
  } else if constexpr (A == Activation::kRelu6) {
    return (u > zero) & (u < six) ? grad : zero;
  } else {
    return grad;
  }
}

// W values from p (Acc or bfloat16) as Acc: the Vec of them when W is its width, else (W = 1) one.
template <typename Acc, int W, typename T>
FASTMB_INLINE auto load_values(const T* p) {
  if constexpr (W == 1) {
    return Acc(*p);
  } else {
    static_assert(W == Vec<Acc>::kLanes);
    return Vec<Acc>::load(p);
  }
}

// sums[k] += the sum over pixels p < pixels of term(p, k, width), k < nc, with the sums of up to 8
// vectors of channels held in registers over all the pixels (summed into memory, each pixel
// would wait on a store-to-load round trip). term returns the Vec of channels k..k+kLanes for
// width Int<kLanes>, and channel k alone for width Int<1> (the channels past the last vector).
template <typename Acc, typename Term>
FASTMB_INLINE void add_column_sums(Acc* sums, int64_t pixels, int64_t nc, const Term& term) {
  using V = Vec<Acc>;
  constexpr int L = V::kLanes, NV = 8;
  int64_t k0 = 0;
  while (nc - k0 >= L) {
    const int64_t nv = std::min<int64_t>(NV, (nc - k0) / L);
    typename V::type acc[NV] = {};
    for (int64_t p = 0; p < pixels; ++p) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        if (v < nv) acc[v] += term(p, k0 + v * L, std::integral_constant<int, L>{});
    }
    for (int64_t v = 0; v < nv; ++v) V::store(sums + k0 + v * L, V::load(sums + k0 + v * L) + acc[v]);
    k0 += nv * L;
  }
  for (int64_t k = k0; k < nc; ++k) {
    Acc acc = 0;
    for (int64_t p = 0; p < pixels; ++p) acc += term(p, k, std::integral_constant<int, 1>{});
    sums[k] += acc;
  }
}

// p, hidden from the optimiser: a pointer stepped through an unrolled loop stays one register
// instead of becoming a precomputed offset per step.
template <typename T>
FASTMB_INLINE T* opaque(T* p) {
  asm("" : "+r"(p));
  return p;
}

// A [num_threads][n] scratch buffer of zeros for per-thread partial reductions.
template <typename T>
at::Tensor per_thread_zeros(int64_t n, const at::Tensor& like) {
  return at::zeros({at::get_num_threads(), n}, like.options().dtype(c10::CppTypeToScalarType<T>::value));
}

}  // namespace fastmb::cpu
