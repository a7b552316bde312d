"""rope.rotate_into's fast path: gather rows, rotate them (RoPE) and write them where they go, in
one pass (see hook/rope.py for what it computes and why it is fused). With `scale`, the rows are
int8 with a float32 scale per head and row (memory/kv_quant.py) and are dequantized as they are
read: the int8 tier is never copied at full size."""

from __future__ import annotations

from .triton_lang import tl, triton


def fits(out, src, cos, sin, scale=None) -> bool:
    """cos/sin may be None (rows copied, not rotated)."""
    if cos is None:
        cos = sin = out
    D = out.shape[-1]
    return (out.is_cuda and src.device == out.device and triton is not None and D % 2 == 0
            and (D // 2) & (D // 2 - 1) == 0 and out.stride(-1) == src.stride(-1) == 1
            and cos.stride(-1) == 1 and cos.stride() == sin.stride()
            and (scale is None or scale.device == out.device))


if triton is not None:
    @triton.jit(do_not_specialize=["n", "first"])
    def _rotate_rows_kernel(src_ptr, idx_ptr, cos_ptr, sin_ptr, out_ptr, scale_ptr, channel_ptr, n, first,
                            s_h, s_n, c_n, o_h, o_n, sc_h, sc_n, ch_h, HAS_INDEX: tl.constexpr, SCALED: tl.constexpr,
                            ROTATE: tl.constexpr, HALF: tl.constexpr, BN: tl.constexpr):
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
        if SCALED:                                   # int8 rows: dequantized here, in float32
            scale = tl.load(scale_ptr + h * sc_h + row[:, None] * sc_n, mask=live, other=0.0)
            x1 = x1 * scale * tl.load(channel_ptr + h * ch_h + d)
            x2 = x2 * scale * tl.load(channel_ptr + h * ch_h + HALF + d)
        o = out_ptr + h * o_h + j[:, None] * o_n + d
        if ROTATE:
            c = j[:, None] * c_n + d
            c1 = tl.load(cos_ptr + c, mask=live, other=0.0).to(tl.float32)
            c2 = tl.load(cos_ptr + c + HALF, mask=live, other=0.0).to(tl.float32)
            s1 = tl.load(sin_ptr + c, mask=live, other=0.0).to(tl.float32)
            s2 = tl.load(sin_ptr + c + HALF, mask=live, other=0.0).to(tl.float32)
            tl.store(o, (x1 * c1 - x2 * s1).to(out_ptr.dtype.element_ty), mask=live)
            tl.store(o + HALF, (x2 * c2 + x1 * s2).to(out_ptr.dtype.element_ty), mask=live)
        else:
            tl.store(o, x1.to(out_ptr.dtype.element_ty), mask=live)
            tl.store(o + HALF, x2.to(out_ptr.dtype.element_ty), mask=live)


_BN = 32


def rotate_rows(out, src, rows, cos, sin, scale=None, channel=None):
    """cos/sin None: the rows are copied, not rotated. scale: None, or float32 [H, N] for int8 `src`
    [H, N, D], with channel [H, D] float32 (contiguous rows) the per-channel factors."""
    H, n, D = out.shape
    indexed = not isinstance(rows, int)
    scaled = scale is not None
    rotate = cos is not None
    _rotate_rows_kernel[(H, -(-n // _BN))](
        src, rows if indexed else src, cos if rotate else out, sin if rotate else out, out,
        scale if scaled else src, channel if scaled else src, n, 0 if indexed else rows,
        src.stride(0), src.stride(1), cos.stride(-2) if rotate else 0, out.stride(0), out.stride(1),
        scale.stride(0) if scaled else 0, scale.stride(1) if scaled else 0, channel.stride(0) if scaled else 0,
        HAS_INDEX=indexed, SCALED=scaled, ROTATE=rotate, HALF=D // 2, BN=_BN)
