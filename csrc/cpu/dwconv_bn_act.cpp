// Fused depthwise conv + BatchNorm + activation on the CPU, forward and backward.
//
// NHWC throughout (other layouts are converted on entry): z is accumulated tap by tap over a
// chunk of output pixels held in L1, every innermost loop runs over contiguous channels and
// vectorises; z = conv(x) is never saved for backward (DESIGN.md's plan):
//   eval forward      one pass: y = act(z * scale + shift) as the conv's tiles store z (BN folded
//                     per channel)
//   train forward     pass 1: z, stored (in y when it is float), and its per-channel mean and
//                     M2 (two-pass per chunk, Chan merges); pass 2: y = act(z * scale + shift)
//   backward          pass 1: z per chunk and the sums of dL/du and dL/du * x_hat per channel;
//                     pass 2, per (image, channel block): z again, dL/dz into a task buffer, the
//                     weight gradient (sums held in registers along each row, per-thread
//                     partials), then dL/dx from dL/dz: a conv with the flipped kernel (stride
//                     1), sub-pixel sliding tiles (stride 2), else a gather over the taps
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_utils.h"

namespace fastmb::cpu {
namespace {

using at::Tensor;

// Channels per backward pass-2 task when whole images would not share out evenly between the
// threads (pass 2 runs per image, or per image and channel block).
constexpr int64_t kBlock = 64;
// Accumulators per row chunk: a chunk of output pixels times the channels, kept in L1.
constexpr int64_t kChunkValues = 4096;

template <int V>
using Int = std::integral_constant<int, V>;

// Output pixels per sliding tile of the conv (conv_row_sliding): MobileNet's map widths (7 to
// 112) are multiples of 7, so 7-pixel tiles leave no lanes idle at 14 and 7 wide, where 8 did.
constexpr int kTilePixels = 7;

// Output pixels per chunk when each holds `channels` accumulators: a multiple of the sliding tile.
FASTMB_INLINE int64_t chunk_pixels(int64_t channels) {
  return std::max<int64_t>(kTilePixels, kChunkValues / std::max<int64_t>(channels, 1) / kTilePixels * kTilePixels);
}

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

// The output positions [lo, hi) whose input position o * stride - pad + tap * dil lies in [0, size).
FASTMB_INLINE void valid_outputs(int tap, int stride, int pad, int dil, int64_t size, int64_t out_lo, int64_t out_hi,
                                 int64_t& lo, int64_t& hi) {
  const int64_t offset = int64_t(tap) * dil - pad;  // input = o * stride + offset
  lo = std::max<int64_t>(out_lo, offset >= 0 ? 0 : (-offset + stride - 1) / stride);
  hi = std::min<int64_t>(out_hi, size - 1 - offset < 0 ? 0 : (size - 1 - offset) / stride + 1);
  if (hi < lo) hi = lo;
}

// Where the conv's results go, pixel p (from the row chunk's first) and channel c (from its
// first): z (or, for dL/dx, the values in T).
template <typename T, typename Acc>
struct StoreValues {
  T* out;
  int64_t pixel_step;
  template <typename VT>  // a Vec<Acc, Bytes>::type
  FASTMB_INLINE void vector(int64_t p, int64_t c, VT v) const {
    Vec<Acc, sizeof(VT)>::store(out + p * pixel_step + c, v);
  }
  FASTMB_INLINE void scalar(int64_t p, int64_t c, Acc v) const { out[p * pixel_step + c] = T(v); }
};

// Stride 1 or 2 with dilation 1 (every MobileNet depthwise layer): P output pixels of a row for
// one vector (of Bytes) of channels from c, sliding along the input row. Each input vector is
// loaded once and feeds every (pixel, tap) pair that reads it, and the row's K weight vectors
// stay in registers, so loads stay below the multiply-adds. x_tap0 is pixel 0's tap (0, 0)
// input; input columns q < q_lo or >= q_hi (relative to it) are outside the image and read as
// zero; Inside: none are. Pixels >= count are computed but not stored.
template <int P, int Bytes, int K, int S, bool Inside, typename T, typename Acc, typename Store>
FASTMB_INLINE void conv_sliding_tile(const Store& store, int64_t p0, int count, const T* x_tap0, const Acc* w, const Geometry& g,
                                     int i_lo, int i_hi, int q_lo, int q_hi, int64_t c) {
  using V = Vec<Acc, Bytes>;
  constexpr int Q = (P - 1) * S + K;  // input columns the tile reads
  const int64_t row_step = int64_t(g.dh) * g.w * g.c;
  typename V::type acc[P] = {};
  for (int i = i_lo; i < i_hi; ++i) {
    // Pointers stepped column by column: precomputed offsets q * C would each need a register
    // and spill (opaque keeps the compiler from hoisting them).
    const Acc* wp = w + int64_t(i) * K * g.c + c;
    typename V::type wv[K];
    unroll<K>([&](auto j) __attribute__((always_inline)) {
      wv[j] = V::load(wp);
      wp = opaque(wp + g.c);
    });
    const T* xp = x_tap0 + i * row_step + c;
    unroll<Q>([&](auto q) __attribute__((always_inline)) {
      const T* column = xp;
      xp = opaque(xp + g.c);
      if (!Inside && (q < q_lo || q >= q_hi)) return;
      const typename V::type xv = V::load(column);
      unroll<P>([&](auto p) __attribute__((always_inline)) {
        constexpr int j = decltype(q)::value - decltype(p)::value * S;
        if constexpr (j >= 0 && j < K) acc[p] += xv * wv[j];
      });
    });
  }
  unroll<P>([&](auto p) __attribute__((always_inline)) {
    if (p < count) store.vector(p0 + p, c, acc[p]);
  });
}

// Prefetches input columns [begin, end) (clamped to the image) of input row ih, channels
// c0..c0+nc, into L2 (prefetcht2: in-process A/B, fp32 batch 16, over 14-51 MB inputs,
// 0.67-0.87x the time of prefetcht0 in eval (one run at 1.01x) and 0.80-0.96x in training;
// likely because into L1 they hold the fill buffers the tile's own loads wait for).
template <typename T>
FASTMB_INLINE void prefetch_columns(const T* x_img, const Geometry& g, int64_t ih, int64_t begin, int64_t end, int64_t c0, int64_t nc) {
  begin = std::max<int64_t>(begin, 0), end = std::min(end, g.w);
  constexpr int64_t kLine = 64 / sizeof(T);
  const T* row = x_img + ih * g.w * g.c + c0;
  if (nc == g.c) {  // the columns' channels are one contiguous range
    for (int64_t k = begin * g.c; k < end * g.c; k += kLine) __builtin_prefetch(row + k, 0, 1);
  } else {
    for (int64_t q = begin; q < end; ++q)
      for (int64_t k = 0; k < nc; k += kLine) __builtin_prefetch(row + q * g.c + k, 0, 1);
  }
}

// Prefetches, over input columns [begin, end), the input rows that output row oh + 1 reads and
// row oh does not (those inside the image). A row ahead covers every tile of a short row, where
// prefetching the row's next tile left out its first. In-process A/B against that, fp32 batch
// 16, eval and training, three runs, the four MobileNetV3 inputs above the gate (13-51 MB):
// median 0.96x the time; 0.91x on C72 and C72-k5-s2 at 56x56, 1.02x on C64-s2 and C16 at
// 112x112. C240-s2 (12.0 MB, under the gate, so unchanged) gave 0.88-1.08x in the same runs:
// the gain is within the noise except on the 56x56 maps.
template <int K, typename T>
FASTMB_INLINE void prefetch_next_rows(const T* x_img, const Geometry& g, int64_t oh, int64_t begin, int64_t end, int64_t c0, int64_t nc) {
  for (int i = 0; i < K; ++i) {
    const int64_t ih = (oh + 1) * g.sh - g.ph + int64_t(i) * g.dh, offset = ih - (oh * g.sh - g.ph);
    if (ih >= 0 && ih < g.h && !(offset % g.dh == 0 && offset / g.dh < K)) prefetch_columns(x_img, g, ih, begin, end, c0, nc);
  }
}

// Whether the sliding tiles prefetch the input rows ahead of them: each channel vector reads one
// piece of every column, a pattern the hardware prefetchers follow with one cache line per
// pixel but not always with more. Measured (fp32, batch 16, in-process A/B, prefetcht0):
// inputs of 14 MB and more (56x56 and 112x112 maps, 64 to 144 channels) 1.03-1.24x faster,
// forward and backward; 4 to 8 MB inputs (28x28 and 14x14 maps, 88 to 960 channels)
// 0.91-1.02x. With prefetcht2, 6 to 12 MB inputs still took 0.98-1.34x the time with it, and
// with the row-ahead prefetch 0.81-1.28x (2 to 8 MB inputs, one run): they mostly sit in L3.
template <typename T>
FASTMB_INLINE bool prefetches_columns(const Geometry& g, int64_t nc) {
  const int64_t pixel_bytes = nc * int64_t(sizeof(T)), input_bytes = g.n * g.h * g.w * g.c * int64_t(sizeof(T));
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

// Output pixels [ow0, ow0 + count) of row oh, channels c0..c0+nc, by sliding tiles of P pixels
// (P / 2 for a short tail) and a vector of Bytes (overlapping_channel_tiles); channel by
// channel where nc is below one 32-byte vector.
template <int K, int S, int Bytes, typename T, typename Acc, typename Store>
FASTMB_INLINE void conv_row_sliding(const Store& store, const T* x_img, const Acc* w, const Geometry& g, int i_lo, int i_hi, int64_t oh,
                                    int64_t ow0, int64_t count, int64_t c0, int64_t nc) {
  constexpr int P = kTilePixels;
  const bool prefetch = prefetches_columns<T>(g, nc);
  for (int64_t p0 = 0; p0 < count; p0 += P) {
    const int tile = int(std::min<int64_t>(P, count - p0));
    const int64_t iw0 = (ow0 + p0) * S - g.pw;  // input column of pixel p0's tap 0
    // The next row's new input rows under this tile, requested a row ahead.
    if (prefetch) prefetch_next_rows<K>(x_img, g, oh, iw0, iw0 + (tile - 1) * S + K, c0, nc);
    const T* x_tap0 = x_img + ((oh * g.sh - g.ph) * g.w + iw0) * g.c + c0;
    const int q_lo = int(std::max<int64_t>(0, -iw0)), q_hi = int(std::min<int64_t>((P - 1) * S + K, g.w - iw0));
    const bool whole = tile > P / 2, inside = q_lo == 0 && q_hi == (whole ? P - 1 : P / 2 - 1) * S + K;
    const auto tile_at = [&](int64_t c, auto bytes) __attribute__((always_inline)) {
      constexpr int B = decltype(bytes)::value;
      if (whole && inside) conv_sliding_tile<P, B, K, S, true>(store, p0, tile, x_tap0, w + c0, g, i_lo, i_hi, q_lo, q_hi, c);
      else if (whole) conv_sliding_tile<P, B, K, S, false>(store, p0, tile, x_tap0, w + c0, g, i_lo, i_hi, q_lo, q_hi, c);
      else if (inside) conv_sliding_tile<P / 2, B, K, S, true>(store, p0, tile, x_tap0, w + c0, g, i_lo, i_hi, q_lo, q_hi, c);
      else conv_sliding_tile<P / 2, B, K, S, false>(store, p0, tile, x_tap0, w + c0, g, i_lo, i_hi, q_lo, q_hi, c);
    };
    for (int64_t c = overlapping_channel_tiles<Bytes, Acc>(nc, tile_at); c < nc; ++c)
      for (int p = 0; p < tile; ++p) {
        Acc sum = 0;
        for (int i = i_lo; i < i_hi; ++i)
          for (int j = std::max(0, q_lo - p * S); j < std::min(K, q_hi - p * S); ++j)
            sum += Acc(x_tap0[(int64_t(i) * g.dh * g.w + p * S + j) * g.c + c]) * w[(int64_t(i) * K + j) * g.c + c0 + c];
        store.scalar(p0 + p, c, sum);
      }
  }
}

// Zeros that out-of-image taps read instead of the input (at least two vectors of any dtype).
template <typename T>
struct Zeros {
  alignas(64) static inline const T values[64] = {};
};

// Any stride and dilation: the conv at P output pixels of one row (pixel_step apart in the input)
// for NV vectors of channels from c. x_tap0 points at pixel 0's tap (0, 0) input; kernel rows
// [i_lo, i_hi) are inside the image for all P pixels, columns [j_lo[p], j_hi[p]) for pixel p
// (the others read zeros); Inside: every column is, for every pixel (compiled without the
// per-pixel selects). The P x NV accumulators stay in registers over all taps.
template <int P, int NV, bool Inside, typename T, typename Acc, typename Store>
FASTMB_INLINE void conv_tile(const Store& store, int64_t p0, const T* x_tap0, int64_t pixel_step, const Acc* w, const Geometry& g, int i_lo,
                             int i_hi, const int* j_lo, const int* j_hi, int64_t c) {
  using V = Vec<Acc>;
  const int kw = g.kw;
  int j_min = Inside ? 0 : j_lo[0], j_max = Inside ? kw : j_hi[0];
  for (int p = 1; p < P && !Inside; ++p) j_min = std::min(j_min, j_lo[p]), j_max = std::max(j_max, j_hi[p]);
  const int64_t row_step = int64_t(g.dh) * g.w * g.c, column_step = int64_t(g.dw) * g.c;
  typename V::type acc[P][NV] = {};
  for (int i = i_lo; i < i_hi; ++i) {
    const T* x_row = x_tap0 + i * row_step + c;
    const Acc* w_row = w + int64_t(i) * kw * g.c + c;
#pragma GCC unroll 8
    for (int j = j_min; j < j_max; ++j) {
      const T* xp = x_row + j * column_step;
      const Acc* wp = w_row + int64_t(j) * g.c;
      typename V::type wv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) wv[v] = V::load(wp + v * V::kLanes);
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) {
        const T* src = Inside || (j >= j_lo[p] && j < j_hi[p]) ? xp + p * pixel_step : Zeros<T>::values;
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
template <int P, bool Inside, typename T, typename Acc, typename Store>
FASTMB_INLINE void conv_pixels(const Store& store, int64_t p0, int64_t nc, const T* x_tap0, int64_t pixel_step, const Acc* w,
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
          sum += Acc(x_tap0[p * pixel_step + (int64_t(i) * g.dh * g.w + int64_t(j) * g.dw) * g.c + c]) * w[(int64_t(i) * kw + j) * g.c + c];
      store.scalar(p0 + p, c, sum);
    }
  }
}

// Any geometry: four output pixels of the row at a time, then one at a time.
template <typename T, typename Acc, typename Store>
FASTMB_INLINE void conv_row_general(const Store& store, const T* x_img, const Acc* w, const Geometry& g, int i_lo, int i_hi, int64_t oh,
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
    const T* x_tap0 = x_img + ((oh * g.sh - g.ph) * g.w + (ow0 + p) * g.sw - g.pw) * g.c + c0;
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

// conv_row_sliding at the geometry's stride (1 or 2).
template <int K, int Bytes, typename T, typename Acc, typename Store>
FASTMB_INLINE void conv_row_sliding_strides(const Store& store, const T* x_img, const Acc* w, const Geometry& g, int i_lo, int i_hi,
                                            int64_t oh, int64_t ow0, int64_t count, int64_t c0, int64_t nc) {
  if (g.sw == 1) conv_row_sliding<K, 1, Bytes>(store, x_img, w, g, i_lo, i_hi, oh, ow0, count, c0, nc);
  else conv_row_sliding<K, 2, Bytes>(store, x_img, w, g, i_lo, i_hi, oh, ow0, count, c0, nc);
}

// Whether the AVX-512 tiles (conv_row_avx512, grad_x_stride2_avx512) serve geometry g: where the
// CPU has the registers, and at stride 2 only with whole 16-lane vectors per pixel. Stride-2
// tiles make ~2 multiply-adds per load, and with part vectors every other pixel's 64-byte loads
// would cross a cache line (C72-k5-s2 took 1.09-1.33x the time of 8-lane vectors; C240-k3-s2,
// whole vectors, 0.74x).
inline bool avx512_tiles_serve(const Geometry& g) { return has_32_vector_registers() && (g.sw == 1 || g.c % 16 == 0); }

// The sliding tiles in AVX-512 registers, 7 pixels x 16 lanes (for K = 3, 8 pixels x 8 lanes,
// 8 chains of 9 dependent multiply-adds, had left the multiply-add pipes waiting). Measured on
// a 2-core Zen 4, fp32, V3-Large's shapes at batch 16 and 1: against one 8-lane vector, eval
// 0.84x the time (geomean; K = 5 0.82-0.90x); against two for K = 3 and one for K = 5, eval
// 0.91x, train forward 0.96x, backward 0.94x.
template <int K, typename T, typename Acc, typename Store>
FASTMB_AVX512 void conv_row_avx512(const Store& store, const T* x_img, const Acc* w, const Geometry& g, int i_lo, int i_hi, int64_t oh,
                                   int64_t ow0, int64_t count, int64_t c0, int64_t nc) {
  conv_row_sliding_strides<K, 64>(store, x_img, w, g, i_lo, i_hi, oh, ow0, count, c0, nc);
}

// The depthwise conv at output pixels (oh, ow0 + p), p < count, channels c0..c0+nc of one image
// (out-of-image taps read zeros), handed to `store`. K = 3, 5, 7 (stride 1 or 2, dilation 1
// along the row: dispatch_kernel_size sees to it): sliding tiles, in AVX-512 registers where
// the CPU has them; K = 0, any geometry: the general path. Out of line: the passes that store z
// share one copy.
template <int K, typename T, typename Acc, typename Store>
FASTMB_MULTIVERSION void conv_row(const Store& store, const T* x_img, const Acc* w, Geometry g, int64_t oh, int64_t ow0, int64_t count,
                                  int64_t c0, int64_t nc) {
  const int kh = K ? K : g.kh;
  int i_lo = 0, i_hi = kh;
  while (i_lo < kh && oh * g.sh - g.ph + int64_t(i_lo) * g.dh < 0) ++i_lo;
  while (i_hi > i_lo && oh * g.sh - g.ph + int64_t(i_hi - 1) * g.dh >= g.h) --i_hi;
  if constexpr (K == 0) {
    conv_row_general(store, x_img, w, g, i_lo, i_hi, oh, ow0, count, c0, nc);
  } else {
    if constexpr (kAvx512Loops) {
      if (avx512_tiles_serve(g)) return conv_row_avx512<K>(store, x_img, w, g, i_lo, i_hi, oh, ow0, count, c0, nc);
    }
    conv_row_sliding_strides<K, 32>(store, x_img, w, g, i_lo, i_hi, oh, ow0, count, c0, nc);
  }
}

// Calls f(std::integral_constant<Activation, A>) with the activation as a compile-time constant.
template <typename F>
FASTMB_INLINE void dispatch_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::kHardswish: f(std::integral_constant<Activation, Activation::kHardswish>{}); break;
    case Activation::kRelu: f(std::integral_constant<Activation, Activation::kRelu>{}); break;
    case Activation::kRelu6: f(std::integral_constant<Activation, Activation::kRelu6>{}); break;
    default: f(std::integral_constant<Activation, Activation::kIdentity>{});
  }
}

// y[p][k] = act(z[p][k] * scale[k] + shift[k]) over `pixels` x `c` stored z values (train pass
// 2, where y and z may be the same memory), in vectors of channels.
template <typename T, typename Acc>
FASTMB_MULTIVERSION void normalize_stored(T* y, const Acc* z, const Acc* scale, const Acc* shift, Activation act, int64_t pixels,
                                          int64_t c) {
  using V = Vec<Acc>;
  constexpr int64_t L = V::kLanes;
  dispatch_activation(act, [&](auto activation) {
    constexpr Activation A = decltype(activation)::value;
    for (int64_t p = 0; p < pixels; ++p) {
      const Acc* zp = z + p * c;
      T* yp = y + p * c;
      int64_t k = 0;
      for (; k + L <= c; k += L) V::store(yp + k, activate_vector<A, Acc>(V::load(zp + k) * V::load(scale + k) + V::load(shift + k)));
      for (; k < c; ++k) yp[k] = T(activate<Acc>(A, zp[k] * scale[k] + shift[k]));
    }
  });
}

// An activation in one branch-free form: act(u) = clamp(u + offset, lo, hi), times u / 6 for
// hardswish, with the same operations and NaN behaviour as activate() (../common.h). Eval's
// epilogue takes it as data, where a compile-time activation would need a conv per activation.
template <typename Acc>
struct ClampActivation {
  Acc offset, lo, hi;
  bool times_input;  // hardswish

  explicit ClampActivation(Activation a)
      : offset(a == Activation::kHardswish ? 3 : 0),
        lo(a == Activation::kIdentity ? -INFINITY : 0),
        hi(a == Activation::kHardswish || a == Activation::kRelu6 ? 6 : INFINITY),
        times_input(a == Activation::kHardswish) {}

  template <typename VT>
  FASTMB_INLINE VT operator()(VT u) const {
    const VT lo_v = VT{} + lo, hi_v = VT{} + hi;  // broadcast (VT is Acc or its Vec)
    VT h = u + offset;
    h = h < lo_v ? lo_v : h;  // comparisons with NaN are false: NaN falls through
    h = h > hi_v ? hi_v : h;
    return times_input ? u * h * Acc(1.0 / 6.0) : h;
  }
};

// Eval's store: y = act(z * scale + shift) as each tile's sums leave the registers, so z never
// goes through memory. Channel c indexes scale and shift as it does the output row.
template <typename T, typename Acc>
struct StoreNormalized {
  T* out;
  int64_t pixel_step;
  const Acc *scale, *shift;
  ClampActivation<Acc> act;
  template <typename VT>  // a Vec<Acc, Bytes>::type
  FASTMB_INLINE void vector(int64_t p, int64_t c, VT z) const {
    using V = Vec<Acc, sizeof(VT)>;
    V::store(out + p * pixel_step + c, act(z * V::load(scale + c) + V::load(shift + c)));
  }
  FASTMB_INLINE void scalar(int64_t p, int64_t c, Acc z) const { out[p * pixel_step + c] = T(act(z * scale[c] + shift[c])); }
};

// Eval: y = act(conv(x) * scale + shift) over output rows [begin, end) in one pass.
template <int K, typename T, typename Acc>
void forward_rows(T* y, const T* x, const Acc* w, const Acc* scale, const Acc* shift, const Geometry& g, Activation act, int64_t begin,
                  int64_t end) {
  const ClampActivation<Acc> activation(act);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / g.ho, oh = row % g.ho;
    conv_row<K>(StoreNormalized<T, Acc>{y + row * g.wo * g.c, g.c, scale, shift, activation}, x + n * g.h * g.w * g.c, w, g, oh, 0, g.wo, 0,
                g.c);
  }
}

// z over rows [begin, end) into z_out ([rows * Wo][C]), and its per-channel mean and M2: two
// passes per chunk (exact, in L1), Chan-merged into (count, mean, m2).
template <int K, typename T, typename Acc>
FASTMB_MULTIVERSION void statistics_rows(Acc* z_out, double* mean, double* m2, int64_t& count, const T* x, const Acc* w, Geometry g,
                                         int64_t begin, int64_t end) {
  const int64_t chunk = chunk_pixels(g.c);
  std::vector<Acc> chunk_mean(g.c), chunk_m2(g.c);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / g.ho, oh = row % g.ho;
    for (int64_t ow0 = 0; ow0 < g.wo; ow0 += chunk) {
      const int64_t pixels = std::min(chunk, g.wo - ow0);
      Acc* z = z_out + (row * g.wo + ow0) * g.c;
      conv_row<K>(StoreValues<Acc, Acc>{z, g.c}, x + n * g.h * g.w * g.c, w, g, oh, ow0, pixels, 0, g.c);
      std::fill(chunk_mean.begin(), chunk_mean.end(), Acc(0));
      std::fill(chunk_m2.begin(), chunk_m2.end(), Acc(0));
      add_column_sums(chunk_mean.data(), pixels, g.c, [&](int64_t p, int64_t c, auto width) __attribute__((always_inline)) {
        return load_values<Acc, decltype(width)::value>(z + p * g.c + c);
      });
      const Acc inv_pixels = Acc(1) / Acc(pixels);
      for (int64_t c = 0; c < g.c; ++c) chunk_mean[c] *= inv_pixels;
      add_column_sums(chunk_m2.data(), pixels, g.c, [&](int64_t p, int64_t c, auto width) __attribute__((always_inline)) {
        constexpr int W = decltype(width)::value;
        const auto d = load_values<Acc, W>(z + p * g.c + c) - load_values<Acc, W>(chunk_mean.data() + c);
        return d * d;
      });
      // Chan's merge; its weights are the same for every channel (no division per channel).
      const double na = double(count), nb = double(pixels), total = na + nb;
      const double weight_b = nb / total, weight_ab = na * nb / total;
      for (int64_t c = 0; c < g.c; ++c) {
        const double delta = double(chunk_mean[c]) - mean[c];
        mean[c] += delta * weight_b;
        m2[c] += double(chunk_m2[c]) + delta * delta * weight_ab;
      }
      count += pixels;
    }
  }
}

// The BN statistics and affine parameters the backward's per-value chain reads, per channel.
template <typename Acc>
struct GradParams {
  const Acc *mean, *invstd, *gamma, *beta;
};

// The backward's per-value chain from z and grad_y at W = Vec<Acc>::kLanes channels from c (or,
// W = 1, channel c alone): x_hat = (z - mean) * invstd, u = x_hat * gamma + beta, gu = act'(u)
// * grad_y, in registers: stored between separate loops, each would be a pass over the chunk
// (the fused chain measured 0.60-0.96x the backward's time at batch 16).
template <Activation A, int W, typename Acc, typename T, typename VT = std::conditional_t<W == 1, Acc, typename Vec<Acc>::type>>
FASTMB_INLINE void grad_chain(const Acc* z, const T* gy, const GradParams<Acc>& p, int64_t c, VT& x_hat, VT& gu) {
  x_hat = (load_values<Acc, W>(z + c) - load_values<Acc, W>(p.mean + c)) * load_values<Acc, W>(p.invstd + c);
  const auto u = x_hat * load_values<Acc, W>(p.gamma + c) + load_values<Acc, W>(p.beta + c);
  if constexpr (W == 1) gu = activation_grad<Acc>(A, Acc(gy[c]), u);
  else gu = activation_grad_vector<A, Acc>(load_values<Acc, W>(gy + c), u);
}

// Backward pass 1's sums over a chunk of `pixels` x `nc` z values (grad_y rows gy_stride apart):
// sum_gu[c] += sum of gu, sum_gu_xhat[c] += sum of gu * x_hat, up to 4 vectors of channels' sums
// held in registers over the pixels.
template <Activation A, typename T, typename Acc>
FASTMB_INLINE void add_grad_sums(Acc* sum_gu, Acc* sum_gu_xhat, const Acc* z, const T* gy, int64_t gy_stride, const GradParams<Acc>& params,
                                 int64_t pixels, int64_t nc) {
  using V = Vec<Acc>;
  constexpr int L = V::kLanes, NV = 4;
  int64_t k0 = 0;
  for (; k0 + L <= nc;) {
    const int64_t nv = std::min<int64_t>(NV, (nc - k0) / L);
    typename V::type acc_gu[NV] = {}, acc_gu_xhat[NV] = {};
    for (int64_t p = 0; p < pixels; ++p) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        if (v >= nv) continue;
        typename V::type x_hat, gu;
        grad_chain<A, L>(z + p * nc, gy + p * gy_stride, params, k0 + v * L, x_hat, gu);
        acc_gu[v] += gu;
        acc_gu_xhat[v] += gu * x_hat;
      }
    }
    for (int64_t v = 0; v < nv; ++v) {
      V::store(sum_gu + k0 + v * L, V::load(sum_gu + k0 + v * L) + acc_gu[v]);
      V::store(sum_gu_xhat + k0 + v * L, V::load(sum_gu_xhat + k0 + v * L) + acc_gu_xhat[v]);
    }
    k0 += nv * L;
  }
  for (int64_t c = k0; c < nc; ++c)
    for (int64_t p = 0; p < pixels; ++p) {
      Acc x_hat, gu;
      grad_chain<A, 1>(z + p * nc, gy + p * gy_stride, params, c, x_hat, gu);
      sum_gu[c] += gu;
      sum_gu_xhat[c] += gu * x_hat;
    }
}

// dL/dz = a * gu - b - x_hat * d (a, b, d per channel, offset like params) for `pixels` x `nc`
// z values, into gz.
template <Activation A, typename T, typename Acc>
FASTMB_INLINE void grad_z(Acc* gz, const Acc* z, const T* gy, int64_t gy_stride, const GradParams<Acc>& params, const Acc* a,
                          const Acc* b, const Acc* d, int64_t pixels, int64_t nc) {
  using V = Vec<Acc>;
  constexpr int L = V::kLanes;
  for (int64_t p = 0; p < pixels; ++p) {
    const Acc* zp = z + p * nc;
    const T* gyp = gy + p * gy_stride;
    int64_t c = 0;
    for (; c + L <= nc; c += L) {
      typename V::type x_hat, gu;
      grad_chain<A, L>(zp, gyp, params, c, x_hat, gu);
      V::store(gz + p * nc + c, V::load(a + c) * gu - V::load(b + c) - x_hat * V::load(d + c));
    }
    for (; c < nc; ++c) {
      Acc x_hat, gu;
      grad_chain<A, 1>(zp, gyp, params, c, x_hat, gu);
      gz[p * nc + c] = a[c] * gu - b[c] - x_hat * d[c];
    }
  }
}

// Backward pass 1: per-channel sums of dL/du and dL/du * x_hat over rows [begin, end).
template <int K, typename T, typename Acc>
FASTMB_MULTIVERSION void grad_sums_rows(double* sum_gu, double* sum_gu_xhat, const T* gy, const T* x, const Acc* w, const Acc* mean,
                                        const Acc* invstd, const Acc* gamma, const Acc* beta, Geometry g, Activation act,
                                        int64_t begin, int64_t end) {
  const int64_t chunk = chunk_pixels(g.c);
  const GradParams<Acc> params{mean, invstd, gamma, beta};
  std::vector<Acc> z(chunk * g.c), partial_gu(g.c), partial_gu_xhat(g.c);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / g.ho, oh = row % g.ho;
    std::fill(partial_gu.begin(), partial_gu.end(), Acc(0));
    std::fill(partial_gu_xhat.begin(), partial_gu_xhat.end(), Acc(0));
    for (int64_t ow0 = 0; ow0 < g.wo; ow0 += chunk) {
      const int64_t pixels = std::min(chunk, g.wo - ow0);
      conv_row<K>(StoreValues<Acc, Acc>{z.data(), g.c}, x + n * g.h * g.w * g.c, w, g, oh, ow0, pixels, 0, g.c);
      dispatch_activation(act, [&](auto activation) {
        add_grad_sums<decltype(activation)::value>(partial_gu.data(), partial_gu_xhat.data(), z.data(), gy + (row * g.wo + ow0) * g.c,
                                                   g.c, params, pixels, g.c);
      });
    }
    for (int64_t c = 0; c < g.c; ++c) {
      sum_gu[c] += partial_gu[c];
      sum_gu_xhat[c] += partial_gu_xhat[c];
    }
  }
}

// gw[tap][0:nc] += sum over pixels [lo, hi) of one output row of gz[ow - ow0][c] * x(ih, iw(ow))[c]
// for one tap (column j): NV vectors of channels from c, their sums held in registers over
// the row and added to gw once.
template <int NV, typename T, typename Acc>
FASTMB_INLINE void weight_grad_tile(Acc* gw, const Acc* gz, int64_t nc, const T* x_row, const Geometry& g, int j, int64_t ow0,
                                    int64_t lo, int64_t hi, int64_t c) {
  using V = Vec<Acc>;
  typename V::type acc[NV] = {};
  for (int64_t ow = lo; ow < hi; ++ow) {
    const Acc* gzp = gz + (ow - ow0) * nc + c;
    const T* xp = x_row + (ow * g.sw - g.pw + int64_t(j) * g.dw) * g.c + c;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[v] += V::load(gzp + v * V::kLanes) * V::load(xp + v * V::kLanes);
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) V::store(gw + c + v * V::kLanes, V::load(gw + c + v * V::kLanes) + acc[v]);
}

// The weight gradient's share of output row oh, pixels [ow0, ow0 + pixels): gw is [taps][C]
// (this thread's partial) offset to c0, gz is [pixels][nc], x_img offset to c0. Any geometry.
template <typename T, typename Acc>
FASTMB_INLINE void weight_grad_row(Acc* gw, const Acc* gz, const T* x_img, const Geometry& g, int64_t oh, int64_t ow0, int64_t pixels,
                                   int64_t nc) {
  constexpr int64_t L = Vec<Acc>::kLanes;
  const int kh = g.kh, kw = g.kw;
  for (int i = 0; i < kh; ++i) {
    const int64_t ih = oh * g.sh - g.ph + int64_t(i) * g.dh;
    if (ih < 0 || ih >= g.h) continue;
    const T* x_row = x_img + ih * g.w * g.c;
    for (int j = 0; j < kw; ++j) {
      int64_t lo, hi;
      valid_outputs(j, g.sw, g.pw, g.dw, g.w, ow0, ow0 + pixels, lo, hi);
      Acc* gw_tap = gw + (int64_t(i) * kw + j) * g.c;
      int64_t c = 0;
      for (; c + 4 * L <= nc; c += 4 * L) weight_grad_tile<4>(gw_tap, gz, nc, x_row, g, j, ow0, lo, hi, c);
      for (; c + L <= nc; c += L) weight_grad_tile<1>(gw_tap, gz, nc, x_row, g, j, ow0, lo, hi, c);
      for (; c < nc; ++c)
        for (int64_t ow = lo; ow < hi; ++ow) gw_tap[c] += gz[(ow - ow0) * nc + c] * Acc(x_row[(ow * g.sw - g.pw + int64_t(j) * g.dw) * g.c + c]);
    }
  }
}

// Channel vectors per weight_grad_row_k step: K x NV independent sums, enough to cover the
// multiply-add latency (K alone, 3 for K = 3, left both pipes waiting on one chain per tap)
// within AVX2's 16 registers.
template <int K>
constexpr int kWeightGradVectors = K == 3 ? 4 : 2;

// weight_grad_row for K = 3, 5, 7 (dilation 1 along the row): per kernel row and NV channel
// vectors, the K taps' sums in registers over the row's pixels, each dL/dz vector loaded once
// for all K; then single vectors, then channel by channel.
template <int K, typename T, typename Acc>
FASTMB_INLINE void weight_grad_row_k(Acc* gw, const Acc* gz, const T* x_img, const Geometry& g, int64_t oh, int64_t ow0, int64_t pixels,
                                     int64_t nc) {
  using V = Vec<Acc>;
  constexpr int64_t L = V::kLanes;
  const int64_t end = ow0 + pixels;
  // Pixels [lo, hi) read all K columns inside the row; the others check each tap.
  const int64_t lo = std::min(end, std::max<int64_t>(ow0, (g.pw + g.sw - 1) / g.sw));
  const int64_t hi = std::max(lo, std::min<int64_t>(end, g.w - K + g.pw >= 0 ? (g.w - K + g.pw) / g.sw + 1 : 0));
  for (int i = 0; i < K; ++i) {
    const int64_t ih = oh * g.sh - g.ph + int64_t(i) * g.dh;
    if (ih < 0 || ih >= g.h) continue;
    const T* x_row = x_img + ih * g.w * g.c;
    Acc* gw_row = gw + int64_t(i) * K * g.c;
    const auto vectors_at = [&](int64_t c, auto nv) __attribute__((always_inline)) {
      constexpr int NV = decltype(nv)::value;
      typename V::type acc[NV][K] = {};
      const auto add_pixel = [&](int64_t ow, bool check) __attribute__((always_inline)) {
        const int64_t iw0 = ow * g.sw - g.pw;
        unroll<NV>([&](auto v) __attribute__((always_inline)) {
          const typename V::type gv = V::load(gz + (ow - ow0) * nc + c + v * L);
          const T* xp = x_row + iw0 * g.c + c + v * L;
          unroll<K>([&](auto j) __attribute__((always_inline)) {
            if (!check || (iw0 + j >= 0 && iw0 + j < g.w)) acc[v][j] += gv * V::load(xp + j * g.c);
          });
        });
      };
      for (int64_t ow = ow0; ow < lo; ++ow) add_pixel(ow, true);
      for (int64_t ow = lo; ow < hi; ++ow) add_pixel(ow, false);
      for (int64_t ow = hi; ow < end; ++ow) add_pixel(ow, true);
      unroll<NV>([&](auto v) __attribute__((always_inline)) {
        unroll<K>([&](auto j) __attribute__((always_inline)) {
          Acc* out = gw_row + j * g.c + c + v * L;
          V::store(out, V::load(out) + acc[v][j]);
        });
      });
    };
    constexpr int NV = kWeightGradVectors<K>;
    int64_t c = 0;
    for (; c + NV * L <= nc; c += NV * L) vectors_at(c, Int<NV>{});
    for (; c + L <= nc; c += L) vectors_at(c, Int<1>{});
    for (; c < nc; ++c)
      for (int64_t ow = ow0; ow < end; ++ow)
        for (int j = 0; j < K; ++j) {
          const int64_t iw = ow * g.sw - g.pw + j;
          if (iw >= 0 && iw < g.w) gw_row[j * g.c + c] += gz[(ow - ow0) * nc + c] * Acc(x_row[iw * g.c + c]);
        }
  }
}

// The output pixels whose taps read input column (or row) `in`: for each, the tap and output
// index. Precomputed per task so the gather does no divisions.
struct TapSources {
  std::vector<int> count;        // [size]
  std::vector<int> tap, output;  // [size][kernel]
  TapSources(int64_t size, int kernel, int stride, int pad, int dil, int64_t out_size)
      : count(size, 0), tap(size * kernel), output(size * kernel) {
    for (int64_t in = 0; in < size; ++in)
      for (int t = 0; t < kernel; ++t) {
        const int64_t shifted = in + pad - int64_t(t) * dil;  // = out * stride
        if (shifted < 0 || shifted % stride != 0 || shifted / stride >= out_size) continue;
        tap[in * kernel + count[in]] = t;
        output[in * kernel + count[in]++] = int(shifted / stride);
      }
  }
};

// dL/dx at one input pixel for NV vectors of channels from c: the gather, over the taps that
// read the pixel (row pairs ri/ro, column pairs cj/co: tap and output index), of gz ([Ho][Wo][nc])
// times the weight (w offset to the block's first channel, rows of C).
template <int NV, typename T, typename Acc>
FASTMB_INLINE void grad_x_tile(T* gx, const Acc* gz, const Acc* w, const Geometry& g, const int* ri, const int* ro, int rows,
                               const int* cj, const int* co, int cols, int64_t nc, int64_t c) {
  using V = Vec<Acc>;
  constexpr int L = V::kLanes;
  typename V::type acc[NV] = {};
  for (int a = 0; a < rows; ++a)
    for (int b = 0; b < cols; ++b) {
      const Acc* gzp = gz + (int64_t(ro[a]) * g.wo + co[b]) * nc + c;
      const Acc* wp = w + (int64_t(ri[a]) * g.kw + cj[b]) * g.c + c;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[v] += V::load(gzp + v * L) * V::load(wp + v * L);
    }
  if constexpr (std::is_same_v<T, Acc>) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) V::store(gx + c + v * L, acc[v]);
  } else {
    alignas(64) Acc out[NV * L];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) V::store(out + v * L, acc[v]);
    for (int k = 0; k < NV * L; ++k) gx[c + k] = T(out[k]);
  }
}

// dL/dx for input row ih of one image and channel block: gx offset to the row's first pixel and
// the block's first channel (pixels C apart).
template <typename T, typename Acc>
FASTMB_INLINE void grad_x_row(T* gx, const Acc* gz, const Acc* w, const Geometry& g, const TapSources& rows, const TapSources& cols,
                              int64_t ih, int64_t nc) {
  constexpr int64_t L = Vec<Acc>::kLanes;
  const int* ri = rows.tap.data() + ih * g.kh;
  const int* ro = rows.output.data() + ih * g.kh;
  for (int64_t iw = 0; iw < g.w; ++iw) {
    const int* cj = cols.tap.data() + iw * g.kw;
    const int* co = cols.output.data() + iw * g.kw;
    const int nr = rows.count[ih], ncols = cols.count[iw];
    T* gxp = gx + iw * g.c;
    int64_t c = 0;
    for (; c + 4 * L <= nc; c += 4 * L) grad_x_tile<4>(gxp, gz, w, g, ri, ro, nr, cj, co, ncols, nc, c);
    for (; c + L <= nc; c += L) grad_x_tile<1>(gxp, gz, w, g, ri, ro, nr, cj, co, ncols, nc, c);
    for (; c < nc; ++c) {
      Acc sum = 0;
      for (int a = 0; a < nr; ++a)
        for (int b = 0; b < ncols; ++b)
          sum += gz[(int64_t(ro[a]) * g.wo + co[b]) * nc + c] * w[(int64_t(ri[a]) * g.kw + cj[b]) * g.c + c];
      gxp[c] = T(sum);
    }
  }
}

// Stride 2 along the row (K = 3, 5, 7, dilation 1): dL/dx at P input pixels iw0 + q of one row
// for one vector (of Bytes) of channels from c, sliding along the rows of dL/dz (sub-pixel: even
// and odd q take alternate taps). iw0 + pw is even, so pixel q reads dL/dz column u (output
// ow_u + u, where ow_u = (iw0 + pw) / 2 - (K - 1) / 2) through tap j = q - 2u + K - 1, all
// known at compile time: each dL/dz vector is loaded once for the P pixels and the row's K
// weight vectors stay in registers, against a load of both per tap in the gather. Columns
// u < u_lo or >= u_hi are outside dL/dz (Inside: none are); pixels q outside [q_lo, q_hi) are
// not stored.
template <int P, int Bytes, int K, bool Inside, typename T, typename Acc>
FASTMB_INLINE void grad_x_stride2_tile(T* gx, const Acc* gz_u0, const Acc* w, const Geometry& g, const int* ri, const int* ro, int nrows,
                                       int64_t nc, int u_lo, int u_hi, int q_lo, int q_hi, int64_t c) {
  using V = Vec<Acc, Bytes>;
  constexpr int U = P / 2 + (K - 1) / 2;  // the dL/dz columns the tile reads
  typename V::type acc[P] = {};
  for (int a = 0; a < nrows; ++a) {
    const Acc* wp = w + int64_t(ri[a]) * K * g.c + c;
    typename V::type wv[K];
    unroll<K>([&](auto j) __attribute__((always_inline)) {
      wv[j] = V::load(wp);
      wp = opaque(wp + g.c);
    });
    const Acc* gzp = gz_u0 + int64_t(ro[a]) * g.wo * nc + c;
    unroll<U>([&](auto u) __attribute__((always_inline)) {
      const Acc* column = gzp;
      gzp = opaque(gzp + nc);
      if (!Inside && (u < u_lo || u >= u_hi)) return;
      const typename V::type gv = V::load(column);
      unroll<P>([&](auto q) __attribute__((always_inline)) {
        constexpr int j = decltype(q)::value - 2 * decltype(u)::value + K - 1;
        if constexpr (j >= 0 && j < K) acc[q] += gv * wv[j];
      });
    });
  }
  unroll<P>([&](auto q) __attribute__((always_inline)) {
    if (q >= q_lo && q < q_hi) StoreValues<T, Acc>{gx, g.c}.vector(q, c, acc[q]);
  });
}

// dL/dx of input row ih (gx offset to the row's first pixel and the block's first channel) for
// stride 2 along the row: sliding tiles of 8 pixels by a vector of Bytes (overlapping_channel_tiles),
// from the first pixel with iw + pw even (the tile before pixel 0 when pw is odd); gz is this
// task's [Ho][Wo][nc], w offset to the block.
template <int K, int Bytes, typename T, typename Acc>
FASTMB_INLINE void grad_x_row_stride2(T* gx, const Acc* gz, const Acc* w, const Geometry& g, const TapSources& rows, int64_t ih,
                                      int64_t nc) {
  constexpr int P = 8, U = P / 2 + (K - 1) / 2;
  const int* ri = rows.tap.data() + ih * g.kh;
  const int* ro = rows.output.data() + ih * g.kh;
  const int nrows = rows.count[ih];
  for (int64_t iw0 = -(g.pw % 2); iw0 < g.w; iw0 += P) {
    const int64_t ow_u0 = (iw0 + g.pw) / 2 - (K - 1) / 2;
    const int u_lo = int(std::max<int64_t>(0, -ow_u0)), u_hi = int(std::clamp<int64_t>(g.wo - ow_u0, 0, U));
    const int q_lo = int(std::max<int64_t>(0, -iw0)), q_hi = int(std::min<int64_t>(P, g.w - iw0));
    const bool inside = u_lo == 0 && u_hi == U;
    // Pixel iw0 and column ow_u0 may lie before the row's first: only those inside are accessed.
    T* gx_tile = gx + iw0 * g.c;
    const Acc* gz_u0 = gz + ow_u0 * nc;
    const auto tile_at = [&](int64_t c, auto bytes) __attribute__((always_inline)) {
      constexpr int B = decltype(bytes)::value;
      if (inside) grad_x_stride2_tile<P, B, K, true>(gx_tile, gz_u0, w, g, ri, ro, nrows, nc, u_lo, u_hi, q_lo, q_hi, c);
      else grad_x_stride2_tile<P, B, K, false>(gx_tile, gz_u0, w, g, ri, ro, nrows, nc, u_lo, u_hi, q_lo, q_hi, c);
    };
    for (int64_t c = overlapping_channel_tiles<Bytes, Acc>(nc, tile_at); c < nc; ++c)
      for (int q = q_lo; q < q_hi; ++q) {
        Acc sum = 0;
        for (int a = 0; a < nrows; ++a)
          for (int u = u_lo; u < u_hi; ++u) {
            const int j = q - 2 * u + K - 1;
            if (j >= 0 && j < K) sum += gz_u0[(int64_t(ro[a]) * g.wo + u) * nc + c] * w[(int64_t(ri[a]) * K + j) * g.c + c];
          }
        gx_tile[q * g.c + c] = T(sum);
      }
  }
}

// grad_x_row_stride2 over the rows of image n in AVX-512 registers, 16 lanes as conv_row_avx512
// (backward, against two 8-lane vectors for K = 3 and one for K = 5: C240-k3-s2 0.75-0.95x the
// time, C672-k5-s2 0.85-0.98x, two runs).
template <int K, typename T, typename Acc>
FASTMB_AVX512 void grad_x_stride2_avx512(T* gx, const Acc* gz, const Acc* w, const Geometry& g, const TapSources& rows, int64_t n, int64_t c0,
                                         int64_t nc) {
  for (int64_t ih = 0; ih < g.h; ++ih) grad_x_row_stride2<K, 64>(gx + ((n * g.h + ih) * g.w) * g.c + c0, gz, w + c0, g, rows, ih, nc);
}

// Backward pass 2 for image n, channels [c0, c0 + nc): dL/dz = a * dL/du - b - x_hat * d per
// channel (a = gamma * invstd; b, d: the batch statistics' terms, zero in eval), row by row into
// gz (this task's buffer: the whole [Ho][Wo][nc] when dL/dx is wanted, one chunk otherwise), the
// weight gradient from each row (gw: this thread's [taps][C] partial, or null), then dL/dx as a
// gather from gz (gx: the NHWC output, or null) — or, given the flipped weight (stride 1),
// as a conv, or (K specialised, stride 2 along the row) by sub-pixel sliding tiles. x_hat and
// dL/du are recomputed from x and grad_y: cheaper than keeping them from pass 1, which writes
// and reads two more tensors.
template <int K, typename T, typename Acc>
FASTMB_MULTIVERSION void grad_input_weight_block(T* gx, Acc* gw, std::vector<Acc>& gz, const T* gy, const T* x, const Acc* w,
                                                 const Acc* flipped,
                                                 const Acc* mean, const Acc* invstd, const Acc* gamma, const Acc* beta, const Acc* a,
                                                 const Acc* b, const Acc* d, const TapSources& rows, const TapSources& cols, Geometry g,
                                                 Activation act, int64_t n, int64_t c0, int64_t nc) {
  const T* x_img = x + n * g.h * g.w * g.c;
  const int64_t chunk = chunk_pixels(nc);
  const GradParams<Acc> params{mean + c0, invstd + c0, gamma + c0, beta + c0};
  std::vector<Acc> z(chunk * nc);
  gz.resize(gx != nullptr ? g.ho * g.wo * nc : chunk * nc);
  for (int64_t oh = 0; oh < g.ho; ++oh) {
    for (int64_t ow0 = 0; ow0 < g.wo; ow0 += chunk) {
      const int64_t pixels = std::min(chunk, g.wo - ow0);
      Acc* gz_chunk = gx != nullptr ? gz.data() + (oh * g.wo + ow0) * nc : gz.data();
      conv_row<K>(StoreValues<Acc, Acc>{z.data(), nc}, x_img, w, g, oh, ow0, pixels, c0, nc);
      dispatch_activation(act, [&](auto activation) {
        grad_z<decltype(activation)::value>(gz_chunk, z.data(), gy + ((n * g.ho + oh) * g.wo + ow0) * g.c + c0, g.c, params, a + c0,
                                            b + c0, d + c0, pixels, nc);
      });
      if constexpr (K != 0) {
        if (gw != nullptr) weight_grad_row_k<K>(gw + c0, gz_chunk, x_img + c0, g, oh, ow0, pixels, nc);
      } else if (gw != nullptr) {
        weight_grad_row(gw + c0, gz_chunk, x_img + c0, g, oh, ow0, pixels, nc);
      }
    }
  }
  if (gx == nullptr) return;
  if (flipped != nullptr) {  // the conv of dL/dz with the flipped kernel: see flipped_blocks
    Geometry transposed = g;
    transposed.n = 1, transposed.c = nc, transposed.h = g.ho, transposed.w = g.wo, transposed.ho = g.h, transposed.wo = g.w;
    transposed.ph = (g.kh - 1) * g.dh - g.ph, transposed.pw = g.kw - 1 - g.pw;
    for (int64_t ih = 0; ih < g.h; ++ih)
      conv_row<K>(StoreValues<T, Acc>{gx + ((n * g.h + ih) * g.w) * g.c + c0, g.c}, gz.data(), flipped + c0 * g.kh * g.kw, transposed, ih,
                  0, g.w, 0, nc);
    return;
  }
  if constexpr (K != 0) {
    if (g.sw == 2) {
      if constexpr (kAvx512Loops) {
        if (avx512_tiles_serve(g)) return grad_x_stride2_avx512<K>(gx, gz.data(), w, g, rows, n, c0, nc);
      }
      for (int64_t ih = 0; ih < g.h; ++ih) grad_x_row_stride2<K, 32>(gx + ((n * g.h + ih) * g.w) * g.c + c0, gz.data(), w + c0, g, rows, ih, nc);
      return;
    }
  }
  for (int64_t ih = 0; ih < g.h; ++ih) grad_x_row(gx + ((n * g.h + ih) * g.w) * g.c + c0, gz.data(), w + c0, g, rows, cols, ih, nc);
}

// weight (C, 1, kH, kW) as [kH * kW][C] in Acc, in a buffer the calling thread reuses from call
// to call (valid until its next call): the eval path allocates nothing beyond the op's outputs.
template <typename T, typename Acc>
const Acc* taps_major_scratch(const Tensor& weight) {
  thread_local std::vector<Acc> buffer;
  const int64_t channels = weight.size(0), taps = weight.size(2) * weight.size(3);
  buffer.resize(channels * taps);
  const Tensor dense = weight.contiguous();
  const T* src = dense.const_data_ptr<T>();
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t t = 0; t < taps; ++t) buffer[t * channels + c] = Acc(src[c * taps + t]);
  return buffer.data();
}

// Stride 1 (K specialised, padding within the kernel's extent): dL/dx is the conv of dL/dz with
// the flipped kernel (padding (K - 1) * dilation - pad), which the forward's sliding tiles
// compute with dL/dz in registers instead of a gather. The flipped taps-major weight per
// channel block of `block` channels ([blocks][taps][nc], the tasks' channel stride), built once
// per call; empty when the geometry gathers.
template <int K, typename Acc>
std::vector<Acc> flipped_blocks(const Acc* w, const Geometry& g, int64_t block) {
  if (K == 0 || g.sh != 1 || g.sw != 1 || g.ph > (g.kh - 1) * g.dh || g.pw > g.kw - 1) return {};
  const int taps = g.kh * g.kw;
  std::vector<Acc> flipped(taps * g.c);
  for (int64_t c0 = 0; c0 < g.c; c0 += block) {
    const int64_t nc = std::min(block, g.c - c0);
    for (int t = 0; t < taps; ++t)
      std::copy(w + t * g.c + c0, w + t * g.c + c0 + nc, flipped.data() + c0 * taps + (taps - 1 - t) * nc);
  }
  return flipped;
}

// Calls f(Int<K>) with the kernel-size specialisation: 3, 5, 7 with stride 1 or 2 and dilation
// 1 along rows (every MobileNet layer) compiled for, anything else generic (0). float64 (tests,
// gradcheck) always takes the generic path: it keeps the build small.
template <typename T, typename F>
void dispatch_kernel_size(const Geometry& g, F&& f) {
  const int k = g.kh == g.kw && g.dw == 1 && (g.sw == 1 || g.sw == 2) ? g.kh : 0;
  if constexpr (std::is_same_v<T, double>) f(Int<0>{});
  else if (k == 3) f(Int<3>{});
  else if (k == 5) f(Int<5>{});
  else if (k == 7) f(Int<7>{});
  else f(Int<0>{});
}

// Rows of work per parallel task: about 64K multiply-adds.
int64_t row_grain(const Geometry& g) { return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, g.wo * g.c * g.kh * g.kw)); }

void check_inputs(const Tensor& x, const Tensor& weight) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1,
              "fastmb::dwconv_bn_act: x must be (N, C, H, W) and weight (C, 1, kH, kW)");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "fastmb::dwconv_bn_act: x and weight dtypes differ");
  TORCH_CHECK(x.scalar_type() != at::kHalf, "fastmb::dwconv_bn_act: the CPU kernels have no float16 path; use the reference backend");
}

std::tuple<Tensor, Tensor, Tensor> dwconv_bn_act_forward(
    const Tensor& x_in, const Tensor& weight, const std::optional<Tensor>& bn_weight, const std::optional<Tensor>& bn_bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, double eps, bool training, c10::string_view activation) {
  check_inputs(x_in, weight);
  const NoAutocast no_autocast;
  const Activation act = parse_activation(activation);
  const Geometry g = dwconv_geometry(x_in, weight, stride, padding, dilation);
  const at::ScalarType acc_type = at::toOpMathType(x_in.scalar_type());
  const auto stats_options = x_in.options().dtype(acc_type);
  Nhwc4dOutput out({g.n, g.c, g.ho, g.wo}, x_in.options(), x_in.suggest_memory_format());
  Tensor mean, var;
  if (!training) {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(), "fastmb::dwconv_bn_act: eval needs running statistics");
    mean = running_mean->to(acc_type).clone();
    var = running_var->to(acc_type).clone();
  } else if (out.output.numel() == 0) {
    mean = at::zeros({g.c}, stats_options);
    var = at::ones({g.c}, stats_options);
  }
  if (out.output.numel() == 0) return {out.output, mean, var};

  const Tensor x = as_nhwc(x_in);
  const Tensor gamma = vector_or(bn_weight, g.c, acc_type, x, 1.0), beta = vector_or(bn_bias, g.c, acc_type, x, 0.0);
  const int64_t rows = g.n * g.ho;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastmb_dwconv_bn_act_forward", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const Acc* w = taps_major_scratch<scalar_t, Acc>(weight);
    dispatch_kernel_size<scalar_t>(g, [&](auto kernel) {
      constexpr int K = decltype(kernel)::value;
      // Training keeps z between its two passes: in y itself when it has the accumulation dtype
      // (normalised in place), else in a transient buffer.
      Tensor z_buffer;
      if (training && !std::is_same_v<scalar_t, Acc>) z_buffer = at::empty({rows * g.wo, g.c}, stats_options);
      Acc* z_store = !training ? nullptr
                     : z_buffer.defined() ? z_buffer.mutable_data_ptr<Acc>()
                                          : reinterpret_cast<Acc*>(out.nhwc.mutable_data_ptr<scalar_t>());
      if (training) {
        // Pass 1: z and per-thread Welford states, merged with Chan's formula.
        const int threads = at::get_num_threads();
        std::vector<double> means(threads * g.c, 0.0), m2s(threads * g.c, 0.0);
        std::vector<int64_t> counts(threads, 0);
        at::parallel_for(0, rows, row_grain(g), [&](int64_t begin, int64_t end) {
          const int t = at::get_thread_num();
          statistics_rows<K>(z_store, means.data() + t * g.c, m2s.data() + t * g.c, counts[t], x.const_data_ptr<scalar_t>(), w, g,
                             begin, end);
        });
        mean = at::empty({g.c}, stats_options);
        var = at::empty({g.c}, stats_options);
        Acc *batch_mean = mean.mutable_data_ptr<Acc>(), *batch_var = var.mutable_data_ptr<Acc>();
        for (int64_t c = 0; c < g.c; ++c) {
          double m = 0.0, m2 = 0.0, n = 0.0;
          for (int t = 0; t < threads; ++t) {
            const double nb = double(counts[t]);
            if (nb == 0.0) continue;
            const double delta = means[t * g.c + c] - m, total = n + nb;
            m += delta * nb / total;
            m2 += m2s[t * g.c + c] + delta * delta * n * nb / total;
            n = total;
          }
          batch_mean[c] = Acc(m);
          batch_var[c] = Acc(m2 / n);
        }
      }
      // Fold BN into a per-channel scale and shift.
      std::vector<Acc> scale(g.c), shift(g.c);
      const Acc *m = mean.const_data_ptr<Acc>(), *v = var.const_data_ptr<Acc>();
      const Acc *pg = gamma.const_data_ptr<Acc>(), *pb = beta.const_data_ptr<Acc>();
      for (int64_t c = 0; c < g.c; ++c) {
        scale[c] = pg[c] / std::sqrt(v[c] + Acc(eps));
        shift[c] = pb[c] - m[c] * scale[c];
      }
      scalar_t* y = out.nhwc.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, rows, row_grain(g), [&](int64_t begin, int64_t end) {
        if (!training) {
          forward_rows<K>(y, x.const_data_ptr<scalar_t>(), w, scale.data(), shift.data(), g, act, begin, end);
        } else {  // z was stored by the statistics pass: normalise it
          normalize_stored(y + begin * g.wo * g.c, z_store + begin * g.wo * g.c, scale.data(), shift.data(), act, (end - begin) * g.wo,
                           g.c);
        }
      });
    });
  });
  return {out.finish(), mean, var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dwconv_bn_act_backward(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& weight, const std::optional<Tensor>& bn_weight,
    const std::optional<Tensor>& bn_bias, const Tensor& mean_in, const Tensor& var_in, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, double eps, bool training, c10::string_view activation,
    std::array<bool, 3> output_mask) {
  check_inputs(x_in, weight);
  const NoAutocast no_autocast;
  const Activation act = parse_activation(activation);
  const Geometry g = dwconv_geometry(x_in, weight, stride, padding, dilation);
  const at::ScalarType acc_type = at::toOpMathType(x_in.scalar_type());
  const auto acc_options = x_in.options().dtype(acc_type);
  const at::ScalarType affine_type = bn_weight.has_value() ? bn_weight->scalar_type() : acc_type;

  Nhwc4dOutput grad_x(output_mask[0] ? x_in.sizes() : at::IntArrayRef{0}, x_in.options(),
                      output_mask[0] ? x_in.suggest_memory_format() : at::MemoryFormat::Contiguous);
  Tensor grad_weight = output_mask[1] ? at::zeros_like(weight, at::MemoryFormat::Contiguous) : at::empty({0}, weight.options());
  Tensor grad_gamma = at::zeros({output_mask[2] ? g.c : 0}, acc_options), grad_beta = at::zeros_like(grad_gamma);
  const int64_t values = g.n * g.ho * g.wo;
  if (values == 0 || !(output_mask[0] || output_mask[1] || output_mask[2])) {
    if (output_mask[0]) grad_x.nhwc.zero_();
    return {grad_x.finish(), grad_weight, grad_gamma.to(affine_type), grad_beta.to(affine_type)};
  }

  const Tensor x = as_nhwc(x_in), grad_y = as_nhwc(grad_y_in);
  const Tensor mean = mean_in.to(acc_type).contiguous(), var = var_in.to(acc_type).contiguous();
  const Tensor gamma = vector_or(bn_weight, g.c, acc_type, x, 1.0), beta = vector_or(bn_bias, g.c, acc_type, x, 0.0);
  const int taps = g.kh * g.kw;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastmb_dwconv_bn_act_backward", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const Acc* w = taps_major_scratch<scalar_t, Acc>(weight);
    const Acc *pm = mean.const_data_ptr<Acc>(), *pv = var.const_data_ptr<Acc>(), *pg = gamma.const_data_ptr<Acc>(),
              *pb = beta.const_data_ptr<Acc>();
    std::vector<Acc> invstd(g.c), a(g.c), b(g.c, Acc(0)), d(g.c, Acc(0));
    for (int64_t c = 0; c < g.c; ++c) {
      invstd[c] = Acc(1) / std::sqrt(pv[c] + Acc(eps));
      a[c] = pg[c] * invstd[c];
    }
    dispatch_kernel_size<scalar_t>(g, [&](auto kernel) {
      constexpr int K = decltype(kernel)::value;
      const bool pass_one = training || output_mask[2], pass_two = output_mask[0] || output_mask[1];
      if (pass_one) {
        const int threads = at::get_num_threads();
        std::vector<double> sums(2 * threads * g.c, 0.0);
        at::parallel_for(0, g.n * g.ho, row_grain(g), [&](int64_t begin, int64_t end) {
          double* s = sums.data() + 2 * at::get_thread_num() * g.c;
          grad_sums_rows<K>(s, s + g.c, grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), w, pm, invstd.data(), pg,
                            pb, g, act, begin, end);
        });
        Acc *grad_beta_values = grad_beta.mutable_data_ptr<Acc>(), *grad_gamma_values = grad_gamma.mutable_data_ptr<Acc>();
        for (int64_t c = 0; c < g.c; ++c) {
          double sum_gu = 0.0, sum_gu_xhat = 0.0;
          for (int t = 0; t < threads; ++t) {
            sum_gu += sums[2 * t * g.c + c];
            sum_gu_xhat += sums[(2 * t + 1) * g.c + c];
          }
          if (output_mask[2]) {
            grad_beta_values[c] = Acc(sum_gu);
            grad_gamma_values[c] = Acc(sum_gu_xhat);
          }
          if (training) {  // the batch statistics' share of dL/dz
            b[c] = a[c] * Acc(sum_gu / double(values));
            d[c] = a[c] * Acc(sum_gu_xhat / double(values));
          }
        }
      }
      if (!pass_two) return;
      Tensor gw_partials = output_mask[1] ? per_thread_zeros<Acc>(taps * g.c, x) : Tensor();
      const TapSources rows(g.h, g.kh, g.sh, g.ph, g.dh, g.ho), cols(g.w, g.kw, g.sw, g.pw, g.dw, g.wo);
      // Whole images (every channel: grad_y and x rows read contiguously) when they share out
      // evenly between the threads, else channel blocks of each image.
      const int threads = at::get_num_threads();
      const int64_t block = g.n % threads == 0 || g.n >= 4 * threads ? g.c : kBlock;
      const std::vector<Acc> flipped = output_mask[0] ? flipped_blocks<K>(w, g, block) : std::vector<Acc>();
      const int64_t blocks = (g.c + block - 1) / block;
      at::parallel_for(0, g.n * blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<Acc> gz;
        Acc* gw = output_mask[1] ? gw_partials.mutable_data_ptr<Acc>() + at::get_thread_num() * taps * g.c : nullptr;
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / blocks, c0 = (task % blocks) * block, nc = std::min(block, g.c - c0);
          grad_input_weight_block<K>(output_mask[0] ? grad_x.nhwc.mutable_data_ptr<scalar_t>() : nullptr, gw, gz,
                                     grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), w,
                                     flipped.empty() ? nullptr : flipped.data(), pm,
                                     invstd.data(), pg, pb, a.data(), b.data(), d.data(), rows, cols, g, act, n, c0, nc);
        }
      });
      if (output_mask[1]) {  // [threads][taps][C] partials -> (C, 1, kH, kW)
        const Tensor summed = gw_partials.sum(0).reshape({taps, g.c}).t();
        grad_weight.copy_(summed.reshape(weight.sizes()));
      }
    });
  });
  return {grad_x.finish(), grad_weight, grad_gamma.to(affine_type), grad_beta.to(affine_type)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmb, CPU, m) {
  m.impl("dwconv_bn_act", &dwconv_bn_act_forward);
  m.impl("dwconv_bn_act_backward", &dwconv_bn_act_backward);
}

}  // namespace fastmb::cpu
