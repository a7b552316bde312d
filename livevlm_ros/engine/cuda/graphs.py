"""What the captured steps share: recording a step in a CUDA graph, and the memory layout a graph
depends on (issue 13).

A graph replays fixed kernels on fixed addresses. The engine's steps (ingest_step.py,
question_step.py, decode_step.py) run at shapes that stop changing once memory is full; the
clip and question steps keep their graphs in a `StepGraphs`, keyed by their shapes under one
`memory_layout`, and record a key only when it comes a second time: while memory still fills up,
its lengths change with every clip and steps run kernel by kernel, so nothing is recorded in vain.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


def memory_layout(memory) -> tuple:
    """The addresses and lengths of memory's device tensors: what a recorded step reads (a new
    memory, a tier that grew, or a clip that changed the lengths makes a different layout)."""
    tensors = [memory.prefix_keys, memory.prefix_values] + [
        t for tier in (memory.long, memory.short) for t in (tier.keys, tier.values, tier.token_idx, tier.sink)]
    return (memory.prefix_len, memory.long.len, memory.short.len, memory.n_sinks,
            tuple(t.data_ptr() for t in tensors))


def record(body: Callable[[], object], pool, reset: Callable[[], None] | None = None):
    """Record `body` in a CUDA graph; returns (graph, what body returned while recording).
    A warm-up run on a side stream comes first, as torch.cuda.graphs asks (lazy initialisation stays
    out of the graph); `reset` undoes what a run left behind, after the warm-up and after recording.
    thread_local: CUDA calls of other threads (a ROS timer reading memory stats) do not spoil it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    if reset is not None:
        reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        result = body()
    if reset is not None:
        reset()
    return graph, result


def describe_error(err: BaseException) -> str:
    """An error while recording, with where it happened (a step that cannot be recorded runs
    kernel by kernel from then on, and says why once)."""
    import traceback

    where = "; ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
                      for f in traceback.extract_tb(err.__traceback__)[-4:])
    return f"{type(err).__name__}: {err} (at {where})"


class StepGraphs:
    """The graphs of one kind of step (a clip's prefill, a question's), for the memory layout of now.

    A step asks `at_layout` first: graphs and sightings of another layout are dropped. It records a
    key (its shapes) only when `seen` already holds it, i.e. on the key's second sighting under this
    layout. A recording that fails turns recording off for good, says why once, and the step runs
    kernel by kernel from then on. One memory pool serves all the graphs: they never run together."""

    def __init__(self, what: str, capture: bool):
        self.what, self.capture = what, capture
        self.graphs: dict = {}          # key -> what the step keeps of its recording
        self.seen: dict = {}            # key -> what the step keeps of a run kernel by kernel
        self._layout = None
        self._pool = None
        self.captures = self.replays = 0       # for benchmarks
        self.capture_error: str | None = None  # why recording failed

    def at_layout(self, layout) -> None:
        if layout != self._layout:
            self.clear()
            self._layout = layout

    def clear(self) -> None:
        """Drop every graph and sighting (what they were recorded for is gone)."""
        self.graphs.clear()
        self.seen.clear()

    def record(self, body: Callable[[], object], reset: Callable[[], None]):
        """(graph, what body returned while recording), or None where recording failed."""
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            made = record(body, self._pool, reset)
        except RuntimeError as err:       # an operation a graph cannot record: run anyway
            reset()
            self.capture, self.capture_error = False, describe_error(err)
            warnings.warn(f"{self.what} is not captured in a CUDA graph: {self.capture_error}")
            return None
        self.captures += 1
        return made

    def replay(self, graph: torch.cuda.CUDAGraph):
        graph.replay()
        self.replays += 1
