// The pointwise GEMM's register tiles, compiled once per instruction set: included by a
// translation unit that defines FASTMB_CPU_ISA (its namespace), FASTMB_GEMM_BYTES (the vector
// width), FASTMB_GEMM_ROWS and FASTMB_GEMM_PANELS (the tile: rows x panels of 16 channels, so
// that its accumulators, the weight vectors and a broadcast fit the ISA's registers).
#pragma once

#ifndef FASTMB_CPU_ISA
#error "tiles.h is compiled per instruction set: see kernels_*.cpp"
#endif

#include "../vec.h"  // after the translation unit's target pragma: its loops inline the ISA's lambdas
#include "kernels.h"

namespace fastmb::cpu::pointwise::FASTMB_CPU_ISA {

using V = Vec<float, FASTMB_GEMM_BYTES>;
using VT = V::type;
constexpr int kLanes = V::kLanes;
constexpr int kPanelVectors = kPanel / kLanes;
constexpr int kRows = FASTMB_GEMM_ROWS, kPanels = FASTMB_GEMM_PANELS;

// Rows [i0, i0 + R) x panels [p0, p0 + P) of c: the k-loop with R * P * kPanelVectors
// accumulators in registers, then bias, activation and residual on the way out. Columns past n
// (the last panel's padding) are computed and dropped.
template <int R, int P>
FASTMB_INLINE void tile(const Gemm& g, int64_t i0, int64_t p0) {
  constexpr int NV = P * kPanelVectors;
  VT acc[R][NV] = {};
  const int64_t k = g.k, lda = g.lda;
  const float* a = g.a + i0 * lda;
  const float* w = g.w + p0 * k * kPanel;
  // Plain loops with constant trip counts, fully unrolled, so the accumulators stay in registers.
  for (int64_t kk = 0; kk < k; ++kk) {
    VT wv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) wv[v] = V::load(w + (v / kPanelVectors) * k * kPanel + kk * kPanel + (v % kPanelVectors) * kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const VT x = VT{} + a[r * lda + kk];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += x * wv[v];
    }
  }
  const ActivationFn<float> act(g.act);
  const bool smooth = is_smooth(g.act);
  const int64_t col0 = p0 * kPanel;
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const int64_t col = col0 + v * kLanes;
    if (col >= g.n) break;
    if (col + kLanes <= g.n) {
      const VT bias = V::load(g.bias + col);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        VT y = acc[r][v] + bias;
        y = smooth ? smooth_activation<VecMath, float>(g.act, y) : act(y);
        if (g.residual != nullptr) y += V::load(g.residual + (i0 + r) * g.ldr + col);
        V::store(g.c + (i0 + r) * g.ldc + col, y);
      }
    } else {  // the last, partial vector of columns
      for (int r = 0; r < R; ++r)
        for (int64_t j = col; j < g.n; ++j) {
          float y = acc[r][v][j - col] + g.bias[j];
          y = smooth ? smooth_activation<ScalarMath, float>(g.act, y) : act(y);
          if (g.residual != nullptr) y += g.residual[(i0 + r) * g.ldr + j];
          g.c[(i0 + r) * g.ldc + j] = y;
        }
    }
  }
}

// The last rows' tile: `left` (< kRows) rows from i0.
template <int P, int R = kRows - 1>
FASTMB_INLINE void tail_tile(const Gemm& g, int64_t i0, int64_t p0, int64_t left) {
  if constexpr (R >= 1) {
    if (left == R) return tile<R, P>(g, i0, p0);
    tail_tile<P, R - 1>(g, i0, p0, left);
  }
}

// Rows [0, m) in tiles of kRows, the last tile as many rows as are left.
template <int P>
FASTMB_INLINE void tile_rows(const Gemm& g, int64_t p0) {
  int64_t i0 = 0;
  for (; i0 + kRows <= g.m; i0 += kRows) tile<kRows, P>(g, i0, p0);
  tail_tile<P>(g, i0, p0, g.m - i0);
}

// Panel by panel group (a group's weights, k x 16 x kPanels floats, stay in L1/L2 while every
// row tile passes over them).
void gemm_panels(const Gemm& g, int64_t panel0, int64_t panel1) {
  int64_t p = panel0;
  if constexpr (kPanels > 1)
    for (; p + kPanels <= panel1; p += kPanels) tile_rows<kPanels>(g, p);
  for (; p < panel1; ++p) tile_rows<1>(g, p);
}

}  // namespace fastmb::cpu::pointwise::FASTMB_CPU_ISA
