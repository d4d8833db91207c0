// The excitation of squeeze-and-excitation, shared by the CPU and CUDA kernels: the two FC
// layers, the activation and the gate on the (N, C) pooled means. These are tiny matrices, so
// they go through ATen (BLAS / cuBLAS) on whatever device they live.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>

#include "common.h"

namespace fastmb {

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
