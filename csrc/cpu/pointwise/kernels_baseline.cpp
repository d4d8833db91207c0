// The pointwise GEMM for the build's baseline instruction set (SSE2 on x86-64, NEON on ARM):
// tiles of 3 rows x 16 channels in 16-byte vectors.
#include "kernels.h"

#define FASTMB_CPU_ISA baseline
#define FASTMB_GEMM_BYTES 16
#define FASTMB_GEMM_ACCUMULATORS 12
#define FASTMB_GEMM_PANELS 1
#include "tiles.h"

namespace fastmb::cpu::pointwise {
GemmPanels baseline_gemm() { return &baseline::gemm_panels; }
}  // namespace fastmb::cpu::pointwise
