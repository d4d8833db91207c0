"""Loads the compiled extension fastmb._C, which registers the native operator schemas and
kernels. fastmb works without it (reference backend only); LOAD_ERROR then says why."""

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
