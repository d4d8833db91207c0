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
  // x (N, C_in, H, W) float32 in any layout (read through its strides), weight (C, C_in, kH, kW),
  // scale and shift (C), each checked (errors name `op`). The tensors must outlive the object.
  static std::unique_ptr<StemRows> make(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                        const at::Tensor& shift, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        Activation act);
  virtual ~StemRows() = default;
  // The conv's geometry over x (g.c is C_in), and C.
  virtual const Geometry& geometry() const = 0;
  virtual int64_t channels() const = 0;
  // Output rows [oh0, oh1) of image n into out: rows of g.wo * C floats, channels last.
  virtual void rows(float* out, int64_t n, int64_t oh0, int64_t oh1) const = 0;
};

}  // namespace fastmb::cpu
