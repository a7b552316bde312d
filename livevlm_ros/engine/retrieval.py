"""Which memory an answer reads: Position-agnostic KV Retrieval (PaR) and its alternatives.

A selector makes a `RetrievalPlan` once per answer (host-side counts and whole-model tensors, no
device sync); the KV hook then asks the plan, layer by layer, which long-term tokens that layer
reads. Everything picked is placed in time order and given fresh contiguous positions, so the
model sees a compact context inside its trained length. Every layer takes the same number of
tokens, so one set of position ids serves all layers.

PaR: long-term tokens other than sinks are cut, in time order, into pages of `page_tokens`. A page
is summarised by the mean of its pre-RoPE keys; without positions, keys of similar content are
similar wherever they occurred. The question's pre-RoPE queries score every page (mean dot product
over question tokens and heads), and the top `retrieval_ratio` of the pages are read, together
with the sinks, the last (partial) page, and all of short-term memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .memory import StreamingMemory


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
    free_pos: torch.Tensor | None   # [L, n_free] long-term positions of non-sinks, time order (None: all)
    sink_pos: torch.Tensor | None   # [L, n_sink]
    means: torch.Tensor             # [L, kv_heads, full_pages, D] float32

    def long_index(self, layer, question_q):
        P = self.page_tokens
        device = self.means.device
        if self.k:
            top = page_scores(question_q, self.means[layer]).topk(self.k).indices.sort().values
        else:
            top = torch.empty(0, dtype=torch.long, device=device)
        pos = torch.cat([(top[:, None] * P + torch.arange(P, device=device)).flatten(),
                         torch.arange(self.full_pages * P, self.n_free, device=device)])    # + the tail
        if self.free_pos is None:
            return pos
        chosen = self.free_pos[layer][pos.to(self.free_pos.device)]
        return torch.cat([self.sink_pos[layer], chosen]).sort().values if self.sink_pos.shape[1] else chosen


class TopKPages(ContextSelector):
    def __init__(self, page_tokens: int, ratio: float):
        self.page_tokens, self.ratio = page_tokens, ratio

    def plan(self, memory):
        P = self.page_tokens
        n_sink = memory.n_sinks
        n_free = memory.long.len - n_sink
        full = n_free // P
        k = math.ceil(self.ratio * full)
        has_tail = int(n_free > full * P)
        plan = _PagePlan(n_sink + k * P + (n_free - full * P), 0, k + has_tail, full + has_tail, uses_question=True)
        plan.page_tokens, plan.k, plan.full_pages, plan.n_free = P, k, full, n_free
        if memory.page_means is not None:            # offloaded tier: no sinks, summaries kept on the GPU
            plan.free_pos = plan.sink_pos = None
            plan.means = memory.page_means.means
            return plan
        long = memory.long.view()
        # stable sort of the sink flags: non-sinks first, each group in time order
        order = long.sink.to(torch.int8).argsort(dim=1, stable=True)
        plan.free_pos, plan.sink_pos = order[:, :n_free], order[:, n_free:]
        L, H, _, D = long.keys.shape
        index = plan.free_pos[:, None, : full * P, None].expand(L, H, full * P, D)
        keys = long.keys.gather(2, index).view(L, H, full, P, D)
        plan.means = keys.sum(3, dtype=torch.float32) / P
        return plan


def page_scores(question_q: torch.Tensor, page_means: torch.Tensor) -> torch.Tensor:
    """question_q [q_heads, n, D] pre-RoPE; page_means [kv_heads, pages, D] -> [pages]."""
    kv_heads = page_means.shape[0]
    q = question_q.float().reshape(kv_heads, -1, question_q.shape[-1])   # query heads grouped by kv head
    return torch.einsum("hqd,hpd->hqp", q, page_means.to(q.device)).mean(dim=(0, 1))


def make_selector(config) -> ContextSelector:
    if config.retrieval == "topk":
        return TopKPages(config.page_tokens, config.retrieval_ratio)
    return AllMemory()
