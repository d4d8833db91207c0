// fastmb::stem_conv_bn_act on the CPU: y = act(batch_norm(conv(x))) in training, with the batch's
// statistics, and its backward, for a full conv over few input channels: the RGB stem of every
// MobileNet. A stem output value costs C_in * kH * kW (27) multiply-adds, less than its memory
// round trip, so z = conv(x) is never stored (DESIGN.md's depthwise plan): every pass recomputes
// it a chunk of output pixels at a time from the chunk's patches (im2col, in L1):
//   forward   pass 1: z and its per-thread moments (Chan merges); pass 2: z, y = act(z * scale + shift)
//   backward  pass 1: z, the sums of dL/du and dL/du * x_hat; pass 2: z, dL/dz and the weight
//             gradient patches^T . dL/dz (float over a chunk, per-thread partials in double)
// Eager keeps z and u for backward and writes dL/du and dL/dz: four stem-sized tensors these
// passes never write. x takes no gradient (an image): the module runs eager's ops where it needs one.
// The batch norm passes are the depthwise kernels' (dwconv/passes.h); the patch GEMMs are here.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dwconv/operator.h"
#include "stem_rows.h"

namespace fastmb::cpu {
namespace {

using at::Tensor;
using dwconv::BnParams;
using dwconv::Kernels;
using dwconv::Moments;

// Vector accumulators per register tile: NV vectors of output channels times kTile / NV pixels
// (z) or taps (weight gradient), 12 of the 16 (AVX2) or 32 (AVX-512) registers.
constexpr int kTile = 12;
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
  FASTMB_INLINE const Acc* pixel(int64_t p) const { return origin + p * step; }
  FASTMB_INLINE int64_t tap(int64_t t) const { return offset[t]; }
};
template <typename Acc>
struct GatheredPatches {
  const Acc* rows;
  int64_t ld;
  FASTMB_INLINE const Acc* pixel(int64_t p) const { return rows + p * ld; }
  FASTMB_INLINE int64_t tap(int64_t t) const { return t; }
};

// What a z tile stores: z itself (the training passes), or act(z * scale + shift) (the eval stem:
// its batch norm and activation applied while z is in registers). at(co): from channel co on.
struct StoreZ {
  StoreZ at(int64_t) const { return *this; }
  template <typename VT>
  FASTMB_INLINE VT operator()(VT z, int64_t) const { return z; }
};
template <typename Acc>
struct StoreNormalized {
  const Acc *scale, *shift;
  Activation act;
  ActivationFn<Acc> clamp;  // act's clamp form, made once (smooth activations: unused)
  StoreNormalized(const Acc* scale_, const Acc* shift_, Activation act_) : scale(scale_), shift(shift_), act(act_), clamp(act_) {}
  StoreNormalized at(int64_t co) const { return {scale + co, shift + co, act}; }
  // Channels [col, col + lanes) of one pixel.
  template <typename VT>
  FASTMB_INLINE VT operator()(VT z, int64_t col) const {
    using V = Vec<Acc, sizeof(VT)>;
    const VT u = z * V::load(scale + col) + V::load(shift + col);
    return is_smooth(act) ? smooth_activation<VecMath, Acc>(act, u) : clamp(u);
  }
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
    constexpr int NV = decltype(vectors)::value, P = kTile / NV;
    for (int64_t p = 0; p < count; p += P)
      z_tile<Bytes, NV, P>(z + p * cp + co, cp, patches, p, w + co, cp, taps, count - p, store.at(co));
  });
}

// gw[t][v] += the sum over `count` pixels of patch tap t0 + t * gz[p][v], for T taps and NV
// vectors of output channels.
template <int Bytes, int NV, int T, typename Acc, typename Patches>
FASTMB_INLINE void weight_grad_tile(Acc* gw, int64_t ldw, const Patches& patches, int64_t t0, const Acc* gz, int64_t ldz, int64_t count) {
  using V = Vec<Acc, Bytes>;
  constexpr int L = V::kLanes;
  int64_t tap[T];
#pragma GCC unroll 12
  for (int t = 0; t < T; ++t) tap[t] = patches.tap(t0 + t);
  typename V::type acc[T][NV] = {};
  for (int64_t p = 0; p < count; ++p) {
    const Acc* pixel = patches.pixel(p);
    typename V::type g[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) g[v] = V::load(gz + p * ldz + v * L);
#pragma GCC unroll 12
    for (int t = 0; t < T; ++t) {
      const Acc xp = pixel[tap[t]];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[t][v] += g[v] * xp;
    }
  }
#pragma GCC unroll 12
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) V::store(gw + t * ldw + v * L, V::load(gw + t * ldw + v * L) + acc[t][v]);
}

// gw ([taps_padded][cp]) += patches^T . gz over `count` pixels; taps_padded is a multiple of
// kTile, so every tile's taps have patch values (the padding's sums are unused).
template <int Bytes, typename Acc, typename Patches>
FASTMB_INLINE void accumulate_weight_grad(Acc* gw, const Patches& patches, const Acc* gz, int64_t count, int64_t taps_padded, int64_t cp) {
  for_each_channel_block<Vec<Acc, Bytes>::kLanes>(cp, [&](auto vectors, int64_t co) __attribute__((always_inline)) {
    constexpr int NV = decltype(vectors)::value, T = kTile / NV;
    for (int64_t t = 0; t < taps_padded; t += T) weight_grad_tile<Bytes, NV, T>(gw + t * cp + co, cp, patches, t, gz + co, cp, count);
  });
}

// The two patch GEMMs compiled per instruction set, picked by cpu_isa() (so FASTMB_ISA tests
// each): 64-byte vectors for AVX-512 (one instruction per 16 lanes keeps the tiles' loads and
// FMAs within the front end's width), 32-byte for AVX2, and the same code at baseline.
#define FASTMB_PATCH_GEMMS(Name, target, Bytes)                                                                                    \
  template <typename Acc, typename Patches>                                                                                       \
  struct Name {                                                                                                                   \
    template <typename Store>                                                                                                     \
    target static void convolve(Acc* z, const Patches& patches, const Acc* w, int64_t count, int64_t taps, int64_t cp,             \
                                const Store& store) {                                                                             \
      convolve_patches<Bytes>(z, patches, w, count, taps, cp, store);                                                             \
    }                                                                                                                             \
    target static void weight_grad(Acc* gw, const Patches& patches, const Acc* gz, int64_t count, int64_t taps_padded, int64_t cp) { \
      accumulate_weight_grad<Bytes>(gw, patches, gz, count, taps_padded, cp);                                                     \
    }                                                                                                                             \
  };
FASTMB_PATCH_GEMMS(BaselinePatchGemms, , 32)
#if FASTMB_X86_TABLES
FASTMB_PATCH_GEMMS(Avx512PatchGemms, __attribute__((target("arch=x86-64-v4"))), 64)
FASTMB_PATCH_GEMMS(Avx2PatchGemms, __attribute__((target("arch=x86-64-v3"))), 32)
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

// gw += patches^T . gz (see accumulate_weight_grad) with the instruction set's GEMMs.
template <typename Acc, typename Patches>
void weight_grad(Acc* gw, const Patches& patches, const Acc* gz, int64_t count, int64_t taps_padded, int64_t cp) {
#if FASTMB_X86_TABLES
  if (cpu_isa() == Isa::kAvx512) return Avx512PatchGemms<Acc, Patches>::weight_grad(gw, patches, gz, count, taps_padded, cp);
  if (cpu_isa() == Isa::kAvx2) return Avx2PatchGemms<Acc, Patches>::weight_grad(gw, patches, gz, count, taps_padded, cp);
#endif
  BaselinePatchGemms<Acc, Patches>::weight_grad(gw, patches, gz, count, taps_padded, cp);
}

// The conv's shape and the chunk buffers' layout.
struct Stem {
  Geometry g;                 // the input's geometry: g.c is C_in
  int64_t c, cp;              // C_out, and rounded up to whole vectors (the chunk rows' stride)
  int64_t taps, taps_padded;  // C_in * kH * kW, and rounded up to kTile (the patch rows' stride)
  int64_t chunk;              // output pixels per chunk: a multiple of kTile
  int64_t step;               // x's elements from one output pixel's patch to the next one's
  int64_t ow_lo, ow_hi;       // the output columns whose taps all lie inside x's columns
  std::vector<int64_t> offset;  // per tap (ci, i, j): its offset in x from the patch's origin; 0 past taps
  std::vector<int64_t> dy, dx;  // per tap: its row and column from the origin

  Stem(const Geometry& geometry, int64_t c_out, int lanes, at::IntArrayRef x_strides) : g(geometry), c(c_out) {
    cp = (c + lanes - 1) / lanes * lanes;
    taps = g.c * g.kh * g.kw;
    taps_padded = (taps + kTile - 1) / kTile * kTile;
    chunk = std::max<int64_t>(kTile, std::min<int64_t>(4096 / cp, 16384 / taps_padded) / kTile * kTile);
    step = g.sw * x_strides[3];
    ow_lo = std::min(g.wo, (g.pw + g.sw - 1) / g.sw);
    const int64_t last = g.w - 1 - (g.kw - 1) * g.dw + g.pw;  // the last column's origin + pw
    ow_hi = last < 0 ? 0 : std::min(g.wo, last / g.sw + 1);
    offset.assign(taps_padded, 0);
    for (int64_t ci = 0, t = 0; ci < g.c; ++ci)
      for (int64_t i = 0; i < g.kh; ++i)
        for (int64_t j = 0; j < g.kw; ++j, ++t) {
          dy.push_back(i * g.dh);
          dx.push_back(j * g.dw);
          offset[t] = ci * x_strides[1] + i * g.dh * x_strides[2] + j * g.dw * x_strides[3];
        }
  }
};

// The patches of output pixels [ow0, ow0 + count) of row oh of image n, rows taps_padded apart,
// with the padding's zeros.
template <typename Acc>
void gather_patches(Acc* patches, const Acc* x, at::IntArrayRef xs, const Stem& s, int64_t n, int64_t oh, int64_t ow0, int64_t count) {
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

// Calls run(patches, p0, np) for the runs of pixels [p0, p0 + np) (from the chunk's first) of
// output pixels [ow0, ow0 + count) of row oh of image n: the pixels whose taps all lie inside x
// read it directly, the border's are gathered into `buffer`.
template <typename Acc, typename Run>
void for_each_run(const Stem& s, const Acc* x, at::IntArrayRef xs, int64_t n, int64_t oh, int64_t ow0, int64_t count, Acc* buffer,
                  const Run& run) {
  const Geometry& g = s.g;
  const int64_t ih0 = oh * g.sh - g.ph, end = ow0 + count;
  const bool rows_inside = ih0 >= 0 && ih0 + (g.kh - 1) * g.dh < g.h;
  const int64_t lo = rows_inside ? std::clamp(s.ow_lo, ow0, end) : end, hi = rows_inside ? std::clamp(s.ow_hi, lo, end) : end;
  const auto border = [&](int64_t first, int64_t last) {
    if (first >= last) return;
    gather_patches(buffer, x, xs, s, n, oh, first, last - first);
    run(GatheredPatches<Acc>{buffer, s.taps_padded}, first - ow0, last - first);
  };
  border(ow0, lo);
  if (lo < hi) run(XPatches<Acc>{x + n * xs[0] + ih0 * xs[2] + (lo * g.sw - g.pw) * xs[3], s.step, s.offset.data()}, lo - ow0, hi - lo);
  border(hi, end);
}

// A thread's chunk buffers: border patches, z and dL/dy or dL/dz rows; the weight gradient's
// sums over the last few chunks ([taps_padded][cp]) and how many pixels they hold.
template <typename Acc>
struct ChunkBuffers {
  AlignedVector<Acc> patches, z, rows, weight_grad;
  int64_t weight_grad_pixels = 0;
  explicit ChunkBuffers(const Stem& s) : patches(s.chunk * s.taps_padded), z(s.chunk * s.cp), rows(s.chunk * s.cp) {}
};

// Pixels whose weight gradient terms are summed in Acc before they are added in double.
constexpr int64_t kWeightGradPixels = 1024;

// Calls chunk(buffers, z, count, offset, place) for every chunk of the output's pixels, in
// parallel over output rows, after computing its z (rows cp apart) into `z_at(buffers, offset)`;
// offset is the chunk's first pixel's index, place = {n, oh, ow0} where it lies; then
// done(buffers) at the end of each parallel task.
template <typename Acc, typename ZAt, typename Chunk, typename Done>
void for_each_chunk(const Stem& s, const Acc* x, at::IntArrayRef xs, const Acc* w, const ZAt& z_at, const Chunk& chunk, const Done& done) {
  const Geometry& g = s.g;
  at::parallel_for(0, g.n * g.ho, 1, [&](int64_t begin, int64_t end) {
    ChunkBuffers<Acc> buffers(s);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.ho, oh = row % g.ho;
      for (int64_t ow0 = 0; ow0 < g.wo; ow0 += s.chunk) {
        const int64_t count = std::min(s.chunk, g.wo - ow0), offset = row * g.wo + ow0;
        Acc* z = z_at(buffers, offset);
        for_each_run(s, x, xs, n, oh, ow0, count, buffers.patches.data(), [&](const auto& patches, int64_t p0, int64_t np) {
          convolve(z + p0 * s.cp, patches, w, np, s.taps, s.cp);
        });
        chunk(buffers, z, count, offset, std::array<int64_t, 3>{n, oh, ow0});
      }
    }
    done(buffers);
  });
}

template <typename Acc>
void no_finish(ChunkBuffers<Acc>&) {}

// A per-channel vector of c values padded with `fill` to cp.
template <typename Acc>
AlignedVector<Acc> padded(const Acc* values, int64_t c, int64_t cp, Acc fill) {
  AlignedVector<Acc> out(cp, fill);
  std::copy(values, values + c, out.begin());
  return out;
}

// The weight (C_out, C_in, kH, kW) as [taps][cp], zero in the padding channels.
template <typename Acc>
AlignedVector<Acc> taps_major_weight(const Tensor& weight, const Stem& s) {
  const Tensor dense = weight.contiguous();
  const Acc* src = dense.const_data_ptr<Acc>();
  AlignedVector<Acc> w(s.taps * s.cp, Acc(0));
  for (int64_t co = 0; co < s.c; ++co)
    for (int64_t t = 0; t < s.taps; ++t) w[t * s.cp + co] = src[co * s.taps + t];
  return w;
}

// x (N, C_in, H, W) and weight (C_out, C_in, kH, kW): CPU float32/64 of one dtype; the geometry.
Geometry checked_stem(const char* op, const Tensor& x, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, const std::optional<Tensor>& bn_weight, const std::optional<Tensor>& bn_bias) {
  TORCH_CHECK(x.dim() == 4, "fastmb::", op, ": x must be (N, C_in, H, W), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(0) >= 1 && weight.size(2) >= 1 && weight.size(3) >= 1,
              "fastmb::", op, ": weight must be (C_out, C_in, kH, kW) with C_in = ", x.size(1), ", got shape ", weight.sizes());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "fastmb::", op, ": the CPU kernel takes CPU tensors, got x on ",
              x.device(), " and weight on ", weight.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "fastmb::", op,
              ": the CPU kernel takes float32 and float64, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "fastmb::", op, ": x and weight dtypes differ (", x.scalar_type(), ", ",
              weight.scalar_type(), ")");
  TORCH_CHECK(x.size(1) >= 1, "fastmb::", op, ": x must have at least one channel");
  check_vector(op, "bn_weight", bn_weight, weight.size(0), weight);
  check_vector(op, "bn_bias", bn_bias, weight.size(0), weight);
  return dwconv_geometry_of(op, x.sizes(), weight.sizes().slice(2), stride, padding, dilation);
}

std::tuple<Tensor, Tensor, Tensor> stem_conv_bn_act(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bn_weight,
                                                    const std::optional<Tensor>& bn_bias, at::IntArrayRef stride, at::IntArrayRef padding,
                                                    at::IntArrayRef dilation, double eps, c10::string_view activation) {
  const Geometry g = checked_stem("stem_conv_bn_act", x, weight, stride, padding, dilation, bn_weight, bn_bias);
  const NoAutocast no_autocast;
  const Activation act = parse_activation(activation);
  const int64_t c = weight.size(0);
  const auto options = x.options();
  Tensor y = cached_empty({g.n, c, g.ho, g.wo}, options, at::MemoryFormat::ChannelsLast);
  Tensor mean = at::zeros({c}, options), var = at::ones({c}, options);
  if (g.pixels == 0) return {y, mean, var};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmb_stem_conv_bn_act", [&] {
    using Acc = scalar_t;
    const Stem s(g, c, gemm_vector_bytes() / int(sizeof(Acc)), x.strides());
    const Kernels<Acc> kernels = dwconv::select_elementwise_kernels<Acc>();
    const AlignedVector<Acc> w = taps_major_weight<Acc>(weight, s);
    const Acc* x_data = x.const_data_ptr<Acc>();
    Acc* y_data = y.mutable_data_ptr<Acc>();
    const auto chunk_z = [](ChunkBuffers<Acc>& buffers, int64_t) { return buffers.z.data(); };

    const int threads = at::get_num_threads();
    std::vector<double> means(threads * s.cp, 0.0), m2s(threads * s.cp, 0.0);
    std::vector<int64_t> counts(threads, 0);
    for_each_chunk(s, x_data, x.strides(), w.data(), chunk_z, [&](ChunkBuffers<Acc>&, const Acc* z, int64_t count, int64_t, auto) {
      const int t = at::get_thread_num();
      Moments moments{means.data() + t * s.cp, m2s.data() + t * s.cp, counts[t]};
      kernels.batch_norm_moments(moments, z, count, s.cp);
      counts[t] = moments.count;
    }, no_finish<Acc>);
    AlignedVector<Acc> mean_p(s.cp), var_p(s.cp);
    dwconv::merge_moments(mean_p.data(), var_p.data(), means, m2s, counts, s.cp);
    std::copy_n(mean_p.data(), c, mean.mutable_data_ptr<Acc>());
    std::copy_n(var_p.data(), c, var.mutable_data_ptr<Acc>());

    const Tensor gamma = vector_or(bn_weight, c, x.scalar_type(), x, 1.0), beta = vector_or(bn_bias, c, x.scalar_type(), x, 0.0);
    const AlignedVector<Acc> gamma_p = padded(gamma.const_data_ptr<Acc>(), c, s.cp, Acc(0)), beta_p = padded(beta.const_data_ptr<Acc>(), c, s.cp, Acc(0));
    AlignedVector<Acc> scale(s.cp), shift(s.cp);
    dwconv::fold_batch_norm(scale.data(), shift.data(), mean_p.data(), var_p.data(), gamma_p.data(), beta_p.data(), eps, s.cp);
    // With no padding channels z is computed straight into y's rows and normalised in place.
    const auto z_in_y = [&](ChunkBuffers<Acc>& buffers, int64_t offset) { return s.cp == c ? y_data + offset * c : buffers.z.data(); };
    for_each_chunk(s, x_data, x.strides(), w.data(), z_in_y, [&](ChunkBuffers<Acc>&, Acc* z, int64_t count, int64_t offset, auto) {
      kernels.normalize(z, z, scale.data(), shift.data(), act, count, s.cp);
      if (s.cp != c)
        for (int64_t p = 0; p < count; ++p) std::copy_n(z + p * s.cp, c, y_data + (offset + p) * c);
    }, no_finish<Acc>);
  });
  return {y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> stem_conv_bn_act_backward(const Tensor& grad_y_in, const Tensor& x, const Tensor& weight,
                                                             const std::optional<Tensor>& bn_weight, const std::optional<Tensor>& bn_bias,
                                                             const Tensor& mean, const Tensor& var, at::IntArrayRef stride,
                                                             at::IntArrayRef padding, at::IntArrayRef dilation, double eps,
                                                             c10::string_view activation, std::array<bool, 2> output_mask) {
  const char* op = "stem_conv_bn_act_backward";
  const Geometry g = checked_stem(op, x, weight, stride, padding, dilation, bn_weight, bn_bias);
  const int64_t c = weight.size(0);
  TORCH_CHECK(grad_y_in.sizes() == at::IntArrayRef({g.n, c, g.ho, g.wo}), "fastmb::", op, ": grad_y must have the output's shape (",
              g.n, ", ", c, ", ", g.ho, ", ", g.wo, "), got ", grad_y_in.sizes());
  TORCH_CHECK(grad_y_in.scalar_type() == x.scalar_type() && grad_y_in.device() == x.device(), "fastmb::", op,
              ": grad_y must have x's dtype and device");
  check_vector(op, "mean", mean, c, x);
  check_vector(op, "var", var, c, x);
  const NoAutocast no_autocast;
  const Activation act = parse_activation(activation);
  const auto options = x.options();
  const at::ScalarType affine_type = bn_weight.has_value() ? bn_weight->scalar_type() : x.scalar_type();
  Tensor grad_weight = at::zeros(output_mask[0] ? weight.sizes() : at::IntArrayRef{0}, options);
  Tensor grad_gamma = at::zeros({output_mask[1] ? c : 0}, options), grad_beta = at::zeros_like(grad_gamma);
  if (g.pixels == 0 || !(output_mask[0] || output_mask[1])) return {grad_weight, grad_gamma.to(affine_type), grad_beta.to(affine_type)};

  const Tensor grad_y = as_nhwc(grad_y_in);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmb_stem_conv_bn_act_backward", [&] {
    using Acc = scalar_t;
    const Stem s(g, c, gemm_vector_bytes() / int(sizeof(Acc)), x.strides());
    const Kernels<Acc> kernels = dwconv::select_elementwise_kernels<Acc>();
    const AlignedVector<Acc> w = taps_major_weight<Acc>(weight, s);
    const Acc *x_data = x.const_data_ptr<Acc>(), *gy_data = grad_y.const_data_ptr<Acc>();
    const Tensor gamma = vector_or(bn_weight, c, x.scalar_type(), x, 1.0), beta = vector_or(bn_bias, c, x.scalar_type(), x, 0.0);
    const Tensor mean_acc = mean.to(x.scalar_type()).contiguous(), var_acc = var.to(x.scalar_type()).contiguous();
    const AlignedVector<Acc> mean_p = padded(mean_acc.const_data_ptr<Acc>(), c, s.cp, Acc(0));
    const AlignedVector<Acc> gamma_p = padded(gamma.const_data_ptr<Acc>(), c, s.cp, Acc(0)), beta_p = padded(beta.const_data_ptr<Acc>(), c, s.cp, Acc(0));
    AlignedVector<Acc> invstd(s.cp, Acc(1)), a(s.cp, Acc(0)), b(s.cp, Acc(0)), d(s.cp, Acc(0));
    const Acc* pv = var_acc.const_data_ptr<Acc>();
    for (int64_t k = 0; k < c; ++k) {
      invstd[k] = Acc(1) / std::sqrt(pv[k] + Acc(eps));
      a[k] = gamma_p[k] * invstd[k];
    }
    const BnParams<Acc> bn{mean_p.data(), invstd.data(), gamma_p.data(), beta_p.data()};
    const auto chunk_z = [](ChunkBuffers<Acc>& buffers, int64_t) { return buffers.z.data(); };
    // dL/dy's rows for a chunk, cp apart: grad_y itself, or copied beside zero padding channels.
    const auto grad_rows = [&](ChunkBuffers<Acc>& buffers, int64_t count, int64_t offset) -> const Acc* {
      if (s.cp == c) return gy_data + offset * c;
      for (int64_t p = 0; p < count; ++p) std::copy_n(gy_data + (offset + p) * c, c, buffers.rows.data() + p * s.cp);
      return buffers.rows.data();
    };

    const int threads = at::get_num_threads();
    std::vector<double> sums(2 * threads * s.cp, 0.0);
    for_each_chunk(s, x_data, x.strides(), w.data(), chunk_z, [&](ChunkBuffers<Acc>& buffers, const Acc* z, int64_t count, int64_t offset, auto) {
      double* sum = sums.data() + 2 * at::get_thread_num() * s.cp;
      kernels.batch_norm_grad_sums(sum, sum + s.cp, z, grad_rows(buffers, count, offset), bn, act, count, s.cp);
    }, no_finish<Acc>);
    const double values = double(g.pixels);
    Acc *grad_beta_values = grad_beta.mutable_data_ptr<Acc>(), *grad_gamma_values = grad_gamma.mutable_data_ptr<Acc>();
    dwconv::for_each_channel_grad_sums(sums, s.cp, c, [&](int64_t k, double sum_gu, double sum_gu_xhat) {
      if (output_mask[1]) {
        grad_beta_values[k] = Acc(sum_gu);
        grad_gamma_values[k] = Acc(sum_gu_xhat);
      }
      b[k] = a[k] * Acc(sum_gu / values);
      d[k] = a[k] * Acc(sum_gu_xhat / values);
    });
    if (!output_mask[0]) return;

    std::vector<double> partials(threads * s.taps_padded * s.cp, 0.0);
    // The buffered sums added to the thread's double partial: every kWeightGradPixels pixels and
    // at the end of its rows.
    const auto add_weight_grad = [&](ChunkBuffers<Acc>& buffers) {
      AlignedVector<Acc>& sums = buffers.weight_grad;
      double* gw = partials.data() + at::get_thread_num() * s.taps_padded * s.cp;
      for (size_t i = 0; i < sums.size(); ++i) gw[i] += double(sums[i]);
      std::fill(sums.begin(), sums.end(), Acc(0));
      buffers.weight_grad_pixels = 0;
    };
    for_each_chunk(s, x_data, x.strides(), w.data(), chunk_z, [&](ChunkBuffers<Acc>& buffers, const Acc* z, int64_t count, int64_t offset,
                                                                   std::array<int64_t, 3> place) {
      const Acc* gy = grad_rows(buffers, count, offset);
      Acc* gz = buffers.rows.data();  // may be gy's copy: grad_values reads each value before writing it
      kernels.batch_norm_grad_values(gz, z, gy, bn, a.data(), b.data(), d.data(), act, count, s.cp);
      AlignedVector<Acc>& sums = buffers.weight_grad;
      if (sums.empty()) sums.assign(s.taps_padded * s.cp, Acc(0));
      for_each_run(s, x_data, x.strides(), place[0], place[1], place[2], count, buffers.patches.data(),
                   [&](const auto& patches, int64_t p0, int64_t np) { weight_grad(sums.data(), patches, gz + p0 * s.cp, np, s.taps_padded, s.cp); });
      buffers.weight_grad_pixels += count;
      if (buffers.weight_grad_pixels >= kWeightGradPixels) add_weight_grad(buffers);
    }, add_weight_grad);
    Acc* gw_data = grad_weight.mutable_data_ptr<Acc>();  // (C_out, taps), contiguous
    for (int64_t co = 0; co < c; ++co)
      for (int64_t t = 0; t < s.taps; ++t) {
        double sum = 0.0;
        for (int th = 0; th < threads; ++th) sum += partials[(th * s.taps_padded + t) * s.cp + co];
        gw_data[co * s.taps + t] = Acc(sum);
      }
  });
  return {grad_weight, grad_gamma.to(affine_type), grad_beta.to(affine_type)};
}

// The eval stem (stem_rows.h): a chunk of an output row at a time, its batch norm and activation
// applied as the tiles leave the registers (into the output itself when C fills whole vectors).
class EvalStemRows final : public StemRows {
 public:
  EvalStemRows(const Tensor& x, const Tensor& weight, const Tensor& scale, const Tensor& shift, const Geometry& g, Activation act)
      : s_(g, weight.size(0), gemm_vector_bytes() / int(sizeof(float)), x.strides()),
        x_(x.const_data_ptr<float>()),
        x_strides_(x.strides().vec()),
        w_(taps_major_weight<float>(weight, s_)),
        scale_(padded(scale.const_data_ptr<float>(), s_.c, s_.cp, 0.0f)),
        shift_(padded(shift.const_data_ptr<float>(), s_.c, s_.cp, 0.0f)),
        act_(act) {}

  const Geometry& geometry() const override { return s_.g; }
  int64_t channels() const override { return s_.c; }

  void rows(float* out, int64_t n, int64_t oh0, int64_t oh1) const override {
    thread_local AlignedVector<float> patches, z;
    if (int64_t(patches.size()) < s_.chunk * s_.taps_padded) patches.resize(s_.chunk * s_.taps_padded);
    if (s_.cp != s_.c && int64_t(z.size()) < s_.chunk * s_.cp) z.resize(s_.chunk * s_.cp);
    const Geometry& g = s_.g;
    const StoreNormalized<float> store(scale_.data(), shift_.data(), act_);
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      if (oh + kPrefetchRows < oh1) prefetch_input_rows(n, oh + kPrefetchRows);
      for (int64_t ow0 = 0; ow0 < g.wo; ow0 += s_.chunk) {
        const int64_t count = std::min(s_.chunk, g.wo - ow0);
        float* y = out + ((oh - oh0) * g.wo + ow0) * s_.c;
        float* chunk = s_.cp == s_.c ? y : z.data();
        for_each_run(s_, x_, x_strides_, n, oh, ow0, count, patches.data(), [&](const auto& p, int64_t p0, int64_t np) {
          convolve(chunk + p0 * s_.cp, p, w_.data(), np, s_.taps, s_.cp, store);
        });
        if (chunk != y)
          for (int64_t p = 0; p < count; ++p) std::copy_n(chunk + p * s_.cp, s_.c, y + p * s_.c);
      }
    }
  }

  // Output rows ahead whose new input rows are prefetched: the image comes from memory at the
  // start of a forward (the last one's weights went through the caches), and the hardware
  // prefetchers did not keep up with the three rows a patch spans. The stem and first block of
  // V3-Large after a 40 MB sweep, 2 threads: 233-290 -> 190-252 us; whole forwards at batch 1
  // 1.01-1.02x.
  static constexpr int64_t kPrefetchRows = 4;

  // Prefetches the input rows output row oh (> 0) reads and row oh - 1 does not (image n), into L2.
  void prefetch_input_rows(int64_t n, int64_t oh) const {
    const Geometry& g = s_.g;
    const int64_t top = oh * g.sh - g.ph, bottom = top + int64_t(g.kh - 1) * g.dh;  // row oh - 1's bottom is bottom - sh
    const int64_t first = std::max<int64_t>({top, bottom - g.sh + 1, 0}), last = std::min<int64_t>(bottom, g.h - 1);
    const int64_t* xs = x_strides_.data();
    const bool pixels_contiguous = xs[1] == 1 && xs[3] == g.c;  // channels_last: a row is one span
    const int64_t bytes = (pixels_contiguous ? g.w * g.c : (g.w - 1) * xs[3] + 1) * int64_t(sizeof(float));  // of a span
    for (int64_t ih = first; ih <= last; ++ih)
      for (int64_t c = 0; c < (pixels_contiguous ? 1 : g.c); ++c) {
        const char* row = reinterpret_cast<const char*>(x_ + n * xs[0] + c * xs[1] + ih * xs[2]);
        for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 2);
      }
  }

 private:
  Stem s_;
  const float* x_;
  std::vector<int64_t> x_strides_;
  AlignedVector<float> w_, scale_, shift_;
  Activation act_;
};

}  // namespace

std::unique_ptr<StemRows> StemRows::make(const char* op, const Tensor& x, const Tensor& weight, const Tensor& scale,
                                         const Tensor& shift, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                         Activation act) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "fastmb::", op,
              ": with a stem, x must be a float32 CPU (N, C_in, H, W) image");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(0) >= 1 && weight.scalar_type() == at::kFloat &&
                  weight.device().is_cpu(),
              "fastmb::", op, ": stem_weight must be a float32 CPU (C, ", x.size(1), ", kH, kW) tensor, got shape ", weight.sizes());
  const int64_t c = weight.size(0);
  checked_dense_float(op, "stem_scale", scale, {c});
  checked_dense_float(op, "stem_shift", shift, {c});
  const Geometry g = dwconv_geometry_of(op, x.sizes(), weight.sizes().slice(2), stride, padding, dilation);
  return std::make_unique<EvalStemRows>(x, weight, scale, shift, g, act);
}

TORCH_LIBRARY_IMPL(fastmb, CPU, m) {
  m.impl("stem_conv_bn_act", &stem_conv_bn_act);
  m.impl("stem_conv_bn_act_backward", &stem_conv_bn_act_backward);
}

}  // namespace fastmb::cpu
