// Fused squeeze-and-excitation on the CPU, forward and backward, NHWC.
//
// The two big passes over x are vectorised loops over channels; the per-image vectors (means,
// FC layers, gate) are tiny and go through ATen's BLAS in the accumulation dtype.
//   forward   pass 1: pooled = mean_hw(x); excitation (FC, activation, FC, gate); pass 2: y = x * scale
//   backward  pass 1: dscale = sum_hw(grad_y * x); the excitation's backward;
//             pass 2: grad_x = grad_y * scale + grad_pooled / HW
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../squeeze_excitation_fc.h"
#include "cpu_utils.h"

namespace fastmb::cpu {
namespace {

using at::Tensor;

// Pixels of one image per parallel task.
constexpr int64_t kPixelsPerTask = 256;
// Elements per thread below which a pass runs on one thread: starting the others costs more.
constexpr int64_t kSerialElements = int64_t(1) << 18;

// Tasks per parallel chunk, so that small passes (SE at batch 1) run serially.
int64_t task_grain(int64_t channels) { return std::max<int64_t>(1, kSerialElements / (kPixelsPerTask * std::max<int64_t>(channels, 1))); }

// partial[n][c] += sum of a[p][c] (* b[p][c] when b is given) over pixels [p0, p1) of image n.
template <typename T, typename Acc>
FASTMB_MULTIVERSION void channel_sums(Acc* partial, const T* a, const T* b, int64_t c, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const T* ap = a + p * c;
    if (b == nullptr) {
      for (int64_t k = 0; k < c; ++k) partial[k] += Acc(ap[k]);
    } else {
      const T* bp = b + p * c;
      for (int64_t k = 0; k < c; ++k) partial[k] += Acc(ap[k]) * Acc(bp[k]);
    }
  }
}

// out[p][c] = a[p][c] * scale[c] + shift[c] over pixels [p0, p1) of one image.
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

// (N, C) sums over each image's pixels of a (or a * b), in the accumulation dtype.
template <typename T, typename Acc>
Tensor image_channel_sums(const Tensor& a, const Tensor* b, int64_t n, int64_t c, int64_t pixels, const Tensor& acc_like) {
  const int64_t chunks = std::max<int64_t>(1, (pixels + kPixelsPerTask - 1) / kPixelsPerTask);
  Tensor partial = per_thread_zeros<Acc>(n * c, acc_like);
  at::parallel_for(0, n * chunks, task_grain(c), [&](int64_t begin, int64_t end) {
    Acc* mine = partial.mutable_data_ptr<Acc>() + at::get_thread_num() * n * c;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / chunks, p0 = (task % chunks) * kPixelsPerTask, p1 = std::min(pixels, p0 + kPixelsPerTask);
      const int64_t offset = image * pixels * c;
      channel_sums<T, Acc>(mine + image * c, a.const_data_ptr<T>() + offset, b ? b->const_data_ptr<T>() + offset : nullptr, c, p0, p1);
    }
  });
  return partial.sum(0).view({n, c});
}

// out = a * scale[n] (+ shift[n]) per image, (N, C) scale and shift.
template <typename T, typename Acc>
void apply_scale(Tensor& out, const Tensor& a, const Tensor& scale, const Tensor* shift, int64_t n, int64_t c, int64_t pixels) {
  const int64_t chunks = std::max<int64_t>(1, (pixels + kPixelsPerTask - 1) / kPixelsPerTask);
  at::parallel_for(0, n * chunks, task_grain(c), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / chunks, p0 = (task % chunks) * kPixelsPerTask, p1 = std::min(pixels, p0 + kPixelsPerTask);
      const int64_t offset = image * pixels * c;
      scale_shift<T, Acc>(out.mutable_data_ptr<T>() + offset, a.const_data_ptr<T>() + offset, scale.const_data_ptr<Acc>() + image * c,
                          shift ? shift->const_data_ptr<Acc>() + image * c : nullptr, c, p0, p1);
    }
  });
}

void check_input(const Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "fastmb::squeeze_excitation: x must be (N, C, H, W)");
  TORCH_CHECK(x.scalar_type() != at::kHalf, "fastmb::squeeze_excitation: the CPU kernels have no float16 path; use the reference backend");
}

std::tuple<Tensor, Tensor> squeeze_excitation_forward(const Tensor& x_in, const Tensor& fc1_weight, const std::optional<Tensor>& fc1_bias,
                                                      const Tensor& fc2_weight, const std::optional<Tensor>& fc2_bias,
                                                      c10::string_view activation, c10::string_view gate) {
  check_input(x_in);
  const NoAutocast no_autocast;
  const int64_t n = x_in.size(0), c = x_in.size(1), pixels = x_in.size(2) * x_in.size(3);
  const Tensor x = as_nhwc(x_in);
  Tensor y = at::empty_like(x_in);
  Tensor y_nhwc = y.is_contiguous(at::MemoryFormat::ChannelsLast) ? y : at::empty_like(x);
  Tensor pooled;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastmb_se_forward", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const Tensor acc_like = at::empty({0}, x.options().dtype(c10::CppTypeToScalarType<Acc>::value));
    pooled = image_channel_sums<scalar_t, Acc>(x, nullptr, n, c, pixels, acc_like).div_(double(pixels));
    const Tensor scale = excitation(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, parse_activation(activation), parse_gate(gate)).scale;
    apply_scale<scalar_t, Acc>(y_nhwc, x, scale, nullptr, n, c, pixels);
  });
  if (!y_nhwc.is_same(y)) y.copy_(y_nhwc);
  return {y, pooled};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> squeeze_excitation_backward(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& pooled, const Tensor& fc1_weight, const std::optional<Tensor>& fc1_bias,
    const Tensor& fc2_weight, const std::optional<Tensor>& fc2_bias, c10::string_view activation, c10::string_view gate_name) {
  check_input(x_in);
  const NoAutocast no_autocast;
  const int64_t n = x_in.size(0), c = x_in.size(1), pixels = x_in.size(2) * x_in.size(3);
  const Activation act = parse_activation(activation);
  const Gate gate = parse_gate(gate_name);
  const Tensor x = as_nhwc(x_in), grad_y = as_nhwc(grad_y_in);
  Tensor grad_x = at::empty_like(x_in);
  Tensor grad_x_nhwc = grad_x.is_contiguous(at::MemoryFormat::ChannelsLast) ? grad_x : at::empty_like(x);
  ExcitationGrads grads;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastmb_se_backward", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const Excitation fc = excitation(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate);
    const Tensor grad_scale = image_channel_sums<scalar_t, Acc>(grad_y, &x, n, c, pixels, pooled);
    grads = excitation_backward(grad_scale, pooled, fc, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate);
    const Tensor grad_pooled = grads.pooled.div_(double(std::max<int64_t>(pixels, 1)));
    apply_scale<scalar_t, Acc>(grad_x_nhwc, grad_y, fc.scale, &grad_pooled, n, c, pixels);
  });
  if (!grad_x_nhwc.is_same(grad_x)) grad_x.copy_(grad_x_nhwc);
  const auto& p = grads.parameters;
  return {grad_x, p[0], p[1], p[2], p[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmb, CPU, m) {
  m.impl("squeeze_excitation", &squeeze_excitation_forward);
  m.impl("squeeze_excitation_backward", &squeeze_excitation_backward);
}

}  // namespace fastmb::cpu
