// fastmb::classifier_head's CPU kernel (classifier_head.cpp), for callers that hold its
// arguments already (a ForwardMemo's replay, forward_replay.cpp): the op's own registration calls
// the same function.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

namespace fastmb::cpu {

// fc_activations owned: views of a str[] may outlive the list the boxed call unpacked them from.
at::Tensor classifier_head(const at::Tensor& x, const at::Tensor& conv_weight, const at::Tensor& conv_bias, c10::string_view conv_activation,
                           at::TensorList fc_weights, at::TensorList fc_biases, const std::vector<std::string>& fc_activations,
                           const std::optional<at::Tensor>& fc1_by_groups);

}  // namespace fastmb::cpu
