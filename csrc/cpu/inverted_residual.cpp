// fastmb::inverted_residual on the CPU: a whole MobileNet V2/V3 block in eval, float32,
// channels_last, in one call:
//   expand 1x1 conv (BN folded) + act -> depthwise conv + BN + act -> [SE] -> project 1x1 conv
//   (BN folded) [+ act, in depthwise-separable blocks] [+ x]
// Work goes image by image (or, with fewer images than threads, in row parts of an image, or
// stage by stage for small images; at batch 1 a chain's blocks that share rows from both ends run
// linked, without a join between them) and in bands of output rows: each band's expanded rows are
// computed just before the depthwise conv reads them, and, without SE, its depthwise output is
// projected at once, so the expanded activation stays in L2 instead of making four round trips
// to memory. With SE the depthwise output is kept once per image (its channel sums are taken
// band by band); the gates of a group of images are computed together and applied to the rows
// or folded into the projection weights, and the images are projected. The 1x1 convs run on our
// register-tiled GEMM (pointwise/) over weights packed once by the caller, with bias,
// activation and residual applied as the tiles leave the registers.
// Buffers are per-thread and reused: a call allocates only its output.
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstring>
#include <memory>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "inverted_residual.h"

#include "../common.h"
#include "aligned_vector.h"
#include "dwconv/operator.h"
#include "pointwise/kernels.h"
#include "stem_rows.h"
#include "vec.h"

namespace fastmb::cpu {
namespace {

using at::Tensor;

// sums[k] += the sum over `pixels` rows (`stride` values apart) of their first nc values.
FASTMB_MULTIVERSION void add_channel_sums(float* sums, const float* rows, int64_t pixels, int64_t nc, int64_t stride) {
  add_column_sums(sums, pixels, nc, [&](int64_t p, int64_t k, auto width) __attribute__((always_inline)) {
    return load_values<float, decltype(width)::value>(rows + p * stride + k);
  });
}

// The SE gate folded into packed projection weights: row k of every panel times gate[k].
FASTMB_MULTIVERSION void gate_packed_rows(float* dst, const float* w, const float* gate, int64_t panels, int64_t c) {
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t k = 0; k < c; ++k)
      for (int l = 0; l < pointwise::kPanel; ++l) {
        const int64_t at = (p * c + k) * pointwise::kPanel + l;
        dst[at] = w[at] * gate[k];
      }
}

// Everything one call reads, as raw pointers: the arguments checked and made dense.
struct Block {
  Geometry g;  // the depthwise conv's, over the expanded channels
  int64_t cin, cout, squeeze;
  const float *x, *expand_w, *expand_b, *dw_taps, *dw_scale, *dw_shift, *fc1_w, *fc1_b, *fc2_w, *fc2_b, *project_w, *project_b;
  Activation expand_act, dw_act, se_act, project_act;
  Gate gate;
  bool residual;
  bool cold_weights;  // each GEMM's weights read once a call (fewer images than threads)
  dwconv::Kernels<float> dw;
  pointwise::GemmPanels gemm;
  const StemRows* stem;  // or null: the block's input is x (else x is the stem's image)
  int64_t stem_image0;   // the stem's image that is this block's image 0 (x and y start there)
  float* y;

  bool expands() const { return expand_w != nullptr; }
  bool has_se() const { return fc1_w != nullptr; }
  // Whether the depthwise conv's input is computed here (by the expansion or the stem), not x.
  bool produces() const { return expands() || stem != nullptr; }
  // Image n of x, without a stem.
  const float* image(int64_t n) const { return x + n * g.h * g.w * cin; }
  // Rows [r0, r1) of image n's depthwise input into `rows` (its row r0), on this thread: the
  // expansion of x's rows, or the stem's output rows.
  void produce(int64_t n, int64_t r0, int64_t r1, float* rows) const {
    if (stem != nullptr) return stem->rows(rows, x, stem_image0 + n, r0, r1);
    gemm(expand(image(n) + r0 * g.w * cin, rows, (r1 - r0) * g.w), 0, pointwise::panels_of(g.c));
  }
  // Floats in the packed projection weights (one image's gated copy).
  int64_t project_values() const { return pointwise::panels_of(cout) * pointwise::kPanel * g.c; }
  // The expansion of `pixels` input pixels from `in` into `out`.
  pointwise::Gemm expand(const float* in, float* out, int64_t pixels) const {
    return {in, cin, expand_w, expand_b, nullptr, 0, out, g.c, pixels, g.c, cin, expand_act, cold_weights};
  }
  // The projection of `pixels` depthwise-output pixels into y rows, with the residual rows.
  pointwise::Gemm project(const float* in, const float* weights, const float* residual_rows, float* out, int64_t pixels) const {
    return {in, g.c, weights, project_b, residual ? residual_rows : nullptr, cin, out, cout, pixels, cout, g.c, project_act, cold_weights};
  }
};

// A thread's reusable buffers (grown, never shrunk).
struct Workspace {
  AlignedVector<float> expanded, depthwise, partial, weights;
  AlignedVector<float> excitation;  // excite's mean, hidden and gate values
  AlignedVector<float> sums, shared_weights;  // run_block's, on the calling thread
};
Workspace& thread_workspace() {
  thread_local Workspace workspace;
  return workspace;
}
float* sized(AlignedVector<float>& buffer, int64_t size) {
  if (int64_t(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

// Output rows per band: at least 256 pixels (the GEMMs' rows; fewer cost more per call than they
// save), else about 128 KB of expanded values, so a band's rows stay in L2; an even number where
// more than one, so the depthwise conv's two-row tiles cover the band.
int64_t band_rows(const Block& b) {
  const int64_t pixels = std::max<int64_t>(256, 32768 / std::max<int64_t>(b.g.c, 1));
  const int64_t rows = pixels / std::max<int64_t>(b.g.wo, 1);
  return std::clamp<int64_t>(rows > 1 ? rows & ~int64_t(1) : rows, 1, b.g.ho);
}

// y rows (pixels [p0, p1) of image n) = d * w + bias (+ the block's input, `input`: image n's,
// addressed from its first pixel), on this thread.
void project(const Block& b, int64_t n, const float* d, const float* w, const float* input, int64_t p0, int64_t p1) {
  const int64_t pixels_out = b.g.ho * b.g.wo;
  const float* residual_rows = b.residual ? input + p0 * b.cin : nullptr;
  const pointwise::Gemm gemm = b.project(d + p0 * b.g.c, w, residual_rows, b.y + (n * pixels_out + p0) * b.cout, p1 - p0);
  b.gemm(gemm, 0, pointwise::panels_of(b.cout));
}

// Bands of output rows [lo, hi), one after another from the top.
struct BandsFromTop {
  int64_t lo, hi, band;
  bool next(int64_t& ob, int64_t& ob1) {
    if (lo >= hi) return false;
    ob = lo, ob1 = lo = std::min(hi, lo + band);
    return true;
  }
};

// Output rows [lo, hi) shared by two threads: one takes bands from the top, the other from the
// bottom, until they meet. A thread that the host slows, or that starts late, takes fewer bands,
// where a static split leaves the other waiting at the join. Each side slides its own window,
// so only the meeting point's halo rows are computed twice, as with two static parts. Bands are
// whole while far from the meeting point, then a third of the rows left (2 at least), so that
// neither side waits long for the other's last band.
struct BandsFromBothEnds {
  std::atomic<int64_t>* taken;  // rows either side has taken
  int64_t rows;                 // in the shared range
  int64_t lo, hi, band;
  bool from_top;
  bool next(int64_t& ob, int64_t& ob1) {
    int64_t before = taken->load(std::memory_order_relaxed), count = 0;
    do {
      if (before >= rows) return false;
      count = std::min({rows - before, band, std::max<int64_t>(2, (rows - before) / 3 & ~int64_t(1))});
    } while (!taken->compare_exchange_weak(before, before + count, std::memory_order_relaxed));
    if (from_top) {
      ob = lo, ob1 = lo += count;
    } else {
      ob1 = hi, ob = hi -= count;
    }
    return true;
  }
};

// A side of a block run alone: the rows of x it reads are written before it starts.
struct Unlinked {
  void wait_for_input(int64_t /*lo*/, int64_t /*hi*/) const {}
  void done(int64_t /*ob*/, int64_t /*ob1*/) const {}
};

// How far a block of a linked run (run_linked_blocks) has got: the rows its two sides have taken,
// and the output rows [0, top) and [bottom, rows) they have written, each side's rows contiguous
// from its end. Rows [lo, hi) are written when they lie in either, or once the sides have met.
struct RowsWritten {
  std::atomic<int64_t> taken{0}, top{0}, bottom{0};
  bool has(int64_t lo, int64_t hi) const {
    const int64_t t = top.load(std::memory_order_acquire), b = bottom.load(std::memory_order_acquire);
    return hi <= t || lo >= b || t >= b;
  }
};

// A side of a block in a linked run: before it reads rows of x (the block before's output,
// `input`; null for the run's first block) it waits until they are written, and it marks the
// output rows it has written. A side only waits on rows of a block that it has itself left, which
// the other side writes first thing or last: the side further behind never waits, so neither
// waits for good.
struct Linked {
  const RowsWritten* input;
  RowsWritten* output;
  bool top;  // the side whose rows run from row 0
  void wait_for_input(int64_t lo, int64_t hi) const {
    while (input != nullptr && !input->has(lo, hi)) {
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    }
  }
  void done(int64_t ob, int64_t ob1) const {
    if (top) output->top.store(ob1, std::memory_order_release);
    else output->bottom.store(ob, std::memory_order_release);
  }
};

// Output rows [oh0, oh1) of image n through the expansion and the depthwise conv, in the bands
// `bands` hands out (at most `band` rows each). Without SE each band is projected into y at once;
// with SE the depthwise output goes to `depthwise` (the image's, addressed from its first pixel)
// and its channel sums into `sums`.
// The expanded (or stem) rows the bands read are addressed as the whole part's, or, with
// `slide`, kept in a window of one band's rows: each band keeps the rows it shares with the last
// one, moved to where it reads them, and computes the rest around them, so the same lines are
// written again while in L2. With parts of one image at batch 1 the window ran V3-Large 1.01-1.06x
// and V2 1.01-1.05x faster. Whole images slide too while each thread has at most two of them
// (slide_whole_images); with more (batch 16) it was level in the models and up to 15% slower for
// a 112x112 block alone, so they keep the part's rows (and take bands from the top).
template <typename Bands, typename Links = Unlinked>
void expand_depthwise_rows(const Block& b, int64_t n, int64_t oh0, int64_t oh1, Bands bands, float* depthwise, float* sums, bool slide,
                           const Links& links = {}) {
  const Geometry& g = b.g;
  Workspace& ws = thread_workspace();
  const int64_t in_row = g.w * g.c, out_row = g.wo * g.c, band = bands.band;
  // Rows [base, next) of the depthwise input are computed, row r at window + (r - base) * in_row.
  const auto [lo, hi] = dwconv::input_rows(g, oh0, oh1);
  float* window = nullptr;
  int64_t base = lo, next = lo;
  const float* expanded = b.produces() ? nullptr : b.image(n);
  if (b.produces()) {
    const int64_t band_input_rows = (band - 1) * g.sh + int64_t(g.kh - 1) * g.dh + 1;
    window = sized(ws.expanded, (slide ? std::min(hi - lo, band_input_rows) : hi - lo) * in_row);
  }
  float* band_out = b.has_se() ? nullptr : sized(ws.depthwise, band * out_row);
  float* partial = b.has_se() ? sized(ws.partial, g.c) : nullptr;
  for (int64_t ob, ob1; bands.next(ob, ob1);) {
    const auto [need_lo, need_hi] = dwconv::input_rows(g, ob, ob1);
    links.wait_for_input(need_lo, need_hi);  // the residual's rows are among them
    if (b.produces()) {
      if (slide) {
        const int64_t keep_lo = std::max(need_lo, base), keep_hi = std::min(need_hi, next);
        if (keep_lo < keep_hi) {
          if (base != need_lo)
            std::memmove(window + (keep_lo - need_lo) * in_row, window + (keep_lo - base) * in_row, sizeof(float) * (keep_hi - keep_lo) * in_row);
          if (need_lo < keep_lo) b.produce(n, need_lo, keep_lo, window);
          if (keep_hi < need_hi) b.produce(n, keep_hi, need_hi, window + (keep_hi - need_lo) * in_row);
        } else {
          b.produce(n, need_lo, need_hi, window);
        }
        base = need_lo, next = need_hi;
      } else {
        next = std::max(next, need_lo);  // rows between the bands (a stride past the kernel) are never read
        if (need_hi > next) {
          b.produce(n, next, need_hi, window + (next - base) * in_row);
          next = need_hi;
        }
      }
      expanded = window - base * in_row;
    }
    // The residual's rows: x's, or the stem's (rows a depthwise conv of stride 1 also reads).
    const float* input = b.expands() ? b.image(n) : expanded;
    float* out = b.has_se() ? depthwise : band_out - ob * out_row;
    b.dw.eval_rows(out, expanded, b.dw_taps, b.dw_scale, b.dw_shift, g, b.dw_act, ob, ob1, 0, g.c);
    if (b.has_se()) {
      std::fill(partial, partial + g.c, 0.0f);  // per band, then into sums: closer to eager's fp32 mean
      add_channel_sums(partial, out + ob * out_row, (ob1 - ob) * g.wo, g.c, g.c);
      for (int64_t k = 0; k < g.c; ++k) sums[k] += partial[k];
    } else {
      project(b, n, out, b.project_w, input, ob * g.wo, ob1 * g.wo);
    }
    links.done(ob, ob1);
  }
}

// The SE's hidden values [r0, r1) from the channel means, and its gate for channels [r0, r1)
// from the hidden values, for `images` images ([image][value]).
void excite_hidden(const Block& b, const float* mean, float* hidden, int64_t images, int64_t r0, int64_t r1) {
  const Activation act = b.se_act;
  dot_rows(hidden, mean, images, b.fc1_w, b.fc1_b, b.squeeze, b.g.c, r0, r1, [act](float v) { return activate(act, v); });
}
void excite_gate(const Block& b, const float* hidden, float* gate, int64_t images, int64_t r0, int64_t r1) {
  const Gate kind = b.gate;
  dot_rows(gate, hidden, images, b.fc2_w, b.fc2_b, b.g.c, b.squeeze, r0, r1, [kind](float v) { return gate_value(kind, v); });
}

// The SE gates ([image][channel]) of `images` images from their depthwise outputs' channel sums
// ([image][channel]), on this thread (in its workspace: valid until its next call).
const float* excite(const Block& b, const float* sums, int64_t images) {
  const int64_t c = b.g.c, s = b.squeeze;
  float* const mean = sized(thread_workspace().excitation, images * (2 * c + s));
  float *const hidden = mean + images * c, *const gate = hidden + images * s;
  const float inv = 1.0f / float(b.g.ho * b.g.wo);
  for (int64_t k = 0; k < images * c; ++k) mean[k] = sums[k] * inv;
  excite_hidden(b, mean, hidden, images, 0, s);
  excite_gate(b, hidden, gate, images, 0, c);
  return gate;
}

// One image's SE gate folded into the projection weights (packed like project_w).
void fold_gate(const Block& b, const float* gate, float* weights) {
  gate_packed_rows(weights, b.project_w, gate, pointwise::panels_of(b.cout), b.g.c);
}

// rows[p][k] *= gate[k] for `pixels` rows of c values.
FASTMB_MULTIVERSION void scale_rows(float* rows, const float* gate, int64_t pixels, int64_t c) {
  for (int64_t p = 0; p < pixels; ++p)
    for (int64_t k = 0; k < c; ++k) rows[p * c + k] *= gate[k];
}

// Image n on every thread in one parallel region, for images too small to split into row parts
// (each part would recompute its neighbours' halo rows of the expansion: a third more work at
// 14x14 with 5x5 kernels), phase by phase with a barrier between: the expansion; the depthwise
// conv with the SE channel sums; the SE's two FCs, split by rows; the projection, split by
// pixels, each thread scaling its rows by the gate first (a per-image gated copy of the
// projection weights would be written and read by each thread, and at 7x7 it outweighs the
// rows). The expansion is split by channels (whole panels of 16: each thread reads only its
// share of the expansion weights, at batch 1 most of the bytes moved) where the channels fill
// whole cache lines and share out, else by pixels (other channel counts put both threads'
// values in one line: false sharing cost 45% at 72 channels). The depthwise conv is split by
// rows, so that the projection mostly reads rows its own thread wrote: split by channels, each
// thread's writes went to lines the other had read, and the conv took 1.2-1.6x as long (Intel
// Xeon, V3-Large's 14x14 SE blocks: 21-41 us a block). Against six parallel regions stage by
// stage, the fork and join are one: their cost was most of these blocks' time at batch 1, and
// doubled when the host's cores were contended.
void run_image_split(const Block& b, int64_t n) {
  const Geometry& g = b.g;
  const int64_t pixels_in = g.h * g.w, pixels_out = g.ho * g.wo, panels = pointwise::panels_of(g.c);
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const bool by_channels = g.c % pointwise::kPanel == 0 && panels >= 4 * threads;
  Workspace& ws = thread_workspace();  // the calling thread's buffers hold what the threads share
  float* expanded = b.produces() ? sized(ws.expanded, pixels_in * g.c) : nullptr;
  float* depthwise = sized(ws.depthwise, pixels_out * g.c);
  // The SE's shared values: each thread's channel sums [thread][channel], the hidden values, the gate.
  float* sums = b.has_se() ? sized(ws.sums, threads * g.c + b.squeeze + g.c) : nullptr;
  float *hidden = nullptr, *gate = nullptr;
  if (sums != nullptr) {
    std::fill(sums, sums + threads * g.c, 0.0f);
    hidden = sums + threads * g.c, gate = hidden + b.squeeze;
  }
  const float* in = b.produces() ? expanded : b.image(n);
  const float* input = b.expands() ? b.image(n) : in;  // the residual's rows
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int thread = 0, team = 1;
#ifdef _OPENMP
    thread = omp_get_thread_num(), team = omp_get_num_threads();
#endif
    // This thread's share of `count` items, in whole units of `unit`.
    const auto share = [&](int64_t count, int64_t unit) {
      const int64_t units = (count + unit - 1) / unit;
      return std::pair<int64_t, int64_t>{std::min(count, units * thread / team * unit), std::min(count, units * (thread + 1) / team * unit)};
    };
    const auto [c0, c1] = by_channels ? share(g.c, pointwise::kPanel) : std::pair<int64_t, int64_t>{0, g.c};
    if (b.stem != nullptr) {  // the stem's rows, split by rows
      const auto [q0, q1] = share(g.h, 1);
      if (q0 < q1) b.stem->rows(expanded + q0 * g.w * g.c, b.x, b.stem_image0 + n, q0, q1);
    } else if (b.expands()) {
      const auto [q0, q1] = by_channels ? std::pair<int64_t, int64_t>{0, pixels_in} : share(pixels_in, 6);
      if (c0 < c1 && q0 < q1)
        b.gemm(b.expand(b.image(n) + q0 * b.cin, expanded + q0 * g.c, q1 - q0), c0 / pointwise::kPanel, pointwise::panels_of(c1));
    }
#pragma omp barrier
    const auto [oh0, oh1] = share(g.ho, 1);
    if (oh0 < oh1) {
      b.dw.eval_rows(depthwise, in, b.dw_taps, b.dw_scale, b.dw_shift, g, b.dw_act, oh0, oh1, 0, g.c);
      if (b.has_se()) {
        float* partial = sized(thread_workspace().partial, g.c);
        const int64_t p1 = oh1 * g.wo;
        for (int64_t p = oh0 * g.wo; p < p1; p += 256) {  // partial sums of 256 pixels, as the banded path
          std::fill(partial, partial + g.c, 0.0f);
          add_channel_sums(partial, depthwise + p * g.c, std::min<int64_t>(256, p1 - p), g.c, g.c);
          float* total = sums + thread * g.c;
          for (int64_t k = 0; k < g.c; ++k) total[k] += partial[k];
        }
      }
    }
#pragma omp barrier
    const auto [r0, r1] = share(pixels_out, 6);  // whole tiles of 6 rows
    if (b.has_se()) {  // the two FCs split by rows, a barrier after each; the gate scales the rows
      float* mean = sized(thread_workspace().excitation, g.c);
      const float inv = 1.0f / float(pixels_out);
      for (int64_t k = 0; k < g.c; ++k) {
        float total = sums[k];
        for (int t = 1; t < team; ++t) total += sums[t * g.c + k];
        mean[k] = total * inv;
      }
      const auto [s0, s1] = share(b.squeeze, 1);
      excite_hidden(b, mean, hidden, 1, s0, s1);
#pragma omp barrier
      const auto [k0, k1] = share(g.c, 1);
      excite_gate(b, hidden, gate, 1, k0, k1);
#pragma omp barrier
      if (r0 < r1) scale_rows(depthwise + r0 * g.c, gate, r1 - r0, g.c);
    }
    if (r0 < r1) project(b, n, depthwise, b.project_w, input, r0, r1);
  }
}

// Image n's output rows in two halves on a team of two threads, for blocks with an expansion and
// no SE too short for bands from both ends: the halves' expanded rows go to one buffer, each
// thread computing its share once. Static parts would compute the rows both halves read twice:
// 16 expanded rows for 14 output rows at 14x14 with 3x3 kernels. Each thread first computes and
// signals the rows the other half reads, so the wait for them is short.
void run_halves(const Block& b, int64_t n) {
  const Geometry& g = b.g;
  const int64_t in_row = g.w * g.c, out_row = g.wo * g.c, middle = (g.ho + 1) / 2;
  const auto [lo0, hi0] = dwconv::input_rows(g, 0, middle);
  const auto [lo1, hi1] = dwconv::input_rows(g, middle, g.ho);
  // The first half computes rows [lo0, split), the second [max(split, lo1), hi1): the rows both
  // read, [lo1, hi0), are divided between them.
  const int64_t split = lo1 < hi0 ? (lo1 + hi0 + 1) / 2 : hi0;
  float* expanded = sized(thread_workspace().expanded, g.h * in_row);  // the caller's: input row r at r * in_row
  std::atomic<int> ready[2] = {0, 0};
  const auto convolve_project = [&](int64_t oh0, int64_t oh1) {
    float* out = sized(thread_workspace().depthwise, (oh1 - oh0) * out_row) - oh0 * out_row;
    b.dw.eval_rows(out, expanded, b.dw_taps, b.dw_scale, b.dw_shift, g, b.dw_act, oh0, oh1, 0, g.c);
    project(b, n, out, b.project_w, b.image(n), oh0 * g.wo, oh1 * g.wo);
  };
#pragma omp parallel num_threads(2)
  {
    int thread = 0, team = 1;
#ifdef _OPENMP
    thread = omp_get_thread_num(), team = omp_get_num_threads();
#endif
    if (team == 1) {  // no second thread (a nested region): both halves here
      b.produce(n, lo0, hi1, expanded + lo0 * in_row);
      convolve_project(0, g.ho);
    } else if (thread < 2) {
      // This half's rows [r0, r1), of which [s0, s1) the other half reads: those first.
      const int64_t r0 = thread == 0 ? lo0 : std::max(split, lo1), r1 = thread == 0 ? split : hi1;
      const int64_t s0 = thread == 0 ? std::clamp(lo1, r0, r1) : r0, s1 = thread == 0 ? r1 : std::clamp(hi0, r0, r1);
      if (s0 < s1) b.produce(n, s0, s1, expanded + s0 * in_row);
      ready[thread].store(1, std::memory_order_release);
      if (r0 < s0) b.produce(n, r0, s0, expanded + r0 * in_row);
      if (s1 < r1) b.produce(n, s1, r1, expanded + s1 * in_row);
      while (ready[1 - thread].load(std::memory_order_acquire) == 0) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      }
      if (thread == 0) convolve_project(0, middle);
      else if (middle < g.ho) convolve_project(middle, g.ho);
    }
  }
}

// Depthwise output a thread keeps for a group of SE images: half of a 2 MB L2 (on a 1 MB L2,
// measured no slower than one image at a time).
constexpr int64_t kSeGroupBytes = 1 << 20;

// Images run_se_images takes together out of `images`: up to kSeGroupBytes of depthwise output
// where the SE weights outweigh an image's, else one.
int64_t se_group(const Block& b, int64_t images) {
  const int64_t image_values = b.g.ho * b.g.wo * b.g.c;
  if (2 * b.g.c * b.squeeze <= image_values) return 1;
  return std::clamp<int64_t>(kSeGroupBytes / int64_t(sizeof(float) * image_values), 1, images);
}

// Images [n0, n1) of an SE block, each whole on this thread. Where the SE weights outweigh an
// image's depthwise output (1.8 MB against 188 KB at 7x7 with 960 channels), the images go in
// groups: expanded and convolved, their gates computed together (each SE weight row read once a
// group, not once an image), then projected. 7x7 blocks of V3-Large at batch 16, 2 MB L2:
// 2.46-2.56 -> 1.92-2.06 ms each.
void run_se_images(const Block& b, float* sums, int64_t n0, int64_t n1, bool slide) {
  const Geometry& g = b.g;
  const int64_t image_values = g.ho * g.wo * g.c, pixels_out = g.ho * g.wo;
  const int64_t group = se_group(b, n1 - n0);
  Workspace& ws = thread_workspace();
  float* const depthwise = sized(ws.depthwise, group * image_values);
  for (int64_t first = n0; first < n1; first += group) {
    const int64_t last = std::min(n1, first + group);
    for (int64_t n = first; n < last; ++n)
      expand_depthwise_rows(b, n, 0, g.ho, BandsFromTop{0, g.ho, band_rows(b)}, depthwise + (n - first) * image_values, sums + n * g.c,
                            slide);
    const float* gates = excite(b, sums + first * g.c, last - first);
    for (int64_t n = first; n < last; ++n) {
      float* d = depthwise + (n - first) * image_values;
      const float* gate = gates + (n - first) * g.c;
      // The gate applied to whichever is smaller: the depthwise output's rows (in place, as at
      // 7x7) or a gated copy of the projection weights (as at 14x14 and up).
      const float* weights = b.project_w;
      if (image_values <= b.project_values()) {
        scale_rows(d, gate, pixels_out, g.c);
      } else {
        float* gated = sized(ws.weights, b.project_values());
        fold_gate(b, gate, gated);
        weights = gated;
      }
      project(b, n, d, weights, b.stem != nullptr ? nullptr : b.image(n), 0, pixels_out);  // with a stem, no residual (checked)
    }
  }
}

// Output rows per part below which an image is run by run_image_split instead of in row parts.
// Without SE the parts are independent, and their halo rows (1 of 7 at 14x14 with 3x3 kernels)
// cost less than the split's barriers and channel shares (batch 1, MobileNetV2's 28x28 blocks
// 163 -> 136 us, 14x14 ones 138 -> 125); with SE they take a second parallel region and a gate
// folded on one thread, which lost 5% at 14x14 and gains 5-10% at 28x28 (V3-Large's features.4-6
// on an Intel Xeon: 139-144 -> 126-135 us).
constexpr int64_t kMinPartRows = 14, kMinPartRowsWithoutSe = 7;
// Rows a pair of parts shares below which each part keeps its own rows. At 14 rows (V2's 14x14
// blocks) the shared bands went down to 2 rows: batch 1 ran 3-5% slower, and the threads' idle
// time in those blocks rose to 8.5%. From 28 rows it fell from 5-8% to 2-3% (busy host, timers
// per block).
constexpr int64_t kMinPairRows = 28;

// Whether run_block's row parts (`parts` of an image, `part_rows` rows each) go in pairs whose
// rows two threads take from both ends (BandsFromBothEnds).
bool parts_in_pairs(const Block& b, int64_t parts, int64_t part_rows) {
  return !b.has_se() && parts % 2 == 0 && 2 * part_rows >= kMinPairRows;
}

// Whether images run whole on a thread keep their expanded rows in a sliding window (as row
// parts do): while each thread has at most two images, whose weights come from memory and whose
// whole rows (4.8 MB at V2's features.2) miss the caches. Alternated in one process, V2 at batch
// 2 on 2 threads 1.05x, at batch 4 1.02x, at batch 1 on 1 thread 1.03x, V3-Large 1.01-1.03x; at
// batch 8 level, at 16 0.5% slower.
bool slide_whole_images(int64_t images, int threads) { return images <= 2 * threads; }

// Whole images (the batch a multiple of the threads), handed out one at a time (with heavy SE,
// a group at a time, as run_se_images groups them) to whichever thread is free: a static share
// left a thread idle at the end of each block when the other ran slower (a busy host, images
// whose bands differ), 8-11% of the threads' time at batch 16. Alternated forward by forward in
// one process (AVX2 Zen 3, 2 threads, batch 16): V3-Large 1.04-1.05x, V2 1.04-1.12x, V3-Small
// 1.05x; batch 2 and 4 level.
void run_whole_images(const Block& b, float* sums, int threads) {
  const Geometry& g = b.g;
  const bool slide = slide_whole_images(g.n, threads);
  // SE groups of equal size: each thread's share (as a static split) in as few groups as
  // se_group allows, so 8 images a thread go as 4 + 4, not 5 + 3 (which dealt out 10 and 6).
  const int64_t share = (g.n + threads - 1) / threads, group = se_group(b, share), groups = (share + group - 1) / group;
  const int64_t step = (share + groups - 1) / groups;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t n0 = next.fetch_add(step, std::memory_order_relaxed); n0 < g.n; n0 = next.fetch_add(step, std::memory_order_relaxed)) {
      const int64_t n1 = std::min(g.n, n0 + step);
      if (b.has_se()) {
        run_se_images(b, sums, n0, n1, slide);
        continue;
      }
      for (int64_t n = n0; n < n1; ++n)
        expand_depthwise_rows(b, n, 0, g.ho, BandsFromTop{0, g.ho, band_rows(b)}, nullptr, nullptr, slide);
    }
  });
}

void run_block(const Block& b) {
  const Geometry& g = b.g;
  const int threads = at::get_num_threads();
  // More images than threads, not a multiple of them: the images that share out evenly run
  // whole, the rest (fewer than threads) in row parts, as a smaller batch would. Shared out
  // whole, 3 images on 2 threads left one thread idle a third of the time (V3-Large at batch 3:
  // 3.45 ms an image, against 2.94 at batch 2 and 2.76 at batch 4).
  if (const int64_t rest = g.n % threads; g.n > threads && rest != 0) {
    Block whole = b, tail = b;
    whole.g.n = g.n - rest;
    run_block(whole);
    tail.g.n = rest;
    if (b.stem == nullptr) tail.x = b.x + whole.g.n * g.h * g.w * b.cin;  // with a stem, its image (read through stem_image0)
    tail.y = b.y + whole.g.n * g.ho * g.wo * b.cout;
    tail.stem_image0 = b.stem_image0 + whole.g.n;
    tail.cold_weights = true;  // as for any batch smaller than the threads (run_prepared)
    return run_block(tail);
  }
  const int64_t image_values = g.ho * g.wo * g.c, pixels_out = g.ho * g.wo;
  // With fewer images than threads each image is split into row parts that share out evenly over
  // the threads (one per thread at batch 1), or, when it is too small for that, run by
  // run_image_split; images that are a multiple of the threads (all the others, here) run whole.
  const int64_t parts = std::min<int64_t>(g.ho, even_parts(g.n, threads));
  if (parts > 1 && g.ho / parts < (b.has_se() ? kMinPartRows : kMinPartRowsWithoutSe)) {
    for (int64_t n = 0; n < g.n; ++n) run_image_split(b, n);
    return;
  }
  const int64_t part_rows = (g.ho + parts - 1) / parts;
  // Two threads, one image, too short for bands from both ends: halves that share their expansion.
  // Batch 1, alternated in one process: V2 1.006-1.011x (4 runs), V3-Large 1.004x and 1.022x.
  if (parts == 2 && threads == 2 && !b.has_se() && b.expands() && 2 * part_rows < kMinPairRows) {
    for (int64_t n = 0; n < g.n; ++n) run_halves(b, n);
    return;
  }
  Workspace& ws = thread_workspace();
  float* sums = b.has_se() ? sized(ws.sums, g.n * parts * g.c) : nullptr;
  if (sums != nullptr) std::fill(sums, sums + g.n * parts * g.c, 0.0f);
  if (parts == 1) return run_whole_images(b, sums, threads);
  // SE with parts: the images' depthwise outputs and gated weights outlive the parallel region.
  float *shared_depthwise = nullptr, *shared_weights = nullptr;
  if (b.has_se()) {
    shared_depthwise = sized(ws.depthwise, g.n * image_values);
    shared_weights = sized(ws.shared_weights, g.n * b.project_values());
  }
  // Without SE, parts go in pairs whose rows both threads take from either end (BandsFromBothEnds).
  const int64_t pair_rows = 2 * part_rows, pair_count = (g.ho + pair_rows - 1) / pair_rows;
  const bool pairs = parts_in_pairs(b, parts, part_rows);
  std::unique_ptr<std::atomic<int64_t>[]> taken(pairs ? new std::atomic<int64_t>[g.n * pair_count] : nullptr);
  for (int64_t i = 0; pairs && i < g.n * pair_count; ++i) taken[i].store(0, std::memory_order_relaxed);
  at::parallel_for(0, g.n * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / parts;
      if (pairs) {
        const int64_t pair = task % parts / 2, lo = pair * pair_rows, hi = std::min(g.ho, lo + pair_rows);
        if (lo < hi)
          expand_depthwise_rows(b, n, lo, hi, BandsFromBothEnds{&taken[n * pair_count + pair], hi - lo, lo, hi, band_rows(b), task % 2 == 0},
                                nullptr, nullptr, true);
        continue;
      }
      const int64_t oh0 = (task % parts) * part_rows, oh1 = std::min(g.ho, oh0 + part_rows);
      if (oh0 >= oh1) continue;
      const BandsFromTop bands{oh0, oh1, band_rows(b)};  // row parts slide their expanded rows
      if (b.has_se())  // parts of an image: its depthwise output and channel sums kept for the second pass
        expand_depthwise_rows(b, n, oh0, oh1, bands, shared_depthwise + n * image_values, sums + task * g.c, true);
      else
        expand_depthwise_rows(b, n, oh0, oh1, bands, nullptr, nullptr, true);
    }
  });
  if (!b.has_se()) return;
  for (int64_t n = 0; n < g.n; ++n) {
    float* total = sums + n * parts * g.c;
    for (int64_t part = 1; part < parts; ++part)
      for (int64_t k = 0; k < g.c; ++k) total[k] += total[part * g.c + k];
    fold_gate(b, excite(b, total, 1), shared_weights + n * b.project_values());
  }
  const int64_t chunk = (pixels_out + parts - 1) / parts;
  at::parallel_for(0, g.n * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / parts, p0 = (task % parts) * chunk, p1 = std::min(pixels_out, p0 + chunk);
      if (p0 < p1)
        project(b, n, shared_depthwise + n * image_values, shared_weights + n * b.project_values(),
                b.stem != nullptr ? nullptr : b.image(n), p0, p1);  // with a stem, no residual (checked)
    }
  });
}

// One block's arguments, as fastmb::inverted_residual takes them (the chain op's lists give each
// block's the same).
struct BlockArguments {
  std::optional<Tensor> expand_weight, expand_bias;
  c10::string_view expand_activation;
  Tensor dw_weight, dw_scale, dw_shift;
  at::IntArrayRef stride, padding, dilation;
  c10::string_view dw_activation;
  std::optional<Tensor> fc1_weight, fc1_bias, fc2_weight, fc2_bias;
  c10::string_view se_activation, se_gate;
  Tensor project_weight, project_bias;
  bool residual;
  c10::string_view project_activation;
};

// The Block one block's arguments make over an input of sizes `input` (N, C, H, W), every argument
// checked (errors name `op`, the op and which block). `taps` keeps a repacked depthwise weight
// alive. What depends on the call (x, y, cold_weights) is left for bind.
Block prepare_block(const char* op, const BlockArguments& a, const std::array<int64_t, 4>& input, const StemRows* stem, Tensor& taps) {
  TORCH_CHECK(a.expand_weight.has_value() == a.expand_bias.has_value(), "fastmb::", op, ": expand_weight and expand_bias go together");
  TORCH_CHECK(stem == nullptr || !a.expand_weight.has_value(), "fastmb::", op,
              ": a stem takes the place of the expansion: give one of them");
  const int se_tensors = a.fc1_weight.has_value() + a.fc1_bias.has_value() + a.fc2_weight.has_value() + a.fc2_bias.has_value();
  TORCH_CHECK(se_tensors == 0 || se_tensors == 4, "fastmb::", op, ": the four SE tensors are given together or not at all");
  Block b{};
  b.cin = input[1];
  const int64_t c = a.expand_bias.has_value() && a.expand_bias->dim() == 1 ? a.expand_bias->size(0) : b.cin;
  const Tensor& dw_weight = a.dw_weight;
  TORCH_CHECK(dw_weight.dim() == 4 && dw_weight.size(0) == c && dw_weight.size(1) == 1 && dw_weight.size(2) >= 1 && dw_weight.size(3) >= 1,
              "fastmb::", op, ": dw_weight must be (", c, ", 1, kH, kW), got shape ", dw_weight.sizes());
  // The depthwise conv's geometry over the expanded channels, with dwconv_bn_act's checks.
  b.g = dwconv_geometry_of(op, {input[0], c, input[2], input[3]}, dw_weight.sizes().slice(2), a.stride, a.padding, a.dilation);
  b.dw = dwconv::select_kernels<float>(b.g);  // for its geometry, once: not at every call
  b.gemm = pointwise::select_gemm();
  b.cout = a.project_bias.dim() == 1 ? a.project_bias.size(0) : 0;
  if (a.expand_weight.has_value()) {
    b.expand_w = checked_dense_float(op, "expand_weight", *a.expand_weight, {pointwise::panels_of(c), b.cin, pointwise::kPanel});
    b.expand_b = checked_dense_float(op, "expand_bias", *a.expand_bias, {c});
  }
  b.expand_act = parse_activation(a.expand_activation);
  // The depthwise weight taps-major, [kH * kW][C], as the kernels read it: in place when its
  // strides are already those (a view of a packed (kH * kW, C) tensor: no view made, as a block
  // at batch 1 feels), else repacked here.
  const bool taps_major = dw_weight.stride(0) == 1 && dw_weight.stride(3) == c && dw_weight.stride(2) == c * b.g.kw &&
                          dw_weight.scalar_type() == at::kFloat && dw_weight.device().is_cpu();
  if (taps_major) {
    b.dw_taps = dw_weight.const_data_ptr<float>();
  } else {
    taps = dw_weight.reshape({c, -1}).t().contiguous();
    b.dw_taps = checked_dense_float(op, "dw_weight", taps, {b.g.kh * b.g.kw, c});
  }
  b.dw_scale = checked_dense_float(op, "dw_scale", a.dw_scale, {c});
  b.dw_shift = checked_dense_float(op, "dw_shift", a.dw_shift, {c});
  b.dw_act = parse_activation(a.dw_activation);
  if (a.fc1_weight.has_value()) {
    b.squeeze = a.fc1_weight->size(0);
    b.fc1_w = checked_dense_float(op, "fc1_weight", *a.fc1_weight, {b.squeeze, c});
    b.fc1_b = checked_dense_float(op, "fc1_bias", *a.fc1_bias, {b.squeeze});
    b.fc2_w = checked_dense_float(op, "fc2_weight", *a.fc2_weight, {c, b.squeeze});
    b.fc2_b = checked_dense_float(op, "fc2_bias", *a.fc2_bias, {c});
  }
  b.se_act = parse_activation(a.se_activation);
  b.gate = parse_gate(a.se_gate);
  b.project_w = checked_dense_float(op, "project_weight", a.project_weight, {pointwise::panels_of(b.cout), c, pointwise::kPanel});
  b.project_b = checked_dense_float(op, "project_bias", a.project_bias, {b.cout});
  b.project_act = parse_activation(a.project_activation);
  b.residual = a.residual;
  TORCH_CHECK(!b.residual || (b.cout == b.cin && b.g.ho == b.g.h && b.g.wo == b.g.w), "fastmb::", op, ": residual needs the ",
              "output's shape to be the block input's, got ", b.cout, " channels of ", b.g.ho, "x", b.g.wo, " from ", at::IntArrayRef(input));
  // With SE the projection may run after the stem's rows are gone (shared_depthwise): no residual.
  TORCH_CHECK(!(stem && b.residual && b.has_se()), "fastmb::", op, ": a block after a stem takes a residual or SE, not both");
  b.stem = stem;
  return b;
}

// The stem the optional stem_* arguments describe (null without them), over image x; else x itself
// must be the first block's input.
std::unique_ptr<StemRows> make_stem(const char* op, const Tensor& x, const std::optional<Tensor>& stem_weight,
                                    const std::optional<Tensor>& stem_scale, const std::optional<Tensor>& stem_shift,
                                    at::IntArrayRef stem_stride, at::IntArrayRef stem_padding, at::IntArrayRef stem_dilation,
                                    c10::string_view stem_activation) {
  const int stem_tensors = stem_weight.has_value() + stem_scale.has_value() + stem_shift.has_value();
  TORCH_CHECK(stem_tensors == 0 || stem_tensors == 3, "fastmb::", op, ": stem_weight, stem_scale and stem_shift go together");
  if (stem_tensors == 3)
    return StemRows::make(op, x, *stem_weight, *stem_scale, *stem_shift, stem_stride, stem_padding, stem_dilation,
                          parse_activation(stem_activation));
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "fastmb::", op, ": x must be a channels_last float32 CPU (N, C, H, W) tensor");
  return nullptr;
}

// The first block's input sizes: x's, or the stem's output's.
std::array<int64_t, 4> first_input(const Tensor& x, const StemRows* stem) {
  if (stem != nullptr) return {x.size(0), stem->channels(), stem->geometry().ho, stem->geometry().wo};
  return {x.size(0), x.size(1), x.size(2), x.size(3)};
}

// Points prepared block b at `input` (its x; the stem's image with a stem) and at a new output,
// which it returns.
Tensor bind(Block& b, const Tensor& input) {
  Tensor y = cached_empty({b.g.n, b.cout, b.g.ho, b.g.wo}, input.options(), at::MemoryFormat::ChannelsLast);
  b.x = input.const_data_ptr<float>();
  b.y = y.mutable_data_ptr<float>();
  b.cold_weights = b.g.n < at::get_num_threads();
  return y;
}

// Runs prepared block b on `input` into a new tensor.
Tensor run_prepared(Block& b, const Tensor& input) {
  Tensor y = bind(b, input);
  if (y.numel() > 0) run_block(b);
  return y;
}

// Whether run_block would share block b's one image between two threads from both ends: batch 1
// on two threads (two parts), in pairs, something to compute.
bool shares_rows_from_both_ends(const Block& b, int threads) {
  const Geometry& g = b.g;
  return g.n == 1 && threads == 2 && parts_in_pairs(b, 2, (g.ho + 1) / 2) && g.wo > 0 && b.cout > 0;
}

// Blocks one after another that each share their one image's rows between two threads from both
// ends (shares_rows_from_both_ends), in one parallel region: a thread that has taken its last
// band of a block goes on to its end of the next block, whose input rows it wrote itself, instead
// of waiting at a join while the other finishes its last band (9 us a block on average, V2 at
// batch 1); it waits only for rows the other writes (Linked). Whole forwards at batch 1 on two
// threads, alternated in one process against a region per block, medians of 6 runs: V2 (blocks
// 0-5 linked) 1.008x, V3-Large (0-2) 1.006x, V3-Small (1-2) 1.006x. V2's 14x14 halves linked the
// same way (through two shared buffers in turn) ran 1.5% slower, so runs stop at them.
// `inputs[i]` is block i's input, for the profiler's event per block.
void run_linked_blocks(const std::vector<Block>& blocks, const std::vector<Tensor>& inputs) {
  const int64_t count = int64_t(blocks.size());
  std::unique_ptr<RowsWritten[]> written(new RowsWritten[count]);
  for (int64_t i = 0; i < count; ++i) written[i].bottom.store(blocks[i].g.ho, std::memory_order_relaxed);
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    // Where the region has one thread it takes both ends in turn: each block whole from the top.
    for (int64_t side = begin; side < end; ++side)
      for (int64_t i = 0; i < count; ++i) {
        const Block& b = blocks[i];
        const auto run = [&] {
          const BandsFromBothEnds bands{&written[i].taken, b.g.ho, 0, b.g.ho, band_rows(b), side == 0};
          expand_depthwise_rows(b, 0, 0, b.g.ho, bands, nullptr, nullptr, true, Linked{i > 0 ? &written[i - 1] : nullptr, &written[i], side == 0});
        };
        if (side != 0) {
          run();
          continue;
        }
        RECORD_FUNCTION("fastmb::inverted_residual_block", std::vector<c10::IValue>{inputs[i]});  // on the caller's thread
        run();
      }
  });
}

// The stem alone, into a new tensor: images, or row parts of them where there are fewer images
// than threads, across the threads.
Tensor run_stem(const StemRows& stem, const Tensor& x) {
  const Geometry& g = stem.geometry();
  const int64_t row = g.wo * stem.channels();
  Tensor y = cached_empty({g.n, stem.channels(), g.ho, g.wo}, x.options(), at::MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return y;
  float* out = y.mutable_data_ptr<float>();
  const float* image = x.const_data_ptr<float>();
  const int64_t parts = std::min<int64_t>(g.ho, even_parts(g.n, at::get_num_threads())), part_rows = (g.ho + parts - 1) / parts;
  at::parallel_for(0, g.n * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / parts, r0 = (task % parts) * part_rows, r1 = std::min(g.ho, r0 + part_rows);
      if (r0 < r1) stem.rows(out + (n * g.ho + r0) * row, image, n, r0, r1);
    }
  });
  return y;
}

Tensor inverted_residual(const Tensor& x, const std::optional<Tensor>& expand_weight, const std::optional<Tensor>& expand_bias,
                         c10::string_view expand_activation, const Tensor& dw_weight, const Tensor& dw_scale, const Tensor& dw_shift,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view dw_activation,
                         const std::optional<Tensor>& fc1_weight, const std::optional<Tensor>& fc1_bias,
                         const std::optional<Tensor>& fc2_weight, const std::optional<Tensor>& fc2_bias, c10::string_view se_activation,
                         c10::string_view se_gate, const Tensor& project_weight, const Tensor& project_bias, bool residual,
                         c10::string_view project_activation, const std::optional<Tensor>& stem_weight,
                         const std::optional<Tensor>& stem_scale, const std::optional<Tensor>& stem_shift, at::IntArrayRef stem_stride,
                         at::IntArrayRef stem_padding, at::IntArrayRef stem_dilation, c10::string_view stem_activation) {
  constexpr const char* op = "inverted_residual";
  const std::unique_ptr<StemRows> stem =
      make_stem(op, x, stem_weight, stem_scale, stem_shift, stem_stride, stem_padding, stem_dilation, stem_activation);
  const NoAutocast no_autocast;
  const BlockArguments arguments{expand_weight, expand_bias, expand_activation, dw_weight, dw_scale, dw_shift,
                                 stride, padding, dilation, dw_activation, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                 se_activation, se_gate, project_weight, project_bias, residual, project_activation};
  Tensor taps;
  Block b = prepare_block(op, arguments, first_input(x, stem.get()), stem.get(), taps);
  return run_prepared(b, x);
}

// Per block of the chain op: its tensors (kChainTensorNames), its settings (stride 2, padding 4:
// top, bottom, left, right, dilation 2, residual 1) and its names (expand, depthwise and SE
// activations, SE gate, projection activation).
constexpr int64_t kChainTensors = 11, kChainSettings = 9, kChainNames = 5;
constexpr const char* kChainTensorNames[kChainTensors] = {"expand_weight", "expand_bias", "dw_weight", "dw_scale", "dw_shift", "fc1_weight",
                                                          "fc1_bias", "fc2_weight", "fc2_bias", "project_weight", "project_bias"};

}  // namespace

struct PreparedChain::Blocks {
  // The x they were made for: its sizes, strides, dtype and device (with a stem, its image).
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  at::Device device{at::kCPU};
  std::unique_ptr<StemRows> stem;  // or null: x is the first block's input
  std::vector<Block> blocks;
  std::vector<Tensor> taps;  // the repacked depthwise weights they read, if any
};

PreparedChain::PreparedChain(std::vector<std::optional<Tensor>> tensors, std::vector<int64_t> settings, std::vector<std::string> names,
                             ChainStem stem)
    : tensors_(std::move(tensors)),
      settings_(std::move(settings)),
      names_(std::move(names)),
      stem_(std::move(stem)),
      blocks_(int64_t(tensors_.size()) / kChainTensors) {
  TORCH_CHECK(int64_t(tensors_.size()) == blocks_ * kChainTensors && int64_t(settings_.size()) == blocks_ * kChainSettings &&
                  int64_t(names_.size()) == blocks_ * kChainNames,
              "fastmb::inverted_residual_chain: tensors, settings and names must hold ", kChainTensors, ", ", kChainSettings, " and ",
              kChainNames, " values per block, got ", tensors_.size(), ", ", settings_.size(), " and ", names_.size());
}

PreparedChain::~PreparedChain() = default;

std::shared_ptr<const PreparedChain::Blocks> PreparedChain::blocks_for(const Tensor& x) const {
  const auto made_for = [&x](const Blocks& b) {
    return b.sizes == x.sizes() && b.strides == x.strides() && b.dtype == x.scalar_type() && b.device == x.device();
  };
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (last_ != nullptr && made_for(*last_)) return last_;
  }
  // x checked (by make_stem, the blocks by prepare_block) only here: an x the blocks were made for
  // passes the same checks.
  auto made = std::make_shared<Blocks>();
  made->sizes = x.sizes().vec(), made->strides = x.strides().vec(), made->dtype = x.scalar_type(), made->device = x.device();
  made->stem = make_stem("inverted_residual_chain", x, stem_.weight, stem_.scale, stem_.shift, stem_.stride, stem_.padding, stem_.dilation,
                         stem_.activation);
  TORCH_CHECK(blocks_ >= 1 || made->stem, "fastmb::inverted_residual_chain: give at least one block, or a stem");
  made->taps.resize(blocks_);
  std::array<int64_t, 4> sizes = first_input(x, made->stem.get());
  for (int64_t i = 0; i < blocks_; ++i) {
    const std::string op = "inverted_residual_chain (block " + std::to_string(i) + ")";
    std::array<std::optional<Tensor>, kChainTensors> t;
    for (int64_t k = 0; k < kChainTensors; ++k) t[k] = tensors_[i * kChainTensors + k];
    for (const int64_t k : {2, 3, 4, 9, 10}) TORCH_CHECK(t[k].has_value(), "fastmb::", op, ": the ", kChainTensorNames[k], " is missing");
    const int64_t* s = settings_.data() + i * kChainSettings;
    const std::string* n = names_.data() + i * kChainNames;
    const BlockArguments arguments{t[0], t[1], n[0], *t[2], *t[3], *t[4], {s, 2}, {s + 2, 4}, {s + 6, 2}, n[1],
                                   t[5], t[6], t[7], t[8], n[2], n[3], *t[9], *t[10], s[8] != 0, n[4]};
    const Block b = prepare_block(op.c_str(), arguments, sizes, i == 0 ? made->stem.get() : nullptr, made->taps[i]);
    made->blocks.push_back(b);
    sizes = {b.g.n, b.cout, b.g.ho, b.g.wo};
  }
  const std::lock_guard<std::mutex> lock(mutex_);
  last_ = made;
  return made;
}

Tensor PreparedChain::run(const Tensor& x) const {
  const NoAutocast no_autocast;
  const std::shared_ptr<const Blocks> prepared = blocks_for(x);
  if (blocks_ == 0) return run_stem(*prepared->stem, x);
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const size_t count = prepared->blocks.size();
  Tensor h = x;
  for (size_t i = 0; i < count;) {
    size_t end = i;
    while (end < count && shares_rows_from_both_ends(prepared->blocks[end], threads)) ++end;
    if (end - i >= 2) {
      std::vector<Block> blocks(prepared->blocks.begin() + i, prepared->blocks.begin() + end);
      std::vector<Tensor> inputs;
      for (size_t k = 0; k < blocks.size(); ++k) {
        inputs.push_back(h);
        h = bind(blocks[k], h);
      }
      run_linked_blocks(blocks, inputs);
      i = end;
      continue;
    }
    // One profiler event per block inside the chain's (its input recorded with the shapes): where
    // a chain's time goes. Nothing is built unless a profiler is listening.
    RECORD_FUNCTION("fastmb::inverted_residual_block", std::vector<c10::IValue>{h});
    Block b = prepared->blocks[i];
    h = run_prepared(b, h);
    ++i;
  }
  return h;
}

namespace {

// Blocks one after another, each block's output the next one's input, in one call: the per-call
// work of a block (argument parsing, checks, the framework's dispatch) is most of a small block's
// time at batch 1.
Tensor inverted_residual_chain(const Tensor& x, const c10::List<std::optional<Tensor>>& tensors, at::IntArrayRef settings,
                               // owned: views of a str[] may outlive the list the boxed call unpacked them from
                               const std::vector<std::string>& names, const std::optional<Tensor>& stem_weight,
                               const std::optional<Tensor>& stem_scale, const std::optional<Tensor>& stem_shift,
                               at::IntArrayRef stem_stride, at::IntArrayRef stem_padding, at::IntArrayRef stem_dilation,
                               c10::string_view stem_activation) {
  const ChainStem stem{stem_weight, stem_scale, stem_shift, stem_stride.vec(), stem_padding.vec(), stem_dilation.vec(),
                       std::string(stem_activation.data(), stem_activation.size())};
  return PreparedChain({tensors.begin(), tensors.end()}, settings.vec(), names, stem).run(x);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmb, CPU, m) {
  m.impl("inverted_residual", &inverted_residual);
  m.impl("inverted_residual_chain", &inverted_residual_chain);
}

}  // namespace fastmb::cpu
