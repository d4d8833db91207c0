// The pointwise GEMM's register tiles, compiled once per instruction set: included by a
// translation unit that defines FASTMB_CPU_ISA (its namespace), FASTMB_GEMM_BYTES (the vector
// width), FASTMB_GEMM_ACCUMULATORS and FASTMB_GEMM_PANELS (a tile's accumulator registers, and its
// widest group of panels of 16 channels: accumulators, weight vectors and a broadcast must fit
// the ISA's registers).
#pragma once

#ifndef FASTMB_CPU_ISA
#error "tiles.h is compiled per instruction set: see kernels_*.cpp"
#endif

#if FASTMB_GEMM_BYTES == 64
#include <immintrin.h>
#endif

#include <utility>

#include "../vec.h"  // after the translation unit's target pragma: its loops inline the ISA's lambdas
#include "kernels.h"

namespace fastmb::cpu::pointwise::FASTMB_CPU_ISA {

using V = Vec<float, FASTMB_GEMM_BYTES>;
using VT = V::type;
constexpr int kLanes = V::kLanes;
constexpr int kPanelVectors = kPanel / kLanes;
constexpr int kAccumulators = FASTMB_GEMM_ACCUMULATORS, kPanels = FASTMB_GEMM_PANELS;
// How far ahead (in k steps, one 64-byte line per panel each) a group's first row tile
// prefetches its own weights where no group before it did: memory latency is about 32 steps.
constexpr int64_t kLeadSteps = 64;

// s in every lane: one broadcast load (VT{} + s would add 0 to s first, to keep -0.0 right).
template <size_t... I>
FASTMB_INLINE VT broadcast(const float* s, std::index_sequence<I...>) {
  const float v = *s;
  return VT{(static_cast<void>(I), v)...};
}
FASTMB_INLINE VT broadcast(const float* s) { return broadcast(s, std::make_index_sequence<kLanes>{}); }

// The first `count` (< kLanes) lanes at p: loaded (the rest zero) and stored, masked where the
// instruction set has masks.
FASTMB_INLINE VT load_first(const float* p, int64_t count) {
#if FASTMB_GEMM_BYTES == 64
  return VT(_mm512_maskz_loadu_ps(__mmask16((1u << count) - 1), p));
#else
  VT v = {};
  for (int64_t l = 0; l < count; ++l) v[l] = p[l];
  return v;
#endif
}
FASTMB_INLINE void store_first(float* p, VT v, int64_t count) {
#if FASTMB_GEMM_BYTES == 64
  _mm512_mask_storeu_ps(p, __mmask16((1u << count) - 1), __m512(v));
#else
  for (int64_t l = 0; l < count; ++l) p[l] = v[l];
#endif
}

#if FASTMB_GEMM_BYTES == 64
// Half vectors (8 lanes, a ymm register): the last panel when only its first 8 columns are
// real. Zen 4 runs a 512-bit FMA as two 256-bit halves, so the padding's half costs nothing.
using VH = Vec<float, 32>;
using VHT = VH::type;
// (A shuffle, not _mm512_castps512_ps256: GCC 12 warns that the cast's undefined upper half may
// be used uninitialised.)
FASTMB_INLINE VHT low_half(VT v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7); }
FASTMB_INLINE VHT load_half(const float* p, int64_t count) {
  return count >= 8 ? VH::load(p) : VHT(_mm256_maskz_loadu_ps(__mmask8((1u << count) - 1), p));
}
FASTMB_INLINE void store_half(float* p, VHT v, int64_t count) {
  if (count >= 8) return VH::store(p, v);
  _mm256_mask_storeu_ps(p, __mmask8((1u << count) - 1), __m256(v));
}
#endif

// c[i] = smooth(values[i]) (+ residual[i]) for `count` consecutive values: a smooth activation out
// of line (one copy per instruction set: its namespace names it). Inlined into every tile shape's
// epilogue, it made this unit 1.9 MB of code and 78 s of compile. A tile stores its accumulators
// in `values` before the call: a call while they are live (every vector register is
// caller-saved) made GCC keep many tiles' accumulators on the stack through the whole k loop,
// for every activation (AVX2, one thread, Zen 3: 14 x 576 x 96 25.0 -> 39.8 G MAC/s, m = 448,
// k = 96, n = 8 9.5 -> 13.6).
[[gnu::noinline]] static void smooth_span(Activation a, const float* values, const float* residual, float* c, int64_t count) {
  for (int64_t i = 0; i < count; i += kLanes) {
    const int64_t left = count - i;
    VT y = smooth_activation<VecMath, float>(a, left >= kLanes ? V::load(values + i) : load_first(values + i, left));
    if (residual != nullptr) y += left >= kLanes ? V::load(residual + i) : load_first(residual + i, left);
    if (left >= kLanes) V::store(c + i, y);
    else store_first(c + i, y, left);
  }
}

// The epilogue of an accumulator y (bias included) of row `row` from column col: activation,
// residual, stored; load and store move as many columns as y holds, or fewer.
template <typename W, typename Load, typename Store>
FASTMB_INLINE void finish(const Gemm& g, const ActivationFn<float>& act, W y, int64_t row, int64_t col, const Load& load,
                          const Store& store) {
  y = act(y);
  if (g.residual != nullptr) y += load(g.residual + row * g.ldr + col);
  store(g.c + row * g.ldc + col, y);
}

// Rows [i0, i0 + R) x panels [p0, p0 + P) of c: the k-loop with R * P * kPanelVectors
// accumulators in registers, then bias, activation and residual on the way out. Columns past n
// (the last panel's padding) are computed and dropped, except with Half: the last panel has at
// most 8 real columns, and its other half is not computed (AVX-512: the last vector is a half
// vector; 32-byte vectors: the panel's second vector is left out). Each of the first ahead_lines
// k steps also prefetches a line of `ahead` into L2 (with Stream, also line k + kk where
// ahead_lines > k: up to 2k lines a tile), and a `lead` tile its own weights kLeadSteps steps on.
//
// Out of line, each shape a function of its own: inlined, all of them into one function, GCC kept
// some tiles' accumulators on the stack through the k loop (AVX2, one thread, Zen 3, m = 448,
// k = 96: n = 8 13.6 -> 19.6 G MAC/s, n = 24 20.6 -> 24.7; each AVX-512 tile of 20-24
// accumulators now compiles without a spill).
template <int R, int P, bool Half, bool Stream = false>
[[gnu::noinline]] void tile(const Gemm& g, int64_t i0, int64_t p0, const float* ahead, int64_t ahead_lines, bool lead) {
#if FASTMB_GEMM_BYTES == 64
  [[maybe_unused]] constexpr bool kHalfVector = Half;  // one vector a panel: the last one at half width
#else
  [[maybe_unused]] constexpr bool kHalfVector = false;  // two vectors a panel: the last one left out
#endif
  constexpr int NV = P * kPanelVectors - (Half ? 1 : 0);  // full-width vectors
  constexpr int NA = NV > 0 ? NV : 1;  // (arrays of at least one)
  const int64_t col0 = p0 * kPanel, tail_col = col0 + NV * kLanes;  // past the full vectors: the half vector's
  // The accumulators start at the bias: with few input channels (16-24 in the early blocks) an
  // add per output value in the epilogue is a sizeable share of the tile's work.
  VT acc[R][NA];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const int64_t col = col0 + v * kLanes;
    const VT bias = col + kLanes <= g.n ? V::load(g.bias + col) : col < g.n ? load_first(g.bias + col, g.n - col) : VT{};
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r][v] = bias;
  }
#if FASTMB_GEMM_BYTES == 64
  VHT acc_half[R];
  if constexpr (kHalfVector) {
    const VHT bias = load_half(g.bias + tail_col, g.n - tail_col);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc_half[r] = bias;
  }
#endif
  const int64_t k = g.k, lda = g.lda;
  const float* a = g.a + i0 * lda;
  const float* w = g.w + p0 * k * kPanel;
  // Plain loops with constant trip counts, fully unrolled, so the accumulators stay in registers.
  for (int64_t kk = 0; kk < k; ++kk) {
    if (kk < ahead_lines) {
      __builtin_prefetch(ahead + kk * kPanel, 0, 2);
      if constexpr (Stream) {
        if (kk + k < ahead_lines) __builtin_prefetch(ahead + (kk + k) * kPanel, 0, 2);
      }
    }
    if (lead && kk + kLeadSteps < k) {
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) __builtin_prefetch(w + (p * k + kk + kLeadSteps) * kPanel, 0, 2);
    }
    VT wv[NA];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) wv[v] = V::load(w + (v / kPanelVectors) * k * kPanel + kk * kPanel + (v % kPanelVectors) * kLanes);
#if FASTMB_GEMM_BYTES == 64
    VHT wh{};
    if constexpr (kHalfVector) wh = VH::load(w + NV * k * kPanel + kk * kPanel);
#endif
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const VT x = broadcast(a + r * lda + kk);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += x * wv[v];
#if FASTMB_GEMM_BYTES == 64
      if constexpr (kHalfVector) acc_half[r] += low_half(x) * wh;
#endif
    }
  }
  if (is_smooth(g.act)) {  // stored, then finished out of line
    constexpr int W = NV * kLanes + (kHalfVector ? kLanes / 2 : 0);
    alignas(64) float values[R][W];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) V::store(values[r] + v * kLanes, acc[r][v]);
#if FASTMB_GEMM_BYTES == 64
      if constexpr (kHalfVector) VH::store(values[r] + NV * kLanes, acc_half[r]);
#endif
    }
    const int64_t count = std::min<int64_t>(W, g.n - col0);
    for (int r = 0; r < R; ++r)
      smooth_span(g.act, values[r], g.residual == nullptr ? nullptr : g.residual + (i0 + r) * g.ldr + col0, g.c + (i0 + r) * g.ldc + col0, count);
    return;
  }
  const ActivationFn<float> act(g.act);
  // Whole vectors (the common case) without the checks per vector: at 16-24 input channels they
  // cost a sixth of the tile's time. The activation's kind is a compile-time choice here: with
  // hardswish's runtime select GCC computed every clamp before any product and spilled them;
  // identity (the projections) skips the clamp's three ops. AVX2, Zen 3, one thread: hardswish
  // m = 784, k = 40, n = 240 27.6 -> 28.9-32.4 G MAC/s, other shapes +1-10%; whole forwards
  // alternated in one process 1.012-1.023x (V2, V3-Large, V3-Small; batch 1 and 16). The AVX-512
  // tiles' k loops with spills went from 10 to 7 (objdump); their speed is not measured.
  if (tail_col <= g.n) {
    const VT offset = VT{} + act.offset, lo = VT{} + act.lo, hi = VT{} + act.hi;
    const auto clamp = [&](VT u) __attribute__((always_inline)) {
      VT h = u + offset;
      h = h < lo ? lo : h;
      return h > hi ? hi : h;
    };
    const auto store_all = [&](auto activate) __attribute__((always_inline)) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const int64_t col = col0 + v * kLanes;
          VT y = activate(acc[r][v]);
          if (g.residual != nullptr) y += V::load(g.residual + (i0 + r) * g.ldr + col);
          V::store(g.c + (i0 + r) * g.ldc + col, y);
        }
    };
    if (g.act == Activation::kIdentity) store_all([](VT u) __attribute__((always_inline)) { return u; });
    else if (act.times_input) store_all([&](VT u) __attribute__((always_inline)) { return u * clamp(u) * (1.0f / 6.0f); });
    else store_all(clamp);
  } else
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const int64_t col = col0 + v * kLanes;
    if (col >= g.n) break;
    if (col + kLanes <= g.n) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        finish(g, act, acc[r][v], i0 + r, col, [](const float* p) { return V::load(p); }, [](float* p, VT y) { V::store(p, y); });
    } else {  // the last, partial vector of columns
      const int64_t count = g.n - col;
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        finish(g, act, acc[r][v], i0 + r, col, [count](const float* p) { return load_first(p, count); },
               [count](float* p, VT y) { store_first(p, y, count); });
    }
  }
#if FASTMB_GEMM_BYTES == 64
  if constexpr (kHalfVector) {
    const int64_t count = g.n - tail_col;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      finish(g, act, acc_half[r], i0 + r, tail_col, [count](const float* p) { return load_half(p, count); },
             [count](float* p, VHT y) { store_half(p, y, count); });
  }
#endif
}

// Rows per tile of P panels: about kAccumulators accumulator registers, at most 8 rows. Each row
// keeps its input pointer in a general register: with 12 rows (two panels) and 14 (one) on
// AVX-512 the pointers went to vector registers and accumulators to the stack. One thread, Zen 4,
// m = 448, k = 32-256: n = 32 (two panels) 47.5-51.5 -> 51.6-57.9 G MAC/s, n = 16 45.7-51.6 ->
// 49.7-57.9, n = 72 47.6-51.9 -> 52.7-57.9 (of 58.6); 6 or 7 rows level with 8. (The tile of
// one full and one half vector, n = 24, was the first found: 8 rows ran 87-89 G MAC/s, 12 67-80.)
constexpr int rows_for(int panels) { return std::min(8, kAccumulators / (panels * kPanelVectors)); }

// The last rows' tile: `left` (< R) rows from i0.
template <int P, bool Half, int R, bool Stream = false>
FASTMB_INLINE void tail_tile(const Gemm& g, int64_t i0, int64_t p0, int64_t left, const float* ahead, int64_t ahead_lines) {
  if constexpr (R >= 1) {
    if (left == R) return tile<R, P, Half, Stream>(g, i0, p0, ahead, ahead_lines, false);
    tail_tile<P, Half, R - 1, Stream>(g, i0, p0, left, ahead, ahead_lines);
  }
}

// Rows [0, m) in tiles of rows_for(P), the last tile as many rows as are left. With cold
// weights the row tiles share out the prefetch of the next group's, panels [p0 + P, next_end),
// and a `lead` group (none before it prefetched its weights) has its first tile run ahead of
// its own.
template <int P, bool Half>
FASTMB_INLINE void tile_rows(const Gemm& g, int64_t p0, int64_t next_end, bool lead) {
  constexpr int R = rows_for(P);
  const int64_t tiles = (g.m + R - 1) / R, lines = g.cold_weights ? std::max<int64_t>(next_end - p0 - P, 0) * g.k : 0;
  const int64_t share = (lines + tiles - 1) / tiles;
  // Tile t's lines of the next group: at most one per k step, and no pointer past the weights.
  const auto count = [&](int64_t t) { return std::clamp<int64_t>(lines - t * share, 0, std::min(share, g.k)); };
  const auto from = [&](int64_t t) { return count(t) > 0 ? g.w + ((p0 + P) * g.k + t * share) * kPanel : nullptr; };
  int64_t i0 = 0, t = 0;
  for (; i0 + R <= g.m; i0 += R, ++t) tile<R, P, Half>(g, i0, p0, from(t), count(t), t == 0 && lead && g.cold_weights);
  tail_tile<P, Half, R - 1>(g, i0, p0, g.m - i0, from(t), count(t));
}

// A call's first group of P panels (p0 = panel0) with its stream (Gemm::stream): its row tiles
// share out the stream's lines, up to two a k step (the next group, a call of its own, runs its
// first tile ahead of its weights instead). Its own instantiation of the tiles, so that the other
// calls' tiles are compiled as before.
template <int P>
FASTMB_INLINE void tile_rows_streaming(const Gemm& g, int64_t p0) {
  constexpr int R = rows_for(P);
  const int64_t tiles = (g.m + R - 1) / R, share = (g.stream_lines + tiles - 1) / tiles;
  const auto count = [&](int64_t t) { return std::clamp<int64_t>(g.stream_lines - t * share, 0, std::min(share, 2 * g.k)); };
  const auto from = [&](int64_t t) { return count(t) > 0 ? g.stream + t * share * kPanel : nullptr; };
  int64_t i0 = 0, t = 0;
  for (; i0 + R <= g.m; i0 += R, ++t) tile<R, P, false, true>(g, i0, p0, from(t), count(t), t == 0 && g.cold_weights);
  tail_tile<P, false, R - 1, true>(g, i0, p0, g.m - i0, from(t), count(t));
}

// Panels [p, panel1) in groups of P, then of fewer (a group's weights, k x 16 x P floats, stay in
// L1/L2 while every row tile passes over them). With cold weights each group prefetches the next
// one's, up to panel `end`: at batch 1 the weights come from memory, and each group's first row
// tile waited on them (one thread, 7x7 pixels, 160 -> 960 channels: 87 -> 105 G MAC/s).
template <int P>
FASTMB_INLINE void panel_groups(const Gemm& g, int64_t p, int64_t panel1, int64_t end, bool lead) {
  for (; p + P <= panel1; p += P, lead = false) tile_rows<P, false>(g, p, std::min(end, p + 2 * P), lead);
  if constexpr (P > 1) panel_groups<P - 1>(g, p, panel1, end, lead);
}

#if FASTMB_GEMM_BYTES == 64
// Rows in pairs, for n = 24 and 40 where c's rows (and the residual's) follow one another: a
// pair's 2n outputs are n / 8 whole vectors, so no lanes go to the last panel's padding (n = 24:
// 3 FMAs a k step for two rows, against 4 with a half vector each). Vector v of a pair holds the
// weights' half panels 2v and 2v + 1 (mod n / 8); its lanes take row 0's input, row 1's, or, in
// the one vector that straddles the rows, row 0's in its low half. Alternated with the half
// vectors on one thread (m = 224-448): n = 24 61-75 -> 74-90 G MAC/s, n = 40 75-76 -> 82-87.
FASTMB_INLINE VT join_halves(const float* lo, const float* hi) {
  return VT(_mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(lo)), _mm256_loadu_ps(hi), 1));
}
template <int NV>
FASTMB_INLINE VT pair_weights(const float* w, int64_t k, int64_t kk, int v) {
  const int lo = (2 * v) % NV, hi = (2 * v + 1) % NV;
  const float* at_lo = w + ((lo / 2) * k + kk) * kPanel + (lo % 2) * 8;
  if (hi == lo + 1 && lo % 2 == 0) return V::load(at_lo);  // a whole panel's vector
  return join_halves(at_lo, w + ((hi / 2) * k + kk) * kPanel + (hi % 2) * 8);
}
// Vector v of a pair of rows of n = 8 * NV values from one row of them (the bias).
template <int NV>
FASTMB_INLINE VT pair_row(const float* row, int v) {
  return join_halves(row + 8 * ((2 * v) % NV), row + 8 * ((2 * v + 1) % NV));
}

// Row pairs [q0, q0 + Q) (rows 2q and 2q + 1) of a GEMM of n = 8 * NV columns, all of them.
template <int NV, int Q>
FASTMB_INLINE void pair_tile(const Gemm& g, int64_t q0, bool lead) {
  VT acc[Q][NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    const VT bias = pair_row<NV>(g.bias, v);
#pragma GCC unroll 16
    for (int q = 0; q < Q; ++q) acc[q][v] = bias;
  }
  const int64_t k = g.k, lda = g.lda;
  const float* a = g.a + 2 * q0 * lda;
  for (int64_t kk = 0; kk < k; ++kk) {
    if (lead && kk + kLeadSteps < k) {
#pragma GCC unroll 4
      for (int p = 0; p < (NV + 1) / 2; ++p) __builtin_prefetch(g.w + (p * k + kk + kLeadSteps) * kPanel, 0, 2);
    }
    VT wv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) wv[v] = pair_weights<NV>(g.w, k, kk, v);
#pragma GCC unroll 16
    for (int q = 0; q < Q; ++q) {
      const VT x0 = broadcast(a + 2 * q * lda + kk), x1 = broadcast(a + (2 * q + 1) * lda + kk);
      const VT straddling = VT(_mm512_mask_blend_ps(__mmask16(0xFF00), __m512(x0), __m512(x1)));
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[q][v] += (16 * v + 16 <= 8 * NV ? x0 : 16 * v >= 8 * NV ? x1 : straddling) * wv[v];
    }
  }
  // Rows follow one another (ldc = ldr = n): vector v of pair q is at row 2q, column 16v.
  if (is_smooth(g.act)) {  // stored, then finished out of line
    alignas(64) float values[Q][NV * kLanes];
#pragma GCC unroll 16
    for (int q = 0; q < Q; ++q)
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) V::store(values[q] + v * kLanes, acc[q][v]);
    for (int q = 0; q < Q; ++q) {
      const int64_t at = 2 * (q0 + q) * g.n;
      smooth_span(g.act, values[q], g.residual == nullptr ? nullptr : g.residual + at, g.c + at, NV * kLanes);
    }
    return;
  }
  const ActivationFn<float> act(g.act);
#pragma GCC unroll 16
  for (int q = 0; q < Q; ++q)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      finish(g, act, acc[q][v], 2 * (q0 + q), v * kLanes, [](const float* p) { return V::load(p); }, [](float* p, VT y) { V::store(p, y); });
}

template <int NV, int Q>
FASTMB_INLINE void tail_pair_tile(const Gemm& g, int64_t q0, int64_t left) {
  if constexpr (Q >= 1) {
    if (left == Q) return pair_tile<NV, Q>(g, q0, false);
    tail_pair_tile<NV, Q - 1>(g, q0, left);
  }
}

// Rows [0, m - m % 2) in tiles of Q pairs: 21 (n = 24) or 20 (n = 40) accumulators. With 24 they
// spilled, and the tiles ran at half speed.
template <int NV>
FASTMB_INLINE void pair_rows(const Gemm& g) {
  constexpr int Q = (kAccumulators - 3) / NV;
  const int64_t pairs = g.m / 2;
  int64_t q = 0;
  for (; q + Q <= pairs; q += Q) pair_tile<NV, Q>(g, q, q == 0 && g.cold_weights);
  tail_pair_tile<NV, Q - 1>(g, q, pairs - q);
}
#endif

// The panels in the last group when panel1 - panel0 end on a half panel: 3 (or 2, or all of them
// when fewer), so that the groups of kPanels before it leave no group of one panel.
constexpr int64_t half_group(int64_t panels) {
  if (kPanels < 3 || panels < 3) return std::min<int64_t>(panels, kPanels >= 2 ? 2 : 1);
  return (panels - 3) % kPanels == 1 ? 2 : 3;
}

// Panels [panel0, panel1) of every row, a vector (or half vector) of one row at a time.
void gemm_panels_by_vectors(const Gemm& g, int64_t panel0, int64_t panel1) {
  // n = 24, 40 (here only where their rows do not follow one another), 72, 88, 120, 184, 200
  // (MobileNetV3's early blocks) end on a panel of at most 8 real columns: it closes the last
  // group, the only one compiled with Half tiles. (One call site each: the tiles are inlined
  // into this function.)
  const int64_t last = g.n % kPanel;
  const bool half = panel1 * kPanel >= g.n && last != 0 && last <= kPanel / 2;
  const int64_t group = half ? panel1 - half_group(panel1 - panel0) : panel1;
  panel_groups<kPanels>(g, panel0, group, panel1, true);
  if (!half) return;
  const bool lead = group == panel0;
  if constexpr (kPanels >= 3) {
    if (panel1 - group == 3) return tile_rows<3, true>(g, group, panel1, lead);
  }
  if constexpr (kPanels >= 2) {
    if (panel1 - group == 2) return tile_rows<2, true>(g, group, panel1, lead);
  }
  tile_rows<1, true>(g, group, panel1, lead);
}

// The output columns of panels [panel0, panel1): in row pairs where they apply, else by vectors;
// a stream (Gemm::stream) goes with the first group of kPanels panels.
void gemm_panels(const Gemm& g, int64_t panel0, int64_t panel1) {
  if (g.stream_lines > 0 && panel1 - panel0 >= kPanels && (panel0 + kPanels) * kPanel <= g.n) {
    tile_rows_streaming<kPanels>(g, panel0);
    if (panel0 + kPanels == panel1) return;
    Gemm rest = g;
    rest.stream = nullptr, rest.stream_lines = 0;
    return gemm_panels(rest, panel0 + kPanels, panel1);
  }
#if FASTMB_GEMM_BYTES == 64
  const bool rows_follow = g.ldc == g.n && (g.residual == nullptr || g.ldr == g.n);
  if ((g.n == 24 || g.n == 40) && panel0 == 0 && panel1 * kPanel >= g.n && g.m >= 2 && rows_follow) {
    if (g.n == 24) pair_rows<3>(g);
    else pair_rows<5>(g);
    if (g.m % 2 == 0) return;
    Gemm last = g;  // an odd row count's last row
    last.a += (g.m - 1) * g.lda, last.c += (g.m - 1) * g.ldc, last.m = 1;
    if (g.residual != nullptr) last.residual += (g.m - 1) * g.ldr;
    return gemm_panels_by_vectors(last, panel0, panel1);
  }
#endif
  gemm_panels_by_vectors(g, panel0, panel1);
}

}  // namespace fastmb::cpu::pointwise::FASTMB_CPU_ISA
