"""8-bit keys and values (`kv_dtype: int8`): one int8 per element, one float32 scale per token and
head, symmetric (scale = the row's largest magnitude / 127).

Per token and head, not per page or channel: memory is compacted, evicted and re-ordered token by
token (VSB), so a token's scale travels with it and nothing is re-quantized when its neighbours
change. 4 bytes of scale per 128 channels: 2 x (128 + 4) bytes a token and head instead of 2 x 256
in bf16, 1.94x the tokens in the same bytes. Pre-RoPE keys are quantized before any rotation, so a
token's error does not depend on the position it is later rotated to.

Readers dequantize where they read (rope.rotate_into, PageSummary.in_time_order: in their Triton
kernels on CUDA), never into a full-size copy of the tier.

Status: these functions and the kernels' dequantizing paths exist and are checked
(test/test_kv_int8.py, benchmarks/kernels_interpreted.py); the long-term tier does not store int8
yet (kv_buffer.py), so `kv_dtype: int8` is refused at start.
"""

from __future__ import annotations

import torch

QMAX = 127


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n, D] -> (int8 [..., n, D], float32 scale [..., n]) with x ~ q * scale."""
    amax = x.abs().amax(dim=-1).float()
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(x.float() / scale[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse: q [..., n, D] int8, scale [..., n] -> [..., n, D] in dtype (computed in float32)."""
    return (q.float() * scale[..., None]).to(dtype)
