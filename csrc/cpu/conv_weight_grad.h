// fastmb::conv_weight_grad's CPU kernel (conv_weight_grad.cpp), also called by the stem op's
// backward on its own dL/dz.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastmb::cpu {

// dL/dweight (weight_size: C_out, C_in, kH, kW; contiguous) of conv2d(x, weight) without groups
// or bias, from grad_z, dL/d of its output; float32/64 CPU tensors, checked (errors name the op).
at::Tensor conv_weight_grad(const at::Tensor& grad_z, const at::Tensor& x, at::IntArrayRef weight_size, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation);

}  // namespace fastmb::cpu
