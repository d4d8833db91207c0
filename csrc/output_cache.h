// Large CPU outputs in memory kept for reuse: an empty tensor whose storage comes from blocks
// that earlier outputs of the same size released, instead of from malloc. glibc hands memory of
// that size back to the system and faults it in again on the next call, page by page; on a
// virtual machine each fault cost 0.7-6 us (25.7 MB: 4.5-38 ms), so a training step of
// mobilenetv4_conv_small at batch 16 spent 7-60 ms in faults on fastmb's outputs alone.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastmb {

// at::empty(shape, options.memory_format(format)), with a CPU tensor of at least 1 MiB taking a
// cached block of its size when one is free. Other devices and smaller tensors: at::empty.
at::Tensor cached_empty(at::IntArrayRef shape, const at::TensorOptions& options, at::MemoryFormat format);

// at::empty_like(x): x's strides where x is dense, in a cached block as above.
at::Tensor cached_empty_like(const at::Tensor& x);

// Frees the cached blocks no tensor uses now; returns the bytes released.
int64_t release_cached_outputs();

}  // namespace fastmb
