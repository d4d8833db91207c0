// The depthwise conv's register tiles, compiled once per instruction set: included by passes.h
// in a translation unit that defines FASTMB_CPU_ISA (the namespace, so each instruction set's
// copies have names of their own) and FASTMB_CONV_BYTES (the sliding tiles' vector width).
//
// NHWC throughout: every innermost loop runs over contiguous channels. A conv row's results go
// to a Store (z, or y = act(z * scale + shift) for eval), so z never goes through memory twice.
#pragma once

#ifndef FASTMB_CPU_ISA
#error "tiles.h is compiled per instruction set: see kernels_*.cpp"
#endif

#include "../vec.h"  // after the translation unit's target pragma: its loops inline the ISA's lambdas
#include "kernels.h"

namespace fastmb::cpu::dwconv::FASTMB_CPU_ISA {

constexpr int kConvBytes = FASTMB_CONV_BYTES;

// Output pixels per sliding tile of the conv (conv_row_sliding): MobileNet's map widths (7 to
// 112) are multiples of 7, so 7-pixel tiles leave no lanes idle at 14 and 7 wide, where 8 did.
constexpr int kTilePixels = 7;

// Where the conv's results go, pixel p (from the row chunk's first) and channel c (from its
// first): z, or dL/dx.
template <typename Acc>
struct StoreValues {
  Acc* out;
  int64_t pixel_step;
  template <typename VT>  // a Vec<Acc, Bytes>::type
  FASTMB_INLINE void vector(int64_t p, int64_t c, VT v) const {
    Vec<Acc, sizeof(VT)>::store(out + p * pixel_step + c, v);
  }
  FASTMB_INLINE void scalar(int64_t p, int64_t c, Acc v) const { out[p * pixel_step + c] = v; }
  // A sliding tile's first `count` accumulators: pixels p0 + p, channels from c.
  template <int P, typename VT>
  FASTMB_INLINE void tile(int64_t p0, int64_t c, const VT (&acc)[P], int count) const {
    unroll<P>([&](auto p) __attribute__((always_inline)) {
      if (p < count) vector(p0 + p, c, acc[p]);
    });
  }
};

// Eval's store: y = act(z * scale + shift) as each tile's sums leave the registers. Channel c
// indexes scale and shift as it does the output row.
template <typename Acc>
struct StoreNormalized {
  Acc* out;
  int64_t pixel_step;
  const Acc *scale, *shift;
  ActivationFn<Acc> act;
  template <typename VT>
  FASTMB_INLINE void vector(int64_t p, int64_t c, VT z) const {
    using V = Vec<Acc, sizeof(VT)>;
    V::store(out + p * pixel_step + c, act(z * V::load(scale + c) + V::load(shift + c)));
  }
  FASTMB_INLINE void scalar(int64_t p, int64_t c, Acc z) const { out[p * pixel_step + c] = act(z * scale[c] + shift[c]); }
  // A sliding tile's first `count` accumulators (pixels p0 + p, channels from c), with the
  // channels' scale and shift loaded and the activation's bounds broadcast once for all of them:
  // per pixel, as `vector` does, they were reloaded after every store (which may alias them) and
  // took as long as a 3x3 conv's multiply-adds.
  template <int P, typename VT>
  FASTMB_INLINE void tile(int64_t p0, int64_t c, const VT (&acc)[P], int count) const {
    using V = Vec<Acc, sizeof(VT)>;
    const VT s = V::load(scale + c), b = V::load(shift + c);
    const VT offset = VT{} + act.offset, lo = VT{} + act.lo, hi = VT{} + act.hi;
    const auto store_all = [&](auto finish) __attribute__((always_inline)) {
      unroll<P>([&](auto p) __attribute__((always_inline)) {
        if (p >= count) return;
        const VT u = acc[p] * s + b;
        VT h = u + offset;
        h = h < lo ? lo : h;
        h = h > hi ? hi : h;
        V::store(out + (p0 + p) * pixel_step + c, finish(u, h));
      });
    };
    if (act.times_input) store_all([](VT u, VT h) __attribute__((always_inline)) { return u * h * Acc(1.0 / 6.0); });  // hardswish
    else store_all([](VT, VT h) __attribute__((always_inline)) { return h; });
  }
};

// Calls f(Int<q>{}, x) for the input vectors x (Bytes of channels) of columns q < Q from xp,
// `step` values apart, skipping those outside [q_lo, q_hi) unless Inside. The pointer steps
// column by column: precomputed offsets q * C would each need a register and spill (opaque
// keeps the compiler from hoisting them).
template <int Q, int Bytes, bool Inside, typename Acc, typename F>
FASTMB_INLINE void for_each_input_column(const Acc* xp, int64_t step, int q_lo, int q_hi, const F& f) {
  unroll<Q>([&](auto q) __attribute__((always_inline)) {
    const Acc* column = xp;
    xp = opaque(xp + step);
    if (!Inside && (q < q_lo || q >= q_hi)) return;
    f(q, Vec<Acc, Bytes>::load(column));
  });
}

// Stride 1 or 2 with dilation 1 (every MobileNet depthwise layer): P output pixels of a row for
// one vector (of Bytes) of channels from c, sliding along the input row. Each input vector is
// loaded once and feeds every (pixel, tap) pair that reads it, and the row's K weight vectors
// stay in registers, so loads stay below the multiply-adds. x_tap0 is pixel 0's tap (0, 0)
// input; input columns q < q_lo or >= q_hi (relative to it) are outside the image and read as
// zero; Inside: none are. Pixels >= count are computed but not stored.
template <int P, int Bytes, int K, int S, bool Inside, typename Acc, typename Store>
FASTMB_INLINE void conv_sliding_tile(const Store& store, int64_t p0, int count, const Acc* x_tap0, const Acc* w, const Geometry& g,
                                     int i_lo, int i_hi, int q_lo, int q_hi, int64_t c) {
  using V = Vec<Acc, Bytes>;
  constexpr int Q = (P - 1) * S + K;  // input columns the tile reads
  const int64_t row_step = int64_t(g.dh) * g.w * g.c;
  typename V::type acc[P] = {};
  for (int i = i_lo; i < i_hi; ++i) {
    const Acc* wp = w + int64_t(i) * K * g.c + c;  // stepped as the columns are
    typename V::type wv[K];
    unroll<K>([&](auto j) __attribute__((always_inline)) {
      wv[j] = V::load(wp);
      wp = opaque(wp + g.c);
    });
    for_each_input_column<Q, Bytes, Inside>(x_tap0 + i * row_step + c, g.c, q_lo, q_hi, [&](auto q, auto xv) __attribute__((always_inline)) {
      unroll<P>([&](auto p) __attribute__((always_inline)) {
        constexpr int j = decltype(q)::value - decltype(p)::value * S;
        if constexpr (j >= 0 && j < K) acc[p] += xv * wv[j];
      });
    });
  }
  store.tile(p0, c, acc, count);
}

// Two output rows (upper, lower = upper + 1) of P pixels per tile, stride S both ways, dilation 1,
// every kernel row inside the image: the K x K weight vectors and 2P accumulators stay in
// registers while the K + S input rows pass once, so the rows the two share (K - S of them) are
// loaded once. 1.1-1.5x the one-row tile's multiply-adds per second for 3x3 on AVX-512 (32
// registers; AVX2's 16 hold one row's tile only). Pixels >= count are computed but not stored.
template <int P, int Bytes, int K, int S, bool Inside, typename Acc, typename Store>
FASTMB_INLINE void conv_sliding_tile_pair(const Store& upper, const Store& lower, int64_t p0, int count, const Acc* x_tap0, const Acc* w,
                                          const Geometry& g, int q_lo, int q_hi, int64_t c) {
  using V = Vec<Acc, Bytes>;
  constexpr int Q = (P - 1) * S + K;
  typename V::type wv[K][K];
  const Acc* wp = w + c;
  unroll<K * K>([&](auto t) __attribute__((always_inline)) {
    wv[t / K][t % K] = V::load(wp);
    wp = opaque(wp + g.c);
  });
  typename V::type acc[2][P] = {};
  unroll<K + S>([&](auto r) __attribute__((always_inline)) {  // input row r: the upper row's tap r, the lower's r - S
    for_each_input_column<Q, Bytes, Inside>(x_tap0 + int64_t(r) * g.w * g.c + c, g.c, q_lo, q_hi, [&](auto q, auto xv) __attribute__((always_inline)) {
      unroll<P>([&](auto p) __attribute__((always_inline)) {
        constexpr int i = decltype(r)::value, j = decltype(q)::value - decltype(p)::value * S;
        if constexpr (j >= 0 && j < K && i < K) acc[0][p] += xv * wv[i][j];
        if constexpr (j >= 0 && j < K && i >= S) acc[1][p] += xv * wv[i - S][j];
      });
    });
  });
  upper.tile(p0, c, acc[0], count);
  lower.tile(p0, c, acc[1], count);
}

// Prefetches input columns [begin, end) (clamped to the image) of input row ih, channels
// c0..c0+nc, into L2 (prefetcht2: into L1 they hold the fill buffers the tiles' own loads wait
// for).
template <typename Acc>
FASTMB_INLINE void prefetch_columns(const Acc* x_img, const Geometry& g, int64_t ih, int64_t begin, int64_t end, int64_t c0, int64_t nc) {
  begin = std::max<int64_t>(begin, 0), end = std::min(end, g.w);
  constexpr int64_t kLine = 64 / sizeof(Acc);
  const Acc* row = x_img + ih * g.w * g.c + c0;
  if (nc == g.c) {  // the columns' channels are one contiguous range
    for (int64_t k = begin * g.c; k < end * g.c; k += kLine) __builtin_prefetch(row + k, 0, 1);
  } else {
    for (int64_t q = begin; q < end; ++q)
      for (int64_t k = 0; k < nc; k += kLine) __builtin_prefetch(row + q * g.c + k, 0, 1);
  }
}

// Prefetches, over input columns [begin, end), the input rows that output row oh + 1 reads and
// row oh does not (those inside the image): a row ahead covers every tile of a short row, where
// prefetching the row's next tile left out its first.
template <int K, typename Acc>
FASTMB_INLINE void prefetch_next_rows(const Acc* x_img, const Geometry& g, int64_t oh, int64_t begin, int64_t end, int64_t c0, int64_t nc) {
  if (oh + 1 >= g.ho) return;  // the image's last row (and (oh + 1) * stride stays within the padded input)
  for (int i = 0; i < K; ++i) {
    const int64_t ih = (oh + 1) * g.sh - g.ph + int64_t(i) * g.dh, offset = ih - (oh * g.sh - g.ph);
    if (ih >= 0 && ih < g.h && !(offset % g.dh == 0 && offset / g.dh < K)) prefetch_columns(x_img, g, ih, begin, end, c0, nc);
  }
}

// Whether the sliding tiles prefetch the input rows ahead of them: each channel vector reads one
// piece of every column, a pattern the hardware prefetchers follow with one cache line per pixel
// but not always with more. Inputs under 12 MB mostly sit in L3, where prefetching cost time
// (bench/results/2026-11-30-cpu-dwconv-tuning.md).
template <typename Acc>
FASTMB_INLINE bool prefetches_columns(const Geometry& g, int64_t nc) {
  const int64_t pixel_bytes = nc * int64_t(sizeof(Acc)), input_bytes = g.n * g.h * g.w * g.c * int64_t(sizeof(Acc));
  return pixel_bytes > 64 && input_bytes >= (int64_t(12) << 20);
}

// Calls tile(c, Int<Bytes>{}) over channels [0, nc) in vectors of Bytes, the last overlapping
// the one before where nc is not a multiple of the vector (the tiles store values, so storing
// some twice is harmless); for nc below one vector, in 32-byte vectors alike. Returns the first
// channel no vector covered: nc, or 0 below one 32-byte vector.
template <int Bytes, typename Acc, typename Tile>
FASTMB_INLINE int64_t overlapping_channel_tiles(int64_t nc, const Tile& tile) {
  constexpr int64_t lanes = Vec<Acc, Bytes>::kLanes;
  if (nc >= lanes) {
    int64_t c = 0;
    for (; c + lanes <= nc; c += lanes) tile(c, Int<Bytes>{});
    if (c < nc) tile(nc - lanes, Int<Bytes>{});
    return nc;
  }
  if constexpr (Bytes > 32) return overlapping_channel_tiles<32, Acc>(nc, tile);
  return 0;
}

// Where one sliding tile of row oh lies: output pixels [p0, p0 + count), their first tap's input
// column iw0 and input (x_tap0, channels from c0), and the input columns [q_lo, q_hi) relative
// to it inside the image. compiled(f) calls f(Int<tile pixels>{}, std::bool_constant<Inside>{}):
// P pixels, or P / 2 for a short tail, with or without the out-of-image column checks.
template <int P, typename Acc>
struct SlidingTile {
  int64_t p0;
  int count;
  int64_t iw0;
  const Acc* x_tap0;
  int q_lo, q_hi;
  bool whole, inside;
  template <typename F>
  FASTMB_INLINE void compiled(const F& f) const {
    if (whole && inside) f(Int<P>{}, std::true_type{});
    else if (whole) f(Int<P>{}, std::false_type{});
    else if (inside) f(Int<P / 2>{}, std::true_type{});
    else f(Int<P / 2>{}, std::false_type{});
  }
};

// Calls f(SlidingTile) for the tiles of kTilePixels covering output pixels [ow0, ow0 + count)
// of row oh (stride S along the row, dilation 1), channels from c0.
template <int K, int S, typename Acc, typename F>
FASTMB_INLINE void for_each_sliding_tile(const Acc* x_img, const Geometry& g, int64_t oh, int64_t ow0, int64_t count, int64_t c0, const F& f) {
  constexpr int P = kTilePixels;
  constexpr int64_t Q = (P - 1) * S + K;  // input columns a whole tile reads
  for (int64_t p0 = 0; p0 < count; p0 += P) {
    const int tile = int(std::min<int64_t>(P, count - p0));
    const int64_t iw0 = (ow0 + p0) * S - g.pw;
    const int q_lo = int(std::clamp<int64_t>(-iw0, 0, Q)), q_hi = int(std::clamp<int64_t>(g.w - iw0, 0, Q));
    const bool whole = tile > P / 2, inside = q_lo == 0 && q_hi == (whole ? P - 1 : P / 2 - 1) * S + K;
    f(SlidingTile<P, Acc>{p0, tile, iw0, x_img + ((oh * g.sh - g.ph) * g.w + iw0) * g.c + c0, q_lo, q_hi, whole, inside});
  }
}

// Output pixels [ow0, ow0 + count) of row oh, channels c0..c0+nc, by sliding tiles and a vector
// of kConvBytes (overlapping_channel_tiles); channel by channel where nc is below one 32-byte
// vector.
template <int K, int S, typename Acc, typename Store>
FASTMB_INLINE void conv_row_sliding(const Store& store, const Acc* x_img, const Acc* w, const Geometry& g, int i_lo, int i_hi, int64_t oh,
                                    int64_t ow0, int64_t count, int64_t c0, int64_t nc) {
  const bool prefetch = prefetches_columns<Acc>(g, nc);
  for_each_sliding_tile<K, S>(x_img, g, oh, ow0, count, c0, [&](const auto& t) __attribute__((always_inline)) {
    // The next row's new input rows under this tile, requested a row ahead.
    if (prefetch) prefetch_next_rows<K>(x_img, g, oh, t.iw0, t.iw0 + (t.count - 1) * S + K, c0, nc);
    const auto tile_at = [&](int64_t c, auto bytes) __attribute__((always_inline)) {
      t.compiled([&](auto pixels, auto inside) __attribute__((always_inline)) {
        conv_sliding_tile<pixels, bytes, K, S, inside>(store, t.p0, t.count, t.x_tap0, w + c0, g, i_lo, i_hi, t.q_lo, t.q_hi, c);
      });
    };
    for (int64_t c = overlapping_channel_tiles<kConvBytes, Acc>(nc, tile_at); c < nc; ++c)
      for (int p = 0; p < t.count; ++p) {
        Acc sum = 0;
        for (int i = i_lo; i < i_hi; ++i)
          for (int j = std::max(0, t.q_lo - p * S); j < std::min(K, t.q_hi - p * S); ++j)
            sum += t.x_tap0[(int64_t(i) * g.dh * g.w + p * S + j) * g.c + c] * w[(int64_t(i) * K + j) * g.c + c0 + c];
        store.scalar(t.p0 + p, c, sum);
      }
  });
}

// Zeros that out-of-image taps read instead of the input (at least two vectors of any dtype).
template <typename Acc>
struct Zeros {
  alignas(64) static inline const Acc values[64] = {};
};

// Any stride and dilation: the conv at P output pixels of one row (pixel_step apart in the input)
// for NV vectors of channels from c. x_tap0 points at pixel 0's tap (0, 0) input; kernel rows
// [i_lo, i_hi) are inside the image for all P pixels, columns [j_lo[p], j_hi[p]) for pixel p
// (the others read zeros); Inside: every column is, for every pixel (compiled without the
// per-pixel selects). The P x NV accumulators stay in registers over all taps.
template <int P, int NV, bool Inside, typename Acc, typename Store>
FASTMB_INLINE void conv_tile(const Store& store, int64_t p0, const Acc* x_tap0, int64_t pixel_step, const Acc* w, const Geometry& g, int i_lo,
                             int i_hi, const int* j_lo, const int* j_hi, int64_t c) {
  using V = Vec<Acc>;
  const int kw = g.kw;
  int j_min = Inside ? 0 : j_lo[0], j_max = Inside ? kw : j_hi[0];
  for (int p = 1; p < P && !Inside; ++p) j_min = std::min(j_min, j_lo[p]), j_max = std::max(j_max, j_hi[p]);
  const int64_t row_step = int64_t(g.dh) * g.w * g.c, column_step = int64_t(g.dw) * g.c;
  typename V::type acc[P][NV] = {};
  for (int i = i_lo; i < i_hi; ++i) {
    const Acc* x_row = x_tap0 + i * row_step + c;
    const Acc* w_row = w + int64_t(i) * kw * g.c + c;
#pragma GCC unroll 8
    for (int j = j_min; j < j_max; ++j) {
      const Acc* xp = x_row + j * column_step;
      const Acc* wp = w_row + int64_t(j) * g.c;
      typename V::type wv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) wv[v] = V::load(wp + v * V::kLanes);
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) {
        const Acc* src = Inside || (j >= j_lo[p] && j < j_hi[p]) ? xp + p * pixel_step : Zeros<Acc>::values;
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[p][v] += V::load(src + v * V::kLanes) * wv[v];
      }
    }
  }
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store.vector(p0 + p, c + v * V::kLanes, acc[p][v]);
}

// Channels [0, nc) of P pixels from p0: vector tiles of 2 and 1 vectors, then a scalar loop.
template <int P, bool Inside, typename Acc, typename Store>
FASTMB_INLINE void conv_pixels(const Store& store, int64_t p0, int64_t nc, const Acc* x_tap0, int64_t pixel_step, const Acc* w,
                               const Geometry& g, int i_lo, int i_hi, const int* j_lo, const int* j_hi) {
  constexpr int64_t L = Vec<Acc>::kLanes;
  const int kw = g.kw;
  int64_t c = 0;
  for (; c + 2 * L <= nc; c += 2 * L) conv_tile<P, 2, Inside>(store, p0, x_tap0, pixel_step, w, g, i_lo, i_hi, j_lo, j_hi, c);
  for (; c + L <= nc; c += L) conv_tile<P, 1, Inside>(store, p0, x_tap0, pixel_step, w, g, i_lo, i_hi, j_lo, j_hi, c);
  for (; c < nc; ++c) {
    for (int p = 0; p < P; ++p) {
      Acc sum = 0;
      for (int i = i_lo; i < i_hi; ++i)
        for (int j = j_lo[p]; j < j_hi[p]; ++j)
          sum += x_tap0[p * pixel_step + (int64_t(i) * g.dh * g.w + int64_t(j) * g.dw) * g.c + c] * w[(int64_t(i) * kw + j) * g.c + c];
      store.scalar(p0 + p, c, sum);
    }
  }
}

// Any geometry: four output pixels of the row at a time, then one at a time.
template <typename Acc, typename Store>
FASTMB_INLINE void conv_row_general(const Store& store, const Acc* x_img, const Acc* w, const Geometry& g, int i_lo, int i_hi, int64_t oh,
                                    int64_t ow0, int64_t count, int64_t c0, int64_t nc) {
  constexpr int kTile = 4;
  const int64_t pixel_step = int64_t(g.sw) * g.c;
  int j_lo[kTile], j_hi[kTile];
  for (int64_t p = 0; p < count;) {
    const int tile = p + kTile <= count ? kTile : 1;
    bool inside = true;
    for (int t = 0; t < tile; ++t) {
      const int64_t iw0 = (ow0 + p + t) * g.sw - g.pw;
      j_lo[t] = 0, j_hi[t] = g.kw;
      while (j_lo[t] < g.kw && iw0 + int64_t(j_lo[t]) * g.dw < 0) ++j_lo[t];
      while (j_hi[t] > j_lo[t] && iw0 + int64_t(j_hi[t] - 1) * g.dw >= g.w) --j_hi[t];
      inside = inside && j_lo[t] == 0 && j_hi[t] == g.kw;
    }
    // Pixel p's tap (0, 0) input, possibly outside the image: only valid taps are read.
    const Acc* x_tap0 = x_img + ((oh * g.sh - g.ph) * g.w + (ow0 + p) * g.sw - g.pw) * g.c + c0;
    if (tile == kTile && inside) {
      conv_pixels<kTile, true>(store, p, nc, x_tap0, pixel_step, w + c0, g, i_lo, i_hi, j_lo, j_hi);
    } else if (tile == kTile) {
      conv_pixels<kTile, false>(store, p, nc, x_tap0, pixel_step, w + c0, g, i_lo, i_hi, j_lo, j_hi);
    } else {
      conv_pixels<1, false>(store, p, nc, x_tap0, pixel_step, w + c0, g, i_lo, i_hi, j_lo, j_hi);
    }
    p += tile;
  }
}

// The depthwise conv at output pixels (oh, ow0 + p), p < count, channels c0..c0+nc of one image
// (out-of-image taps read zeros), handed to `store`. K = 3, 5, 7 (stride 1 or 2, dilation 1
// along the row: select_kernels sees to it): sliding tiles; K = 0, any geometry: the general
// conv. Out of line: the passes that store z share one copy.
template <int K, typename Acc, typename Store>
__attribute__((noinline)) void conv_row(const Store& store, const Acc* x_img, const Acc* w, const Geometry& g, int64_t oh, int64_t ow0,
                                        int64_t count, int64_t c0, int64_t nc) {
  const int kh = K ? K : g.kh;
  int i_lo = 0, i_hi = kh;
  while (i_lo < kh && oh * g.sh - g.ph + int64_t(i_lo) * g.dh < 0) ++i_lo;
  while (i_hi > i_lo && oh * g.sh - g.ph + int64_t(i_hi - 1) * g.dh >= g.h) --i_hi;
  if constexpr (K == 0) {
    conv_row_general(store, x_img, w, g, i_lo, i_hi, oh, ow0, count, c0, nc);
  } else if (g.sw == 1) {
    conv_row_sliding<K, 1>(store, x_img, w, g, i_lo, i_hi, oh, ow0, count, c0, nc);
  } else {
    conv_row_sliding<K, 2>(store, x_img, w, g, i_lo, i_hi, oh, ow0, count, c0, nc);
  }
}

// Output rows oh and oh + 1 by two-row sliding tiles (conv_sliding_tile_pair), pixels
// [ow0, ow0 + count), channels c0..c0+nc (at least one vector of kConvBytes), every kernel row
// inside.
template <int K, int S, typename Acc, typename Store>
FASTMB_INLINE void conv_row_pair_sliding(const Store& upper, const Store& lower, const Acc* x_img, const Acc* w, const Geometry& g, int64_t oh,
                                         int64_t ow0, int64_t count, int64_t c0, int64_t nc) {
  constexpr int P = kTilePixels;
  for_each_sliding_tile<K, S>(x_img, g, oh, ow0, count, c0, [&](const auto& t) __attribute__((always_inline)) {
    overlapping_channel_tiles<kConvBytes, Acc>(nc, [&](int64_t c, auto bytes) __attribute__((always_inline)) {
      // Two variants, not SlidingTile's eight (short tails and 32-byte vectors too): these tiles
      // are large when unrolled, and all of them doubled the AVX-512 table's compile time. A
      // short tail runs as a whole tile with the column checks (its extra pixels are not
      // stored); conv_row_pair sends at least one vector of kConvBytes.
      if constexpr (decltype(bytes)::value == kConvBytes) {
        if (t.whole && t.inside) conv_sliding_tile_pair<P, kConvBytes, K, S, true>(upper, lower, t.p0, t.count, t.x_tap0, w + c0, g, t.q_lo, t.q_hi, c);
        else conv_sliding_tile_pair<P, kConvBytes, K, S, false>(upper, lower, t.p0, t.count, t.x_tap0, w + c0, g, t.q_lo, t.q_hi, c);
      }
    });
  });
}

// Output rows oh and oh + 1 (as conv_row, to `upper` and `lower`): by two-row tiles for 3x3 with
// the same stride both ways and dilation 1 on AVX-512 where both rows' taps are inside the image,
// there is a vector of channels and the input is not streamed from memory (prefetches_columns:
// there the pair's five input rows at stride 2 ran 1.3x slower than one row's three), else a row
// at a time.
template <int K, typename Acc, typename Store>
__attribute__((noinline)) void conv_row_pair(const Store& upper, const Store& lower, const Acc* x_img, const Acc* w, const Geometry& g,
                                             int64_t oh, int64_t ow0, int64_t count, int64_t c0, int64_t nc) {
  if constexpr (K == 3 && kConvBytes == 64) {
    const bool inside = oh * g.sh - g.ph >= 0 && (oh + 1) * g.sh - g.ph + K <= g.h;
    if (inside && g.dh == 1 && g.sh == g.sw && nc >= Vec<Acc, kConvBytes>::kLanes && !prefetches_columns<Acc>(g, nc)) {
      if (g.sw == 1) conv_row_pair_sliding<K, 1>(upper, lower, x_img, w, g, oh, ow0, count, c0, nc);
      else conv_row_pair_sliding<K, 2>(upper, lower, x_img, w, g, oh, ow0, count, c0, nc);
      return;
    }
  }
  conv_row<K>(upper, x_img, w, g, oh, ow0, count, c0, nc);
  conv_row<K>(lower, x_img, w, g, oh + 1, ow0, count, c0, nc);
}

// Output row oh alone (rows = 1) or rows oh and oh + 1 (rows = 2), row oh + r to store_at(r):
// the passes walk their rows in pairs.
template <int K, typename Acc, typename StoreAt>
FASTMB_INLINE void conv_rows(int64_t rows, const StoreAt& store_at, const Acc* x_img, const Acc* w, const Geometry& g, int64_t oh, int64_t ow0,
                             int64_t count, int64_t c0, int64_t nc) {
  if (rows == 2) conv_row_pair<K>(store_at(0), store_at(1), x_img, w, g, oh, ow0, count, c0, nc);
  else conv_row<K>(store_at(0), x_img, w, g, oh, ow0, count, c0, nc);
}

}  // namespace fastmb::cpu::dwconv::FASTMB_CPU_ISA
