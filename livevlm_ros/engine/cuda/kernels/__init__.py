"""Triton kernels, each the fast path of a torch function named in its docstring. Defined only
where Triton is installed (triton_lang.py); every caller checks and falls back."""
