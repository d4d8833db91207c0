// The depthwise passes for the build's baseline instruction set: float64 (the generic conv), and
// float on x86-64 CPUs without AVX2 (the generic conv too: the specialised tiles would spill in
// SSE2's 16-byte registers). Without the per-ISA units (off x86-64, e.g. ARM, where NEON is
// baseline; or not GCC) this is the only table, and it holds every kernel size.
#include "kernels.h"

#define FASTMB_CPU_ISA baseline
#define FASTMB_CONV_BYTES 32
#include "passes.h"

namespace fastmb::cpu::dwconv {

Kernels<float> baseline_kernels(int k) {
#if !FASTMB_X86_TABLES
  switch (k) {
    case 3: return baseline::make_kernels<3, float>();
    case 5: return baseline::make_kernels<5, float>();
    case 7: return baseline::make_kernels<7, float>();
  }
#endif
  return baseline::make_kernels<0, float>();
}

Kernels<double> baseline_double_kernels() { return baseline::make_kernels<0, double>(); }

}  // namespace fastmb::cpu::dwconv
