// How the extension was built. setup.py passes FASTMB_CUDA_STATUS: 0 when csrc/cuda/ was
// compiled, otherwise the reason it was not.
#include "build_info.h"

#ifndef FASTMB_CUDA_STATUS
#define FASTMB_CUDA_STATUS 3
#endif

namespace fastmb {

const char* cuda_build_status() {
  switch (FASTMB_CUDA_STATUS) {
    case 0:
      return "built";
    case 1:
      return "not built: FASTMB_SKIP_CUDA=1 was set at build time";
    case 2:
      return "not built: no CUDA toolkit (nvcc and headers) was found at build time; set CUDA_HOME";
    case 4:
      return "not built: the torch present at build time has no CUDA support";
    default:
      return "not built: the extension was compiled without setup.py";
  }
}

#if FASTMB_CUDA_STATUS != 0
const char* cuda_archs() { return ""; }
#endif

}  // namespace fastmb
