"""Which memory an answer reads: Position-agnostic KV Retrieval (PaR) and its alternatives.

A selector makes a `RetrievalPlan` once per answer (host-side counts and whole-model tensors, no
device sync); the KV hook then asks the plan, layer by layer, which long-term tokens that layer
reads. Everything picked is placed in time order and given fresh contiguous positions, so the
model sees a compact context inside its trained length. Every layer takes the same number of
tokens, so one set of position ids serves all layers.

PaR: long-term tokens other than sinks are cut, in time order, into pages of `page_tokens`. A page
is summarised by its pre-RoPE keys (mean, and per-channel min/max): without positions, keys of
similar content are similar wherever they occurred. The question's own pre-RoPE queries attend to
the page summaries - a softmax over pages for every query head and question token, the paper's
"simplified attention" - and the attention each page gets is pooled over heads and tokens. The top
`retrieval_ratio` of the pages are read, with the sinks, the last (partial) page and all of
short-term memory. Why a softmax: raw dot products averaged over heads let the few heads with the
largest logits decide for all; per-head softmax gives every head one vote of equal weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .memory import StreamingMemory


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

    def layer(self, i: int) -> "PageSummary":
        return PageSummary(self.mean[i], self.low[i], self.high[i])

    def cat(self, other: "PageSummary") -> "PageSummary":
        return PageSummary(*(torch.cat([a, b], dim=-2) for a, b in
                             zip((self.mean, self.low, self.high), (other.mean, other.low, other.high))))


def page_scores(question_q: torch.Tensor, pages: PageSummary, scoring: str = "softmax_mean") -> torch.Tensor:
    """question_q [q_heads, n, D] pre-RoPE queries of the question's tokens; pages: one layer's
    summaries [kv_heads, pages, D] -> the attention each page draws, [pages].

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
    probs = (logits * D ** -0.5).softmax(dim=-1)
    return probs.amax(dim=(0, 1)) if scoring == "softmax_max" else probs.mean(dim=(0, 1))


@dataclass
class RetrievalPlan:
    n_long: int                     # long-term tokens each layer reads
    short_from: int                 # first short-term token read
    pages_used: int
    pages_total: int
    uses_question: bool = False

    def long_index(self, layer: int, question_q: torch.Tensor | None) -> torch.Tensor | None:
        """Sorted indices of the long-term tokens `layer` reads; None = all of them."""
        return None


class ContextSelector:
    def plan(self, memory: StreamingMemory) -> RetrievalPlan:
        raise NotImplementedError


class AllMemory(ContextSelector):
    """Full cache and sliding window: read everything that is kept."""

    def plan(self, memory):
        pages = math.ceil(memory.long.len / memory.config.page_tokens)
        return RetrievalPlan(memory.long.len, 0, pages, pages)


class _NoLongTerm(RetrievalPlan):
    def long_index(self, layer, question_q):
        return self.empty


class RecentFrames(ContextSelector):
    """Narration: only the last `frames` frames of short-term memory."""

    def __init__(self, frames: int):
        self.frames = frames

    def plan(self, memory):
        plan = _NoLongTerm(0, max(0, memory.short.len - self.frames * memory.tokens_per_frame), 0,
                           math.ceil(memory.long.len / memory.config.page_tokens))
        plan.empty = torch.empty(0, dtype=torch.long, device=memory.long.device)
        return plan


class _PagePlan(RetrievalPlan):
    page_tokens: int
    k: int
    full_pages: int
    n_free: int
    scoring: str
    free_pos: torch.Tensor | None   # [L, n_free] long-term positions of non-sinks, time order (None: all)
    sink_pos: torch.Tensor | None   # [L, n_sink]
    summary: PageSummary            # of the full pages

    def long_index(self, layer, question_q):
        P = self.page_tokens
        device = self.summary.mean.device
        if self.k:
            scores = page_scores(question_q, self.summary.layer(layer), self.scoring)
            top = scores.topk(self.k).indices.sort().values
        else:
            top = torch.empty(0, dtype=torch.long, device=device)
        pos = torch.cat([(top[:, None] * P + torch.arange(P, device=device)).flatten(),
                         torch.arange(self.full_pages * P, self.n_free, device=device)])    # + the tail
        if self.free_pos is None:
            return pos
        chosen = self.free_pos[layer][pos.to(self.free_pos.device)]
        return torch.cat([self.sink_pos[layer], chosen]).sort().values if self.sink_pos.shape[1] else chosen


class TopKPages(ContextSelector):
    def __init__(self, page_tokens: int, ratio: float, scoring: str = "softmax_mean"):
        self.page_tokens, self.ratio, self.scoring = page_tokens, ratio, scoring

    def plan(self, memory):
        P = self.page_tokens
        n_sink = memory.n_sinks
        n_free = memory.long.len - n_sink
        full = n_free // P
        k = math.ceil(self.ratio * full)
        has_tail = int(n_free > full * P)
        plan = _PagePlan(n_sink + k * P + (n_free - full * P), 0, k + has_tail, full + has_tail, uses_question=True)
        plan.page_tokens, plan.k, plan.full_pages, plan.n_free, plan.scoring = P, k, full, n_free, self.scoring
        if memory.page_summaries is not None:        # offloaded tier: no sinks, summaries kept on the GPU
            plan.free_pos = plan.sink_pos = None
            plan.summary = memory.page_summaries.summary
            return plan
        long = memory.long.view()
        # stable sort of the sink flags: non-sinks first, each group in time order
        order = long.sink.to(torch.int8).argsort(dim=1, stable=True)
        plan.free_pos, plan.sink_pos = order[:, :n_free], order[:, n_free:]
        L, H, _, D = long.keys.shape
        index = plan.free_pos[:, None, : full * P, None].expand(L, H, full * P, D)
        plan.summary = PageSummary.of(long.keys.gather(2, index).view(L, H, full, P, D))
        return plan


def make_selector(config) -> ContextSelector:
    if config.retrieval == "topk":
        return TopKPages(config.page_tokens, config.retrieval_ratio, config.page_scoring)
    return AllMemory()
