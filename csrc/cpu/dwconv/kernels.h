// The CPU depthwise conv + BatchNorm + activation kernels: what the operators (forward.cpp,
// backward.cpp) call, one table of row-range passes per instruction set and kernel size.
//
// The passes are compiled once per instruction set, each in its own translation unit
// (kernels_avx512.cpp, kernels_avx2.cpp, kernels_baseline.cpp: ATen's DispatchStub layout), in
// a namespace of its own, from passes.h and tiles.h: they run on float (or double) NHWC images,
// and the operators convert bfloat16 into float a band of rows at a time. The sliding tiles
// specialised for kernel sizes 3, 5 and 7 are compiled for AVX-512 and AVX2 only; other
// geometries, float64 and x86 CPUs without AVX2 take the generic conv. This header and
// everything it includes need no ATen and are compiled for the baseline instruction set.
#pragma once

#include <c10/util/BFloat16.h>  // here, not first in vec.h: compiled for the baseline, not per ISA

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../activations.h"
#include "../aligned_vector.h"
#include "../../geometry.h"
#include "../isa.h"
#include "../vec_math.h"

namespace fastmb::cpu::dwconv {

// A thread's running mean and M2 (sum of squared deviations) per channel over `count` values.
struct Moments {
  double* mean;
  double* m2;
  int64_t count;
};

// The BN statistics and affine parameters per channel that the backward's per-value chain reads.
template <typename Acc>
struct BnParams {
  const Acc *mean, *invstd, *gamma, *beta;
};

// The output pixels whose taps read input column (or row) `in`: for each, the tap and output
// index. Built once per backward call so the gather does no divisions.
struct TapSources {
  std::vector<int> count;         // [size]
  std::vector<int> tap;           // [size][kernel]
  std::vector<int64_t> output;    // [size][kernel]
  TapSources(int64_t size, int64_t kernel, int64_t stride, int64_t pad, int64_t dil, int64_t out_size)
      : count(size, 0), tap(size * kernel), output(size * kernel) {
    for (int64_t in = 0; in < size; ++in)
      for (int t = 0; t < kernel; ++t) {
        const int64_t shifted = in + pad - t * dil;  // = out * stride
        if (shifted < 0 || shifted % stride != 0 || shifted / stride >= out_size) continue;
        tap[in * kernel + count[in]] = t;
        output[in * kernel + count[in]++] = shifted / stride;
      }
  }
};

// Backward pass 2's inputs for one image (pointers at its first pixel): dL/dz = a * dL/du - b -
// x_hat * d per channel (b, d: the batch statistics' terms, zero in eval), then the weight
// gradient into gw (this thread's [taps][C] partial, in double, or null) and dL/dx into gx (or
// null).
template <typename Acc>
struct BlockArgs {
  Acc* gx;
  const Acc* z;  // the image's z as pass 1 kept it (pixels g.c apart), or null: convolved again
  double* gw;
  const Acc *gy, *x, *w;
  const Acc* flipped;  // the flipped weight per channel block (stride 1, K specialised), or null
  BnParams<Acc> bn;
  const Acc *a, *b, *d;
  const TapSources *rows, *cols;
  Geometry g;
  Activation act;
};

// One instruction set's passes for one kernel size. Images are NHWC (pixels g.c apart), weights
// taps-major ([kH * kW][C]); rows [oh0, oh1) are output rows of the image.
template <typename Acc>
struct Kernels {
  // Eval: y = act(conv(x) * scale + shift) in one pass, for channels [c0, c0 + nc).
  void (*eval_rows)(Acc* y, const Acc* x, const Acc* w, const Acc* scale, const Acc* shift, const Geometry& g, Activation act,
                    int64_t oh0, int64_t oh1, int64_t c0, int64_t nc);
  // Training pass 1: z = conv(x) into z, and its statistics merged into `moments`.
  void (*statistics_rows)(Acc* z, Moments& moments, const Acc* x, const Acc* w, const Geometry& g, int64_t oh0, int64_t oh1);
  // Training pass 2: y = act(z * scale + shift) over `pixels` pixels of c channels (y may be z).
  void (*normalize)(Acc* y, const Acc* z, const Acc* scale, const Acc* shift, Activation act, int64_t pixels, int64_t c);
  // Backward pass 1: sum_gu[c] += sum of dL/du, sum_gu_xhat[c] += sum of dL/du * x_hat; z kept
  // into the image's rows at z_kept (pixels g.c apart) unless it is null.
  void (*grad_sums_rows)(double* sum_gu, double* sum_gu_xhat, Acc* z_kept, const Acc* gy, const Acc* x, const Acc* w,
                         const BnParams<Acc>& bn, const Geometry& g, Activation act, int64_t oh0, int64_t oh1);
  // Backward pass 2 for channels [c0, c0 + nc) of one image; gz is the calling thread's buffer.
  void (*grad_input_weight_block)(const BlockArgs<Acc>& args, AlignedVector<Acc>& gz, int64_t c0, int64_t nc);
  // fastmb::batch_norm_act's passes over `pixels` x c values z of an NHWC tensor, no conv: its
  // statistics merged into `moments`; the backward's two sums (as grad_sums_rows); and
  // dL/dz = a * dL/du - b - x_hat * d into gz.
  void (*batch_norm_moments)(Moments& moments, const Acc* z, int64_t pixels, int64_t c);
  void (*batch_norm_grad_sums)(double* sum_gu, double* sum_gu_xhat, const Acc* z, const Acc* gy, const BnParams<Acc>& bn, Activation act,
                               int64_t pixels, int64_t c);
  void (*batch_norm_grad_values)(Acc* gz, const Acc* z, const Acc* gy, const BnParams<Acc>& bn, const Acc* a, const Acc* b, const Acc* d,
                                 Activation act, int64_t pixels, int64_t c);
  // n values bfloat16 -> Acc and back (float only; the operators convert bfloat16 with these).
  void (*from_bfloat16)(const c10::BFloat16* src, Acc* dst, int64_t n);
  void (*to_bfloat16)(const Acc* src, c10::BFloat16* dst, int64_t n);
};

// The kernel size the tiles are specialised for: 3, 5, 7 with stride 1 or 2 and dilation 1
// along rows (every MobileNet layer); 0 (the generic conv) for anything else.
inline int specialised_kernel_size(const Geometry& g) {
  const bool specialised = g.kh == g.kw && g.dw == 1 && (g.sw == 1 || g.sw == 2) && (g.kh == 3 || g.kh == 5 || g.kh == 7);
  return specialised ? g.kh : 0;
}

// Each translation unit's table; k = 0, 3, 5 or 7. Without FASTMB_X86_TABLES (isa.h) only
// kernels_baseline.cpp is compiled, and it holds every kernel size.
Kernels<float> avx512_kernels(int k);
Kernels<float> avx2_kernels(int k);
Kernels<float> baseline_kernels(int k);
Kernels<double> baseline_double_kernels();

// The fastest passes this CPU runs (or FASTMB_ISA allows) for geometry g. The AVX-512 tiles are 16 lanes wide: at
// stride 2 they serve only whole vectors per pixel (else every other pixel's 64-byte loads
// would split a cache line), and the generic conv gains nothing from them.
template <typename Acc>
Kernels<Acc> select_kernels(const Geometry& g) {
  if constexpr (std::is_same_v<Acc, double>) {
    return baseline_double_kernels();
  } else {
    const int k = specialised_kernel_size(g);
#if FASTMB_X86_TABLES
    const Isa isa = cpu_isa();
    if (isa == Isa::kAvx512 && k != 0 && (g.sw == 1 || g.c % 16 == 0)) return avx512_kernels(k);
    if (isa >= Isa::kAvx2) return avx2_kernels(k);
#endif
    return baseline_kernels(k);
  }
}

// The fastest table for the passes that do not convolve (normalize and the batch_norm_* ones):
// the AVX-512 tiles' table is taken for kernel size 3, which holds them at 16 lanes.
template <typename Acc>
Kernels<Acc> select_elementwise_kernels() {
  if constexpr (std::is_same_v<Acc, double>) {
    return baseline_double_kernels();
  } else {
#if FASTMB_X86_TABLES
    const Isa isa = cpu_isa();
    if (isa == Isa::kAvx512) return avx512_kernels(3);
    if (isa >= Isa::kAvx2) return avx2_kernels(0);
#endif
    return baseline_kernels(0);
  }
}

}  // namespace fastmb::cpu::dwconv
