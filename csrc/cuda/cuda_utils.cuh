// Shared by the CUDA kernels: vector loads over channels, block reductions, dispatch to the
// kernels' template instances.
#pragma once

// c10's light headers only (see launch.h): Half and BFloat16 for the kernels' element types,
// CUDAException for the launch checks.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "launch.h"

namespace fastmb::cuda {

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
// operators choose V so that it is).
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

// Block shape of the kernels that merge per-block partial rows [blocks][C] per channel: 8
// channels (a 32-byte segment of 4 rows per warp) by kThreads / 8 rows striding over the rows.
// At 32 x 8, 72 channels were 3 blocks whose threads took 132 dependent steps each over 1056
// rows: 116 us on the H200; at 8 x 32 the same merge took 32 us, the backward's
// coefficients 16 us (2026-12-04, fourth run).
inline dim3 merge_block_shape() { return dim3(8, kThreads / 8); }

// Calls f(T{}) with the element type: float, half or bfloat16.
template <typename F>
void dispatch_element(Element element, F&& f) {
  switch (element) {
    case Element::kFloat: f(float{}); break;
    case Element::kHalf: f(c10::Half{}); break;
    case Element::kBFloat16: f(c10::BFloat16{}); break;
  }
}

template <int V>
using Width = std::integral_constant<int, V>;

// Calls f(Width<V>{}) for the channels per thread chosen at run time: kVector or 1.
template <int kVector, typename F>
void dispatch_vector(int vector, F&& f) {
  TORCH_CHECK(vector == kVector || vector == 1, "fastmb: no CUDA kernel instance for ", vector, " channels per thread");
  if (vector == kVector) f(Width<kVector>{});
  else f(Width<1>{});
}

// The same for one 16-byte access of T.
template <typename T, typename F>
void dispatch_width(int vector, F&& f) {
  dispatch_vector<int(16 / sizeof(T))>(vector, f);
}

}  // namespace fastmb::cuda
