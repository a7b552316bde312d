"""Rotary position embedding, applied to stored keys at the positions a context gives them.

RoPE rotates pairs of key channels by an angle proportional to the position. The memory stores
pre-RoPE keys (taken from each layer's key projection) and rotates them to whatever positions the
current context gives them (Position-agnostic KV Retrieval).

cos/sin are the tensors a transformers rotary embedding module returns: [batch, seq, head_dim],
in the half-split layout that `rotate_half` expects.
"""

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., heads, seq, head_dim]; cos/sin broadcastable to [..., 1, seq, head_dim]."""
    return x * cos + rotate_half(x) * sin
