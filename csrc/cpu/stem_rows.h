// The stem conv in eval, as fastmb::inverted_residual runs it in front of a block (its stem_*
// arguments): y = act(conv(x) * scale + shift) (the batch norm's eval scale and shift), written an
// image's output rows at a time, so the block reads them while they are in cache and the stem's
// output never goes to memory. The patch GEMMs are the training stem op's (stem_conv_bn_act.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>

#include "../common.h"

namespace fastmb::cpu {

class StemRows {
 public:
  // For images x (N, C_in, H, W) float32 of these sizes and strides (any layout: read through its
  // strides), weight (C, C_in, kH, kW), scale and shift (C), each checked (errors name `op`). The
  // weight is repacked, scale and shift copied: the object holds no tensor, and none of x's data.
  static std::unique_ptr<StemRows> make(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                        const at::Tensor& shift, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        Activation act);
  virtual ~StemRows() = default;
  // The conv's geometry over x (g.c is C_in), and C.
  virtual const Geometry& geometry() const = 0;
  virtual int64_t channels() const = 0;
  // Output rows [oh0, oh1) of image n of x (the data of images of the sizes and strides the object
  // was made for) into out: rows of g.wo * C floats, channels last.
  virtual void rows(float* out, const float* x, int64_t n, int64_t oh0, int64_t oh1) const = 0;
};

}  // namespace fastmb::cpu
