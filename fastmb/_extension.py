"""Loads the compiled extension fastmb._C, which registers the native operator schemas and
kernels. fastmb works without it (reference backend only); LOAD_ERROR then says why."""

import importlib.util
import os
from types import ModuleType

import torch  # libtorch must be loaded before the extension

C: ModuleType | None
LOAD_ERROR: str | None
try:
    from fastmb import _C as C

    LOAD_ERROR = None
except ImportError as error:  # not built, or built against another torch
    C = None
    LOAD_ERROR = f"fastmb._C could not be imported ({error}); reinstall fastmb with `pip install .`"


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether fastmb._C registered a kernel for fastmb::<op> under `dispatch_key` ("CPU", "CUDA")."""
    return C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmb::{op}", dispatch_key)


def unbuilt_source_tree() -> str | None:
    """Why this fastmb cannot be tested as built, in one line, or None: a source tree (imported
    from the checkout, e.g. by `python -m pytest`, which puts the working directory first on
    sys.path) without its compiled extension or its Triton kernels."""
    package = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.dirname(package)
    if not os.path.exists(os.path.join(checkout, "setup.py")):
        return None  # an installed fastmb
    where = f"fastmb was imported from the source tree {package}"
    build = "build it in place (`pip install -e .` or `python setup.py build_ext --inplace`)"
    if C is None:
        return f"{where}, which has no built extension: {build}, or run `pytest` (not `python -m pytest`) to test the installed fastmb"
    if importlib.util.find_spec("triton") is not None and importlib.util.find_spec("fastmb.kernels") is None:
        return f"{where}, which has no fastmb/kernels (the Triton kernels, kernels/ in the checkout): {build}"
    return None


def empty_cache() -> int:
    """Frees the CPU memory fastmb keeps for reuse and no tensor holds now; returns how many
    bytes. fastmb's CPU kernels take outputs of 1 MiB and more from blocks that earlier outputs
    of the same size released (up to 1 GiB of them kept idle), since fresh memory from malloc
    is faulted in page by page on every call: torch.cuda.empty_cache's counterpart for them."""
    return C.release_cached_outputs() if C is not None else 0
