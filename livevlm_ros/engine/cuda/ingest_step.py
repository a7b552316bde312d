"""A clip's vision tower and language-model prefill, replayed from a CUDA graph (issue 13).

A one-frame clip at 7B shapes took 62 ms on an H100 for ~6 ms of arithmetic: the vision tower and
the prefill over memory are ~2,000 kernels launched one by one from Python. Once memory is full a
clip's prefill has the same shapes every time (the same memory lengths, so the same positions), so
both are recorded once per clip shape and replayed (graphs.py says when).

What follows the prefill - memory's scores, eviction and VSB's choice of what to keep
(StreamingMemory.commit_clip) - runs kernel by kernel: it advances host counters (the stream's
token count, frame times) that a recorded graph would replay frozen.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .graphs import StepGraphs, memory_layout


class IngestStep:
    def __init__(self, hook, capture: bool):
        self.hook = hook
        self.recorded = StepGraphs("clip prefill", capture)   # clip shape -> (graph, outputs, pixel input)

    def run(self, pixels: torch.Tensor, forward: Callable[[torch.Tensor], tuple]) -> tuple:
        """forward(pixels) -> the prefill's outputs, read before the next clip (a replay
        overwrites them). `pixels` is the step's input: a clip's pixels, or (a family whose vision
        tower cannot be recorded) the tower's output, the step then being the prefill alone."""
        rec = self.recorded
        if not rec.capture:
            return forward(pixels)
        rec.at_layout(memory_layout(self.hook.memory))
        key = (tuple(pixels.shape), pixels.dtype)
        entry = rec.graphs.get(key)
        if entry is None and key in rec.seen:
            static = pixels.clone()
            made = rec.record(lambda: forward(static), self.hook.reset)
            if made is not None:
                entry = rec.graphs[key] = (*made, static)
        rec.seen[key] = True
        if entry is None:
            return forward(pixels)
        graph, outputs, static = entry
        static.copy_(pixels)
        rec.replay(graph)
        return outputs
