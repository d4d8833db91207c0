// The depthwise passes for AVX-512 CPUs (x86-64-v4): sliding tiles of 16 float lanes, for the
// specialised kernel sizes only (the generic conv runs the AVX2 table's).
#include "kernels.h"

#if FASTMB_X86_TABLES
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define FASTMB_CPU_ISA avx512
#define FASTMB_CONV_BYTES 64
#include "passes.h"

namespace fastmb::cpu::dwconv {

Kernels<float> avx512_kernels(int k) {
  switch (k) {
    case 3: return avx512::make_kernels<3, float>();
    case 5: return avx512::make_kernels<5, float>();
    default: return avx512::make_kernels<7, float>();
  }
}

}  // namespace fastmb::cpu::dwconv
#pragma GCC pop_options
#endif
