// The pointwise GEMM for AVX2 + FMA CPUs (x86-64-v3): tiles of 6 rows x 16 channels (12 of the
// 16 ymm registers accumulate).
#include "kernels.h"

#if FASTMB_X86_TABLES
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define FASTMB_CPU_ISA avx2
#define FASTMB_GEMM_BYTES 32
#define FASTMB_GEMM_ACCUMULATORS 12
#define FASTMB_GEMM_PANELS 1
#include "tiles.h"

namespace fastmb::cpu::pointwise {
GemmPanels avx2_gemm() { return &avx2::gemm_panels; }
}  // namespace fastmb::cpu::pointwise
#pragma GCC pop_options
#endif
