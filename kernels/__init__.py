"""fastmb.kernels: the Triton kernels of the fused ops, one module per op (installed from the
top-level kernels/ folder)."""
