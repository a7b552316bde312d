"""The attention the language model runs while the engine drives it, registered with transformers.

Every forward the engine makes is "a block of new tokens after a context": the KV hook returns
[context | new] keys, and new token i may see the whole context and new tokens up to i — a causal
mask aligned to the bottom-right corner. Registering this as an attention implementation (instead
of passing masks) means transformers builds no mask and never asks our cache for sizes, the same on
every model family and on transformers 5.17 .. 5.24.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

NAME = "livevlm_stream"


def stream_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """query [b, Hq, n, D], key/value [b, Hkv, n_ctx + n, D] -> [b, n, Hq, D]."""
    b, hq, n, d = query.shape
    groups = hq // key.shape[1]
    if n == 1:
        # decoding: the new token sees everything; fold the query heads of each kv head into one
        # block so no key is copied for grouped-query attention
        out = F.scaled_dot_product_attention(query.view(b, key.shape[1], groups, d), key, value, scale=scaling)
        return out.view(b, hq, 1, d).transpose(1, 2).contiguous(), None
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=causal_lower_right(n, key.shape[2]),
                                         scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, stream_attention)
    return NAME
