// The pointwise GEMM for AVX-512 CPUs (x86-64-v4): tiles of up to 6 rows x 64 channels (24 of the
// 32 zmm registers accumulate; of the shapes tried, 12 x 32 and 8 x 48 were slower on Zen 4).
#include "kernels.h"

#if FASTMB_X86_TABLES
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define FASTMB_CPU_ISA avx512
#define FASTMB_GEMM_BYTES 64
#define FASTMB_GEMM_ACCUMULATORS 24
#define FASTMB_GEMM_PANELS 4
#include "tiles.h"

namespace fastmb::cpu::pointwise {
GemmPanels avx512_gemm() { return &avx512::gemm_panels; }
}  // namespace fastmb::cpu::pointwise
#pragma GCC pop_options
#endif
