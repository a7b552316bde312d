"""8-bit keys and values (`kv_dtype: int8`): one int8 per element and one float32 scale per token
and head (symmetric: the row's largest magnitude maps to 127), keys first divided by a fixed
per-channel factor.

Per token and head, not per page: memory is compacted, evicted and re-ordered token by token
(VSB), so a token's scale travels with it and nothing is re-quantized when its neighbours change.
Keys also get a per-channel factor (per layer and head, the channel's largest magnitude over the
first tokens the tier stores, then fixed): real keys have a few outlier channels, and a scale per
token alone gives them the int8 range and leaves the small channels a few steps, which moved pages
across quest's bound (test/test_kv_int8.py: 3 of 50 object pages lost without it). Values have no
such channels and no factor (ones). Pre-RoPE keys are quantized before any rotation.

Bytes: 2 x (128 + 4) a token and head at head_dim 128 against 2 x 256 in bf16: 1.94x the tokens.
Readers dequantize where they read (rope.rotate_into / read_rows, PageSummary.in_time_order: in
their Triton kernels on CUDA), never into a full-size copy of the tier.
"""

from __future__ import annotations

import torch

QMAX = 127


def channel_factors(keys: torch.Tensor) -> torch.Tensor:
    """keys [L, H, n, D] -> [L, H, D] float32: each channel's largest magnitude (1 where it is 0)."""
    amax = keys.abs().amax(dim=2).float()
    return torch.where(amax > 0, amax, torch.ones_like(amax))


def rotated_channel_factors(channel: torch.Tensor) -> torch.Tensor:
    """Factors for keys after RoPE [..., D] from factors before it: RoPE turns channels i and
    i + D/2 together (rotate_half), so each of the pair is bounded by their joint magnitude."""
    half = channel.shape[-1] // 2
    pair = torch.hypot(channel[..., :half], channel[..., half:])
    return torch.cat([pair, pair], dim=-1)


def quantize_rows(x: torch.Tensor, channel: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n, D] (channel [..., D] or None) -> (int8 [..., n, D], float32 scale [..., n]) with
    x ~ q * scale * channel."""
    x = x.float()
    if channel is not None:
        x = x / channel[..., None, :]
    amax = x.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(x / scale[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                    channel: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse: [..., n, D] in dtype, computed in float32 (as the kernels do) and rounded once."""
    x = q.float() * scale[..., None]
    if channel is not None:
        x = x * channel[..., None, :]
    return x.to(dtype)
