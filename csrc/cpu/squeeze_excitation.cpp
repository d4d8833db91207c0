// Fused squeeze-and-excitation on the CPU, forward and backward, NHWC.
//
// The two big passes over x are vectorised loops over channels. The forward's excitation (FC,
// activation, FC, gate on the per-image means) is a loop of dot products: at inference batch
// sizes a chain of ATen calls costs more than its arithmetic. The backward needs the
// excitation's intermediates and its transposed products, and takes them from ATen's BLAS.
//   forward   pass 1: pooled = mean_hw(x); excitation; pass 2: y = x * scale
//   backward  pass 1: dscale = sum_hw(grad_y * x); the excitation's backward;
//             pass 2: grad_x = grad_y * scale + grad_pooled / HW
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common.h"
#include "../squeeze_excitation_fc.h"
#include "vec.h"

namespace fastmb::cpu {
namespace {

using at::Tensor;

// Pixels of one image per parallel task of the scaling pass, and per partial sum of the pooling
// pass (fp32 sums over a few hundred values, then over the partials, stay close to eager's).
constexpr int64_t kPixelsPerTask = 256;
// Channels per pooling task when there are fewer images than threads: each task owns its
// (image, channel block) sums, so no partial sums are shared between threads. With enough
// images a task takes all of an image's channels, and reads its pixels contiguously.
constexpr int64_t kChannelBlock = 64;
// Elements per thread below which a pass runs on one thread: starting the others costs more.
constexpr int64_t kSerialElements = int64_t(1) << 16;
// The same for an FC layer's multiply-adds: its weights come from beyond L2, so it splits sooner.
constexpr int64_t kSerialWeights = int64_t(1) << 15;

// Tasks of `elements_per_task` per parallel chunk, so that small passes (SE at batch 1) run serially.
int64_t task_grain(int64_t elements_per_task, int64_t serial = kSerialElements) {
  return std::max<int64_t>(1, serial / std::max<int64_t>(elements_per_task, 1));
}

// sums[k] = factor * sum over the image's pixels of a[p][k] (* b[p][k] when b is given), k < nc;
// a and b point at the block's first channel, c is the pixel stride; partial holds nc values.
template <typename T, typename Acc>
FASTMB_MULTIVERSION void channel_block_sums(Acc* sums, const T* a, const T* b, int64_t c, int64_t nc, int64_t pixels, Acc factor,
                                            Acc* partial) {
  std::fill(sums, sums + nc, Acc(0));
  for (int64_t p0 = 0; p0 < pixels; p0 += kPixelsPerTask) {
    std::fill(partial, partial + nc, Acc(0));
    add_column_sums(partial, std::min(kPixelsPerTask, pixels - p0), nc, [&](int64_t p, int64_t k, auto width) __attribute__((always_inline)) {
      constexpr int W = decltype(width)::value;
      const int64_t offset = (p0 + p) * c + k;
      return b == nullptr ? load_values<Acc, W>(a + offset) : load_values<Acc, W>(a + offset) * load_values<Acc, W>(b + offset);
    });
    for (int64_t k = 0; k < nc; ++k) sums[k] += partial[k];
  }
  for (int64_t k = 0; k < nc; ++k) sums[k] *= factor;
}

// (N, C) sums over each image's pixels of a (or a * b), times factor, in the accumulation dtype.
template <typename T, typename Acc>
Tensor image_channel_sums(const Tensor& a, const Tensor* b, int64_t n, int64_t c, int64_t pixels, Acc factor, const Tensor& acc_like) {
  Tensor sums = at::empty({n, c}, acc_like.options());
  const int64_t block = n >= at::get_num_threads() ? c : kChannelBlock, blocks = (c + block - 1) / block;
  at::parallel_for(0, n * blocks, task_grain(pixels * block), [&](int64_t begin, int64_t end) {
    std::vector<Acc> partial(std::min(block, c));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / blocks, c0 = (task % blocks) * block, offset = image * pixels * c + c0;
      channel_block_sums<T, Acc>(sums.mutable_data_ptr<Acc>() + image * c + c0, a.const_data_ptr<T>() + offset,
                                 b ? b->const_data_ptr<T>() + offset : nullptr, c, std::min(block, c - c0), pixels, factor,
                                 partial.data());
    }
  });
  return sums;
}

// out[i][r] = bias[r] + dot(weight[r], in[i]) for the n images and output rows [r0, r1): each
// weight row is read once for all images. weight is (out_features, in_features), row-major.
template <typename Acc>
FASTMB_MULTIVERSION void fully_connected_rows(Acc* out, const Acc* in, const Acc* weight, const Acc* bias, int64_t n, int64_t in_features,
                                              int64_t out_features, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t i = 0; i < n; ++i)
      out[i * out_features + r] = (bias ? bias[r] : Acc(0)) + dot(weight + r * in_features, in + i * in_features, in_features);
}

// One FC layer of the excitation, then `finish` on each output: parallel over output rows when
// the layer is large enough to pay for it.
template <typename Acc, typename Finish>
void fully_connected(Acc* out, const Acc* in, const Tensor& weight, const std::optional<Tensor>& bias, int64_t n, Finish finish) {
  const at::ScalarType acc_type = c10::CppTypeToScalarType<Acc>::value;
  const Tensor w = weight.to(acc_type).contiguous();
  const Tensor b = bias.has_value() ? bias->to(acc_type).contiguous() : Tensor();
  const int64_t out_features = w.size(0), in_features = w.size(1);
  at::parallel_for(0, out_features, task_grain(n * in_features, kSerialWeights), [&](int64_t r0, int64_t r1) {
    fully_connected_rows<Acc>(out, in, w.const_data_ptr<Acc>(), b.defined() ? b.const_data_ptr<Acc>() : nullptr, n, in_features,
                              out_features, r0, r1);
  });
  for (int64_t k = 0; k < n * out_features; ++k) out[k] = finish(out[k]);
}

// out[p][k] = a[p][k] * scale[k] + shift[k] over pixels [p0, p1) of one image.
template <typename T, typename Acc>
FASTMB_MULTIVERSION void scale_shift(T* out, const T* a, const Acc* scale, const Acc* shift, int64_t c, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const T* ap = a + p * c;
    T* op = out + p * c;
    if (shift == nullptr) {
      for (int64_t k = 0; k < c; ++k) op[k] = T(Acc(ap[k]) * scale[k]);
    } else {
      for (int64_t k = 0; k < c; ++k) op[k] = T(Acc(ap[k]) * scale[k] + shift[k]);
    }
  }
}

// out = a * scale[n] (+ shift[n]) per image, (N, C) scale and shift.
template <typename T, typename Acc>
void apply_scale(Tensor& out, const Tensor& a, const Acc* scale, const Acc* shift, int64_t n, int64_t c, int64_t pixels) {
  const int64_t chunks = std::max<int64_t>(1, (pixels + kPixelsPerTask - 1) / kPixelsPerTask);
  at::parallel_for(0, n * chunks, task_grain(kPixelsPerTask * c), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / chunks, p0 = (task % chunks) * kPixelsPerTask, p1 = std::min(pixels, p0 + kPixelsPerTask);
      const int64_t offset = image * pixels * c;
      scale_shift<T, Acc>(out.mutable_data_ptr<T>() + offset, a.const_data_ptr<T>() + offset, scale + image * c,
                          shift ? shift + image * c : nullptr, c, p0, p1);
    }
  });
}

void check_cpu_input(const char* op, const Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "fastmb::", op, ": the CPU kernels take CPU tensors, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16, "fastmb::", op,
              ": the CPU kernels take float32, float64 and bfloat16, got ", x.scalar_type(), " (the reference backend takes the rest)");
}

std::tuple<Tensor, Tensor> squeeze_excitation_forward(const Tensor& x_in, const Tensor& fc1_weight, const std::optional<Tensor>& fc1_bias,
                                                      const Tensor& fc2_weight, const std::optional<Tensor>& fc2_bias,
                                                      c10::string_view activation, c10::string_view gate) {
  check_squeeze_excitation("squeeze_excitation", x_in, fc1_weight, fc1_bias, fc2_weight, fc2_bias);
  check_cpu_input("squeeze_excitation", x_in);
  const NoAutocast no_autocast;
  const int64_t n = x_in.size(0), c = x_in.size(1), pixels = x_in.size(2) * x_in.size(3);
  const Tensor x = as_nhwc(x_in);
  Nhwc4dOutput y(cached_empty_like(x_in));  // laid out like x, as eager's elementwise ops and the fake do
  const Activation act = parse_activation(activation);
  const Gate gate_kind = parse_gate(gate);
  Tensor pooled;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastmb_se_forward", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const Tensor acc_like = at::empty({0}, x.options().dtype(c10::CppTypeToScalarType<Acc>::value));
    pooled = image_channel_sums<scalar_t, Acc>(x, nullptr, n, c, pixels, Acc(1) / Acc(pixels), acc_like);
    std::vector<Acc> hidden(n * fc1_weight.size(0)), scale(n * c);
    fully_connected(hidden.data(), pooled.const_data_ptr<Acc>(), fc1_weight, fc1_bias, n, [&](Acc v) { return activate(act, v); });
    fully_connected(scale.data(), hidden.data(), fc2_weight, fc2_bias, n, [&](Acc v) { return gate_value(gate_kind, v); });
    apply_scale<scalar_t, Acc>(y.nhwc, x, scale.data(), nullptr, n, c, pixels);
  });
  return {y.finish(), pooled};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> squeeze_excitation_backward(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& pooled, const Tensor& fc1_weight, const std::optional<Tensor>& fc1_bias,
    const Tensor& fc2_weight, const std::optional<Tensor>& fc2_bias, c10::string_view activation, c10::string_view gate_name) {
  check_squeeze_excitation("squeeze_excitation_backward", x_in, fc1_weight, fc1_bias, fc2_weight, fc2_bias, &grad_y_in, &pooled);
  check_cpu_input("squeeze_excitation_backward", x_in);
  const NoAutocast no_autocast;
  const int64_t n = x_in.size(0), c = x_in.size(1), pixels = x_in.size(2) * x_in.size(3);
  const Activation act = parse_activation(activation);
  const Gate gate = parse_gate(gate_name);
  const Tensor x = as_nhwc(x_in), grad_y = as_nhwc(grad_y_in);
  Nhwc4dOutput grad_x(cached_empty_like(x_in));
  ExcitationGrads grads;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastmb_se_backward", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const Excitation fc = excitation(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate);
    const Tensor grad_scale = image_channel_sums<scalar_t, Acc>(grad_y, &x, n, c, pixels, Acc(1), pooled);
    grads = excitation_backward(grad_scale, pooled, fc, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate);
    const Tensor grad_pooled = grads.pooled.div_(double(std::max<int64_t>(pixels, 1)));
    apply_scale<scalar_t, Acc>(grad_x.nhwc, grad_y, fc.scale.const_data_ptr<Acc>(), grad_pooled.const_data_ptr<Acc>(), n, c, pixels);
  });
  const auto& p = grads.parameters;
  return {grad_x.finish(), p[0], p[1], p[2], p[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmb, CPU, m) {
  m.impl("squeeze_excitation", &squeeze_excitation_forward);
  m.impl("squeeze_excitation_backward", &squeeze_excitation_backward);
}

}  // namespace fastmb::cpu
