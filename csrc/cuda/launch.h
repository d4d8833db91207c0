// The CUDA kernels' launchers and launch shapes, without ATen. The .cu files include this and
// c10's light headers only: with ATen.h and torch/library.h each .cu spent 25 s of its
// compile in nvcc's host and device passes over them. The operators (*_op.cpp, compiled by the
// C++ compiler) check arguments, allocate tensors and pick the launch shapes.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "../activations.h"
#include "../geometry.h"

namespace fastmb::cuda {

// The element type of x and y; the kernels compute in float.
enum class Element { kFloat, kHalf, kBFloat16 };

// Threads per block of every kernel here; blocks are (channel vectors) x (pixels).
constexpr int kThreads = 256;

// The geometry the kernels index with, in int (cuda_geometry in dwconv_bn_act_op.cpp checks
// that it fits).
using CudaGeometry = BasicGeometry<int>;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Block shape for `vectors` channel vectors: x over channel vectors, split evenly into blocks of
// at most 32 (72 bf16 channels: 9 vectors, so 9 threads, where a power of two would leave 7 of
// 16 idle), y over pixels, at most kThreads in all.
inline dim3 block_shape(int64_t vectors) {
  vectors = std::max<int64_t>(vectors, 1);
  const int x = int(ceil_div(vectors, ceil_div(vectors, 32)));
  return dim3(x, kThreads / x);
}

// Output pixels per thread in the depthwise passes that compute z (forward, statistics, backward
// passes 1 and 2): a strip of kStrip along a row, so that each tap's weights are loaded once for
// kStrip pixels (the inputs they share come from L1).
constexpr int kStrip = 4;

// The strips of output pixels over the whole output: per row, and in all.
struct StripGrid {
  int per_row;
  int64_t count;
};
inline StripGrid strip_grid(const CudaGeometry& g) {
  const int per_row = int(ceil_div(g.wo, kStrip));
  return {per_row, int64_t(g.n) * g.ho * per_row};
}

// Channels per thread in the backward's pass 2 where 16-byte vectors are allowed: it keeps
// K*K*V weight-gradient sums per thread, 4 channels for 3x3, 2 for 5x5, 1 for 7x7 (at 2, its 98
// sums spilled 636 bytes under the 128-register cap). At most every dtype's 16-byte width.
constexpr int grad_z_vector(int k) { return k == 3 ? 4 : k == 5 ? 2 : 1; }

// The launchers (dwconv_bn_act_forward.cu, dwconv_bn_act_backward.cu, squeeze_excitation.cu).
// `vector` is the channels per thread: 1, or one 16-byte access of `element` (grad_z:
// grad_z_vector); x-typed buffers are void*, float ones float*. Each launch is checked.

// Forward: BN as [mean; scale; beta] per channel, and in eval the running statistics copied
// to mean_out and var_out (null in training).
void launch_dwconv_norm(cudaStream_t stream, float* norm, const float* mean, const float* var, const float* gamma, const float* beta,
                        float eps, float* mean_out, float* var_out, int64_t channels);
// Forward, training: per-block mean, M2 and pixel count of z, then their merge per channel.
void launch_dwconv_statistics(Element element, int vector, dim3 grid, dim3 block, cudaStream_t stream, float* partial_mean,
                              float* partial_m2, float* partial_count, const void* x, const float* w, const CudaGeometry& g,
                              const StripGrid& strips);
void launch_dwconv_merge_statistics(cudaStream_t stream, float* mean, float* var, const float* partial_mean, const float* partial_m2,
                                    const float* partial_count, int64_t blocks, int64_t channels);
// Forward: y = act((conv(x) - mean) * scale + beta).
void launch_dwconv_forward(Element element, int vector, dim3 grid, dim3 block, cudaStream_t stream, void* y, const void* x,
                           const float* w, const float* norm, const CudaGeometry& g, const StripGrid& strips, Activation act);

// Backward pass 1: per-block sums of dL/du and dL/du * x_hat.
void launch_dwconv_grad_sums(Element element, int vector, dim3 grid, dim3 block, cudaStream_t stream, float* partial_gu,
                             float* partial_gu_xhat, const void* grad_y, const void* x, const float* w, const float* mean,
                             const float* var, const float* gamma, const float* beta, float eps, const CudaGeometry& g,
                             const StripGrid& strips, Activation act);
// The coefficients [a; b; d] of dL/dz = a * dL/du - b - x_hat * d and the affine grads (null
// when not wanted) from pass 1's partials (null with blocks = 0 when pass 1 was skipped).
void launch_dwconv_coefficients(cudaStream_t stream, float* coef, float* grad_gamma, float* grad_beta, const float* partial_gu,
                                const float* partial_gu_xhat, int64_t blocks, const float* var, const float* gamma, float eps,
                                int64_t channels, double pixels, bool batch_statistics);
// Backward pass 2: dL/dz (null when not wanted) and per-block weight-gradient rows
// [blocks][K * K][C] (null when not wanted).
void launch_dwconv_grad_z(Element element, int vector, dim3 grid, dim3 block, cudaStream_t stream, float* grad_z, float* partial_gw,
                          const void* grad_y, const void* x, const float* w, const float* mean, const float* var, const float* gamma,
                          const float* beta, const float* coef, float eps, const CudaGeometry& g, const StripGrid& strips,
                          Activation act);
// Backward pass 3: dL/dx gathered from dL/dz over the taps.
void launch_dwconv_grad_x(Element element, int vector, dim3 grid, dim3 block, cudaStream_t stream, void* grad_x, const float* grad_z,
                          const float* w, const CudaGeometry& g);

// Squeeze-and-excitation: out[n][c] = factor * sum over image n's pixels of a (* b where b is
// not null), one block per (image, channel group); and out = a * scale[n] (+ shift[n]).
void launch_channel_sums(Element element, int vector, dim3 grid, dim3 block, cudaStream_t stream, float* out, const void* a,
                         const void* b, int64_t pixels, int64_t channels, float factor);
void launch_scale_shift(Element element, int vector, dim3 grid, dim3 block, cudaStream_t stream, void* out, const void* a,
                        const float* scale, const float* shift, int64_t pixels, int64_t total_pixels, int64_t channels);

}  // namespace fastmb::cuda
