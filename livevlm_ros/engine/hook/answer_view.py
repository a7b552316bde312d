"""One answer, as the model's attention layers see it: memory read through a retrieval plan.

On a layer's first call the view asks the plan which long-term tokens this layer reads (PaR scores
pages with the question's pre-RoPE queries, which the hook captured; a time window narrows the
candidates), and assembles [prefix | those tokens | short-term memory] in one buffer with room for
the question and the answer, re-rotated to where hook/positions.py places them (1-D: positions
that end right before the question). Later
calls (the rest of the question's forward, then eagerly decoded tokens) append to it. A CUDA decode
step appends in the arena instead (arena.py), from where the view's prefill left each layer; an
8-bit arena has every layer assembled in one shared scratch, so its answers decode only there.

Evidence, on request: the attention the question's rows pay each frame of the context, from the
attention's own probabilities where it writes them out (a few rows), else computed once the layer
has attended (hook/attention.py calls back with the rows' queries after RoPE).

Nothing is written back into memory. Nothing here waits for the device (no .item(), no nonzero()),
so the host can run ahead; the one exception is a time window, whose per-layer counts are read once
per answer. After the question's forward the view changes no more (eager decoding aside): a graph
replay of that forward puts the recorded view back as it is.
"""

from __future__ import annotations

import functools

import torch

from ..memory.retrieval import RetrievalPlan
from ..memory.streaming_memory import StreamingMemory
from .arena import AnswerArena
from .attention import hands_probabilities
from .received import attention_received
from .rope import rotate_into


class AnswerView:
    def __init__(self, memory: StreamingMemory, place_memory, queries: dict[int, torch.Tensor], arena: AnswerArena,
                 plan: RetrievalPlan, question_rows: slice, room: int, evidence_rows: slice | None = None,
                 row_weights: torch.Tensor | None = None, record_selection: bool = False):
        """question_rows: rows of the first forward that are the question's own tokens (they score
        pages); room: answer tokens to leave space for; evidence_rows: rows whose attention to memory
        is measured per frame (`frame_attention()`); row_weights (0/1, one per question row; the
        same rows serve evidence): which of them count, when the question is padded to a fixed length."""
        kv = memory.kv
        self.memory, self.plan, self.arena, self._queries = memory, plan, arena, queries
        self.question_rows, self.room, self.row_weights = question_rows, room, row_weights
        self.evidence_rows, self.record_selection = evidence_rows, record_selection
        self._n_ctx = [n + plan.n_short for n in plan.n_long]
        # layers may read different numbers of tokens (a time window): each layer's context ends
        # right before the question, so the newest memory is as close to it on every layer
        self.context_tokens = max(self._n_ctx)
        self.place = place_memory(self.context_tokens)          # hook/positions.py
        self.context_end = memory.prefix_len + self.context_tokens   # rows before the question's
        self.evidence = None
        if evidence_rows is not None:
            # per frame number, over all layers: attention drawn, and tokens that drew it (sized in
            # steps of 4096 frames, so that a captured prefill outlives many new frames)
            frames = -(-(memory.frames_ingested + 1) // 4096) * 4096
            self.evidence = torch.zeros(2, frames, dtype=torch.float32, device=kv.device)
        self.wants_queries = plan.uses_question
        self.keys: dict[int, torch.Tensor] = {}       # per layer: context + question + room to decode
        # (in an 8-bit arena every layer's is the one shared scratch, valid during that layer's call)
        self.values: dict[int, torch.Tensor] = {}
        self.lengths: dict[int, int] = {}
        self.padding = 0                              # trailing rows of the first forward that were padding
        self._in_arena = False                        # the layer being assembled is in the arena
        self.last_selection: dict[int, torch.Tensor] = {}

    @property
    def start(self) -> int:
        """Position of the first question row (multimodal positions: read from the device)."""
        return self.place.end_int()

    def pages(self) -> tuple[int, int]:
        return self.plan.pages_used, self.plan.pages_total

    def decode_lengths(self) -> list[int]:
        """Where each layer's context ends for decoding: after the question, before its padding."""
        return [self.lengths[layer] - self.padding for layer in range(self.memory.kv.layers)]

    def update(self, k_new, v_new, layer: int):
        first = layer not in self.keys
        if first:
            self.lengths[layer], frames = self._assemble(layer, k_new.shape[2])
        elif self._in_arena and self.arena.quantized:
            # every layer was assembled in the one shared scratch: later calls decode in the arena
            raise RuntimeError("an 8-bit arena's answer decodes through the arena (begin_decode), not the view")
        start = self.lengths[layer]
        stop = start + k_new.shape[2]
        self.keys[layer][:, start:stop] = k_new[0]
        self.values[layer][:, start:stop] = v_new[0]
        self.lengths[layer] = stop
        if first and self._in_arena:
            self.arena.keep(layer, stop)        # an 8-bit arena stores what the scratch now holds
        keys = self.keys[layer][None, :, :stop]
        if first and self.evidence_rows is not None:
            kv = self.memory.kv
            if hands_probabilities(kv.q_heads // kv.kv_heads, k_new.shape[2]):
                # the attention's own probabilities (attention.py calls this with them)
                keys.livevlm_on_probs = functools.partial(self._evidence_from_probs, frames, start, k_new.shape[2])
            else:
                keys.livevlm_on_lse = functools.partial(self._evidence_from_query, frames, keys[0], start)
        return keys, self.values[layer][None, :, :stop]

    def _assemble(self, layer: int, n_question: int) -> tuple[int, tuple | None]:
        """prefix + the long-term tokens this layer reads + short-term memory, re-rotated to
        positions that end right before the question, in one buffer with room for the question
        and the answer. Returns where the context ends, and (with evidence) the frame number of each
        context token with whether it counts (vision sinks do not)."""
        mem, kv, plan = self.memory, self.memory.kv, self.plan
        q = self._question_queries(layer) if plan.uses_question else None
        index = plan.long_index(layer, q, self.row_weights)
        if index is not None:
            index = index.to(mem.long.device)
        if self.record_selection or self.evidence_rows is not None:    # which tokens were read: on request
            long_idx, long_sink = mem.long.token_idx[layer, :mem.long.len], mem.long.sink[layer, :mem.long.len]
            if index is not None:
                long_idx, long_sink = long_idx[index], long_sink[index]
            if self.record_selection:
                self.last_selection[layer] = long_idx.cpu()
        # short-term tokens read: a range, or an index where a place leaves gaps
        short = slice(plan.short_from, plan.short_to) if plan.short_index is None else plan.short_index
        p, n_ctx = mem.prefix_len, self._n_ctx[layer]
        size = (kv.kv_heads, p + n_ctx + n_question + self.room, kv.head_dim)
        self._in_arena = self.arena.capacity >= size[1]
        if self._in_arena:
            keys, values = self.arena.context_buffers(layer)
        else:
            keys = torch.empty(size, dtype=kv.dtype, device=kv.device)
            values = torch.empty_like(keys)
        n_long = len(index) if index is not None else mem.long.len
        keys[:, :p], values[:, :p] = mem.prefix_keys[layer], mem.prefix_values[layer]
        # gathered and rotated in one pass (rope.rotate_into); the context ends right before the question
        gap = self.context_tokens - n_ctx
        at_long, at_short = slice(gap, gap + n_long), slice(gap + n_long, gap + n_ctx)
        cos, sin = self.place.rope(layer, mem.long, slice(0, mem.long.len) if index is None else index, at_long)
        # int8 long-term rows are dequantized in the same pass (kv_buffer.read_keys / read_values)
        mem.long.read_keys(keys[:, p:p + n_long], layer, 0 if index is None else index, cos, sin)
        mem.long.read_values(values[:, p:p + n_long], layer, 0 if index is None else index)
        cos, sin = self.place.rope(layer, mem.short, short, at_short)
        rotate_into(keys[:, p + n_long:p + n_ctx], mem.short.keys[layer],
                    plan.short_from if plan.short_index is None else plan.short_index, cos, sin)
        values[:, p + n_long:p + n_ctx] = mem.short.values[layer, :, short]
        self.keys[layer], self.values[layer] = keys, values
        frames = None
        if self.evidence_rows is not None:
            frame = torch.cat([long_idx.to(kv.device), mem.short.token_idx[layer, short]]) // mem.tokens_per_frame
            counts = torch.cat([~long_sink.to(kv.device), torch.ones(plan.n_short, dtype=torch.bool, device=kv.device)])
            frames = (frame, counts.float())
        return p + n_ctx, frames

    def _question_queries(self, layer: int) -> torch.Tensor:
        """The question rows' pre-RoPE queries of `layer`, as q_proj made them -> [q_heads, n, D]."""
        q = self._queries[layer][0, self.question_rows]
        return q.view(q.shape[0], self.memory.kv.q_heads, -1).transpose(0, 1)

    def _evidence_from_query(self, frames: tuple, keys: torch.Tensor, context_end: int, query: torch.Tensor,
                             lse: torch.Tensor | None, scale: float):
        """Attention the evidence rows (query [1, q_heads, n_new, D], after RoPE) paid this layer's
        memory tokens, computed here: a forward of many new tokens writes no probabilities out."""
        kv, rows = self.memory.kv, self.evidence_rows
        q = query[0, :, rows].reshape(kv.kv_heads, -1, query.shape[-1])    # query heads grouped by kv head
        r = rows.stop - rows.start
        folded = None if self.row_weights is None else self.row_weights.repeat(q.shape[1] // r)
        if lse is not None:
            lse = lse[0, :, rows].reshape(kv.kv_heads, -1)
        received = attention_received(q, keys[:, :context_end + rows.stop], r, folded, lse=lse, scale=scale).sum(dim=0)
        count = r if self.row_weights is None else self.row_weights.sum(dtype=torch.float32)
        self._add_per_frame(frames, received[self.memory.prefix_len:context_end] / (kv.q_heads * count))

    def _evidence_from_probs(self, frames: tuple, context_end: int, n_new: int, probs: torch.Tensor):
        """The same from the attention's own probabilities [1, kv_heads, groups * n_new, keys] (rows
        are (head in group, new token)): their mean over the query heads and the evidence rows."""
        kv, rows = self.memory.kv, self.evidence_rows
        picked = probs[0].view(kv.kv_heads, -1, n_new, probs.shape[-1])[:, :, rows, self.memory.prefix_len:context_end]
        if self.row_weights is None:
            received = picked.sum(dim=(0, 1, 2)) / (kv.q_heads * picked.shape[2])
        else:
            w = self.row_weights.to(picked.dtype)
            received = torch.einsum("hgrk,r->k", picked, w) / (kv.q_heads * w.sum())
        self._add_per_frame(frames, received)

    def _add_per_frame(self, frames: tuple, received: torch.Tensor):
        """Attention drawn by this layer's memory tokens, added up per frame. Vision sinks are left
        out: they are kept because they draw attention from every query (attention sinks), so what
        they draw says nothing about what the question is about."""
        frame, counts = frames
        self.evidence[0].index_add_(0, frame, received * counts)
        self.evidence[1].index_add_(0, frame, counts)

    def frame_attention(self) -> torch.Tensor:
        """After the question's forward with evidence rows: per frame number, the mean attention
        one of its tokens drew (0 for frames not read). A mean, not a sum: a long-past frame that
        compression left a few tokens of competes on equal terms with the whole recent frames."""
        drawn, tokens = self.evidence
        return drawn / tokens.clamp_min(1)
