// The shape of a depthwise conv, shared by every backend's kernels (no ATen: the CPU's
// per-instruction-set translation units include it).
#pragma once

#include <cstdint>

namespace fastmb {

// Input (n, c, h, w), output (ho, wo), kernel, stride, padding, dilation; pixels = n * ho * wo,
// the output pixels. Index is int64_t for the CPU kernels, which take every argument PyTorch's
// conv takes; the CUDA kernels use int (csrc/cuda/cuda_utils.cuh), for arguments that fit.
template <typename Index>
struct BasicGeometry {
  int64_t n, c, h, w, ho, wo, pixels;
  Index kh, kw, sh, sw, ph, pw, dh, dw;
};
using Geometry = BasicGeometry<int64_t>;

}  // namespace fastmb
