"""The question's prefill at fixed shapes, so that a CUDA graph can replay it (issue 13).

A question's first forward is ~3,400 small kernels at 7B shapes (per layer: score pages, pick
them, gather and re-rotate their keys, attend), launched one by one from Python: 44 ms of wall
time for 19.5 ms of GPU work. Once memory is full nothing in it changes shape from one question to
the next, so it is recorded once and replayed with one launch. What is fixed, and how:

  question  padded to a multiple of `BUCKET` tokens. The padding comes after the question, so no
            real token sees it (causal attention); the first answer token is read from the last
            real row, and decoding goes on from there, writing over the padding's KV.
  rows      the rows that score pages (PaR) and measure evidence run from the question's first
            token to the end of the bucket, weighted 1 for the question's own tokens, 0 after.
  memory    the graph reads memory at fixed addresses and lengths (graphs.memory_layout); graphs
            are dropped when they change, and one is recorded for a question shape (bucket,
            selector, evidence or not) only when that shape already ran on this memory layout.
  the host  what the hook knows after the forward (its AnswerView: the plan, per-layer lengths, the
            buffers) is kept with the graph and resumed at each replay (MemoryKVHook.resume): after
            the forward a view changes no more, so the recorded one is the replay's.

Not captured (run kernel by kernel, at the same fixed shapes): time windows (their per-layer
counts are read from the device), an offloaded (CPU) long-term tier, `hook.record_selection`, CPUs. With capture off the
same padded step runs eagerly: the CPU test suite checks it answers as the unpadded path does, and
the GPU benchmark checks the replay gives the tokens of that eager step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hook.answer_view import AnswerView
from .graphs import StepGraphs, memory_layout

BUCKET = 32           # question lengths are rounded up to this: few graphs, little padding


@dataclass
class _Inputs:
    """The tensors a recorded graph reads (filled before each replay) and writes."""
    embeds: torch.Tensor            # [bucket, hidden] the question's embeddings, then padding
    last: torch.Tensor              # [1] row of the question's last token
    row_weights: torch.Tensor       # [bucket - first question row] 1 for the question's own tokens
    logits: torch.Tensor | None = None


@dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    inputs: _Inputs
    view: AnswerView                # what the hook knew after the recorded forward


class QuestionStep:
    def __init__(self, model, hook, capture: bool):
        self.model, self.hook = model, hook
        # question key -> _Recorded; seen: question key -> context end, of questions run kernel by kernel
        self.recorded = StepGraphs("question prefill", capture)
        self._arena_generation = hook.arena.generation      # of the arena the graphs were recorded on

    def run(self, selector, embeds: torch.Tensor, rows: slice, max_new_tokens: int, evidence: bool):
        """The question's first forward. embeds [n, hidden]; rows: the question's own token rows.
        Returns (the answer's view, logits that choose the first answer token); the hook is left in
        that view, its padding marked, ready to decode."""
        hook, rec, n = self.hook, self.recorded, embeds.shape[0]
        bucket = -(-n // BUCKET) * BUCKET
        weights = torch.zeros(bucket - rows.start, device=embeds.device)
        weights[:rows.stop - rows.start] = 1
        inputs = _Inputs(torch.cat([embeds, embeds.new_zeros(bucket - n, embeds.shape[1])]),
                         torch.tensor([n - 1], device=embeds.device), weights)
        rows = slice(rows.start, bucket)
        key = (bucket, rows.start, evidence, type(selector).__name__, tuple(sorted(vars(selector).items())))
        layout = self._layout()
        rec.at_layout(layout)
        self._forget_old_arena()               # regrown since (e.g. by an answer in a time window)
        recorded = rec.graphs.get(key)
        if recorded is None and layout is not None and key in rec.seen:
            # the second question of this shape on this memory layout: record it
            hook.reserve_arena(rec.seen[key] + bucket + max_new_tokens)
            self._forget_old_arena()
            made = rec.record(lambda: self._forward(selector, inputs, rows, max_new_tokens, evidence),
                              hook.reset)
            if made is not None:
                graph, view = made
                recorded = rec.graphs[key] = _Recorded(graph, inputs, view)
        if recorded is not None and hook.arena.capacity >= recorded.view.context_end + bucket + max_new_tokens:
            for static, new in zip((recorded.inputs.embeds, recorded.inputs.last, recorded.inputs.row_weights),
                                   (inputs.embeds, inputs.last, inputs.row_weights)):
                static.copy_(new)
            rec.replay(recorded.graph)
            view, logits = recorded.view, recorded.inputs.logits
            hook.resume(view)
        else:
            view = self._forward(selector, inputs, rows, max_new_tokens, evidence)
            self._forget_old_arena()           # the arena grew: every graph must be recorded again
            rec.seen[key] = view.context_end
            logits = inputs.logits
        view.padding = bucket - n              # decoding goes on from the last real row
        return view, logits

    def _forget_old_arena(self):
        """Drop the graphs if the arena was regrown since they were recorded, here or elsewhere (an
        answer in a time window runs kernel by kernel and reserves its own room): they would write
        the freed buffers and decode from ones this answer never filled."""
        if self._arena_generation != self.hook.arena.generation:
            self.recorded.graphs.clear()
            self._arena_generation = self.hook.arena.generation

    def _layout(self) -> tuple | None:
        """What a graph reads of memory (its tensors, their lengths), or None where nothing may be
        recorded."""
        mem = self.hook.memory
        # (recording which tokens each layer read copies them to the host: not in a graph)
        if self.recorded.capture and mem.long.device.type == "cuda" and not self.hook.record_selection:
            # + the frame count in the steps the hook sizes evidence in
            return memory_layout(mem), -(-(mem.frames_ingested + 1) // 4096)
        return None

    @torch.inference_mode()
    def _forward(self, selector, inputs: _Inputs, rows: slice, max_new_tokens: int, evidence: bool) -> AnswerView:
        hook, bucket = self.hook, inputs.embeds.shape[0]
        view = hook.begin_answer(selector, rows, max_new_tokens, None, rows if evidence else None,
                                 row_weights=inputs.row_weights)
        hook.reserve_arena(view.context_end + bucket + max_new_tokens)   # recording: reserved before (factors only)
        positions = view.place.text(bucket)              # on the device: a replay computes them afresh
        hidden = self.model.run_language_model(inputs.embeds[None], positions, hook)
        inputs.logits = self.model.logits(hidden[0].index_select(0, inputs.last))[0]
        return view
