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

import warnings
from collections.abc import Callable

import torch

from .graphs import describe_error, memory_layout, record


class IngestStep:
    def __init__(self, hook, capture: bool):
        self.hook, self.capture = hook, capture
        self.graphs: dict[tuple, tuple] = {}   # clip shape -> (graph, its pixel input, its outputs)
        self._seen: set[tuple] = set()         # clip shapes run kernel by kernel on this layout
        self._layout: tuple | None = None
        self._pool = None                      # one memory pool for these graphs (never run together)
        self.captures = self.replays = 0       # for benchmarks
        self.capture_error: str | None = None  # why recording failed (then clips run kernel by kernel)

    def run(self, pixels: torch.Tensor, forward: Callable[[torch.Tensor], tuple]) -> tuple:
        """forward(pixels) -> the prefill's outputs, read before the next clip (a replay
        overwrites them)."""
        if not self.capture:
            return forward(pixels)
        layout = memory_layout(self.hook.memory)
        if layout != self._layout:
            self.graphs.clear()
            self._seen.clear()
            self._layout = layout
        key = (tuple(pixels.shape), pixels.dtype)
        recorded = self.graphs.get(key)
        if recorded is None and key in self._seen:
            static = pixels.clone()
            try:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph, outputs = record(lambda: forward(static), self._pool, self.hook.reset)
                recorded = self.graphs[key] = (graph, static, outputs)
                self.captures += 1
            except RuntimeError as err:       # an operation a graph cannot record: ingest anyway
                self.hook.reset()
                self.capture, self.capture_error = False, describe_error(err)
                warnings.warn(f"clip prefill is not captured in a CUDA graph: {self.capture_error}")
        self._seen.add(key)
        if recorded is None:
            return forward(pixels)
        graph, static, outputs = recorded
        static.copy_(pixels)
        graph.replay()
        self.replays += 1
        return outputs
