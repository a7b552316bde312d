"""Which memory an answer reads: Position-agnostic KV Retrieval (PaR) and its alternatives.

A selector makes a `RetrievalPlan` once per answer (host-side counts and whole-model tensors, no
device sync, except the per-layer counts of a time window); the KV hook then asks the plan, layer
by layer, which long-term tokens that layer reads. Everything picked is placed in time order and
given fresh contiguous positions, so the model sees a compact context inside its trained length.
Without a region (a time window, a place) every layer reads the same number of tokens; with one,
each layer's context ends right before the question. No sorts: a plan is fixed-shape work that a CUDA graph can replay
(question_step.py).

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

from ..cuda.kernels.page_kernels import top_pages
from .pages import PageSummary, page_scores
from .region import Region
from .streaming_memory import StreamingMemory


@dataclass(kw_only=True)
class RetrievalPlan:
    """What one answer reads, made whole by a selector. Layers may read different numbers of
    long-term tokens (a time window keeps different tokens of each layer); `n_long[layer]` says how
    many. This base plan reads every long-term token."""
    n_long: list[int]               # long-term tokens each layer reads
    short_from: int                 # short-term tokens read: [short_from, short_to)
    short_to: int
    short_index: torch.Tensor | None = None    # or these of them (a place), ascending
    pages_used: int
    pages_total: int
    uses_question: bool = False

    @property
    def n_short(self) -> int:
        return self.short_to - self.short_from if self.short_index is None else len(self.short_index)

    def long_index(self, layer: int, question_q: torch.Tensor | None,
                   row_weights: torch.Tensor | None = None) -> torch.Tensor | None:
        """Sorted indices of the long-term tokens `layer` reads; None = all of them."""
        return None


class ContextSelector:
    def plan(self, memory: StreamingMemory, region: Region | None = None) -> RetrievalPlan:
        """region: the stream tokens an answer may read (sinks are always read); None: all."""
        raise NotImplementedError


def _short_part(memory: StreamingMemory, region: Region | None) -> dict:
    """The short-term tokens read: a range, and within it an index where a place leaves gaps (a
    device->host sync, as a window's counts are)."""
    if region is None:
        return dict(short_from=0, short_to=memory.short.len)
    first = memory.next_token - memory.short.len        # short-term memory is one run of stream tokens
    s0 = min(max(region.first - first, 0), memory.short.len)
    s1 = min(max(region.stop - first, 0), memory.short.len)
    if region.frames is None:
        return dict(short_from=s0, short_to=s1)
    idx = memory.short.token_idx[0, s0:s1]              # every layer holds the same short-term tokens
    return dict(short_from=s0, short_to=s1,
                short_index=region.allows(idx, memory.tokens_per_frame).nonzero()[:, 0] + s0)


def _in_order(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Positions where the 1-d `mask` is True, ascending, given that there are exactly n of them:
    each goes to the slot its rank names, the rest to a spare slot (no sort, and no asking the
    device how many: a sort costs ~45 us on the GPU, this ~15; and nothing here waits)."""
    slot = torch.where(mask, mask.cumsum(0) - 1, n)
    out = torch.zeros(n + 1, dtype=torch.long, device=mask.device)
    return out.scatter_(0, slot, torch.arange(mask.shape[0], device=mask.device))[:n]


def _in_region(memory: StreamingMemory, region: Region | None) -> tuple[torch.Tensor, list[int]]:
    """Long-term tokens (device tier) that are no sinks and lie in the region, per layer: their
    positions first, in time order, then the rest, [L, long.len]; and how many there are per layer
    (one device->host copy, made only when there is a region: without one every layer has the same)."""
    long = memory.long.view()
    free = ~long.sink
    if region is not None:
        free &= region.allows(long.token_idx, memory.tokens_per_frame)
    # a stable partition by rank (what a stable argsort of ~free gives, without the sort)
    n_free = free.sum(dim=1, keepdim=True)
    slot = torch.where(free, free.cumsum(dim=1) - 1, n_free + (~free).cumsum(dim=1) - 1)
    positions = torch.arange(free.shape[1], device=free.device).expand_as(slot)
    order = torch.empty_like(slot).scatter_(1, slot, positions)
    counts = (free.sum(dim=1).tolist() if region is not None
              else [memory.long.len - memory.n_sinks] * memory.kv.layers)
    return order, counts


def _sinks(memory: StreamingMemory, order: torch.Tensor, region: Region | None) -> torch.Tensor:
    """[L, n_sinks] long-term positions of the vision sinks, in time order. Without a region they
    are what `_in_region`'s order puts last; with one, tokens outside it are among those."""
    if region is None:
        return order[:, order.shape[1] - memory.n_sinks:]
    return memory.long.view().sink.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :memory.n_sinks]


@dataclass(kw_only=True)
class _IndexPlan(RetrievalPlan):
    """Reads the long-term tokens listed per layer."""
    index: list[torch.Tensor]

    def long_index(self, layer, question_q, row_weights=None):
        return self.index[layer]


class AllMemory(ContextSelector):
    """Full cache and sliding window: read everything that is kept (in the region, and the sinks)."""

    def plan(self, memory, region=None):
        pages = math.ceil(memory.long.len / memory.config.page_tokens)
        short = _short_part(memory, region)
        if region is None:
            return RetrievalPlan(n_long=[memory.long.len] * memory.kv.layers, pages_used=pages, pages_total=pages,
                                 **short)
        order, counts = _in_region(memory, region)
        sinks = _sinks(memory, order, region)
        index = [torch.cat([sinks[layer], order[layer, :n]]).sort().values for layer, n in enumerate(counts)]
        return _IndexPlan(n_long=[len(i) for i in index], pages_used=pages, pages_total=pages, index=index, **short)


class RecentFrames(ContextSelector):
    """Narration: only the last `frames` frames of short-term memory."""

    def __init__(self, frames: int):
        self.frames = frames

    def plan(self, memory, region=None):
        start = max(0, memory.short.len - self.frames * memory.tokens_per_frame)
        return _IndexPlan(n_long=[0] * memory.kv.layers, short_from=start, short_to=memory.short.len, pages_used=0,
                          pages_total=math.ceil(memory.long.len / memory.config.page_tokens),
                          index=[torch.empty(0, dtype=torch.long, device=memory.long.device)] * memory.kv.layers)


@dataclass(kw_only=True)
class _PagePlan(RetrievalPlan):
    """Pages of a device tier (VSB): layer l's candidates are its non-sink tokens in the region,
    `order[l, :n_free[l]]` in time order, cut into pages; the summaries cover the most pages any
    layer has, and layer l scores only its own `full[l]` first ones."""
    page_tokens: int
    ratio: float
    scoring: str
    n_free: list[int]
    order: torch.Tensor             # [L, long.len] candidate positions first, time order
    sinks: torch.Tensor             # [L, n_sink]
    summary: PageSummary
    uses_question: bool = True

    def long_index(self, layer, question_q, row_weights=None):
        P, n_free = self.page_tokens, self.n_free[layer]
        full = n_free // P
        k = math.ceil(self.ratio * full)
        order, device = self.order[layer], self.order.device
        # mark what is read over the long-term positions, then list the marks in time order
        read = torch.zeros(order.shape[0], dtype=torch.bool, device=device)
        if k:
            scores = page_scores(question_q, self.summary.layer(layer), self.scoring, row_weights)[:full]
            pages = top_pages(scores, k)
            read.index_put_((order[:full * P],), pages[:, None].expand(full, P).reshape(-1))
        # index_fill_, not read[i] = True: that copies a host scalar, which a CUDA graph cannot record
        read.index_fill_(0, order[full * P:n_free], True)                      # the tail
        read.index_fill_(0, self.sinks[layer], True)
        return _in_order(read, self.n_long[layer])


@dataclass(kw_only=True)
class _OffloadedPagePlan(RetrievalPlan):
    """Pages of the offloaded (CPU) tier: every layer holds the same tokens, in stream order, no
    sinks, and the summaries of its full pages are kept on the GPU. Long-term positions [a, b) are in
    the time window; pages wholly inside it are candidates, the parts of pages at its edges are read.
    (A place is not read from this tier: the engine refuses it.)"""
    page_tokens: int
    scoring: str
    k: int
    a: int
    b: int
    summary: PageSummary            # of the candidate pages
    uses_question: bool = True

    def long_index(self, layer, question_q, row_weights=None):
        P, device = self.page_tokens, self.summary.mean.device
        first, last = -(-self.a // P), self.b // P            # candidate pages [first, last)
        if self.k:
            scores = page_scores(question_q, self.summary.layer(layer), self.scoring, row_weights)
            top = scores.topk(self.k).indices
            top = top.sort().values + first
        else:
            top = torch.empty(0, dtype=torch.long, device=device)
        if first >= last:                                      # no whole page inside [a, b)
            return torch.arange(self.a, self.b, device=device)
        head = torch.arange(self.a, first * P, device=device)
        tail = torch.arange(last * P, self.b, device=device)
        return torch.cat([head, (top[:, None] * P + torch.arange(P, device=device)).flatten(), tail])


class TopKPages(ContextSelector):
    def __init__(self, page_tokens: int, ratio: float, scoring: str = "softmax_mean"):
        self.page_tokens, self.ratio, self.scoring = page_tokens, ratio, scoring

    def plan(self, memory, region=None):
        P, L = self.page_tokens, memory.kv.layers
        short = _short_part(memory, region)
        if memory.page_summaries is not None:
            if region is not None and region.frames is not None:
                raise ValueError("a place is not read from an offloaded long-term tier")
            return self._plan_offloaded(memory, region, short)
        order, n_free = _in_region(memory, region)
        full = [n // P for n in n_free]
        k = [math.ceil(self.ratio * f) for f in full]
        n_long = [memory.n_sinks + kl * P + n - f * P for kl, n, f in zip(k, n_free, full)]
        # pages reported for the most-read layer (without a region every layer is the same)
        most = max(range(L), key=lambda layer: n_long[layer])
        has_tail = int(n_free[most] > full[most] * P)
        return _PagePlan(n_long=n_long, pages_used=k[most] + has_tail, pages_total=full[most] + has_tail,
                         page_tokens=P, ratio=self.ratio, scoring=self.scoring, n_free=n_free, order=order,
                         sinks=_sinks(memory, order, region),
                         summary=_summaries(memory.long, order, max(full), P), **short)

    def _plan_offloaded(self, memory, region, short):
        P, n = self.page_tokens, memory.long.len
        # every token is kept on this tier, in stream order: long-term position = stream index
        a, b = (0, n) if region is None else (min(max(region.first, 0), n), min(max(region.stop, 0), n))
        first, last = -(-a // P), b // P
        full = max(0, last - first)
        k = math.ceil(self.ratio * full)
        edges = (b - a) - full * P                         # tokens of partial pages, always read
        s = memory.page_summaries.summary
        candidates = PageSummary(s.mean[:, :, first:first + full], s.low[:, :, first:first + full],
                                 s.high[:, :, first:first + full])
        return _OffloadedPagePlan(n_long=[k * P + edges] * memory.kv.layers, pages_used=k + int(edges > 0),
                                  pages_total=full + int(edges > 0), page_tokens=P, scoring=self.scoring, k=k, a=a,
                                  b=b, summary=candidates, **short)


def make_selector(config) -> ContextSelector:
    if config.retrieval == "topk":
        return TopKPages(config.page_tokens, config.retrieval_ratio, config.page_scoring)
    return AllMemory()


def _summaries(long, order, pages: int, P: int) -> PageSummary:
    """Page summaries of the long-term tier; int8 keys are dequantized as they are read."""
    if long.quantized:
        return PageSummary.in_time_order(long.keys, order, pages, P, long.key_scale, long.kv.dtype, long.key_channel)
    return PageSummary.in_time_order(long.keys, order, pages, P)
