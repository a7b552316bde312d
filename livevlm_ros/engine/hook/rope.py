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

from ..cuda.kernels import rotate_rows


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., heads, seq, head_dim]; cos/sin broadcastable to [..., 1, seq, head_dim]."""
    return x * cos + rotate_half(x) * sin


def rotate_into(out: torch.Tensor, src: torch.Tensor, rows: torch.Tensor | int, cos: torch.Tensor,
                sin: torch.Tensor, scale: torch.Tensor | None = None, channel: torch.Tensor | None = None):
    """out[h, j] = RoPE(src[h, row j], cos[j], sin[j]) for out [H, n, D], src [H, N, D], cos/sin
    [n, D]; `rows`: an index tensor [n] into src's N, or an int, the first of n consecutive rows.
    `scale` [H, N] and `channel` [H, D] (float32): src is int8 (memory/kv_quant.py), dequantized as
    it is read; the rotation is then computed in float32 and rounded once on every path."""
    _read(out, src, rows, cos, sin, scale, channel)


def read_rows(out: torch.Tensor, src: torch.Tensor, rows: torch.Tensor | int, scale: torch.Tensor | None = None,
              channel: torch.Tensor | None = None):
    """out[h, j] = src[h, row j] (values: no rotation), dequantized as in rotate_into."""
    _read(out, src, rows, None, None, scale, channel)


def _read(out, src, rows, cos, sin, scale, channel):
    n = out.shape[1]
    if n == 0:
        return
    if scale is not None and channel is None:
        channel = torch.ones(src.shape[0], src.shape[-1], dtype=torch.float32, device=scale.device)
    if ((scale is not None or cos is not None) and rotate_rows.fits(out, src, cos, sin, scale)
            and (isinstance(rows, int) or rows.device == out.device)):
        rotate_rows.rotate_rows(out, src, rows, cos, sin, scale, channel)
        return
    picked = src[:, rows:rows + n] if isinstance(rows, int) else src[:, rows]
    picked = picked.to(out.device, non_blocking=True)
    if scale is not None:
        s = scale[:, rows:rows + n] if isinstance(rows, int) else scale[:, rows]
        picked = picked.float() * s.to(out.device, non_blocking=True)[..., None] * channel.to(out.device)[:, None]
        if cos is not None:
            cos, sin = cos.float(), sin.float()
    out.copy_(picked if cos is None else apply_rope(picked, cos, sin))
