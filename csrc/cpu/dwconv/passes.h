// The depthwise conv + BatchNorm + activation passes over one image's rows, compiled once per
// instruction set (see tiles.h), and make_kernels, the table of them for one kernel size.
//
// z = conv(x) is never saved for backward (DESIGN.md's plan); a pass computes it a chunk of
// output pixels at a time, the chunk's accumulators in L1:
//   eval forward    eval_rows: y = act(z * scale + shift) as the conv's tiles store z
//   train forward   statistics_rows: z, stored, and its per-channel mean and M2 (two-pass per
//                   chunk, Chan merges); normalize: y = act(z * scale + shift)
//   backward        grad_sums_rows: z per chunk (kept for pass 2 in dL/dx's memory where it
//                   fits: see backward.cpp) and the sums of dL/du and dL/du * x_hat per channel;
//                   grad_input_weight_block, per (image, channel block): the kept z or z again,
//                   dL/dz into a task buffer, the weight gradient (sums held in registers over
//                   bands of rows), then dL/dx from dL/dz: a conv with the flipped kernel
//                   (stride 1), sub-pixel sliding tiles (stride 2), else a gather over the taps
#pragma once

#include "tiles.h"

namespace fastmb::cpu::dwconv::FASTMB_CPU_ISA {

// Accumulators per row chunk: a chunk of output pixels times the channels, kept in L1.
constexpr int64_t kChunkValues = 4096;

// Output pixels per chunk when each holds `channels` accumulators: a multiple of the sliding tile.
FASTMB_INLINE int64_t chunk_pixels(int64_t channels) {
  return std::max<int64_t>(kTilePixels, kChunkValues / std::max<int64_t>(channels, 1) / kTilePixels * kTilePixels);
}

// The output positions [lo, hi) whose input position o * stride - pad + tap * dil lies in [0, size).
FASTMB_INLINE void valid_outputs(int64_t tap, int64_t stride, int64_t pad, int64_t dil, int64_t size, int64_t out_lo, int64_t out_hi,
                                 int64_t& lo, int64_t& hi) {
  const int64_t offset = tap * dil - pad;  // input = o * stride + offset
  lo = std::max<int64_t>(out_lo, offset >= 0 ? 0 : (-offset + stride - 1) / stride);
  hi = std::min<int64_t>(out_hi, size - 1 - offset < 0 ? 0 : (size - 1 - offset) / stride + 1);
  if (hi < lo) hi = lo;
}

// Calls f(k, Int<NV>{}, Int<Bytes>{}) for blocks of NV vectors of Bytes that cover values
// [0, n) from 0: blocks of NV kConvBytes vectors, then single ones, then (AVX-512) one of 32 bytes
// where 8 values or more are left; returns where the values left for scalar code start. The
// elementwise passes' loops: the exp-based activations ran 1.4x faster in AVX-512's registers
// than in AVX's, and a block's per-channel parameters stay in registers over many pixels.
template <int NV, typename Acc, typename F>
FASTMB_INLINE int64_t for_each_vector_block(int64_t n, const F& f) {
  constexpr int64_t L = kConvBytes / sizeof(Acc);
  int64_t k = 0;
  if constexpr (NV > 1) {
    for (; k + NV * L <= n; k += NV * L) f(k, Int<NV>{}, Int<kConvBytes>{});
  }
  for (; k + L <= n; k += L) f(k, Int<1>{}, Int<kConvBytes>{});
  if constexpr (kConvBytes > 32) {
    constexpr int64_t H = 32 / sizeof(Acc);
    if (k + H <= n) {
      f(k, Int<1>{}, Int<32>{});
      k += H;
    }
  }
  return k;
}

// Channel vectors per register block of the elementwise passes, by how many per-channel
// parameters each vector holds (2 for normalize, 4 for the backward's sums, 7 for dL/dz): the
// parameters, reloaded for every pixel, were most of these passes' loads. AVX2 has 16 registers,
// AVX-512 32.
template <int Params>
constexpr int kParamBlockVectors = std::max(1, (kConvBytes == 64 ? 16 : 8) / Params);

// y[0:n] = act(y[0:n]) for a smooth activation (see ActivationFn): a second loop over values
// still in L1, which keeps the exp-based forms out of the conv tiles' registers.
template <typename Acc>
void apply_smooth_activation(Acc* y, int64_t n, Activation act) {
  dispatch_activation(act, [&](auto a) {
    constexpr Activation A = decltype(a)::value;
    if constexpr (is_smooth(A)) {
      int64_t k = for_each_vector_block<1, Acc>(n, [&](int64_t k, auto, auto bytes) __attribute__((always_inline)) {
        using V = Vec<Acc, decltype(bytes)::value>;
        V::store(y + k, smooth_activation<VecMath, Acc>(A, V::load(y + k)));
      });
      for (; k < n; ++k) y[k] = smooth_activation<VecMath, Acc>(A, y[k]);
    }
  });
}

template <int K, typename Acc>
void eval_rows(Acc* y, const Acc* x, const Acc* w, const Acc* scale, const Acc* shift, const Geometry& g, Activation act, int64_t oh0,
               int64_t oh1, int64_t c0, int64_t nc) {
  const ActivationFn<Acc> activation(act);
  for (int64_t oh = oh0; oh < oh1; oh += 2) {
    const int64_t rows = std::min<int64_t>(2, oh1 - oh);
    Acc* row = y + oh * g.wo * g.c;
    const auto store_at = [&](int64_t r) { return StoreNormalized<Acc>{row + r * g.wo * g.c + c0, g.c, scale + c0, shift + c0, activation}; };
    conv_rows<K>(rows, store_at, x, w, g, oh, 0, g.wo, c0, nc);
    if (!is_smooth(act)) continue;
    if (nc == g.c) apply_smooth_activation(row, rows * g.wo * g.c, act);
    else
      for (int64_t p = 0; p < rows * g.wo; ++p) apply_smooth_activation(row + p * g.c + c0, nc, act);
  }
}

// Merges the statistics of `pixels` x c values z (in L1) into `moments`; chunk_mean, chunk_m2 and
// chunk_residual are c-value scratch buffers.
template <typename Acc>
FASTMB_INLINE void merge_chunk_moments(Moments& moments, const Acc* z, int64_t pixels, int64_t c, Acc* chunk_mean, Acc* chunk_m2,
                                       Acc* chunk_residual) {
  std::fill(chunk_mean, chunk_mean + c, Acc(0));
  std::fill(chunk_m2, chunk_m2 + c, Acc(0));
  std::fill(chunk_residual, chunk_residual + c, Acc(0));
  add_column_sums(chunk_mean, pixels, c, [&](int64_t p, int64_t k, auto width) __attribute__((always_inline)) {
    return load_values<Acc, decltype(width)::value>(z + p * c + k);
  });
  const Acc inv_pixels = Acc(1) / Acc(pixels);
  for (int64_t k = 0; k < c; ++k) chunk_mean[k] *= inv_pixels;
  // The corrected two-pass algorithm: the deviations' own sum (small, so summed accurately)
  // corrects the mean's rounding, which the batch norm's backward would otherwise see as
  // a bias in x_hat (gradients of 1x1 convs, whose sums cancel, lost digits to it).
  add_column_sums(chunk_residual, pixels, c, [&](int64_t p, int64_t k, auto width) __attribute__((always_inline)) {
    constexpr int W = decltype(width)::value;
    return load_values<Acc, W>(z + p * c + k) - load_values<Acc, W>(chunk_mean + k);
  });
  add_column_sums(chunk_m2, pixels, c, [&](int64_t p, int64_t k, auto width) __attribute__((always_inline)) {
    constexpr int W = decltype(width)::value;
    const auto d = load_values<Acc, W>(z + p * c + k) - load_values<Acc, W>(chunk_mean + k);
    return d * d;
  });
  // Chan's merge; its weights are the same for every channel (no division per channel).
  const double na = double(moments.count), nb = double(pixels), total = na + nb;
  const double weight_b = nb / total, weight_ab = na * nb / total;
  for (int64_t k = 0; k < c; ++k) {
    const double residual = double(chunk_residual[k]);
    const double delta = double(chunk_mean[k]) + residual / nb - moments.mean[k];
    moments.mean[k] += delta * weight_b;
    moments.m2[k] += double(chunk_m2[k]) - residual * residual / nb + delta * delta * weight_ab;
  }
  moments.count += pixels;
}

template <int K, typename Acc>
void statistics_rows(Acc* z_img, Moments& moments, const Acc* x, const Acc* w, const Geometry& g, int64_t oh0, int64_t oh1) {
  const int64_t chunk = chunk_pixels(g.c);
  AlignedVector<Acc> scratch(3 * g.c);
  for (int64_t oh = oh0; oh < oh1; oh += 2) {
    const int64_t rows = std::min<int64_t>(2, oh1 - oh);
    for (int64_t ow0 = 0; ow0 < g.wo; ow0 += chunk) {
      const int64_t pixels = std::min(chunk, g.wo - ow0);
      Acc* z = z_img + (oh * g.wo + ow0) * g.c;
      conv_rows<K>(rows, [&](int64_t r) { return StoreValues<Acc>{z + r * g.wo * g.c, g.c}; }, x, w, g, oh, ow0, pixels, 0, g.c);
      for (int64_t r = 0; r < rows; ++r)
        merge_chunk_moments(moments, z + r * g.wo * g.c, pixels, g.c, scratch.data(), scratch.data() + g.c, scratch.data() + 2 * g.c);
    }
  }
}

// y = act(z * scale + shift) for `pixels` x c values (y may be z), a chunk of pixels at a time:
// per block of channel vectors, scale and shift in registers over the chunk's pixels.
template <typename Acc>
void normalize(Acc* y, const Acc* z, const Acc* scale, const Acc* shift, Activation act, int64_t pixels, int64_t c) {
  const ActivationFn<Acc> activation(act);
  const int64_t chunk = chunk_pixels(c);
  for (int64_t p0 = 0; p0 < pixels; p0 += chunk) {
    const int64_t np = std::min(chunk, pixels - p0);
    Acc* yc = y + p0 * c;
    const Acc* zc = z + p0 * c;
    const int64_t k0 = for_each_vector_block<kParamBlockVectors<2>, Acc>(c, [&](int64_t k, auto nv, auto bytes) __attribute__((always_inline)) {
      constexpr int NV = decltype(nv)::value;
      using V = Vec<Acc, decltype(bytes)::value>;
      constexpr int64_t L = V::kLanes;
      typename V::type sc[NV], sh[NV];
      unroll<NV>([&](auto v) __attribute__((always_inline)) {
        sc[v] = V::load(scale + k + v * L);
        sh[v] = V::load(shift + k + v * L);
      });
      const ActivationFn<Acc> held = activation;  // a copy no store can alias
      for (int64_t p = 0; p < np; ++p)
        unroll<NV>([&](auto v) __attribute__((always_inline)) {
          V::store(yc + p * c + k + v * L, held(V::load(zc + p * c + k + v * L) * sc[v] + sh[v]));
        });
    });
    for (int64_t p = 0; p < np; ++p)
      for (int64_t k = k0; k < c; ++k) yc[p * c + k] = activation(zc[p * c + k] * scale[k] + shift[k]);
    if (is_smooth(act)) apply_smooth_activation(yc, np * c, act);
  }
}

// The backward's per-value chain from z and grad_y, VT a vector of Acc or Acc: x_hat = (z - mean) *
// invstd, u = x_hat * gamma + beta, gu = act'(u) * grad_y, in registers: stored between separate
// loops, each would be a pass over the chunk.
template <Activation A, typename Acc, typename VT>
FASTMB_INLINE void chain_values(VT z, VT gy, VT mean, VT invstd, VT gamma, VT beta, VT& x_hat, VT& gu) {
  x_hat = (z - mean) * invstd;
  gu = activation_grad<A, Acc, VecMath>(gy, x_hat * gamma + beta);
}

// The chain for channel c alone.
template <Activation A, typename Acc>
FASTMB_INLINE void chain_at(const Acc* z, const Acc* gy, const BnParams<Acc>& p, int64_t c, Acc& x_hat, Acc& gu) {
  chain_values<A, Acc>(z[c], gy[c], p.mean[c], p.invstd[c], p.gamma[c], p.beta[c], x_hat, gu);
}

// A block's batch norm parameters, NV vectors of V from channel c, held in registers.
template <typename V, int NV, typename Acc>
struct HeldBn {
  typename V::type mean[NV], invstd[NV], gamma[NV], beta[NV];
  FASTMB_INLINE HeldBn(const BnParams<Acc>& p, int64_t c) {
    unroll<NV>([&](auto v) __attribute__((always_inline)) {
      const int64_t k = c + v * V::kLanes;
      mean[v] = V::load(p.mean + k), invstd[v] = V::load(p.invstd + k), gamma[v] = V::load(p.gamma + k), beta[v] = V::load(p.beta + k);
    });
  }
  template <Activation A>
  FASTMB_INLINE void chain(int v, const Acc* z, const Acc* gy, typename V::type& x_hat, typename V::type& gu) const {
    chain_values<A, Acc>(V::load(z), V::load(gy), mean[v], invstd[v], gamma[v], beta[v], x_hat, gu);
  }
};

// Backward pass 1's sums over a chunk of `pixels` x `nc` z values (grad_y rows gy_stride apart):
// sum_gu[c] += sum of gu, sum_gu_xhat[c] += sum of gu * x_hat, a block of channel vectors' sums
// and parameters held in registers over the pixels.
template <Activation A, typename Acc>
FASTMB_INLINE void add_grad_sums(Acc* sum_gu, Acc* sum_gu_xhat, const Acc* z, const Acc* gy, int64_t gy_stride, const BnParams<Acc>& bn,
                                 int64_t pixels, int64_t nc) {
  const int64_t k0 = for_each_vector_block<kParamBlockVectors<4>, Acc>(nc, [&](int64_t c, auto nv, auto bytes) __attribute__((always_inline)) {
    constexpr int NV = decltype(nv)::value;
    using V = Vec<Acc, decltype(bytes)::value>;
    constexpr int64_t L = V::kLanes;
    const HeldBn<V, NV, Acc> held(bn, c);
    typename V::type acc_gu[NV] = {}, acc_gu_xhat[NV] = {};
    for (int64_t p = 0; p < pixels; ++p)
      unroll<NV>([&](auto v) __attribute__((always_inline)) {
        typename V::type x_hat, gu;
        held.template chain<A>(v, z + p * nc + c + v * L, gy + p * gy_stride + c + v * L, x_hat, gu);
        acc_gu[v] += gu;
        acc_gu_xhat[v] += gu * x_hat;
      });
    unroll<NV>([&](auto v) __attribute__((always_inline)) {
      V::store(sum_gu + c + v * L, V::load(sum_gu + c + v * L) + acc_gu[v]);
      V::store(sum_gu_xhat + c + v * L, V::load(sum_gu_xhat + c + v * L) + acc_gu_xhat[v]);
    });
  });
  for (int64_t c = k0; c < nc; ++c)
    for (int64_t p = 0; p < pixels; ++p) {
      Acc x_hat, gu;
      chain_at<A>(z + p * nc, gy + p * gy_stride, bn, c, x_hat, gu);
      sum_gu[c] += gu;
      sum_gu_xhat[c] += gu * x_hat;
    }
}

// dL/dz = a * gu - b - x_hat * d (a, b, d per channel, offset like bn) for `pixels` x `nc` z
// values (pixels z_stride apart), into gz (nc apart), a chunk of pixels at a time with a block's
// parameters in registers. The x_hat term is left out where d is 0 (eval), as eager's backward
// has no such term: a NaN in z must not reach dL/dz through it.
template <Activation A, typename Acc>
FASTMB_INLINE void grad_z(Acc* gz, const Acc* z, int64_t z_stride, const Acc* gy, int64_t gy_stride, const BnParams<Acc>& bn, const Acc* a,
                          const Acc* b, const Acc* d, int64_t pixels, int64_t nc) {
  const int64_t chunk = chunk_pixels(nc);
  for (int64_t p0 = 0; p0 < pixels; p0 += chunk) {
    const int64_t np = std::min(chunk, pixels - p0);
    const int64_t k0 = for_each_vector_block<kParamBlockVectors<7>, Acc>(nc, [&](int64_t c, auto nv, auto bytes) __attribute__((always_inline)) {
      constexpr int NV = decltype(nv)::value;
      using V = Vec<Acc, decltype(bytes)::value>;
      constexpr int64_t L = V::kLanes;
      const HeldBn<V, NV, Acc> held(bn, c);
      typename V::type av[NV], bv[NV], dv[NV];
      unroll<NV>([&](auto v) __attribute__((always_inline)) {
        av[v] = V::load(a + c + v * L), bv[v] = V::load(b + c + v * L), dv[v] = V::load(d + c + v * L);
      });
      const typename V::type zero = {};
      for (int64_t p = p0; p < p0 + np; ++p)
        unroll<NV>([&](auto v) __attribute__((always_inline)) {
          typename V::type x_hat, gu;
          held.template chain<A>(v, z + p * z_stride + c + v * L, gy + p * gy_stride + c + v * L, x_hat, gu);
          V::store(gz + p * nc + c + v * L, av[v] * gu - bv[v] - (dv[v] == zero ? zero : x_hat * dv[v]));
        });
    });
    for (int64_t p = p0; p < p0 + np; ++p)
      for (int64_t c = k0; c < nc; ++c) {
        Acc x_hat, gu;
        chain_at<A>(z + p * z_stride, gy + p * gy_stride, bn, c, x_hat, gu);
        gz[p * nc + c] = a[c] * gu - b[c] - (d[c] == Acc(0) ? Acc(0) : x_hat * d[c]);
      }
  }
}

template <int K, typename Acc>
void grad_sums_rows(double* sum_gu, double* sum_gu_xhat, Acc* z_kept, const Acc* gy, const Acc* x, const Acc* w, const BnParams<Acc>& bn,
                    const Geometry& g, Activation act, int64_t oh0, int64_t oh1) {
  const int64_t chunk = chunk_pixels(g.c);
  // z: a chunk of each of two rows, or the image's rows kept for pass 2; the partial sums: one
  // row's each, as in float they lose digits with every row more.
  AlignedVector<Acc> z(z_kept != nullptr ? 0 : 2 * chunk * g.c), partial_gu(2 * g.c), partial_gu_xhat(2 * g.c);
  for (int64_t oh = oh0; oh < oh1; oh += 2) {
    const int64_t rows = std::min<int64_t>(2, oh1 - oh);
    std::fill(partial_gu.begin(), partial_gu.end(), Acc(0));
    std::fill(partial_gu_xhat.begin(), partial_gu_xhat.end(), Acc(0));
    for (int64_t ow0 = 0; ow0 < g.wo; ow0 += chunk) {
      const int64_t pixels = std::min(chunk, g.wo - ow0);
      const auto z_row = [&](int64_t r) { return z_kept != nullptr ? z_kept + ((oh + r) * g.wo + ow0) * g.c : z.data() + r * chunk * g.c; };
      conv_rows<K>(rows, [&](int64_t r) { return StoreValues<Acc>{z_row(r), g.c}; }, x, w, g, oh, ow0, pixels, 0, g.c);
      dispatch_activation(act, [&](auto activation) {
        for (int64_t r = 0; r < rows; ++r)
          add_grad_sums<decltype(activation)::value>(partial_gu.data() + r * g.c, partial_gu_xhat.data() + r * g.c, z_row(r),
                                                     gy + ((oh + r) * g.wo + ow0) * g.c, g.c, bn, pixels, g.c);
      });
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < g.c; ++c) {
        sum_gu[c] += partial_gu[r * g.c + c];
        sum_gu_xhat[c] += partial_gu_xhat[r * g.c + c];
      }
  }
}

// Vectors of Lanes doubles, loaded and stored at any double's alignment.
template <int Lanes>
struct DoubleLanes {
  typedef double type __attribute__((vector_size(Lanes * sizeof(double)), aligned(alignof(double))));
};

// dst[0:lanes] += v's lanes, in double: the weight gradient's per-thread partials sum a band's
// float sums over many bands, and in float their rounding outgrew eager's where those sums
// cancel. One vector conversion and add, not one per lane.
template <typename VT>
FASTMB_INLINE void add_lanes(double* dst, const VT& v) {
  using D = typename DoubleLanes<sizeof(VT) / sizeof(v[0])>::type;
  *reinterpret_cast<D*>(dst) += __builtin_convertvector(v, D);
}

// gw[tap][0:nc] += sum over pixels [lo, hi) of one output row of gz[ow - ow0][c] * x(ih, iw(ow))[c]
// for one tap (column j): NV vectors of channels from c, their sums held in registers over
// the row and added to gw once.
template <int NV, typename Acc>
FASTMB_INLINE void weight_grad_tile(double* gw, const Acc* gz, int64_t nc, const Acc* x_row, const Geometry& g, int j, int64_t ow0, int64_t lo,
                                    int64_t hi, int64_t c) {
  using V = Vec<Acc>;
  typename V::type acc[NV] = {};
  for (int64_t ow = lo; ow < hi; ++ow) {
    const Acc* gzp = gz + (ow - ow0) * nc + c;
    const Acc* xp = x_row + (ow * g.sw - g.pw + int64_t(j) * g.dw) * g.c + c;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[v] += V::load(gzp + v * V::kLanes) * V::load(xp + v * V::kLanes);
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) add_lanes(gw + c + v * V::kLanes, acc[v]);
}

// The weight gradient's share of output row oh, pixels [ow0, ow0 + pixels): gw is [taps][C]
// (this thread's partial) offset to c0, gz is [pixels][nc], x_img offset to c0. Any geometry.
template <typename Acc>
FASTMB_INLINE void weight_grad_row(double* gw, const Acc* gz, const Acc* x_img, const Geometry& g, int64_t oh, int64_t ow0, int64_t pixels,
                                   int64_t nc) {
  constexpr int64_t L = Vec<Acc>::kLanes;
  const int kh = g.kh, kw = g.kw;
  for (int i = 0; i < kh; ++i) {
    const int64_t ih = oh * g.sh - g.ph + int64_t(i) * g.dh;
    if (ih < 0 || ih >= g.h) continue;
    const Acc* x_row = x_img + ih * g.w * g.c;
    for (int j = 0; j < kw; ++j) {
      int64_t lo, hi;
      valid_outputs(j, g.sw, g.pw, g.dw, g.w, ow0, ow0 + pixels, lo, hi);
      double* gw_tap = gw + (int64_t(i) * kw + j) * g.c;
      int64_t c = 0;
      for (; c + 4 * L <= nc; c += 4 * L) weight_grad_tile<4>(gw_tap, gz, nc, x_row, g, j, ow0, lo, hi, c);
      for (; c + L <= nc; c += L) weight_grad_tile<1>(gw_tap, gz, nc, x_row, g, j, ow0, lo, hi, c);
      for (; c < nc; ++c)
        for (int64_t ow = lo; ow < hi; ++ow) gw_tap[c] += double(gz[(ow - ow0) * nc + c] * x_row[(ow * g.sw - g.pw + int64_t(j) * g.dw) * g.c + c]);
    }
  }
}

// Output pixels whose weight gradient terms a float register sums before they are added in
// double (add_lanes): whole rows up to this many, so narrow rows do not pay the conversion per row.
constexpr int64_t kWeightGradPixels = 128;

// Channel vectors of Bytes per weight_grad_rows_k step: K x NV independent sums, enough to cover
// the multiply-add latency, within the registers (16 for AVX2's 32-byte vectors, 32 for
// AVX-512's).
template <int K, int Bytes>
constexpr int kWeightGradVectors = Bytes == 64 ? (K == 3 ? 6 : K == 5 ? 4 : 3) : (K == 3 ? 4 : K == 5 ? 2 : 1);

// The weight gradient's share of output rows [oh0, oh1) for K = 3, 5, 7 (dilation 1 along the
// row): gw is [taps][C] (this thread's partial) offset to c0, gz is the rows' [oh1 - oh0][Wo][nc],
// x_img offset to c0. Per kernel row and NV channel vectors, the K taps' sums stay in registers
// over all the rows' pixels, each dL/dz vector loaded once for all K; then narrower vectors,
// then channel by channel.
template <int K, typename Acc>
FASTMB_INLINE void weight_grad_rows_k(double* gw, const Acc* gz, const Acc* x_img, const Geometry& g, int64_t oh0, int64_t oh1, int64_t nc) {
  // Pixels [lo, hi) read all K columns inside the row; the others check each tap.
  const int64_t lo = std::min(g.wo, (g.pw + g.sw - 1) / g.sw);
  const int64_t hi = std::max(lo, std::min<int64_t>(g.wo, g.w - K + g.pw >= 0 ? (g.w - K + g.pw) / g.sw + 1 : 0));
  for (int i = 0; i < K; ++i) {
    double* gw_row = gw + int64_t(i) * K * g.c;
    const auto vectors_at = [&](int64_t c, auto nv, auto bytes) __attribute__((always_inline)) {
      constexpr int NV = decltype(nv)::value;
      using V = Vec<Acc, decltype(bytes)::value>;
      constexpr int64_t L = V::kLanes;
      typename V::type acc[NV][K] = {};
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        const int64_t ih = oh * g.sh - g.ph + int64_t(i) * g.dh;
        if (ih < 0 || ih >= g.h) continue;
        const Acc* x_row = x_img + ih * g.w * g.c;
        const Acc* gz_row = gz + (oh - oh0) * g.wo * nc;
        const auto add_pixel = [&](int64_t ow, bool check) __attribute__((always_inline)) {
          const int64_t iw0 = ow * g.sw - g.pw;
          unroll<NV>([&](auto v) __attribute__((always_inline)) {
            const typename V::type gv = V::load(gz_row + ow * nc + c + v * L);
            const Acc* xp = x_row + iw0 * g.c + c + v * L;
            unroll<K>([&](auto j) __attribute__((always_inline)) {
              if (!check || (iw0 + j >= 0 && iw0 + j < g.w)) acc[v][j] += gv * V::load(xp + j * g.c);
            });
          });
        };
        for (int64_t ow = 0; ow < lo; ++ow) add_pixel(ow, true);
        for (int64_t ow = lo; ow < hi; ++ow) add_pixel(ow, false);
        for (int64_t ow = hi; ow < g.wo; ++ow) add_pixel(ow, true);
      }
      unroll<NV>([&](auto v) __attribute__((always_inline)) {
        unroll<K>([&](auto j) __attribute__((always_inline)) { add_lanes(gw_row + j * g.c + c + v * L, acc[v][j]); });
      });
    };
    constexpr int B = kConvBytes, NV = kWeightGradVectors<K, B>;
    constexpr int64_t L = Vec<Acc, B>::kLanes;
    int64_t c = 0;
    for (; c + NV * L <= nc; c += NV * L) vectors_at(c, Int<NV>{}, Int<B>{});
    // A narrow block's vectors in fewer sums, but enough of them to cover the latency.
    if constexpr (NV >= 4) {
      for (; c + NV / 2 * L <= nc; c += NV / 2 * L) vectors_at(c, Int<NV / 2>{}, Int<B>{});
    }
    if constexpr (NV / 2 > 2) {
      for (; c + 2 * L <= nc; c += 2 * L) vectors_at(c, Int<2>{}, Int<B>{});
    }
    for (; c + L <= nc; c += L) vectors_at(c, Int<1>{}, Int<B>{});
    if constexpr (B > 32) {
      for (; c + 32 / int64_t(sizeof(Acc)) <= nc; c += 32 / int64_t(sizeof(Acc))) vectors_at(c, Int<1>{}, Int<32>{});
    }
    for (; c < nc; ++c)
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        const int64_t ih = oh * g.sh - g.ph + int64_t(i) * g.dh;
        if (ih < 0 || ih >= g.h) continue;
        const Acc* x_row = x_img + ih * g.w * g.c;
        for (int64_t ow = 0; ow < g.wo; ++ow)
          for (int j = 0; j < K; ++j) {
            const int64_t iw = ow * g.sw - g.pw + j;
            if (iw >= 0 && iw < g.w) gw_row[j * g.c + c] += double(gz[((oh - oh0) * g.wo + ow) * nc + c] * x_row[iw * g.c + c]);
          }
      }
  }
}

// dL/dx at one input pixel for NV vectors of channels from c: the gather, over the taps that
// read the pixel (row pairs ri/ro, column pairs cj/co: tap and output index), of gz ([Ho][Wo][nc])
// times the weight (w offset to the block's first channel, rows of C).
template <int NV, typename Acc>
FASTMB_INLINE void grad_x_tile(Acc* gx, const Acc* gz, const Acc* w, const Geometry& g, const int* ri, const int64_t* ro, int rows, const int* cj,
                               const int64_t* co, int cols, int64_t nc, int64_t c) {
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
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) V::store(gx + c + v * L, acc[v]);
}

// dL/dx for input row ih of one image and channel block: gx offset to the row's first pixel and
// the block's first channel (pixels C apart).
template <typename Acc>
FASTMB_INLINE void grad_x_row(Acc* gx, const Acc* gz, const Acc* w, const Geometry& g, const TapSources& rows, const TapSources& cols,
                              int64_t ih, int64_t nc) {
  constexpr int64_t L = Vec<Acc>::kLanes;
  const int* ri = rows.tap.data() + ih * g.kh;
  const int64_t* ro = rows.output.data() + ih * g.kh;
  for (int64_t iw = 0; iw < g.w; ++iw) {
    const int* cj = cols.tap.data() + iw * g.kw;
    const int64_t* co = cols.output.data() + iw * g.kw;
    const int nr = rows.count[ih], ncols = cols.count[iw];
    Acc* gxp = gx + iw * g.c;
    int64_t c = 0;
    for (; c + 4 * L <= nc; c += 4 * L) grad_x_tile<4>(gxp, gz, w, g, ri, ro, nr, cj, co, ncols, nc, c);
    for (; c + L <= nc; c += L) grad_x_tile<1>(gxp, gz, w, g, ri, ro, nr, cj, co, ncols, nc, c);
    for (; c < nc; ++c) {
      Acc sum = 0;
      for (int a = 0; a < nr; ++a)
        for (int b = 0; b < ncols; ++b) sum += gz[(int64_t(ro[a]) * g.wo + co[b]) * nc + c] * w[(int64_t(ri[a]) * g.kw + cj[b]) * g.c + c];
      gxp[c] = sum;
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
template <int P, int Bytes, int K, bool Inside, typename Acc>
FASTMB_INLINE void grad_x_stride2_tile(Acc* gx, const Acc* gz_u0, const Acc* w, const Geometry& g, const int* ri, const int64_t* ro, int nrows,
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
    if (q >= q_lo && q < q_hi) StoreValues<Acc>{gx, g.c}.vector(q, c, acc[q]);
  });
}

// dL/dx of input row ih (gx offset to the row's first pixel and the block's first channel) for
// stride 2 along the row: sliding tiles of 8 pixels by a vector of kConvBytes
// (overlapping_channel_tiles), from the first pixel with iw + pw even (the tile before pixel 0
// when pw is odd); gz is this task's [Ho][Wo][nc], w offset to the block.
template <int K, typename Acc>
FASTMB_INLINE void grad_x_row_stride2(Acc* gx, const Acc* gz, const Acc* w, const Geometry& g, const TapSources& rows, int64_t ih,
                                      int64_t nc) {
  constexpr int P = 8, U = P / 2 + (K - 1) / 2;
  const int* ri = rows.tap.data() + ih * g.kh;
  const int64_t* ro = rows.output.data() + ih * g.kh;
  const int nrows = rows.count[ih];
  for (int64_t iw0 = -(g.pw % 2); iw0 < g.w; iw0 += P) {
    const int64_t ow_u0 = (iw0 + g.pw) / 2 - (K - 1) / 2;
    const int u_lo = int(std::clamp<int64_t>(-ow_u0, 0, U)), u_hi = int(std::clamp<int64_t>(g.wo - ow_u0, 0, U));
    const int q_lo = int(std::max<int64_t>(0, -iw0)), q_hi = int(std::min<int64_t>(P, g.w - iw0));
    const bool inside = u_lo == 0 && u_hi == U;
    // Pixel iw0 and column ow_u0 may lie before the row's first: only those inside are accessed.
    Acc* gx_tile = gx + iw0 * g.c;
    const Acc* gz_u0 = gz + ow_u0 * nc;
    const auto tile_at = [&](int64_t c, auto bytes) __attribute__((always_inline)) {
      constexpr int B = decltype(bytes)::value;
      if (inside) grad_x_stride2_tile<P, B, K, true>(gx_tile, gz_u0, w, g, ri, ro, nrows, nc, u_lo, u_hi, q_lo, q_hi, c);
      else grad_x_stride2_tile<P, B, K, false>(gx_tile, gz_u0, w, g, ri, ro, nrows, nc, u_lo, u_hi, q_lo, q_hi, c);
    };
    for (int64_t c = overlapping_channel_tiles<kConvBytes, Acc>(nc, tile_at); c < nc; ++c)
      for (int q = q_lo; q < q_hi; ++q) {
        Acc sum = 0;
        for (int a = 0; a < nrows; ++a)
          for (int u = u_lo; u < u_hi; ++u) {
            const int j = q - 2 * u + K - 1;
            if (j >= 0 && j < K) sum += gz_u0[(int64_t(ro[a]) * g.wo + u) * nc + c] * w[(int64_t(ri[a]) * K + j) * g.c + c];
          }
        gx_tile[q * g.c + c] = sum;
      }
  }
}

// z is read where pass 1 kept it (args.z), else convolved again; x_hat and dL/du are recomputed
// from it and grad_y: cheaper than keeping them from pass 1, which would write and read two more
// tensors. gz holds the whole [Ho][Wo][nc] dL/dz when dL/dx is wanted, one band of rows otherwise.
template <int K, typename Acc>
void grad_input_weight_block(const BlockArgs<Acc>& args, AlignedVector<Acc>& gz, int64_t c0, int64_t nc) {
  const Geometry& g = args.g;
  const int64_t chunk = chunk_pixels(nc);
  const BnParams<Acc> bn{args.bn.mean + c0, args.bn.invstd + c0, args.bn.gamma + c0, args.bn.beta + c0};
  // Bands of whole rows, about kWeightGradPixels pixels: the specialised weight gradient sums
  // a band's pixels in registers.
  const int64_t band = std::max<int64_t>(1, kWeightGradPixels / std::max<int64_t>(g.wo, 1));
  AlignedVector<Acc> z(args.z != nullptr ? 0 : 2 * chunk * nc);  // a chunk of each of two rows, where pass 1 kept none
  gz.resize((args.gx != nullptr ? g.ho : std::min(band, g.ho)) * g.wo * nc);
  for (int64_t oh0 = 0; oh0 < g.ho; oh0 += band) {
    const int64_t oh1 = std::min(g.ho, oh0 + band);
    Acc* gz_band = args.gx != nullptr ? gz.data() + oh0 * g.wo * nc : gz.data();
    for (int64_t oh = oh0; oh < oh1; oh += 2) {
      const int64_t rows = std::min<int64_t>(2, oh1 - oh);
      for (int64_t ow0 = 0; ow0 < g.wo; ow0 += chunk) {
        const int64_t pixels = std::min(chunk, g.wo - ow0);
        if (args.z == nullptr)
          conv_rows<K>(rows, [&](int64_t r) { return StoreValues<Acc>{z.data() + r * chunk * nc, nc}; }, args.x, args.w, g, oh, ow0, pixels, c0, nc);
        dispatch_activation(args.act, [&](auto activation) {
          for (int64_t r = 0; r < rows; ++r) {
            const Acc* z_row = args.z != nullptr ? args.z + ((oh + r) * g.wo + ow0) * g.c + c0 : z.data() + r * chunk * nc;
            grad_z<decltype(activation)::value>(gz_band + ((oh + r - oh0) * g.wo + ow0) * nc, z_row, args.z != nullptr ? g.c : nc,
                                                args.gy + ((oh + r) * g.wo + ow0) * g.c + c0, g.c, bn, args.a + c0, args.b + c0, args.d + c0,
                                                pixels, nc);
          }
        });
      }
    }
    if (args.gw != nullptr) {
      if constexpr (K != 0) {
        weight_grad_rows_k<K>(args.gw + c0, gz_band, args.x + c0, g, oh0, oh1, nc);
      } else {
        for (int64_t oh = oh0; oh < oh1; ++oh)
          weight_grad_row(args.gw + c0, gz_band + (oh - oh0) * g.wo * nc, args.x + c0, g, oh, 0, g.wo, nc);
      }
    }
  }
  if (args.gx == nullptr) return;
  if (args.flipped != nullptr) {  // the conv of dL/dz with the flipped kernel (backward.cpp's flipped_blocks)
    Geometry transposed = g;
    transposed.n = 1, transposed.c = nc, transposed.h = g.ho, transposed.w = g.wo, transposed.ho = g.h, transposed.wo = g.w;
    transposed.ph = (g.kh - 1) * g.dh - g.ph, transposed.pw = g.kw - 1 - g.pw;
    for (int64_t ih = 0; ih < g.h; ih += 2) {
      Acc* gx_row = args.gx + ih * g.w * g.c + c0;
      conv_rows<K>(std::min<int64_t>(2, g.h - ih), [&](int64_t r) { return StoreValues<Acc>{gx_row + r * g.w * g.c, g.c}; }, gz.data(),
                   args.flipped + c0 * g.kh * g.kw, transposed, ih, 0, g.w, 0, nc);
    }
    return;
  }
  for (int64_t ih = 0; ih < g.h; ++ih) {
    Acc* gx_row = args.gx + ih * g.w * g.c + c0;
    if constexpr (K != 0) {
      if (g.sw == 2) {
        grad_x_row_stride2<K>(gx_row, gz.data(), args.w + c0, g, *args.rows, ih, nc);
        continue;
      }
    }
    grad_x_row(gx_row, gz.data(), args.w + c0, g, *args.rows, *args.cols, ih, nc);
  }
}

// The batch norm + activation passes over `pixels` x c values of an NHWC tensor z (no conv):
// fastmb::batch_norm_act's training forward and backward (csrc/cpu/batch_norm_act.cpp).
template <typename Acc>
void batch_norm_moments(Moments& moments, const Acc* z, int64_t pixels, int64_t c) {
  const int64_t chunk = chunk_pixels(c);
  AlignedVector<Acc> scratch(3 * c);
  for (int64_t p = 0; p < pixels; p += chunk)
    merge_chunk_moments(moments, z + p * c, std::min(chunk, pixels - p), c, scratch.data(), scratch.data() + c, scratch.data() + 2 * c);
}

template <typename Acc>
void batch_norm_grad_sums(double* sum_gu, double* sum_gu_xhat, const Acc* z, const Acc* gy, const BnParams<Acc>& bn, Activation act,
                          int64_t pixels, int64_t c) {
  const int64_t chunk = chunk_pixels(c);
  AlignedVector<Acc> partial(2 * c);
  for (int64_t p = 0; p < pixels; p += chunk) {  // float partials over a chunk, summed in double
    std::fill(partial.begin(), partial.end(), Acc(0));
    dispatch_activation(act, [&](auto activation) {
      add_grad_sums<decltype(activation)::value>(partial.data(), partial.data() + c, z + p * c, gy + p * c, c, bn,
                                                 std::min(chunk, pixels - p), c);
    });
    for (int64_t k = 0; k < c; ++k) {
      sum_gu[k] += partial[k];
      sum_gu_xhat[k] += partial[c + k];
    }
  }
}

template <typename Acc>
void batch_norm_grad_values(Acc* gz, const Acc* z, const Acc* gy, const BnParams<Acc>& bn, const Acc* a, const Acc* b, const Acc* d,
                            Activation act, int64_t pixels, int64_t c) {
  dispatch_activation(act, [&](auto activation) { grad_z<decltype(activation)::value>(gz, z, c, gy, c, bn, a, b, d, pixels, c); });
}

inline void from_bfloat16(const c10::BFloat16* src, float* dst, int64_t n) { convert(src, dst, n); }
inline void to_bfloat16(const float* src, c10::BFloat16* dst, int64_t n) { convert(src, dst, n); }

template <int K, typename Acc>
Kernels<Acc> make_kernels() {
  Kernels<Acc> kernels{&eval_rows<K, Acc>, &statistics_rows<K, Acc>, &normalize<Acc>, &grad_sums_rows<K, Acc>,
                       &grad_input_weight_block<K, Acc>, &batch_norm_moments<Acc>, &batch_norm_grad_sums<Acc>,
                       &batch_norm_grad_values<Acc>};
  if constexpr (std::is_same_v<Acc, float>) kernels.from_bfloat16 = &from_bfloat16, kernels.to_bfloat16 = &to_bfloat16;
  return kernels;
}

}  // namespace fastmb::cpu::dwconv::FASTMB_CPU_ISA
