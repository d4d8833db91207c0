// The pointwise (1x1) conv GEMM of the fused inverted-residual op: c = epilogue(a * w), where a
// is (m, k) rows of pixels (NHWC), w the (k, n) weight pre-packed in panels of 16 output
// channels ([ceil(n / 16)][k][16], zero-padded), and the epilogue (bias, activation, residual)
// is applied while the tile is in registers. Register tiles of up to 6 pixels x 64 channels
// on AVX-512: at batch 1 MobileNet's GEMMs are small (7x7 to 14x14 pixels, 16 to 960 channels),
// where the BLAS's per-call packing and blocking cost more than the products themselves.
//
// Compiled once per instruction set (kernels_*.cpp, as the depthwise kernels are); this header
// needs no ATen.
#pragma once

#include <c10/util/BFloat16.h>  // here, not first in vec.h: compiled for the baseline, not per ISA

#include <cstdint>

#include "../../activations.h"
#include "../isa.h"
#include "../vec_math.h"

namespace fastmb::cpu::pointwise {

constexpr int kPanel = 16;  // output channels per packed weight panel

// The packed panels that hold `channels` output channels.
constexpr int64_t panels_of(int64_t channels) { return (channels + kPanel - 1) / kPanel; }

// Where value (kk, col) of a (k, n) weight lies in its packed panels.
constexpr int64_t packed_at(int64_t kk, int64_t col, int64_t k) { return ((col / kPanel) * k + kk) * kPanel + col % kPanel; }

struct Gemm {
  const float* a;  // (m, k), rows lda apart
  int64_t lda;
  const float* w;  // packed panels [ceil(n / 16)][k][16]
  const float* bias;  // (n)
  const float* residual;  // (m, n), rows ldr apart, added after the activation; or null
  int64_t ldr;
  float* c;  // (m, n), rows ldc apart
  int64_t ldc;
  int64_t m, n, k;
  Activation act;
  // Whether the weights are likely in memory, not in cache (each read once a call, as at batch
  // 1): the kernel then prefetches them ahead of its tiles.
  bool cold_weights = false;
  // Data the caller reads next (the next layer's weights): `stream_lines` 64-byte lines from
  // `stream`, prefetched into L2 by the row tiles of the call's first group of whole panels
  // (kPanels of them, on AVX-512 4) while they compute, two a k step at most, so that a
  // memory-bound read hides under the GEMM's arithmetic. Calls with fewer panels leave it.
  const float* stream = nullptr;
  int64_t stream_lines = 0;
};

// The output columns of panels [panel0, panel1) for every row.
using GemmPanels = void (*)(const Gemm& gemm, int64_t panel0, int64_t panel1);

GemmPanels avx512_gemm();
GemmPanels avx2_gemm();
GemmPanels baseline_gemm();

// The fastest kernel this CPU runs (or FASTMB_ISA allows).
inline GemmPanels select_gemm() {
#if FASTMB_X86_TABLES
  if (cpu_isa() == Isa::kAvx512) return avx512_gemm();
  if (cpu_isa() == Isa::kAvx2) return avx2_gemm();
#endif
  return baseline_gemm();
}

}  // namespace fastmb::cpu::pointwise
