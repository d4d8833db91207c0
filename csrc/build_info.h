#pragma once

namespace fastmb {

// "built", or why the CUDA part of the extension was left out (set by setup.py).
const char* cuda_build_status();

// The GPU architectures the CUDA kernels were compiled for, e.g. "800,900"; "" without CUDA.
const char* cuda_archs();

}  // namespace fastmb
