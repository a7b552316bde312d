"""Pages: what retrieval ranks. A page is `page_tokens` consecutive long-term tokens of one layer,
summarised by their pre-RoPE keys (mean, per-channel min and max), and scored by the attention a
question's pre-RoPE queries pay the summaries (retrieval.py says why these and how they are used)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cuda.kernels.page_kernels import summarize
from ..models.base import KVShape


@dataclass
class PageSummary:
    """Per layer and kv head, one row per page, [L, kv_heads, pages, D]: the mean key (float32) and
    the per-channel min and max (exact in the keys' own dtype, which halves their size in bf16)."""
    mean: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor

    @staticmethod
    def of(keys: torch.Tensor) -> "PageSummary":
        """keys [L, H, pages, page_tokens, D] pre-RoPE."""
        return PageSummary(keys.sum(3, dtype=torch.float32) / keys.shape[3], keys.amin(3), keys.amax(3))

    @staticmethod
    def in_time_order(keys: torch.Tensor, order: torch.Tensor, pages: int, page_tokens: int,
                      scale: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                      channel: torch.Tensor | None = None) -> "PageSummary":
        """keys [L, H, N, D] pre-RoPE, page p of layer l = keys at order[l, p * page_tokens:(p + 1) *
        page_tokens]: one kernel on CUDA (page_kernels.py), else gathered into time order first.
        With `scale` [L, H, N] and `channel` [L, H, D]: int8 keys (kv_quant.py), dequantized where
        they are read, to `dtype` (the gathered pages only, never the whole tier)."""
        if scale is not None and channel is None:
            channel = torch.ones(keys.shape[0], keys.shape[1], keys.shape[3], device=keys.device)
        fused = summarize(keys, order, pages, page_tokens, scale, dtype, channel)
        if fused is not None:
            return PageSummary(*fused)
        L, H, _, D = keys.shape
        index = order[:, None, :pages * page_tokens, None].expand(L, H, pages * page_tokens, D)
        picked = keys.gather(2, index)
        if scale is None:
            return PageSummary.of(picked.view(L, H, pages, page_tokens, D))
        # as the kernel: dequantized and reduced in float32, the bounds rounded once to dtype
        picked = picked.float() * scale.gather(2, index[..., 0])[..., None] * channel[:, :, None]
        s = PageSummary.of(picked.view(L, H, pages, page_tokens, D))
        return PageSummary(s.mean, s.low.to(dtype), s.high.to(dtype))

    def layer(self, i: int) -> "PageSummary":
        return PageSummary(self.mean[i], self.low[i], self.high[i])


def page_scores(question_q: torch.Tensor, pages: PageSummary, scoring: str = "softmax_mean",
                row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """question_q [q_heads, n, D] pre-RoPE queries of the question's tokens; pages: one layer's
    summaries [kv_heads, pages, D] -> the attention each page draws, [pages]. row_weights [n] (0/1):
    only the tokens weighted 1 count (a question padded to a fixed length, question_step.py).

    softmax_mean  logits q . mean_key; softmax over pages per (query head, token); mean over both
    softmax_max   the same softmax; max over (query head, token): one strong match decides
    quest         logits = the largest q . k any key inside the page's per-channel [min, max] box
                  can reach (Quest's bound); softmax and mean as softmax_mean
    """
    kv_heads, _, D = pages.mean.shape
    device = pages.mean.device
    # query heads that share a kv head are adjacent in the projection: fold them into rows
    q = question_q.to(device, torch.float32).reshape(kv_heads, -1, D)
    if scoring == "quest":
        logits = (torch.einsum("hqd,hpd->hqp", q.clamp_min(0), pages.high.float())
                  + torch.einsum("hqd,hpd->hqp", q.clamp_max(0), pages.low.float()))
    else:
        logits = torch.einsum("hqd,hpd->hqp", q, pages.mean)
    probs = (logits * D ** -0.5).softmax(dim=-1)                   # [kv_heads, rows, pages]
    if row_weights is None:
        return probs.amax(dim=(0, 1)) if scoring == "softmax_max" else probs.mean(dim=(0, 1))
    folded = row_weights.repeat(q.shape[1] // row_weights.shape[0]).to(probs.dtype)   # rows: (head, token)
    probs = probs * folded[:, None]
    return probs.amax(dim=(0, 1)) if scoring == "softmax_max" else probs.sum(dim=(0, 1)) / (kv_heads * folded.sum())


class PageSummaries:
    """Summaries (PageSummary) of every full page of an append-only tier, kept on the GPU, so a
    question can score pages that live in CPU memory without touching them (ReKV-style). They are
    written into storage that doubles when full: appending a clip's pages costs those pages, not a
    copy of every summary so far (that made a stream of n clips cost n^2)."""

    def __init__(self, kv: KVShape, page_tokens: int):
        self.kv, self.page_tokens = kv, page_tokens
        self.pages = 0
        self._storage = self._empty(0)
        self.tail = torch.empty(kv.layers, kv.kv_heads, 0, kv.head_dim, dtype=kv.dtype, device=kv.device)

    def _empty(self, pages: int) -> PageSummary:
        kv = self.kv
        shape = (kv.layers, kv.kv_heads, pages, kv.head_dim)
        return PageSummary(torch.empty(shape, dtype=torch.float32, device=kv.device),
                           torch.empty(shape, dtype=kv.dtype, device=kv.device),
                           torch.empty(shape, dtype=kv.dtype, device=kv.device))

    @property
    def summary(self) -> PageSummary:
        """The summaries of all full pages so far, [L, kv_heads, pages, D] (views of the storage)."""
        st = self._storage
        return PageSummary(st.mean[:, :, :self.pages], st.low[:, :, :self.pages], st.high[:, :, :self.pages])

    def append(self, keys: torch.Tensor):
        """keys [L, H, n, D] pre-RoPE, the next tokens of the tier."""
        keys = torch.cat([self.tail, keys.to(self.tail.device)], dim=2)
        full = keys.shape[2] // self.page_tokens
        L, H, _, D = keys.shape
        if self.pages + full > self._storage.mean.shape[2]:
            grown = self._empty(max(2 * self._storage.mean.shape[2], self.pages + full, 16))
            old = self.summary
            for new, kept in zip((grown.mean, grown.low, grown.high), (old.mean, old.low, old.high)):
                new[:, :, :self.pages] = kept
            self._storage = grown
        added = PageSummary.of(keys[:, :, :full * self.page_tokens].view(L, H, full, self.page_tokens, D))
        for store, part in zip((self._storage.mean, self._storage.low, self._storage.high),
                               (added.mean, added.low, added.high)):
            store[:, :, self.pages:self.pages + full] = part
        self.pages += full
        self.tail = keys[:, :, full * self.page_tokens:].clone()
