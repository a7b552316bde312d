"""Which memory an answer reads: Position-agnostic KV Retrieval (PaR) and its alternatives.

A selector decides, per layer, which long-term tokens go into an answer's context. Everything it
picks is placed in time order and given fresh contiguous positions by the KV hook, so the model
sees a compact context inside its trained length. Every layer takes the same number of tokens
(`plan`), so one set of position ids serves all layers.

PaR: long-term tokens other than sinks are cut, in time order, into pages of `page_tokens`. A page
is summarised by the mean of its pre-RoPE keys; without positions, keys of similar content are
similar wherever they occurred. The question's pre-RoPE queries score every page (mean dot product
over question tokens and heads), and the top `retrieval_ratio` of the pages are read, together
with the sinks, the last (partial) page, and all of short-term memory.
"""

from __future__ import annotations

import abc
import math

import torch

from .memory import StreamingMemory


class ContextSelector(abc.ABC):
    uses_question = False

    @abc.abstractmethod
    def plan(self, memory: StreamingMemory) -> tuple[int, int]:
        """(long-term tokens taken per layer, first short-term token taken)."""

    def select_long(self, memory: StreamingMemory, layer: int, question_q: torch.Tensor | None):
        """Indices (sorted) of the long-term tokens this layer reads; None = all of them."""
        return None

    def pages_used(self, memory: StreamingMemory) -> tuple[int, int]:
        """(pages read, pages available), for the answer's report."""
        pages = math.ceil(memory.long.len / memory.config.page_tokens)
        return pages, pages


class AllMemory(ContextSelector):
    """Full cache and sliding window: read everything that is kept."""

    def plan(self, memory):
        return memory.long.len, 0


class RecentFrames(ContextSelector):
    """Narration: only the last `frames` frames of short-term memory."""

    def __init__(self, frames: int):
        self.frames = frames

    def plan(self, memory):
        return 0, max(0, memory.short.len - self.frames * memory.tokens_per_frame)

    def select_long(self, memory, layer, question_q):
        return torch.empty(0, dtype=torch.long, device=memory.long.device)

    def pages_used(self, memory):
        return 0, math.ceil(memory.long.len / memory.config.page_tokens)


class TopKPages(ContextSelector):
    uses_question = True

    def __init__(self, page_tokens: int, ratio: float):
        self.page_tokens, self.ratio = page_tokens, ratio

    def _layout(self, memory):
        n_sink = int(memory.long.view().sink[0].sum()) if memory.long.len else 0
        n_free = memory.long.len - n_sink
        full_pages = n_free // self.page_tokens
        k = math.ceil(self.ratio * full_pages)
        return n_sink, n_free, full_pages, k

    def plan(self, memory):
        n_sink, n_free, full_pages, k = self._layout(memory)
        tail = n_free - full_pages * self.page_tokens
        return n_sink + k * self.page_tokens + tail, 0

    def pages_used(self, memory):
        _, n_free, full_pages, k = self._layout(memory)
        has_tail = int(n_free > full_pages * self.page_tokens)
        return k + has_tail, full_pages + has_tail

    def select_long(self, memory, layer, question_q):
        n_sink, n_free, full_pages, k = self._layout(memory)
        long = memory.long.view()
        sink = long.sink[layer]
        free_pos = (~sink).nonzero().squeeze(1)                  # long-term positions, time order
        P = self.page_tokens
        if memory.page_means is not None:                       # offloaded tier: summaries kept on GPU
            means = memory.page_means.means[layer]
        else:
            keys = long.keys[layer][:, free_pos[: full_pages * P]]
            means = keys.float().view(keys.shape[0], full_pages, P, keys.shape[-1]).mean(2)
        top = page_scores(question_q, means).topk(k).indices if k else means.new_empty(0, dtype=torch.long)
        top = top.to(free_pos.device).sort().values
        in_pages = (top[:, None] * P + torch.arange(P, device=free_pos.device)).flatten()
        tail = torch.arange(full_pages * P, n_free, device=free_pos.device)
        chosen = free_pos[torch.cat([in_pages, tail])]
        return torch.cat([sink.nonzero().squeeze(1), chosen]).sort().values


def page_scores(question_q: torch.Tensor, page_means: torch.Tensor) -> torch.Tensor:
    """question_q [q_heads, n, D] pre-RoPE; page_means [kv_heads, pages, D] -> [pages]."""
    kv_heads = page_means.shape[0]
    q = question_q.float().reshape(kv_heads, -1, question_q.shape[-1])   # query heads grouped by kv head
    return torch.einsum("hqd,hpd->hqp", q, page_means.to(q.device)).mean(dim=(0, 1))


def make_selector(config) -> ContextSelector:
    if config.retrieval == "topk":
        return TopKPages(config.page_tokens, config.retrieval_ratio)
    return AllMemory()
