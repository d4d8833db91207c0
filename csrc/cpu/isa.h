// The instruction set the CPU kernels' per-ISA tables are chosen for: the best this x86-64 CPU
// runs, or a lower one named by the environment variable FASTMB_ISA ("avx2", "baseline"),
// read once, so that tests run every table on one machine. No ATen.
#pragma once

#include <cstdlib>
#include <cstring>

// Whether the per-ISA translation units (dwconv/kernels_*.cpp, pointwise/kernels_*.cpp) are
// compiled: they use GCC's `#pragma GCC target`; other compilers (and -DFASTMB_NO_MULTIVERSION
// builds for one -march) compile each baseline table alone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FASTMB_NO_MULTIVERSION)
#define FASTMB_X86_TABLES 1
#else
#define FASTMB_X86_TABLES 0
#endif

namespace fastmb::cpu {

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kBaseline;
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("x86-64-v4")) best = Isa::kAvx512;
    else if (__builtin_cpu_supports("x86-64-v3")) best = Isa::kAvx2;
#endif
    const char* cap = std::getenv("FASTMB_ISA");
    if (cap != nullptr && std::strcmp(cap, "baseline") == 0) return Isa::kBaseline;
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && best == Isa::kAvx512) return Isa::kAvx2;
    return best;
  }();
  return isa;
}

}  // namespace fastmb::cpu
