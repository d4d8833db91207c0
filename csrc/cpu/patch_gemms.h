// Patch GEMMs of a full conv over channels_last-or-strided x, without an im2col of the whole
// input: a run of output pixels whose taps all lie inside x reads each tap straight from x (its
// offset from the pixel's patch origin), the border's pixels are gathered with the padding's
// zeros. z = patches . w (the stem's forward, stem_conv_bn_act.cpp) and gw += patches^T . dL/dz
// (its weight gradient, and conv_weight_grad.cpp's for any full conv), register-tiled per
// instruction set.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "../common.h"
#include "isa.h"
#include "vec.h"

namespace fastmb::cpu::patches {

// Vector accumulators per register tile: NV vectors of output channels times kTile / NV pixels
// (z: at most kMaxTilePixels) or taps (weight gradient), 12 of the 16 (AVX2) or 32 (AVX-512)
// registers.
constexpr int kTile = 12;
// Pixels per z tile, at most: each keeps a pointer in a general register. With 12 (one vector of
// channels: the 16-channel stems of MobileNetV3) they did not all fit; with 8 V3-Large's stem
// ran 151 -> 129 us on one thread (AVX-512, Zen 4; 6 as fast as 8).
constexpr int kMaxTilePixels = 8;
// Output channels per tile: up to 4 vectors.
constexpr int kMaxVectors = 4;

// Where a run of output pixels' patches are read: straight from x for pixels whose taps all lie
// inside it (tap t of pixel p at pixel(p)[tap(t)]: origin + p * step + offset[t]), else from
// rows gathered with the padding's zeros (patch buffer rows ld apart).
template <typename Acc>
struct XPatches {
  const Acc* origin;
  int64_t step;
  const int64_t* offset;
  int64_t row_step = 0;  // x's elements from an output row's patch origins to the next row's
  FASTMB_INLINE const Acc* pixel(int64_t p) const { return origin + p * step; }
  FASTMB_INLINE int64_t tap(int64_t t) const { return offset[t]; }
  // Whether taps [t0, t0 + count) lie one after another in x (channels_last, within one (i, j))
  bool consecutive(int64_t t0, int count) const {
    for (int t = 1; t < count; ++t)
      if (offset[t0 + t] != offset[t0] + t) return false;
    return true;
  }
};
template <typename Acc>
struct GatheredPatches {
  const Acc* rows;
  int64_t ld;
  FASTMB_INLINE const Acc* pixel(int64_t p) const { return rows + p * ld; }
  FASTMB_INLINE int64_t tap(int64_t t) const { return t; }
  bool consecutive(int64_t, int) const { return true; }
  static constexpr int64_t row_step = 0;
};

// What a z tile stores, through store.at(co)(tile, column): z itself here; the eval stem stores
// act(z * scale + shift) (its batch norm and activation applied while z is in registers).
struct StoreZ {
  StoreZ at(int64_t) const { return *this; }
  template <typename VT>
  FASTMB_INLINE VT operator()(VT z, int64_t) const { return z; }
};

// z[p][v] for P pixels' patches and NV vectors of output channels of the weight ([taps][ldw]);
// stores the first np pixels' rows (ldz apart), through `store`.
template <int Bytes, int NV, int P, typename Acc, typename Patches, typename Store>
FASTMB_INLINE void z_tile(Acc* z, int64_t ldz, const Patches& patches, int64_t p0, const Acc* w, int64_t ldw, int64_t taps, int64_t np,
                          const Store& store) {
  using V = Vec<Acc, Bytes>;
  constexpr int L = V::kLanes;
  const Acc* pixel[P];  // one pointer per pixel: each tap's loads need no address arithmetic
#pragma GCC unroll 12
  for (int p = 0; p < P; ++p) pixel[p] = patches.pixel(p0 + std::min<int64_t>(p, np - 1));  // past np: a valid pixel, not stored
  typename V::type acc[P][NV] = {};
  for (int64_t t = 0; t < taps; ++t) {
    const int64_t tap = patches.tap(t);
    typename V::type wv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) wv[v] = V::load(w + t * ldw + v * L);
#pragma GCC unroll 12
    for (int p = 0; p < P; ++p) {
      const Acc xp = pixel[p][tap];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[p][v] += wv[v] * xp;
    }
  }
#pragma GCC unroll 12
  for (int p = 0; p < P; ++p)
    if (p < np)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) V::store(z + p * ldz + v * L, store(acc[p][v], v * L));
}

// Calls block(Int<NV>{}, co) for the blocks of up to kMaxVectors vectors of L output channels
// from channel co, across cp channels.
template <int L, typename Block>
FASTMB_INLINE void for_each_channel_block(int64_t cp, const Block& block) {
  for (int64_t co = 0; co < cp;) {
    const int64_t nv = std::min<int64_t>(kMaxVectors, (cp - co) / L);
    unroll<kMaxVectors>([&](auto i) __attribute__((always_inline)) {
      if (nv == decltype(i)::value + 1) block(Int<decltype(i)::value + 1>{}, co);
    });
    co += nv * L;
  }
}

// z = patches . w for `count` pixels: rows of cp values (every output channel, vector-padded),
// stored through `store`.
template <int Bytes, typename Acc, typename Patches, typename Store>
FASTMB_INLINE void convolve_patches(Acc* z, const Patches& patches, const Acc* w, int64_t count, int64_t taps, int64_t cp, const Store& store) {
  for_each_channel_block<Vec<Acc, Bytes>::kLanes>(cp, [&](auto vectors, int64_t co) __attribute__((always_inline)) {
    constexpr int NV = decltype(vectors)::value, P = std::min(kMaxTilePixels, kTile / NV);
    for (int64_t p = 0; p < count; p += P)
      z_tile<Bytes, NV, P>(z + p * cp + co, cp, patches, p, w + co, cp, taps, count - p, store.at(co));
  });
}

// gw[t][v] += the sum over `rows` rows of `count` pixels of patch tap t0 + t * gz[p][v], for T
// taps and NV vectors of output channels: dL/dz's rows ldz apart, its output rows ldz_row apart
// (several rows a call spare each tile its setup and stores a row). Consecutive: the taps lie
// one after another (patches.consecutive), read at constant displacements (else T tap offsets,
// more than the free registers at T = 12).
template <int Bytes, int NV, int T, bool Consecutive, typename Acc, typename Patches>
FASTMB_INLINE void weight_grad_tile(Acc* gw, int64_t ldw, const Patches& patches, int64_t t0, const Acc* gz, int64_t ldz, int64_t count,
                                    int64_t rows, int64_t ldz_row) {
  using V = Vec<Acc, Bytes>;
  constexpr int L = V::kLanes;
  int64_t tap[T];
#pragma GCC unroll 24
  for (int t = 0; t < T; ++t) tap[t] = Consecutive ? t : patches.tap(t0 + t);
  const int64_t first = Consecutive ? patches.tap(t0) : 0;
  typename V::type acc[T][NV] = {};
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t p = 0; p < count; ++p) {
      const Acc* pixel = patches.pixel(p) + r * patches.row_step + first;
      typename V::type g[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) g[v] = V::load(gz + r * ldz_row + p * ldz + v * L);
#pragma GCC unroll 24
      for (int t = 0; t < T; ++t) {
        const Acc xp = pixel[tap[t]];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[t][v] += g[v] * xp;
      }
    }
  }
#pragma GCC unroll 24
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) V::store(gw + t * ldw + v * L, V::load(gw + t * ldw + v * L) + acc[t][v]);
}

// gw ([taps_padded][cp]) += patches^T . gz over `rows` x `count` pixels; taps_padded is a multiple of
// kTile, so every tile's taps have patch values (the padding's sums are unused). Tiles of
// `Accumulators` vectors, the last taps in tiles of kTile.
template <int Bytes, int Accumulators, typename Acc, typename Patches>
FASTMB_INLINE void accumulate_weight_grad(Acc* gw, const Patches& patches, const Acc* gz, int64_t count, int64_t rows, int64_t ldz_row,
                                          int64_t taps_padded, int64_t cp) {
  for_each_channel_block<Vec<Acc, Bytes>::kLanes>(cp, [&](auto vectors, int64_t co) __attribute__((always_inline)) {
    constexpr int NV = decltype(vectors)::value, T = Accumulators / NV, T_last = kTile / NV;
    int64_t t = 0;
    const auto tile = [&](auto taps) __attribute__((always_inline)) {
      constexpr int TT = decltype(taps)::value;
      if (patches.consecutive(t, TT))
        weight_grad_tile<Bytes, NV, TT, true>(gw + t * cp + co, cp, patches, t, gz + co, cp, count, rows, ldz_row);
      else
        weight_grad_tile<Bytes, NV, TT, false>(gw + t * cp + co, cp, patches, t, gz + co, cp, count, rows, ldz_row);
      t += TT;
    };
    while (t + T <= taps_padded) tile(Int<T>{});
    while (t < taps_padded) tile(Int<T_last>{});
  });
}

// The two patch GEMMs compiled per instruction set, picked by cpu_isa() (so FASTMB_ISA tests
// each): 64-byte vectors for AVX-512 (one instruction per 16 lanes keeps the tiles' loads and
// FMAs within the front end's width), 32-byte for AVX2, and the same code at baseline.
#define FASTMB_PATCH_GEMMS(Name, target, Bytes, WeightGradAccumulators)                                                           \
  template <typename Acc, typename Patches>                                                                                       \
  struct Name {                                                                                                                   \
    template <typename Store>                                                                                                     \
    target static void convolve(Acc* z, const Patches& patches, const Acc* w, int64_t count, int64_t taps, int64_t cp,            \
                                const Store& store) {                                                                             \
      convolve_patches<Bytes>(z, patches, w, count, taps, cp, store);                                                             \
    }                                                                                                                             \
    target static void weight_grad(Acc* gw, const Patches& patches, const Acc* gz, int64_t count, int64_t rows, int64_t ldz_row,    \
                                   int64_t taps_padded, int64_t cp) {                                                             \
      accumulate_weight_grad<Bytes, WeightGradAccumulators>(gw, patches, gz, count, rows, ldz_row, taps_padded, cp);              \
    }                                                                                                                             \
  };
FASTMB_PATCH_GEMMS(BaselinePatchGemms, , 32, kTile)
#if FASTMB_X86_TABLES
FASTMB_PATCH_GEMMS(Avx512PatchGemms, __attribute__((target("arch=x86-64-v4"))), 64, 2 * kTile)
FASTMB_PATCH_GEMMS(Avx2PatchGemms, __attribute__((target("arch=x86-64-v3"))), 32, kTile)
#endif
#undef FASTMB_PATCH_GEMMS

// The vector width (bytes) of the patch GEMMs this CPU runs: the chunk rows are padded to it.
inline int gemm_vector_bytes() {
#if FASTMB_X86_TABLES
  if (cpu_isa() == Isa::kAvx512) return 64;
#endif
  return 32;
}

// z = patches . w (see convolve_patches) with the instruction set's GEMMs, stored through `store`.
template <typename Acc, typename Patches, typename Store = StoreZ>
void convolve(Acc* z, const Patches& patches, const Acc* w, int64_t count, int64_t taps, int64_t cp, const Store& store = {}) {
#if FASTMB_X86_TABLES
  if (cpu_isa() == Isa::kAvx512) return Avx512PatchGemms<Acc, Patches>::convolve(z, patches, w, count, taps, cp, store);
  if (cpu_isa() == Isa::kAvx2) return Avx2PatchGemms<Acc, Patches>::convolve(z, patches, w, count, taps, cp, store);
#endif
  BaselinePatchGemms<Acc, Patches>::convolve(z, patches, w, count, taps, cp, store);
}

// gw += patches^T . gz (see accumulate_weight_grad) with the instruction set's GEMMs, over
// `rows` output rows of `count` pixels (dL/dz's rows ldz_row apart).
template <typename Acc, typename Patches>
void weight_grad(Acc* gw, const Patches& patches, const Acc* gz, int64_t count, int64_t taps_padded, int64_t cp, int64_t rows = 1,
                 int64_t ldz_row = 0) {
#if FASTMB_X86_TABLES
  if (cpu_isa() == Isa::kAvx512) return Avx512PatchGemms<Acc, Patches>::weight_grad(gw, patches, gz, count, rows, ldz_row, taps_padded, cp);
  if (cpu_isa() == Isa::kAvx2) return Avx2PatchGemms<Acc, Patches>::weight_grad(gw, patches, gz, count, rows, ldz_row, taps_padded, cp);
#endif
  BaselinePatchGemms<Acc, Patches>::weight_grad(gw, patches, gz, count, rows, ldz_row, taps_padded, cp);
}

// The conv's shape and the chunk buffers' layout.
struct ConvPatches {
  Geometry g;                 // the input's geometry: g.c is C_in
  int64_t c, cp;              // C_out, and rounded up to whole vectors (the chunk rows' stride)
  int64_t taps, taps_padded;  // C_in * kH * kW, and rounded up to kTile (the patch rows' stride)
  int64_t chunk;              // output pixels per chunk: a multiple of kTile
  int64_t step;               // x's elements from one output pixel's patch to the next one's
  int64_t ow_lo, ow_hi;       // the output columns whose taps all lie inside x's columns
  std::vector<int64_t> offset;  // per tap: its offset in x from the patch's origin; 0 past taps
  std::vector<int64_t> dy, dx;  // per tap: its row and column from the origin
  std::vector<int64_t> weight_tap;  // per tap: its index ci * kH * kW + i * kW + j in the weight's (C_in, kH, kW)

  ConvPatches(const Geometry& geometry, int64_t c_out, int lanes, at::IntArrayRef x_strides) : g(geometry), c(c_out) {
    cp = (c + lanes - 1) / lanes * lanes;
    taps = g.c * g.kh * g.kw;
    taps_padded = (taps + kTile - 1) / kTile * kTile;
    chunk = std::max<int64_t>(kTile, std::min<int64_t>(4096 / cp, 16384 / taps_padded) / kTile * kTile);
    step = g.sw * x_strides[3];
    ow_lo = std::min(g.wo, (g.pw + g.sw - 1) / g.sw);
    const int64_t last = g.w - 1 - (g.kw - 1) * g.dw + g.pw;  // the last column's origin + pw
    ow_hi = last < 0 ? 0 : std::min(g.wo, last / g.sw + 1);
    offset.assign(taps_padded, 0);
    // Taps in the order x keeps them: (i, j, ci) channels_last, so a tile's taps share cache
    // lines; else (ci, i, j)
    const bool channels_inner = x_strides[1] < x_strides[3];
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t ci = channels_inner ? t % g.c : t / (g.kh * g.kw), ij = channels_inner ? t / g.c : t % (g.kh * g.kw);
      const int64_t i = ij / g.kw, j = ij % g.kw;
      dy.push_back(i * g.dh);
      dx.push_back(j * g.dw);
      weight_tap.push_back(ci * g.kh * g.kw + ij);
      offset[t] = ci * x_strides[1] + i * g.dh * x_strides[2] + j * g.dw * x_strides[3];
    }
  }
};

// The patches of output pixels [ow0, ow0 + count) of row oh of image n, rows taps_padded apart,
// with the padding's zeros.
template <typename Acc>
void gather_patches(Acc* patches, const Acc* x, at::IntArrayRef xs, const ConvPatches& s, int64_t n, int64_t oh, int64_t ow0, int64_t count) {
  const Geometry& g = s.g;
  const int64_t ih0 = oh * g.sh - g.ph;
  for (int64_t p = 0; p < count; ++p) {
    const int64_t iw0 = (ow0 + p) * g.sw - g.pw;
    const int64_t origin = n * xs[0] + ih0 * xs[2] + iw0 * xs[3];  // may lie outside x: only in-bounds taps add to it
    Acc* row = patches + p * s.taps_padded;
    for (int64_t t = 0; t < s.taps; ++t) {
      const int64_t ih = ih0 + s.dy[t], iw = iw0 + s.dx[t];
      row[t] = ih >= 0 && ih < g.h && iw >= 0 && iw < g.w ? x[origin + s.offset[t]] : Acc(0);
    }
  }
}

// The output columns [lo, hi) of [ow0, end) of row oh whose taps all lie inside x.
inline std::pair<int64_t, int64_t> interior_columns(const ConvPatches& s, int64_t oh, int64_t ow0, int64_t end) {
  const Geometry& g = s.g;
  const int64_t ih0 = oh * g.sh - g.ph;
  const bool rows_inside = ih0 >= 0 && ih0 + (g.kh - 1) * g.dh < g.h;
  const int64_t lo = rows_inside ? std::clamp(s.ow_lo, ow0, end) : end, hi = rows_inside ? std::clamp(s.ow_hi, lo, end) : end;
  return {lo, hi};
}

// The patches of row oh of image n from output column ow on, read straight from x (interior
// columns only).
template <typename Acc>
XPatches<Acc> x_patches(const ConvPatches& s, const Acc* x, at::IntArrayRef xs, int64_t n, int64_t oh, int64_t ow) {
  return {x + n * xs[0] + (oh * s.g.sh - s.g.ph) * xs[2] + (ow * s.g.sw - s.g.pw) * xs[3], s.step, s.offset.data()};
}

// Calls run(patches, p0, np) for the runs of pixels [p0, p0 + np) (from the chunk's first) of
// output pixels [ow0, ow0 + count) of row oh of image n: the pixels whose taps all lie inside x
// read it directly, the border's are gathered into `buffer`.
template <typename Acc, typename Run>
void for_each_run(const ConvPatches& s, const Acc* x, at::IntArrayRef xs, int64_t n, int64_t oh, int64_t ow0, int64_t count, Acc* buffer,
                  const Run& run) {
  const int64_t end = ow0 + count;
  const auto [lo, hi] = interior_columns(s, oh, ow0, end);
  const auto border = [&](int64_t first, int64_t last) {
    if (first >= last) return;
    gather_patches(buffer, x, xs, s, n, oh, first, last - first);
    run(GatheredPatches<Acc>{buffer, s.taps_padded}, first - ow0, last - first);
  };
  border(ow0, lo);
  if (lo < hi) run(x_patches(s, x, xs, n, oh, lo), lo - ow0, hi - lo);
  border(hi, end);
}

// Prefetches input rows [first, last] of image n (clamped to x's rows) into L2: one span a row
// channels_last, else one a channel.
template <typename Acc>
void prefetch_input_rows(const Acc* x, at::IntArrayRef xs, const Geometry& g, int64_t n, int64_t first, int64_t last) {
  const bool pixels_contiguous = xs[1] == 1 && xs[3] == g.c;
  const int64_t bytes = (pixels_contiguous ? g.w * g.c : (g.w - 1) * xs[3] + 1) * int64_t(sizeof(Acc));  // of a span
  for (int64_t ih = std::max<int64_t>(first, 0); ih <= std::min<int64_t>(last, g.h - 1); ++ih)
    for (int64_t c = 0; c < (pixels_contiguous ? 1 : g.c); ++c) {
      const char* row = reinterpret_cast<const char*>(x + n * xs[0] + c * xs[1] + ih * xs[2]);
      for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 2);
    }
}

// Pixels whose weight gradient terms are summed in Acc before they are added in double.
constexpr int64_t kWeightGradPixels = 1024;

}  // namespace fastmb::cpu::patches
