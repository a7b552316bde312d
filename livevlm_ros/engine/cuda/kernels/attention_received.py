"""hook/received.py's fast path: attention received without writing the attention matrix out.

The first kernel finds each row's log-sum-exp (split over key blocks, merged after); the second,
one program per block of keys, adds exp(logit - lse) over the rows. Layout and meaning: see
hook/received.py, whose written-out torch version is the specification these are checked against
(benchmarks/kernels_interpreted.py)."""

from __future__ import annotations

import torch

from .triton_lang import tl, triton


def available(t: torch.Tensor) -> bool:
    return t.is_cuda and triton is not None


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


def with_row_lse(q, keys, r, weights):
    """Both kernels: each row's log-sum-exp, then the column sums."""
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
    return column_sums(q, keys, r, lse, weights, 1.0)


def column_sums(q, keys, r, lse, weights, scale):
    """The second kernel alone, given each row's log-sum-exp of scale * logits."""
    kv_heads, rows, D = q.shape
    n_keys = keys.shape[1]
    w = torch.ones(rows, dtype=torch.float32, device=q.device) if weights is None else weights.float().contiguous()
    out = torch.empty(kv_heads, n_keys, dtype=torch.float32, device=q.device)
    _column_sums_kernel[(kv_heads, -(-n_keys // _BN))](
        q, keys, lse, w, out, rows, n_keys, r, scale, q.stride(0), q.stride(1), lse.stride(0), keys.stride(0),
        keys.stride(1), D=D, BR=_BR, BN=_BN)
    return out
