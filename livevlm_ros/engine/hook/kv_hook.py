"""The cache object the language model's attention layers call: our one hook into model code.

transformers' attention layers call `cache.update(key_states, value_states, layer_idx, ...)` with
the new tokens' post-RoPE keys and attend to whatever comes back. The hook hands each call to the
view of the forward in progress, which owns everything that forward uses:
  IngestView   a clip's prefill against memory (ingest_view.py);
  AnswerView   an answer's question and eagerly decoded tokens, reading memory through a
               retrieval plan (answer_view.py);
  AnswerArena  a captured decode step, one token at a time at a fixed shape (arena.py).
The hook itself keeps only what outlives one forward: the forward hooks that capture what a view
needs from inside the model (pre-RoPE keys from each k_proj while a clip is prefilled, pre-RoPE
queries from each q_proj while a question that scores pages is), and the arena.
"""

from __future__ import annotations

import torch

from ..memory.region import Region
from ..memory.retrieval import ContextSelector
from ..memory.streaming_memory import StreamingMemory
from .answer_view import AnswerView
from .arena import AnswerArena
from .ingest_view import IngestView
from .positions import SlotPositions


class MemoryKVHook:
    def __init__(self, rope, query_modules: list[torch.nn.Module], key_modules: list[torch.nn.Module],
                 positions=None):
        self.memory: StreamingMemory | None = None      # set by the engine (LiveVLMEngine._use_memory)
        self.rope = rope
        self.positions = positions or SlotPositions()
        self.view: IngestView | AnswerView | AnswerArena | None = None
        self.arena = AnswerArena()
        self._queries: dict[int, torch.Tensor] = {}
        self._keys_pre: dict[int, torch.Tensor] = {}
        wants_queries = lambda: isinstance(self.view, AnswerView) and self.view.wants_queries  # noqa: E731
        wants_keys = lambda: isinstance(self.view, IngestView)                                  # noqa: E731
        self._handles = [m.register_forward_hook(_capture(self._queries, i, wants_queries))
                         for i, m in enumerate(query_modules)]
        self._handles += [m.register_forward_hook(_capture(self._keys_pre, i, wants_keys))
                          for i, m in enumerate(key_modules)]
        # For tests and benchmarks: the stream indices of the long-term tokens each layer read in
        # the last answer (off by default: it costs a device->host copy per layer).
        self.record_selection = False
        self.last_selection: dict[int, torch.Tensor] = {}

    def close(self):
        """Detach from the model (the model may outlive this engine)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self):
        """Leave the forward in progress, dropping everything it built."""
        self.view = None
        self._queries.clear()
        self._keys_pre.clear()

    # ---- ingest -----------------------------------------------------------------------------------
    def place_memory(self, n_context: int):
        """Where a context of memory's tokens sits, right after the prefix (hook/positions.py)."""
        return self.positions.place(self.memory, self.rope, self.memory.prefix_len, n_context)

    def begin_ingest(self, place, n_new: int, observation_window: int | None):
        """A prefill of n_new tokens after prefix + attendable memory, which sits where `place`
        (place_memory) puts it; with an observation window, VSB's scores are measured."""
        self.reset()
        self.view = IngestView(self.memory, place, self._keys_pre, n_new, observation_window)

    def finish_ingest(self) -> tuple:
        """IngestView.finish's outputs; the hook leaves ingest."""
        try:
            return self.view.finish()
        finally:
            self.reset()

    # ---- answer -----------------------------------------------------------------------------------
    def begin_answer(self, selector: ContextSelector, question_rows: slice, max_new_tokens: int,
                     region: Region | None = None, evidence_rows: slice | None = None,
                     row_weights: torch.Tensor | None = None) -> AnswerView:
        """An answer's first forward (see AnswerView); `region`: what of memory it may read (None:
        all). Returns the view: `view.start` is the position of the question's first row."""
        self.reset()
        plan = selector.plan(self.memory, region)
        self.view = AnswerView(self.memory, self.place_memory, self._queries, self.arena, plan, question_rows,
                               max_new_tokens, evidence_rows, row_weights, self.record_selection)
        if self.record_selection:
            self.last_selection = self.view.last_selection
        return self.view

    def resume(self, view: AnswerView):
        """Make `view` the answer in progress again: a graph replayed the forward it was recorded with."""
        self.reset()
        self.view = view

    def reserve_arena(self, tokens: int):
        """Room in the arena for an answer of `tokens` per layer, 8-bit where memory is (with
        memory's channel factors: called once per answer, in its recorded graph too)."""
        self.arena.reserve(self.memory.kv, tokens, quantized=self.memory.long.quantized)
        if self.arena.quantized:
            self.arena.use_channel_factors(self.memory.long.key_channel)

    def drop_arena(self):
        """Free the arena (an engine that decodes eagerly has none)."""
        self.arena = AnswerArena()

    def begin_decode(self):
        """After an answer's first forward, in the arena: one token at a time at a fixed shape."""
        self.arena.begin_decode(self.view.decode_lengths())
        self._queries.clear()
        self.view = self.arena

    # ---- what transformers calls ---------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.view is None:
            raise RuntimeError("MemoryKVHook used outside begin_ingest/begin_answer")
        return self.view.update(key_states, value_states, layer_idx)

    # transformers may ask a cache these; our positions and masks are always given explicitly
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return False


def _capture(store: dict, layer: int, active):
    def hook(module, args, output):
        if active():
            store[layer] = output
    return hook
