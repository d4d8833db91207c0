#include "squeeze_excitation_fc.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/hardsigmoid.h>
#include <ATen/ops/hardsigmoid_backward.h>
#include <ATen/ops/hardswish.h>
#include <ATen/ops/hardswish_backward.h>
#include <ATen/ops/hardtanh.h>
#include <ATen/ops/hardtanh_backward.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/sigmoid_backward.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <ATen/ops/threshold_backward.h>

namespace fastmb {
namespace {

using at::Tensor;

Tensor fully_connected(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias) {
  return bias.has_value() ? at::addmm(bias->to(input.scalar_type()), input, weight.to(input.scalar_type()).t())
                          : at::mm(input, weight.to(input.scalar_type()).t());
}

// PyTorch's own activation kernels, so the kinks and NaNs behave exactly as in eager.
Tensor activation_forward(Activation act, const Tensor& v) {
  switch (act) {
    case Activation::kHardswish: return at::hardswish(v);
    case Activation::kRelu: return at::relu(v);
    case Activation::kRelu6: return at::hardtanh(v, 0.0, 6.0);
    case Activation::kSilu: return at::silu(v);
    case Activation::kGelu: return at::gelu(v);
    case Activation::kGeluTanh: return at::gelu(v, "tanh");
    default: return v;
  }
}

Tensor activation_backward(Activation act, const Tensor& grad, const Tensor& pre_activation) {
  switch (act) {
    case Activation::kHardswish: return at::hardswish_backward(grad, pre_activation);
    case Activation::kRelu: return at::threshold_backward(grad, pre_activation, 0.0);
    case Activation::kRelu6: return at::hardtanh_backward(grad, pre_activation, 0.0, 6.0);
    case Activation::kSilu: return at::silu_backward(grad, pre_activation);
    case Activation::kGelu: return at::gelu_backward(grad, pre_activation);
    case Activation::kGeluTanh: return at::gelu_backward(grad, pre_activation, "tanh");
    default: return grad;
  }
}

}  // namespace

Excitation excitation(const Tensor& pooled, const Tensor& fc1_weight, const std::optional<Tensor>& fc1_bias, const Tensor& fc2_weight,
                      const std::optional<Tensor>& fc2_bias, Activation act, Gate gate) {
  Excitation e;
  e.pre_activation = fully_connected(pooled, fc1_weight, fc1_bias);
  e.hidden = activation_forward(act, e.pre_activation);
  e.pre_gate = fully_connected(e.hidden, fc2_weight, fc2_bias);
  e.scale = gate == Gate::kHardsigmoid ? at::hardsigmoid(e.pre_gate) : at::sigmoid(e.pre_gate);
  return e;
}

ExcitationGrads excitation_backward(const Tensor& grad_scale, const Tensor& pooled, const Excitation& forward, const Tensor& fc1_weight,
                                    const std::optional<Tensor>& fc1_bias, const Tensor& fc2_weight,
                                    const std::optional<Tensor>& fc2_bias, Activation act, Gate gate) {
  const Tensor grad_pre_gate = gate == Gate::kHardsigmoid ? at::hardsigmoid_backward(grad_scale, forward.pre_gate)
                                                          : at::sigmoid_backward(grad_scale, forward.scale);
  const Tensor grad_hidden = at::mm(grad_pre_gate, fc2_weight.to(pooled.scalar_type()));
  const Tensor grad_pre_activation = activation_backward(act, grad_hidden, forward.pre_activation);
  const auto typed = [](const Tensor& g, const std::optional<Tensor>& p, const Tensor& fallback) {
    return g.to((p.has_value() ? *p : fallback).scalar_type());
  };
  ExcitationGrads grads;
  grads.pooled = at::mm(grad_pre_activation, fc1_weight.to(pooled.scalar_type()));
  grads.parameters = {typed(at::mm(grad_pre_activation.t(), pooled), fc1_weight, fc1_weight),
                      typed(grad_pre_activation.sum(0), fc1_bias, fc1_weight),
                      typed(at::mm(grad_pre_gate.t(), forward.hidden), fc2_weight, fc2_weight),
                      typed(grad_pre_gate.sum(0), fc2_bias, fc2_weight)};
  return grads;
}

}  // namespace fastmb
