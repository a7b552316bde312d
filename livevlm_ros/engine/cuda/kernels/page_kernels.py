"""The two steps of page retrieval (retrieval.py) that an answer runs on every layer, as one Triton
kernel each on CUDA, with the torch code they replace as the fallback elsewhere.

summarize  Page summaries straight from the tier: each page's tokens are found through `order`
           (time order) and reduced to the mean key and the per-channel min and max in one read
           (CUDA only: retrieval.PageSummary.in_time_order falls back to torch).
           With torch the tier was gathered into time order first (290 MB written and read again
           at 7B shapes, 0.6 ms an answer) and reduced three times.
top_pages  The k best-scored pages as a mask, each page ranked by how many beat it (ties: the
           earlier page first). torch's top-k took ~31 us a layer for ~640 pages, plus the kernels
           that turn its indices into a mask.
"""

from __future__ import annotations

import torch

from .triton_lang import tl, triton


def summarize(keys: torch.Tensor, order: torch.Tensor, pages: int, page_tokens: int,
              scale: torch.Tensor | None = None, dtype: torch.dtype | None = None,
              channel: torch.Tensor | None = None):
    """keys [L, H, N, D] (a tier, pre-RoPE), order [L, >= pages * page_tokens] positions into N in
    time order -> (mean float32, low, high), each [L, H, pages, D]: page p of layer l holds the
    tokens order[l, p * page_tokens:(p + 1) * page_tokens]. With `scale` [L, H, N] and `channel`
    [L, H, D] (float32, contiguous) the keys are int8 (memory/kv_quant.py), dequantized as they are
    read, and low/high come out in `dtype`.
    None where the kernel does not apply (retrieval.PageSummary.in_time_order then gathers and
    reduces with torch)."""
    L, H, _, D = keys.shape
    P = page_tokens
    if not _fits(keys, P) or (scale is not None and scale.device != keys.device):
        return None
    bound_dtype = keys.dtype if scale is None else dtype
    mean = torch.empty(L, H, pages, D, dtype=torch.float32, device=keys.device)
    low, high = torch.empty(L, H, pages, D, dtype=bound_dtype, device=keys.device), \
        torch.empty(L, H, pages, D, dtype=bound_dtype, device=keys.device)
    if pages:
        order = order if order.stride(1) == 1 else order.contiguous()
        scaled = scale is not None
        _summarize_kernel[(L * H, -(-pages // _PAGES_PER_PROGRAM))](
            keys, order, mean, low, high, scale if scaled else keys, channel if scaled else keys, pages, H,
            keys.stride(0), keys.stride(1), keys.stride(2), order.stride(0), *(scale.stride() if scaled else (0, 0, 0)),
            P=P, D=D, PB=_PAGES_PER_PROGRAM, SCALED=scaled)
    return mean, low, high


def top_pages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool [n]: True for the k highest of the 1-d `scores`."""
    n = scores.shape[0]
    if not (scores.is_cuda and triton is not None) or n == 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device).index_fill_(0, scores.topk(k).indices, True)
    scores = scores.contiguous()
    out = torch.empty(n, dtype=torch.bool, device=scores.device)
    _top_by_rank_kernel[(-(-n // _RANK_BLOCK),)](scores, out, n, k, BI=_RANK_BLOCK, BJ=_RANK_BLOCK)
    return out


_PAGES_PER_PROGRAM, _RANK_BLOCK = 4, 128


def _fits(keys, P) -> bool:
    D = keys.shape[-1]
    return (keys.is_cuda and triton is not None and keys.stride(-1) == 1
            and P & (P - 1) == 0 and D & (D - 1) == 0)


if triton is not None:
    @triton.jit(do_not_specialize=["pages"])
    def _summarize_kernel(k_ptr, order_ptr, mean_ptr, low_ptr, high_ptr, scale_ptr, channel_ptr, pages, H, sk_l, sk_h, sk_n,
                          so_l, ss_l, ss_h, ss_n, P: tl.constexpr, D: tl.constexpr, PB: tl.constexpr,
                          SCALED: tl.constexpr):
        """One program per (layer and head, block of PB pages)."""
        lh, pb = tl.program_id(0), tl.program_id(1)
        layer, h = lh // H, lh % H
        page = pb * PB + tl.arange(0, PB)
        live = page < pages
        t = tl.arange(0, P)
        pos = tl.load(order_ptr + layer * so_l + page[:, None] * P + t[None, :], mask=live[:, None], other=0)
        d = tl.arange(0, D)
        x = tl.load(k_ptr + layer * sk_l + h * sk_h + pos[:, :, None] * sk_n + d[None, None, :],
                    mask=live[:, None, None], other=0.0)                      # [PB, P, D]
        if SCALED:                                   # int8 keys: dequantized here, in float32
            scale = tl.load(scale_ptr + layer * ss_l + h * ss_h + pos * ss_n, mask=live[:, None], other=0.0)
            channel = tl.load(channel_ptr + (layer * H + h) * D + d)
            x = x.to(tl.float32) * scale[:, :, None] * channel[None, None, :]
        out = (lh * pages + page)[:, None] * D + d[None, :]
        tl.store(mean_ptr + out, tl.sum(x.to(tl.float32), axis=1) / P, mask=live[:, None])
        tl.store(low_ptr + out, tl.min(x, axis=1).to(low_ptr.dtype.element_ty), mask=live[:, None])
        tl.store(high_ptr + out, tl.max(x, axis=1).to(high_ptr.dtype.element_ty), mask=live[:, None])

    @triton.jit(do_not_specialize=["n", "k"])
    def _top_by_rank_kernel(s_ptr, out_ptr, n, k, BI: tl.constexpr, BJ: tl.constexpr):
        """out[i] = (scores beating i) < k; j beats i if higher, or equal and earlier."""
        i = tl.program_id(0) * BI + tl.arange(0, BI)
        si = tl.load(s_ptr + i, mask=i < n, other=0.0)
        rank = tl.zeros([BI], tl.int32)
        for j0 in range(0, n, BJ):
            j = j0 + tl.arange(0, BJ)
            sj = tl.load(s_ptr + j, mask=j < n, other=0.0)
            beats = (sj[None, :] > si[:, None]) | ((sj[None, :] == si[:, None]) & (j[None, :] < i[:, None]))
            rank += tl.sum((beats & (j[None, :] < n)).to(tl.int32), axis=1)
        tl.store(out_ptr + i, rank < k, mask=i < n)
