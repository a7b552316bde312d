"""Attention received: how much softmax attention a few query rows pay each key, summed over rows.

VSB scores memory with it (a clip's last frame of rows over every key) and evidence measures frames
with it (a question's rows over its context). Written out, it is a [kv_heads, rows, keys] matrix
of logits, softmaxed and summed over rows: at 7B shapes 7 x 196 rows x 12.5k keys per kv head, 137 MB
in bf16, written and read three times a layer - 13 ms of a 48 ms one-frame clip on an H100.

One implementation, with a fast path: on CUDA two Triton kernels (cuda/kernels/attention_received.py)
compute the same sums without writing the matrix; where the forward's flash kernel already returned
the rows' log-sum-exp (a clip's prefill), only the second runs. Elsewhere (CPUs, or no Triton) the
matrix is written out, as below: that is the specification the kernels are checked against.

Layout: q [kv_heads, groups * r, D] holds the query heads of a kv head as adjacent blocks of the r
rows (row = head in group * r + i), already scaled; keys [kv_heads, n_keys, D], whose last r are the
rows' own keys: row i sees every key before them and those <= i.
"""

from __future__ import annotations

import torch

from ..cuda.kernels import attention_received as kernels
from .attention import causal_tail


def attention_received(q: torch.Tensor, keys: torch.Tensor, r: int, weights: torch.Tensor | None = None,
                       lse: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """-> [kv_heads, n_keys] float32: the sum over rows of softmax attention (rows weighted by
    `weights` [groups * r], if given). q is scaled by `scale` first (pass it unscaled with a
    scale, or scaled with 1.0). `lse` [kv_heads, groups * r] float32, optional: each row's
    log-sum-exp of scale * logits, as the flash kernel returned it for the forward that just ran
    (on CUDA it halves the work; elsewhere it is not needed)."""
    if kernels.available(keys):
        keys = keys if keys.stride(2) == 1 else keys.contiguous()
        q = q if q.stride(2) == 1 else q.contiguous()
        if lse is not None:
            return kernels.column_sums(q, keys, r, lse.contiguous(), weights, scale)
        if scale != 1.0:
            q = (q * scale).to(keys.dtype)
        return kernels.with_row_lse(q, keys, r, weights)
    if scale != 1.0:
        q = (q * scale).to(keys.dtype)
    return _written_out(q, keys, r, weights)


def _written_out(q, keys, r, weights):
    # logits stay in the model's dtype (half the bytes of float32; softmax and the sum accumulate in float32)
    logits = torch.matmul(q, keys.transpose(1, 2))
    logits[..., -r:].masked_fill_(causal_tail(q.shape[1] // r, r, keys.device), float("-inf"))
    probs = logits.softmax(dim=-1)
    if weights is not None:
        probs.mul_(weights.to(probs.dtype)[:, None])
    return probs.sum(dim=1, dtype=torch.float32)
