// Shared by the CPU kernels: vector types, compile-time unrolling and column sums, and the
// multiversioning of the squeeze-excitation loops. No ATen: the depthwise kernels' per-
// instruction-set translation units (dwconv/kernels_*.cpp) include it.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

// The squeeze-excitation loops are plain C++ written for the auto-vectoriser; on x86-64 GCC and
// Clang compile each for AVX-512, AVX2+FMA and baseline SSE2 and pick one at load time. (The
// depthwise kernels instead have one translation unit per instruction set: dwconv/kernels.h;
// compiled under its target pragma, clones would conflict with it, and they are not used there.)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(FASTMB_NO_MULTIVERSION) && !defined(FASTMB_CPU_ISA)
#define FASTMB_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTMB_MULTIVERSION
#endif
#define FASTMB_INLINE inline __attribute__((always_inline))

namespace fastmb::cpu {

template <int V>
using Int = std::integral_constant<int, V>;

// Calls f(Int<0>{}), ..., f(Int<N - 1>{}): a loop unrolled at compile time, so indices into
// register arrays and the conditions on them are constants.
template <typename F, int... I>
FASTMB_INLINE void unroll_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(Int<I>{}), ...);
}
template <int N, typename F>
FASTMB_INLINE void unroll(F&& f) {
  unroll_impl(f, std::make_integer_sequence<int, N>{});
}

// A vector of Bytes of E. (GCC drops vector_size from a typedef in a function template when
// the size depends on a template parameter; in a class it keeps it.)
template <typename E, int Bytes>
struct VectorOf {
  typedef E type __attribute__((vector_size(Bytes)));
};

// A vector of Acc (GCC/Clang vector extension), 32 bytes unless said: AVX2 registers on x86-64,
// two NEON registers on ARM; 64 bytes: one AVX-512 register. Loops keep accumulators of this
// type in registers, which the auto-vectoriser does not reliably do.
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
};

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
        if (v < nv) acc[v] += term(p, k0 + v * L, Int<L>{});
    }
    for (int64_t v = 0; v < nv; ++v) V::store(sums + k0 + v * L, V::load(sums + k0 + v * L) + acc[v]);
    k0 += nv * L;
  }
  for (int64_t k = k0; k < nc; ++k) {
    Acc acc = 0;
    for (int64_t p = 0; p < pixels; ++p) acc += term(p, k, Int<1>{});
    sums[k] += acc;
  }
}

// How far ahead (bytes) the weight rows of a matrix-vector product at batch 1 are prefetched as
// dot reads them (its `prefetch`). Those rows come from memory (a V3-Large forward's 22 MB of
// weights do not stay in this host's share of the L3), and the hardware prefetcher alone keeps
// too few lines in flight: a 10 MB stream on two threads went from 39 to 49-57 GB/s. Measured
// with a switch, alternated in one process: V3-Large's classifier 1.01-1.29x, its chain (the SE
// FCs) 1.02-1.05x, V2's classifier 1.02-1.08x; 4 KB ahead gained less, 32-128 KB varied more.
constexpr int64_t kRowPrefetchBytes = 16 << 10;

// dot(w, v) over k values with vector accumulators: a plain loop does not vectorise, as the
// compiler may not reorder a floating-point sum. With `prefetch` (bytes; see kRowPrefetchBytes),
// w's lines that far on are prefetched as it goes: prefetches never fault, so past w's end is fine.
template <typename Acc>
FASTMB_INLINE Acc dot(const Acc* w, const Acc* v, int64_t k, int64_t prefetch = 0) {
  using V = Vec<Acc>;
  typename V::type s0 = {}, s1 = {};
  int64_t i = 0;
  for (; i + 2 * V::kLanes <= k; i += 2 * V::kLanes) {
    if (prefetch > 0) {  // an address as an integer: a pointer past w's end would be undefined
      const uintptr_t line = reinterpret_cast<uintptr_t>(w + i) + uintptr_t(prefetch);
      for (size_t b = 0; b < 2 * V::kLanes * sizeof(Acc); b += 64) __builtin_prefetch(reinterpret_cast<const void*>(line + b));
    }
    s0 += V::load(w + i) * V::load(v + i);
    s1 += V::load(w + i + V::kLanes) * V::load(v + i + V::kLanes);
  }
  for (; i + V::kLanes <= k; i += V::kLanes) s0 += V::load(w + i) * V::load(v + i);
  s0 += s1;
  Acc sum = 0;
  for (int l = 0; l < V::kLanes; ++l) sum += s0[l];
  for (; i < k; ++i) sum += w[i] * v[i];
  return sum;
}

// out[i * rows + r] = finish(bias[r] + dot(w[r], in[i])) for rows [r0, r1) of the (rows, k)
// matrix w and `images` inputs of k values (an SE FC layer, a classifier's linear layer): each
// weight row read once for all the images, the first image's pass prefetching the rows ahead.
template <typename Finish>
FASTMB_MULTIVERSION void dot_rows(float* out, const float* in, int64_t images, const float* w, const float* bias, int64_t rows, int64_t k,
                                  int64_t r0, int64_t r1, Finish finish) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t i = 0; i < images; ++i) out[i * rows + r] = finish(bias[r] + dot(w + r * k, in + i * k, k, i == 0 ? kRowPrefetchBytes : 0));
}

// dst[k] = src[k] for n values, bfloat16 <-> float, a vector at a time: bfloat16 rounded to
// nearest even with NaN kept quiet, as c10::BFloat16 converts.
FASTMB_INLINE void convert(const c10::BFloat16* src, float* dst, int64_t n) {
  using V = Vec<float>;
  int64_t k = 0;
  for (; k + V::kLanes <= n; k += V::kLanes) V::store(dst + k, V::load(src + k));
  for (; k < n; ++k) dst[k] = float(src[k]);
}
FASTMB_INLINE void convert(const float* src, c10::BFloat16* dst, int64_t n) {
  using V = Vec<float>;
  using bits = VectorOf<uint32_t, 32>::type;
  using half_bits = VectorOf<uint16_t, 16>::type;
  int64_t k = 0;
  for (; k + V::kLanes <= n; k += V::kLanes) {
    const V::type v = V::load(src + k);
    bits b;
    std::memcpy(&b, &v, sizeof b);
    const bits nan = bits(v != v);  // all ones where v is NaN
    const bits rounded = ((b + ((b >> 16) & 1) + 0x7fff) >> 16 & ~nan) | (0x7fc0 & nan);
    const half_bits h = __builtin_convertvector(rounded, half_bits);
    std::memcpy(dst + k, &h, sizeof h);
  }
  for (; k < n; ++k) dst[k] = c10::BFloat16(src[k]);
}
template <typename T>
FASTMB_INLINE void convert(const T* src, T* dst, int64_t n) {
  std::copy(src, src + n, dst);
}

// p, hidden from the optimiser: a pointer stepped through an unrolled loop stays one register
// instead of becoming a precomputed offset per step.
template <typename T>
FASTMB_INLINE T* opaque(T* p) {
  asm("" : "+r"(p));
  return p;
}

}  // namespace fastmb::cpu
