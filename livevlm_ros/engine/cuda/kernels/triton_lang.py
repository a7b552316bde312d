"""Triton, where it is installed (CUDA builds of torch bring it), else None. The engine's kernels
are defined only where it is; every caller checks `triton is not None` (and that its tensors are
on CUDA) and falls back to torch elsewhere."""

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

__all__ = ["tl", "triton"]
