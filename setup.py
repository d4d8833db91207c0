"""Builds fastmb._C against the installed torch: the C++ part always, csrc/cuda/ when it can.

Knobs (environment variables):
  FASTMB_SKIP_CUDA=1       leave out the CUDA kernels even where nvcc and a CUDA torch exist
  TORCH_CUDA_ARCH_LIST     GPU architectures to compile for (default "8.0;9.0")
  FASTMB_CUDA_PTX_ONLY=1   PTX alone for those architectures, compiled by the driver at load: no
                           ptxas, half of nvcc's time (CI's compile check of the CUDA part)
  MAX_JOBS                 parallel compile jobs (ninja)
  FASTMB_DEBUG=1           -O0 -g builds
"""

import glob
import os
import shutil
import sys

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "fastmb builds its extension against the PyTorch you run, so torch must be installed "
        "first: `pip install torch`, then `pip install .` again."
    )

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Values of FASTMB_CUDA_STATUS, decoded in csrc/build_info.cpp.
CUDA_BUILT, CUDA_SKIPPED, CUDA_NO_NVCC, CUDA_TORCH_WITHOUT_CUDA = 0, 1, 2, 4


def cuda_status() -> int:
    if os.environ.get("FASTMB_SKIP_CUDA", "0") not in ("", "0"):
        return CUDA_SKIPPED
    if torch.version.cuda is None:
        return CUDA_TORCH_WITHOUT_CUDA
    home = cpp_extension.CUDA_HOME
    # torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper outside the toolkit.
    if home is None or not all(
        os.path.exists(os.path.join(home, *part)) for part in (("bin", "nvcc"), ("include", "cuda_runtime.h"))
    ):
        return CUDA_NO_NVCC
    return CUDA_BUILT


def sources(pattern: str) -> list[str]:
    # Relative paths: setuptools rejects absolute ones in sources.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        sys.exit(f"fastmb needs a C++ compiler to build its extension; `{compiler}` was not found.")

    status = cuda_status()
    debug = os.environ.get("FASTMB_DEBUG", "0") not in ("", "0")
    optimize = ["-O0", "-g"] if debug else ["-O3"]
    # -g0: Python's CFLAGS ask for debug info, which took 40% of the C++ build.
    cxx_optimize = optimize if debug else [*optimize, "-g0"]
    # at::parallel_for is inlined into the extension: without OpenMP here it runs serially.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    # -Wno-psabi: GCC notes that vector arguments change ABI between instruction sets; the CPU
    # kernels' vector-typed helpers are all inlined.
    cxx_flags = [*cxx_optimize, *openmp, "-Wno-psabi", f"-DFASTMB_CUDA_STATUS={status}"]
    # The shared libstdc++, named: a compiler wrapper that adds -static-libstdc++ (the H200
    # machine's CXX, 2026-12-04) gave the extension a private C++ runtime, and every C++ error
    # raised through it crashed the process. Named before the driver's own, it is the one linked.
    link_flags = [*openmp, "-lstdc++"] if sys.platform.startswith("linux") else openmp
    cpp_sources = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp") + sources("csrc/cpu/dwconv/*.cpp") + sources("csrc/cpu/pointwise/*.cpp")

    if status != CUDA_BUILT:
        print(f"fastmb: CUDA kernels {_CUDA_REASONS[status]}", file=sys.stderr)
        return cpp_extension.CppExtension(
            "fastmb._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    nvcc_flags = [*optimize, "-lineinfo", f"-DFASTMB_CUDA_STATUS={status}", *ptx_only_flags()]
    return cpp_extension.CUDAExtension(
        "fastmb._C",
        cpp_sources + sources("csrc/cuda/*.cu") + sources("csrc/cuda/*.cpp"),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


def ptx_only_flags() -> list[str]:
    """-gencode flags for PTX alone where FASTMB_CUDA_PTX_ONLY=1 (torch then adds none of its own);
    dwconv_bn_act_backward.cu compiled in 37 s instead of 68."""
    if os.environ.get("FASTMB_CUDA_PTX_ONLY", "0") in ("", "0"):
        return []
    archs = os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", " ").replace(",", " ").split()
    numbers = [arch.removesuffix("+PTX").replace(".", "") for arch in archs]
    if not numbers or not all(n.isdigit() for n in numbers):
        sys.exit(f"fastmb: FASTMB_CUDA_PTX_ONLY=1 wants numeric TORCH_CUDA_ARCH_LIST entries such as 9.0, not {archs}")
    return [f"-gencode=arch=compute_{n},code=compute_{n}" for n in numbers]


_CUDA_REASONS = {
    CUDA_SKIPPED: "skipped (FASTMB_SKIP_CUDA=1)",
    CUDA_NO_NVCC: f"skipped: no CUDA toolkit at CUDA_HOME={cpp_extension.CUDA_HOME} (set CUDA_HOME)",
    CUDA_TORCH_WITHOUT_CUDA: "skipped: the installed torch is a CPU-only build",
}


class BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension; an in-place build also links fastmb/kernels to kernels/, so the
    source tree imports as the installed package does (installs map it through package_dir)."""

    def run(self) -> None:
        super().run()
        link = os.path.join(ROOT, "fastmb", "kernels")
        if self.inplace and not os.path.lexists(link):
            try:
                os.symlink(os.path.join("..", "kernels"), link)
            except OSError as error:  # e.g. Windows without symlink rights
                print(f"fastmb: could not link fastmb/kernels to kernels/ ({error}); Triton kernels need an install", file=sys.stderr)


if __name__ == "__main__":  # pip's build backend runs this file as __main__ too; tests import it
    setup(
        packages=find_packages(include=["fastmb", "fastmb.*"]) + ["fastmb.kernels"],
        package_dir={"fastmb": "fastmb", "fastmb.kernels": "kernels"},
        package_data={"fastmb": ["auto_order.json"]},
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtension},
    )
