"""What happens to KV that leaves short-term memory: one small class per rule.

`select(candidates, capacity, n_sink, stream_tokens)` gets the long-term candidates (current
long-term memory followed by the tokens just evicted from short-term memory, in time order, all
layers at once), how many of them are already sinks and how many visual tokens the stream has had
so far (both known on the host: no device sync). It returns the per-layer indices to keep, sorted
by time, or None to keep everything, and the new sink count; it may mark vision sinks in
`candidates.sink`. Every layer keeps the same number of tokens and sinks, so the memory stays one
rectangular tensor and every layer sees the same positions.
"""

from __future__ import annotations

import abc

import torch

from .kv_buffer import Tokens


class CompressionPolicy(abc.ABC):
    needs_scores = False
    keeps_all = False        # nothing is ever dropped: every layer holds the same tokens

    @abc.abstractmethod
    def select(self, cand: Tokens, capacity: int | None, n_sink: int,
               stream_tokens: int) -> tuple[torch.Tensor | None, int]: ...


class KeepAll(CompressionPolicy):
    """Full cache / ReKV: nothing is ever dropped."""
    keeps_all = True

    def select(self, cand, capacity, n_sink, stream_tokens):
        return None, n_sink


def _mark_sinks(cand: Tokens, have: int, wanted: int, rank_key: torch.Tensor) -> int:
    """Promote the highest-`rank_key` non-sinks until each layer has `wanted` sinks (sticky:
    sinks are never un-marked; the sliding window's positional sinks). Returns the sink count per
    layer (equal on every layer)."""
    need = min(wanted - have, cand.n - have)
    if need > 0:
        top = rank_key.masked_fill(cand.sink, float("-inf")).topk(need, dim=1).indices
        cand.sink.scatter_(1, top, True)
        have += need
    return have


def _choose_sinks(cand: Tokens, wanted: int) -> int:
    """Vision sinks: on every layer, the `wanted` candidates that have drawn the most attention
    over all observations so far. Re-chosen at every eviction, so a token that stops drawing
    attention stops being a sink (and competes like any other)."""
    n = min(wanted, cand.n)
    cand.sink.zero_()
    if n:
        cand.sink.scatter_(1, cand.score_sum.topk(n, dim=1).indices, True)
    return n


class SlidingWindow(CompressionPolicy):
    """StreamingLLM-style: the first `sinks` visual tokens of the stream, then the newest ones."""

    def __init__(self, sinks: int):
        self.sinks = sinks

    def select(self, cand, capacity, n_sink, stream_tokens):
        age = -torch.arange(cand.n, device=cand.token_idx.device, dtype=torch.float32)
        n_sink = _mark_sinks(cand, n_sink, self.sinks, age.expand_as(cand.score_sum))
        if capacity is None or cand.n <= capacity:
            return None, n_sink
        # sinks are the oldest tokens, so they sit at the front; keep them and the newest rest
        recent = capacity - n_sink
        idx = torch.cat([torch.arange(n_sink), torch.arange(cand.n - recent, cand.n)]).to(cand.token_idx.device)
        return idx.expand(cand.token_idx.shape[0], -1), n_sink


class VisionSinkBucketing(CompressionPolicy):
    """VSB (LiveVLM): keep vision sinks, then fill the budget in two phases.

    A token's score is the vision-to-vision attention it received from the newest clip's
    observation window (the paper's rule; a running mean over every clip that observed it recalled
    less: QUALITY.md). Its accumulated attention is the sum over all observations.
    - sinks: the `sinks` tokens with the most accumulated attention, re-chosen at every eviction;
    - saliency: the top `saliency_share` of the remaining budget by score, wherever they are;
    - coverage: the stream so far is cut into equal time ranges ("buckets") of capacity
      `bucket_tokens`; the rest of the budget goes, in score order, only to tokens whose bucket has
      room. As the stream grows the ranges widen, so old buckets merge and are re-selected and the
      kept tokens keep covering the whole stream;
    - any budget left (buckets with too few candidates) goes by score.
    With `span_tokens` > 1 (ours, off by default), the score of each token is the mean over its
    span of `span_tokens` neighbouring candidates, so spans are kept or dropped together (text keeps
    whole words and numbers; see benchmarks/recall_bench.py).
    """

    needs_scores = True

    def __init__(self, sinks: int, bucket_tokens: int, saliency_share: float, span_tokens: int = 1):
        self.sinks, self.bucket_tokens, self.saliency_share = sinks, bucket_tokens, saliency_share
        self.span_tokens = span_tokens

    def select(self, cand, capacity, n_sink, stream_tokens):
        score = cand.score
        n_sink = _choose_sinks(cand, self.sinks)
        if self.span_tokens > 1:
            score = _span_mean(score, self.span_tokens)
        if capacity is None or cand.n <= capacity:
            return None, n_sink
        layers, n = score.shape
        budget = capacity - n_sink
        free = ~cand.sink

        # saliency phase
        n_salient = min(int(self.saliency_share * budget), n - n_sink)
        salient = torch.zeros_like(cand.sink)
        if n_salient > 0:
            top = score.masked_fill(cand.sink, float("-inf")).topk(n_salient, dim=1).indices
            salient.scatter_(1, top, True)

        # coverage phase: equal ranges of the stream so far [0, newest candidate]
        n_buckets = max(1, budget // self.bucket_tokens)
        bucket = (cand.token_idx * n_buckets // max(1, stream_tokens)).clamp_max(n_buckets - 1)
        used = torch.zeros(layers, n_buckets, device=score.device).scatter_add_(1, bucket, salient.float())
        room = (self.bucket_tokens - used).clamp_min(0).gather(1, bucket)
        eligible = free & ~salient
        rank = _rank_within_group(bucket, score.masked_fill(~eligible, float("-inf")))
        covering = eligible & (rank < room)

        # one priority key: sinks > salient > covering > rest, ties broken by score
        lo, hi = score.min(dim=1, keepdim=True).values, score.max(dim=1, keepdim=True).values
        tie = 0.999 * (score - lo) / (hi - lo).clamp_min(1e-12)
        key = 3.0 * cand.sink + 2.0 * salient + 1.0 * covering + tie
        return key.topk(capacity, dim=1).indices.sort(dim=1).values, n_sink


def _span_mean(score: torch.Tensor, span: int) -> torch.Tensor:
    """Each element replaced by the mean of its span of `span` neighbours, minus a tiny amount per
    span index so that equal means still order span by span (ties never interleave spans)."""
    layers, n = score.shape
    span_id = torch.arange(n, device=score.device) // span
    n_spans = int(span_id[-1]) + 1 if n else 0
    sums = torch.zeros(layers, n_spans, device=score.device, dtype=torch.float64)
    sums.scatter_add_(1, span_id.expand(layers, -1), score.double())
    counts = torch.bincount(span_id, minlength=n_spans).double()
    means = sums / counts
    scale = means.abs().max().clamp_min(1e-30)
    return (means - scale * 1e-9 * torch.arange(n_spans, device=score.device))[:, span_id]


def _rank_within_group(group: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """For each element, how many elements of the same group (per row) have a higher score."""
    by_score = score.argsort(dim=1, descending=True)
    group_in_score_order = group.gather(1, by_score)
    by_group = group_in_score_order.argsort(dim=1, stable=True)       # groups, each in score order
    order = by_score.gather(1, by_group)
    g_sorted = group.gather(1, order)
    first = torch.searchsorted(g_sorted, g_sorted, right=False)
    pos = torch.arange(group.shape[1], device=group.device).expand_as(group)
    return torch.empty_like(group).scatter_(1, order, pos - first)


def make_compression(config) -> CompressionPolicy:
    if config.compression == "keep_all":
        return KeepAll()
    if config.compression == "sliding_window":
        return SlidingWindow(config.vision_sinks)
    return VisionSinkBucketing(config.vision_sinks, config.bucket_tokens, config.saliency_share, config.span_tokens)
