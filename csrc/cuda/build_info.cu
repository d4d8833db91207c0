// The architectures nvcc compiled the CUDA kernels for, so that fastmb.backends() can say
// that a GPU needs a rebuild instead of failing later with "no kernel image is available".
#include "../build_info.h"

#define FASTMB_STR_(x) #x
#define FASTMB_STR(x) FASTMB_STR_(x)

namespace fastmb {

// nvcc defines __CUDA_ARCH_LIST__ (e.g. 800,900) in host code since CUDA 11.5.
const char* cuda_archs() {
#ifdef __CUDA_ARCH_LIST__
  return FASTMB_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

}  // namespace fastmb
