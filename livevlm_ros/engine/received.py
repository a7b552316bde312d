"""Attention received: how much softmax attention a few query rows pay each key, summed over rows.

VSB scores memory with it (a clip's last frame of rows over every key) and evidence measures frames
with it (a question's rows over its context). Written out, it is a [kv_heads, rows, keys] matrix
of logits, softmaxed and summed over rows: at 7B shapes 7 x 196 rows x 12.5k keys per kv head, 137 MB
in bf16, written and read three times a layer - 13 ms of a 48 ms one-frame clip on an H100.

On CUDA two Triton kernels compute the same sums without writing the matrix: the first finds each
row's log-sum-exp (split over key blocks, merged after), the second, one program per block of keys,
adds exp(logit - lse) over the rows. Where the forward's flash kernel already returned the rows'
log-sum-exp (a clip's prefill), only the second runs (`attention_received_from_lse`). Elsewhere
(CPUs, or no Triton) the matrix is written out.

Layout: q [kv_heads, groups * r, D] holds the query heads of a kv head as adjacent blocks of the r
rows (row = head in group * r + i), already scaled; keys [kv_heads, n_keys, D], whose last r are the
rows' own keys: row i sees every key before them and those <= i.
"""

from __future__ import annotations

import torch

from .attention import causal_tail
from .triton_lang import tl, triton


def fused_available(t: torch.Tensor) -> bool:
    return t.is_cuda and triton is not None


def attention_received(q: torch.Tensor, keys: torch.Tensor, r: int,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """-> [kv_heads, n_keys] float32: the sum over rows of softmax attention (rows weighted by
    `weights` [groups * r], if given)."""
    if fused_available(keys):
        return _fused(q, keys, r, weights)
    return _written_out(q, keys, r, weights)


def _written_out(q, keys, r, weights):
    # logits stay in the model's dtype (half the bytes of float32; softmax and the sum accumulate in float32)
    logits = torch.matmul(q, keys.transpose(1, 2))
    logits[..., -r:].masked_fill_(causal_tail(q.shape[1] // r, r, keys.device), float("-inf"))
    probs = logits.softmax(dim=-1)
    if weights is not None:
        probs.mul_(weights.to(probs.dtype)[:, None])
    return probs.sum(dim=1, dtype=torch.float32)


if triton is not None:
    @triton.jit(do_not_specialize=["rows", "n_keys", "r"])
    def _row_lse_parts_kernel(q_ptr, k_ptr, m_ptr, l_ptr, rows, n_keys, r, keys_per_split,
                              sqh, sqr, skh, skn, D: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):
        """Per (kv head, block of rows, split of the keys): each row's running max and sum of exp."""
        h, rb, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        splits = tl.num_programs(2)
        row = rb * BR + tl.arange(0, BR)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + h * sqh + row[:, None] * sqr + d[None, :], mask=row[:, None] < rows, other=0.0)
        own = row % r                                   # the row's index among the r rows
        m = tl.full([BR], float("-inf"), tl.float32)
        s_sum = tl.zeros([BR], tl.float32)
        start = split * keys_per_split
        for n0 in range(0, keys_per_split, BN):           # the last split runs past n_keys, masked
            n = start + n0 + tl.arange(0, BN)
            k = tl.load(k_ptr + h * skh + n[:, None] * skn + d[None, :], mask=n[:, None] < n_keys, other=0.0)
            s = tl.dot(q, tl.trans(k))
            seen = (n[None, :] < n_keys) & ((n[None, :] - (n_keys - r)) <= own[:, None])
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_sum = s_sum * tl.exp(m - safe) + tl.sum(tl.exp(s - safe[:, None]), axis=1)
            m = m_new
        out = (h * rows + row) * splits + split
        tl.store(m_ptr + out, m, mask=row < rows)
        tl.store(l_ptr + out, s_sum, mask=row < rows)

    @triton.jit(do_not_specialize=["rows", "n_keys", "r"])
    def _column_sums_kernel(q_ptr, k_ptr, lse_ptr, w_ptr, out_ptr, rows, n_keys, r, scale,
                            sqh, sqr, slh, skh, skn, D: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):
        """Per (kv head, block of keys): the weighted sum over all rows of exp(logit - row lse)."""
        h, nb = tl.program_id(0), tl.program_id(1)
        n = nb * BN + tl.arange(0, BN)
        d = tl.arange(0, D)
        k = tl.load(k_ptr + h * skh + n[:, None] * skn + d[None, :], mask=n[:, None] < n_keys, other=0.0)
        acc = tl.zeros([BN], tl.float32)
        for r0 in range(0, rows, BR):
            row = r0 + tl.arange(0, BR)
            q = tl.load(q_ptr + h * sqh + row[:, None] * sqr + d[None, :], mask=row[:, None] < rows, other=0.0)
            lse = tl.load(lse_ptr + h * slh + row, mask=row < rows, other=float("inf"))
            w = tl.load(w_ptr + row, mask=row < rows, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            seen = (n[None, :] < n_keys) & ((n[None, :] - (n_keys - r)) <= (row % r)[:, None])
            p = tl.where(seen, tl.exp(s - lse[:, None]), 0.0) * w[:, None]
            acc += tl.sum(p, axis=0)
        tl.store(out_ptr + h * n_keys + n, acc, mask=n < n_keys)


_BR, _BN, _KEYS_PER_SPLIT = 64, 64, 2048


def _fused(q, keys, r, weights):
    kv_heads, rows, D = q.shape
    n_keys = keys.shape[1]
    if keys.stride(2) != 1:
        keys = keys.contiguous()
    q = q.contiguous()
    splits = -(-n_keys // _KEYS_PER_SPLIT)
    m = torch.empty(kv_heads, rows, splits, dtype=torch.float32, device=q.device)
    s_sum = torch.empty_like(m)
    _row_lse_parts_kernel[(kv_heads, -(-rows // _BR), splits)](
        q, keys, m, s_sum, rows, n_keys, r, _KEYS_PER_SPLIT, q.stride(0), q.stride(1), keys.stride(0),
        keys.stride(1), D=D, BR=_BR, BN=_BN)
    # merge the splits: lse = log(sum over splits of s_sum * exp(m)), without overflow
    top = m.amax(dim=2, keepdim=True)
    lse = (top + torch.log((s_sum * torch.exp(m - top)).sum(dim=2, keepdim=True))).squeeze(2).contiguous()
    return _column_sums(q, keys, r, lse, weights, 1.0)


def _column_sums(q, keys, r, lse, weights, scale):
    kv_heads, rows, D = q.shape
    n_keys = keys.shape[1]
    w = torch.ones(rows, dtype=torch.float32, device=q.device) if weights is None else weights.float().contiguous()
    out = torch.empty(kv_heads, n_keys, dtype=torch.float32, device=q.device)
    _column_sums_kernel[(kv_heads, -(-n_keys // _BN))](
        q, keys, lse, w, out, rows, n_keys, r, scale, q.stride(0), q.stride(1), lse.stride(0), keys.stride(0),
        keys.stride(1), D=D, BR=_BR, BN=_BN)
    return out


def attention_received_from_lse(q: torch.Tensor, keys: torch.Tensor, r: int, lse: torch.Tensor,
                                scale: float) -> torch.Tensor:
    """The same sums, given each row's log-sum-exp of scale * logits (as the flash kernel returns
    it for the forward that just ran): only the second kernel runs. q [kv_heads, groups * r, D] not
    scaled, lse [kv_heads, groups * r] float32; CUDA with Triton only."""
    if keys.stride(2) != 1:
        keys = keys.contiguous()
    if q.stride(2) != 1:
        q = q.contiguous()
    if lse.stride(1) != 1:
        lse = lse.contiguous()
    return _column_sums(q, keys, r, lse, None, scale)
