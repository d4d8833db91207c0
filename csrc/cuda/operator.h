// Shared by the CUDA operators (*_op.cpp): from tensors to what the launchers (launch.h) take.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <initializer_list>

#include "launch.h"

namespace fastmb::cuda {

inline Element element_of(at::ScalarType dtype, const char* op) {
  if (dtype == at::kHalf) return Element::kHalf;
  if (dtype == at::kBFloat16) return Element::kBFloat16;
  TORCH_CHECK(dtype == at::kFloat, "fastmb::", op, ": the CUDA kernels take float32, float16 or bfloat16, got ", dtype);
  return Element::kFloat;
}

// Elements per 16-byte vector of `dtype`, when every tensor's data and the channel count allow
// it; else 1 (scalar accesses).
inline int vector_width(at::ScalarType dtype, int64_t channels, std::initializer_list<const at::Tensor*> tensors) {
  const int width = 16 / int(c10::elementSize(dtype));
  if (channels % width != 0) return 1;
  for (const at::Tensor* t : tensors)
    if (t->defined() && reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return 1;
  return width;
}

// Blocks along the pixels for a reduction kernel: enough to fill the GPU (8 blocks of kThreads
// per SM) beside `channel_blocks` blocks along the channels, and at most one per `rows` pixels.
inline int64_t reduction_blocks(int64_t pixels, int64_t rows, int64_t channel_blocks) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(pixels, rows), 8 * int64_t(sms) / std::max<int64_t>(1, channel_blocks)));
}

// The grid and block of a kernel whose threads take `vector` channels each (of `channels`) and
// whose block rows go over `rows` items (strips or pixels), one item per thread row.
struct Launch {
  dim3 grid, block;
};
inline Launch rows_launch(int64_t channels, int vector, int64_t rows) {
  const dim3 block = block_shape(channels / vector);
  return {dim3(ceil_div(rows, block.y), ceil_div(channels / vector, block.x)), block};
}

}  // namespace fastmb::cuda
