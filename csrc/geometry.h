// The shape of a depthwise conv, shared by every backend's kernels (no ATen: the CPU's
// per-instruction-set translation units include it).
#pragma once

#include <cstdint>

namespace fastmb {

// Input (n, c, h, w), output (ho, wo), kernel, stride, padding, dilation; pixels = n * ho * wo,
// the output pixels.
struct Geometry {
  int64_t n, c, h, w, ho, wo, pixels;
  int kh, kw, sh, sw, ph, pw, dh, dw;
};

}  // namespace fastmb
