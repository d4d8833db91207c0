// Shared by the CUDA kernels: vector loads over channels, launch shapes, dtype dispatch.
#pragma once

#include <ATen/ATen.h>
// Only c10's CUDA headers: ATen/cuda/CUDAContext.h also wants the cuBLAS/cuSPARSE headers,
// which a bare CUDA toolkit (or torch's pip wheels) may not put on the include path.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "../common.h"

namespace fastmb::cuda {

// Threads per block of every kernel here; blocks are (channel vectors) x (pixels).
constexpr int kThreads = 256;

// Minimum resident blocks per SM for the kernels that recompute the depthwise conv, as
// __launch_bounds__'s second argument: it caps their registers (65536 per SM) at 128, or at 80
// for three blocks. Uncapped, the backward's strips took 156-238 registers, one block per SM,
// and a memory-bound kernel with 8 warps per SM hides little latency (H200, 2026-12-04).
constexpr int kTwoBlocksPerSm = 2, kThreeBlocksPerSm = 3;

// V consecutive elements of T, read or written as one access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// p[0:V] as floats, in accesses of at most 16 bytes. p must be aligned to one access (the
// launchers choose V so that it is).
template <int V, typename T>
__device__ __forceinline__ void load_floats(float (&out)[V], const T* p) {
  constexpr int kChunk = sizeof(T) * V > 16 ? 16 / sizeof(T) : V;
#pragma unroll
  for (int k = 0; k < V; k += kChunk) {
    const Pack<T, kChunk> pack = *reinterpret_cast<const Pack<T, kChunk>*>(p + k);
#pragma unroll
    for (int l = 0; l < kChunk; ++l) out[k + l] = static_cast<float>(pack.v[l]);
  }
}

template <int V, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[V]) {
  constexpr int kChunk = sizeof(T) * V > 16 ? 16 / sizeof(T) : V;
#pragma unroll
  for (int k = 0; k < V; k += kChunk) {
    Pack<T, kChunk> pack;
#pragma unroll
    for (int l = 0; l < kChunk; ++l) pack.v[l] = static_cast<T>(in[k + l]);
    *reinterpret_cast<Pack<T, kChunk>*>(p + k) = pack;
  }
}

// The first step of a tree reduction over n rows: the largest power of two below n (0 for n = 1).
// Rows r < step then take row r + step where it exists, and so on down to step 1, for any n.
__device__ __forceinline__ int first_tree_step(int n) { return n > 1 ? 1 << (31 - __clz(n - 1)) : 0; }

// Sums v over the block's rows (threadIdx.y, any number of them); every thread gets the total of
// its column (threadIdx.x). `shared` holds kThreads * V values; every thread of the block must
// call this.
template <int V, typename T>
__device__ __forceinline__ void sum_over_rows(T (&v)[V], T* shared) {
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int l = 0; l < V; ++l) shared[t * V + l] = v[l];
  __syncthreads();
  for (int s = first_tree_step(blockDim.y); s > 0; s >>= 1) {
    if (threadIdx.y < s && threadIdx.y + s < blockDim.y) {
#pragma unroll
      for (int l = 0; l < V; ++l) shared[t * V + l] += shared[(t + s * blockDim.x) * V + l];
    }
    __syncthreads();
  }
#pragma unroll
  for (int l = 0; l < V; ++l) v[l] = shared[threadIdx.x * V + l];
  __syncthreads();  // before anyone writes `shared` again
}

// Output pixel p (row-major over N, Ho, Wo) as (n, oh, ow). Pixel counts stay below 2^31 (the
// fused ops' supports() send bigger inputs to the reference), offsets are 64-bit.
struct PixelCoords {
  int64_t n, h, w;
};
__device__ __forceinline__ PixelCoords pixel_coords(uint32_t p, uint32_t height, uint32_t width) {
  const uint32_t row = p / width;
  return {int64_t(row / height), int64_t(row % height), int64_t(p % width)};
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

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Block shape for `vectors` channel vectors: x over channel vectors, split evenly into blocks of
// at most 32 (72 bf16 channels: 9 vectors, so 9 threads, where a power of two would leave 7 of
// 16 idle), y over pixels, at most kThreads in all.
inline dim3 block_shape(int64_t vectors) {
  vectors = std::max<int64_t>(vectors, 1);
  const int x = int(ceil_div(vectors, ceil_div(vectors, 32)));
  return dim3(x, kThreads / x);
}

// Block shape of the kernels that merge per-block partial rows [blocks][C] per channel: 8
// channels (a 32-byte segment of 4 rows per warp) by kThreads / 8 rows striding over the rows.
// At 32 x 8, 72 channels were 3 blocks whose threads took 132 dependent steps each over 1056
// rows: 116 us on the H200; at 8 x 32 the same merge took 32 us, the backward's
// coefficients 16 us (2026-12-04, fourth run).
inline dim3 merge_block_shape() { return dim3(8, kThreads / 8); }

// Blocks along the pixels for a reduction kernel: enough to fill the GPU (8 blocks of kThreads
// per SM) beside `channel_blocks` blocks along the channels, and at most one per `rows` pixels.
inline int64_t reduction_blocks(int64_t pixels, int64_t rows, int64_t channel_blocks) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(pixels, rows), 8 * int64_t(sms) / std::max<int64_t>(1, channel_blocks)));
}

// Calls f(T{}) with the element type of `dtype`: float, half or bfloat16.
template <typename F>
void dispatch_floating(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "fastmb::", op, ": the CUDA kernels take float32, float16 or bfloat16, got ", dtype);
  }
}

template <int V>
using Width = std::integral_constant<int, V>;

// Calls f(Width<V>{}) for the vector width of `T` chosen at run time (`width`: 1 or 16 bytes' worth).
template <typename T, typename F>
void dispatch_width(int width, F&& f) {
  constexpr int kVector = 16 / sizeof(T);
  if (width == kVector) f(Width<kVector>{});
  else f(Width<1>{});
}

}  // namespace fastmb::cuda
