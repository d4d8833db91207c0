// The excitation of squeeze-and-excitation, shared by the CPU and CUDA kernels: the two FC
// layers, the activation and the gate on the (N, C) pooled means. These are tiny matrices, so
// they go through ATen (BLAS / cuBLAS) on whatever device they live.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>

#include "common.h"

namespace fastmb {

// The SE operators' argument checks (they are public through torch.ops.fastmb): x (N, C, H, W),
// fc1 (S, C) and fc2 (C, S) matrices with optional biases (S) and (C), all floating point on x's
// device; for the backward (grad_y and pooled given), grad_y of x's shape and pooled (N, C).
inline void check_squeeze_excitation(const char* op, const at::Tensor& x, const at::Tensor& fc1_weight,
                                     const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
                                     const std::optional<at::Tensor>& fc2_bias, const at::Tensor* grad_y = nullptr,
                                     const at::Tensor* pooled = nullptr) {
  TORCH_CHECK(x.dim() == 4, "fastmb::", op, ": x must be (N, C, H, W), got shape ", x.sizes());
  const int64_t c = x.size(1);
  TORCH_CHECK(fc1_weight.dim() == 2 && fc1_weight.size(1) == c, "fastmb::", op, ": fc1_weight must be (S, ", c, "), got shape ",
              fc1_weight.sizes());
  const int64_t s = fc1_weight.size(0);
  TORCH_CHECK(fc2_weight.dim() == 2 && fc2_weight.size(0) == c && fc2_weight.size(1) == s, "fastmb::", op, ": fc2_weight must be (",
              c, ", ", s, "), got shape ", fc2_weight.sizes());
  for (const at::Tensor* t : {&fc1_weight, &fc2_weight})
    TORCH_CHECK(t->is_floating_point() && t->device() == x.device(), "fastmb::", op,
                ": the fc weights must be floating point on x's device");
  check_vector(op, "fc1_bias", fc1_bias, s, x);
  check_vector(op, "fc2_bias", fc2_bias, c, x);
  if (grad_y != nullptr) {
    TORCH_CHECK(grad_y->sizes() == x.sizes() && grad_y->scalar_type() == x.scalar_type() && grad_y->device() == x.device(),
                "fastmb::", op, ": grad_y must have x's shape, dtype and device, got ", grad_y->sizes());
    TORCH_CHECK(pooled->dim() == 2 && pooled->size(0) == x.size(0) && pooled->size(1) == c && pooled->is_floating_point() &&
                    pooled->device() == x.device(),
                "fastmb::", op, ": pooled must be (", x.size(0), ", ", c, ") on x's device, got shape ", pooled->sizes());
  }
}

struct Excitation {
  at::Tensor pre_activation, hidden, pre_gate, scale;  // all (N, *), in pooled's dtype
};

// From pooled = mean_hw(x), (N, C): fc1, activation, fc2, gate. fc weights are (out, in) matrices.
Excitation excitation(const at::Tensor& pooled, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
                      const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias, Activation act, Gate gate);

struct ExcitationGrads {
  at::Tensor pooled;  // dL/dpooled, (N, C)
  std::array<at::Tensor, 4> parameters;  // fc1 weight, fc1 bias, fc2 weight, fc2 bias, typed like them
};

// Backward of excitation() given dL/dscale = sum_hw(grad_y * x), (N, C).
ExcitationGrads excitation_backward(const at::Tensor& grad_scale, const at::Tensor& pooled, const Excitation& forward,
                                    const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
                                    const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias, Activation act,
                                    Gate gate);

}  // namespace fastmb
