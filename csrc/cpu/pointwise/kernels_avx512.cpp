// The pointwise GEMM for AVX-512 CPUs (x86-64-v4): tiles of 12 rows x 32 channels (24 of the 32
// zmm registers accumulate).
#include "kernels.h"

#if FASTMB_X86_POINTWISE
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define FASTMB_CPU_ISA avx512
#define FASTMB_GEMM_BYTES 64
#define FASTMB_GEMM_ROWS 12
#define FASTMB_GEMM_PANELS 2
#include "tiles.h"

namespace fastmb::cpu::pointwise {
GemmPanels avx512_gemm() { return &avx512::gemm_panels; }
}  // namespace fastmb::cpu::pointwise
#pragma GCC pop_options
#endif
