// The depthwise passes for AVX2 + FMA CPUs (x86-64-v3): every kernel size, tiles of 8 float lanes.
#include "kernels.h"

#if FASTMB_X86_TABLES
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define FASTMB_CPU_ISA avx2
#define FASTMB_CONV_BYTES 32
#include "passes.h"

namespace fastmb::cpu::dwconv {

Kernels<float> avx2_kernels(int k) {
  switch (k) {
    case 3: return avx2::make_kernels<3, float>();
    case 5: return avx2::make_kernels<5, float>();
    case 7: return avx2::make_kernels<7, float>();
    default: return avx2::make_kernels<0, float>();
  }
}

}  // namespace fastmb::cpu::dwconv
#pragma GCC pop_options
#endif
