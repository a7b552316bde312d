"""Rotary position embedding, applied to stored keys at the positions a context gives them.

RoPE rotates pairs of key channels by an angle proportional to the position. The memory stores
pre-RoPE keys (taken from each layer's key projection) and rotates them to whatever positions the
current context gives them (Position-agnostic KV Retrieval).

cos/sin are the tensors a transformers rotary embedding module returns: [batch, seq, head_dim],
in the half-split layout that `rotate_half` expects.

`rotate_into` gathers, rotates and writes in one pass: on CUDA one Triton kernel reads each source
row once and writes the rotated row where it goes (an answer's context at 7B shapes is 12.6 MB of
keys a layer; gathering, copying and rotating it with torch took ~8 kernels and ~6 passes: 121 us a
layer on an H100, 15 us fused). It computes in float32 and rounds once, where torch rounds each
product and the sum to half precision: the two differ by at most one unit in the last place.
"""

from __future__ import annotations

import torch

from .triton_lang import tl, triton


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., heads, seq, head_dim]; cos/sin broadcastable to [..., 1, seq, head_dim]."""
    return x * cos + rotate_half(x) * sin


def rotate_into(out: torch.Tensor, src: torch.Tensor, rows: torch.Tensor | int, cos: torch.Tensor,
                sin: torch.Tensor):
    """out[h, j] = RoPE(src[h, row j], cos[j], sin[j]) for out [H, n, D], src [H, N, D], cos/sin
    [n, D]; `rows`: an index tensor [n] into src's N, or an int, the first of n consecutive rows."""
    n = out.shape[1]
    if n == 0:
        return
    if _fits_kernel(out, src, cos, sin) and (isinstance(rows, int) or rows.device == out.device):
        _rotate_rows(out, src, rows, cos, sin)
        return
    picked = src[:, rows:rows + n] if isinstance(rows, int) else src[:, rows]
    out.copy_(apply_rope(picked.to(out.device, non_blocking=True), cos, sin))


def _fits_kernel(out, src, cos, sin) -> bool:
    D = out.shape[-1]
    return (out.is_cuda and src.device == out.device and triton is not None and D % 2 == 0
            and (D // 2) & (D // 2 - 1) == 0 and out.stride(-1) == src.stride(-1) == 1
            and cos.stride(-1) == 1 and cos.stride() == sin.stride())


if triton is not None:
    @triton.jit(do_not_specialize=["n", "first"])
    def _rotate_rows_kernel(src_ptr, idx_ptr, cos_ptr, sin_ptr, out_ptr, n, first,
                            s_h, s_n, c_n, o_h, o_n, HAS_INDEX: tl.constexpr, HALF: tl.constexpr, BN: tl.constexpr):
        """One program per (head, block of BN rows): both halves of each row rotated."""
        h, nb = tl.program_id(0), tl.program_id(1)
        j = nb * BN + tl.arange(0, BN)
        live = (j < n)[:, None]
        if HAS_INDEX:
            row = tl.load(idx_ptr + j, mask=j < n, other=0)
        else:
            row = first + j
        d = tl.arange(0, HALF)[None, :]
        x = src_ptr + h * s_h + row[:, None] * s_n + d
        x1 = tl.load(x, mask=live, other=0.0).to(tl.float32)
        x2 = tl.load(x + HALF, mask=live, other=0.0).to(tl.float32)
        c = j[:, None] * c_n + d
        c1 = tl.load(cos_ptr + c, mask=live, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + c + HALF, mask=live, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + c, mask=live, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + c + HALF, mask=live, other=0.0).to(tl.float32)
        o = out_ptr + h * o_h + j[:, None] * o_n + d
        tl.store(o, (x1 * c1 - x2 * s1).to(out_ptr.dtype.element_ty), mask=live)
        tl.store(o + HALF, (x2 * c2 + x1 * s2).to(out_ptr.dtype.element_ty), mask=live)


_BN = 32


def _rotate_rows(out, src, rows, cos, sin):
    H, n, D = out.shape
    indexed = not isinstance(rows, int)
    _rotate_rows_kernel[(H, -(-n // _BN))](
        src, rows if indexed else src, cos, sin, out, n, 0 if indexed else rows,
        src.stride(0), src.stride(1), cos.stride(-2), out.stride(0), out.stride(1),
        HAS_INDEX=indexed, HALF=D // 2, BN=_BN)
