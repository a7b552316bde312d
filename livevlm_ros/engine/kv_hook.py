"""The cache object the language model's attention layers call: our one hook into model code.

transformers' attention layers call `cache.update(key_states, value_states, layer_idx, ...)` with
the new tokens' post-RoPE keys and attend to whatever comes back. That is where this hook works:
  ingest  - hands back memory (pre-RoPE keys rotated to fresh positions) + the new clip, keeps the
            clip's pre-RoPE keys exactly as each layer's key projection made them, and, for VSB,
            measures the vision-to-vision attention the clip's last `observation_window` tokens pay
            to every token, once the layer's attention has run: from the row log-sum-exp of its
            flash kernel where it has one (attention.py hands it over), else in full from the
            queries a forward hook on each q_proj captured (update() sees no queries);
  answer  - on the first call per layer, asks the retrieval plan which long-term tokens this layer
            reads (PaR scores pages with the question's pre-RoPE queries; a time window narrows the
            candidates), assembles the context in a buffer with room for the answer, optionally
            measures the attention the question pays each frame (evidence: from the attention's
            own probabilities, which attention.py hands over), then appends in place while the
            answer is decoded;
  decode  - the fixed-shape step of decode_step.py: writes at per-layer lengths kept on the device
            and hands back the whole answer buffer with its last slot in use marked.
Nothing is written back into memory. Nothing here waits for the device (no .item(), no nonzero()),
so the host can run ahead; the one exception is a time window, whose per-layer counts are read once
per answer.
"""

from __future__ import annotations

import functools

import torch

from .attention import hands_probabilities
from .memory import StreamingMemory
from .received import attention_received, attention_received_from_lse, fused_available
from .retrieval import ContextSelector
from .rope import apply_rope, rotate_into


class MemoryKVHook:
    def __init__(self, rope, query_modules: list[torch.nn.Module], key_modules: list[torch.nn.Module]):
        self.memory: StreamingMemory | None = None      # set by the engine (LiveVLMEngine.reset)
        self.rope = rope
        self._queries: dict[int, torch.Tensor] = {}
        self._keys_pre: dict[int, torch.Tensor] = {}
        self._capture = False
        self._handles = [m.register_forward_hook(self._capture_hook(self._queries, i, lambda: self._capture))
                         for i, m in enumerate(query_modules)]
        self._handles += [m.register_forward_hook(self._capture_hook(self._keys_pre, i, lambda: self.mode == "ingest"))
                          for i, m in enumerate(key_modules)]
        self.mode = None
        # For tests and benchmarks: the stream indices of the long-term tokens each layer read in
        # the last answer (off by default: it costs a device->host copy per layer).
        self.record_selection = False
        self.last_selection: dict[int, torch.Tensor] = {}
        self._arena_k = self._arena_v = None          # fixed answer buffers (reserve_arena)
        self.lengths: torch.Tensor | None = None
        self.arena_generation = 0

    # ---- fixed answer buffers (decode_step.py, question_step.py) ------------------------------------
    @property
    def arena_capacity(self) -> int:
        return 0 if self._arena_k is None else self._arena_k.shape[2]

    def reserve_arena(self, tokens: int):
        """From now on every answer's context is assembled in one buffer per layer, allocated here
        (instead of per answer), so that captured steps find their KV at the same addresses every
        time. It grows, rarely, when an answer needs more than `tokens` (prefix + context + question
        + answer); memory is bounded, so it stops growing. `arena_generation` counts the buffers:
        a graph recorded on older ones must be recorded again."""
        if self.arena_capacity >= tokens:
            return
        kv = self.memory.kv
        # some slack, so that a memory still filling up does not grow it answer after answer
        capacity = -(-tokens * 9 // 8 // 256) * 256
        self._arena_k = self._arena_v = None                    # free the old ones first
        # zeros, not empty: masked slots still enter the product (0 x -inf is NaN, garbage may be NaN)
        self._arena_k = torch.zeros(kv.layers, kv.kv_heads, capacity, kv.head_dim, dtype=kv.dtype, device=kv.device)
        self._arena_v = torch.zeros_like(self._arena_k)
        self.lengths = torch.zeros(kv.layers, dtype=torch.long, device=kv.device)
        self.arena_generation += 1

    def begin_decode(self):
        """After an answer's prefill (in the arena): one token at a time at a fixed shape, the
        per-layer context lengths on the device (DecodeStep advances them)."""
        self.mode, self._capture = "decode", False
        self.lengths.copy_(torch.tensor([self._answer_len[layer] for layer in range(self.memory.kv.layers)]))

    def _update_decode(self, k_new, v_new, layer):
        at = self.lengths[layer:layer + 1]
        keys, values = self._arena_k[layer], self._arena_v[layer]
        keys.index_copy_(1, at, k_new[0])
        values.index_copy_(1, at, v_new[0])
        keys, values = keys[None], values[None]
        keys.livevlm_last = at                                  # attention.py masks the slots beyond
        return keys, values

    def close(self):
        """Detach from the model (the model may outlive this engine)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @staticmethod
    def _capture_hook(store: dict, layer: int, active):
        def hook(module, args, output):
            if active():
                store[layer] = output
        return hook

    def _query_heads(self, layer: int, rows: slice) -> torch.Tensor:
        """Captured pre-RoPE queries of `layer` for the given token rows -> [q_heads, n, D]."""
        q = self._queries[layer][0, rows]
        return q.view(q.shape[0], self.memory.kv.q_heads, -1).transpose(0, 1)

    # ---- ingest -----------------------------------------------------------------------------------
    def begin_ingest(self, new_positions: torch.Tensor, observation_window: int | None):
        """Prefill of new tokens at `new_positions`, after prefix + attendable memory."""
        mem, kv = self.memory, self.memory.kv
        self.mode = "ingest"
        p, n_att, n = mem.prefix_len, mem.attendable_len(), new_positions.shape[0]
        self._parts = [b for b in mem.attendable_buffers() if b.len]
        self._mem_rope = self.rope(torch.arange(p, p + n_att, device=kv.device))
        self._new_rope = self.rope(new_positions)
        # one [prefix | memory | new] buffer, reused by every layer: the device runs layer i's
        # attention before layer i+1's update overwrites it (same stream, in order)
        self._keys = torch.empty(kv.kv_heads, p + n_att + n, kv.head_dim, dtype=kv.dtype, device=kv.device)
        self._values = torch.empty_like(self._keys)
        self._window = None if observation_window is None else min(observation_window, n)
        self._capture = observation_window is not None
        self.new_keys_pre, self.new_keys_rot, self.new_values, self.scores = [], [], [], []

    def _update_ingest(self, k_new, v_new, layer):
        mem = self.memory
        p, n = mem.prefix_len, k_new.shape[2]
        keys, values = self._keys, self._values
        if p:
            keys[:, :p], values[:, :p] = mem.prefix_keys[layer], mem.prefix_values[layer]
        start = p
        cos, sin = self._mem_rope
        for buf in self._parts:
            stop = start + buf.len
            rotate_into(keys[:, start:stop], buf.keys[layer], 0, cos[start - p:stop - p], sin[start - p:stop - p])
            values[:, start:stop] = buf.values[layer, :, :buf.len]
            start = stop
        keys[:, start:], values[:, start:] = k_new[0], v_new[0]
        self.new_keys_rot.append(k_new[0])
        pre = self._keys_pre.pop(layer)[0]                       # [n, kv_heads * D], as k_proj made it
        self.new_keys_pre.append(pre.view(n, -1, keys.shape[2]).transpose(0, 1))
        self.new_values.append(v_new[0])
        keys_out = keys[None]
        if self._window is not None:     # VSB's scores, once the attention has run (attention.py calls this)
            keys_out.livevlm_on_lse = functools.partial(self._scores_after_attention, layer, keys)
        return keys_out, values[None]

    def _scores_after_attention(self, layer: int, keys: torch.Tensor, query: torch.Tensor,
                                lse: torch.Tensor | None, scale: float):
        """VSB's scores of this layer: from the rows' log-sum-exp the flash kernel returned with the
        attention (query [1, q_heads, n, D] after RoPE), or computed in full where it returned none."""
        if lse is None or not fused_available(keys):
            self.scores.append(self._observation_scores(layer, keys))
            return
        kv, r, n = self.memory.kv, self._window, query.shape[2]
        q = query[0, :, n - r:].reshape(kv.kv_heads, -1, query.shape[-1])    # query heads grouped by kv head
        received = attention_received_from_lse(q, keys, r, lse[0, :, n - r:n].reshape(kv.kv_heads, -1), scale)
        self.scores.append(received.sum(dim=0) / (kv.q_heads * r))

    def _observation_scores(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """Mean softmax attention that the last r new tokens pay to every key, [n_keys]."""
        cos, sin = self._new_rope
        n_new, r = cos.shape[0], self._window
        return self._attention_received(layer, slice(n_new - r, n_new), cos[-r:], sin[-r:], keys)

    def _attention_received(self, layer: int, rows: slice, cos, sin, keys: torch.Tensor,
                            weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean softmax attention that the captured query `rows` (of this forward, at the positions
        cos/sin give) pay to `keys`, whose last r = len(rows) columns are those rows' own keys, [n_keys].
        Only these r rows are computed (per kv head: group*r x n_keys), never the full matrix.
        `weights` [r] (0/1): average over the rows weighted 1 only (a padded question)."""
        q = apply_rope(self._query_heads(layer, rows), cos, sin)             # [q_heads, r, D]
        kv_heads, _, D = keys.shape
        q_heads, r = q.shape[0], q.shape[1]
        q = (q.reshape(kv_heads, -1, D) * D ** -0.5).to(keys.dtype)      # query heads grouped by kv head
        folded = None if weights is None else weights.repeat(q.shape[1] // r)   # rows are (head in group, i)
        received = attention_received(q, keys, r, folded).sum(dim=0)      # [keys]
        return received / (q_heads * (r if weights is None else weights.sum(dtype=torch.float32)))

    def finish_ingest(self):
        # post-RoPE keys stay a per-layer list: only the prefix keeps them, so clips skip the copy
        out = (torch.stack(self.new_keys_pre), self.new_keys_rot, torch.stack(self.new_values),
               torch.stack(self.scores) if self.scores else None)
        self.reset()
        return out

    # ---- answer -----------------------------------------------------------------------------------
    def begin_answer(self, selector: ContextSelector, question_rows: slice, max_new_tokens: int,
                     window: tuple[int, int] | None = None, evidence_rows: slice | None = None,
                     row_weights: torch.Tensor | None = None) -> int:
        """Returns the position of the answer's first token. `window`: the stream tokens [a, b) it may
        read; `evidence_rows`: rows of the first forward whose attention to memory is measured per
        frame (`frame_attention()`); `row_weights` (0/1, one per question row; the same rows serve
        evidence): which of them count, when the question is padded to a fixed length."""
        mem, kv = self.memory, self.memory.kv
        self.mode = "answer"
        self._plan = selector.plan(mem, window)
        self._question_rows, self._room, self._row_weights = question_rows, max_new_tokens, row_weights
        n_short = self._plan.short_to - self._plan.short_from
        self._n_ctx = [n + n_short for n in self._plan.n_long]
        # layers may read different numbers of tokens (a time window): each layer's context ends
        # right before the question, so the newest memory is as close to it on every layer
        self.context_tokens = max(self._n_ctx)
        p = mem.prefix_len
        self._ctx_rope = self.rope(torch.arange(p, p + self.context_tokens, device=kv.device))
        start = p + self.context_tokens
        self._evidence_rows = evidence_rows
        self.evidence = None
        if evidence_rows is not None:
            # per frame number, over all layers: attention drawn, and tokens that drew it (sized in
            # steps of 4096 frames, so that a captured prefill outlives many new frames)
            frames = -(-(mem.frames_ingested + 1) // 4096) * 4096
            self.evidence = torch.zeros(2, frames, dtype=torch.float32, device=kv.device)
            self._evidence_rope = self.rope(torch.arange(start + evidence_rows.start, start + evidence_rows.stop,
                                                         device=kv.device))
        self._capture = self._plan.uses_question or evidence_rows is not None
        self._answer_k: dict[int, torch.Tensor] = {}     # per layer: context + question + room to decode
        self._answer_v: dict[int, torch.Tensor] = {}
        self._answer_len: dict[int, int] = {}
        return start

    def pages(self) -> tuple[int, int]:
        return self._plan.pages_used, self._plan.pages_total

    def _update_answer(self, k_new, v_new, layer):
        first = layer not in self._answer_k
        if first:
            self._build_answer_context(layer, k_new.shape[2])
        start = self._answer_len[layer]
        stop = start + k_new.shape[2]
        self._answer_k[layer][:, start:stop] = k_new[0]
        self._answer_v[layer][:, start:stop] = v_new[0]
        self._answer_len[layer] = stop
        keys = self._answer_k[layer][None, :, :stop]
        if first and self._evidence_rows is not None:
            kv = self.memory.kv
            if hands_probabilities(kv.q_heads // kv.kv_heads, k_new.shape[2]):
                # the attention's own probabilities (attention.py calls this with them)
                keys.livevlm_on_probs = functools.partial(self._evidence_from_probs, start, k_new.shape[2])
            else:
                self._add_evidence(layer, start)
        return keys, self._answer_v[layer][None, :, :stop]

    def _build_answer_context(self, layer: int, n_question: int):
        """prefix + the long-term tokens this layer reads + short-term memory, re-rotated to
        positions that end right before the question, in one buffer with room for the question
        and the answer."""
        mem, kv, plan = self.memory, self.memory.kv, self._plan
        q = self._query_heads(layer, self._question_rows) if plan.uses_question else None
        index = plan.long_index(layer, q, self._row_weights)
        long_k, long_v = mem.long.keys[layer, :, :mem.long.len], mem.long.values[layer, :, :mem.long.len]
        if index is not None:
            index = index.to(long_k.device)
        if self.record_selection or self._evidence_rows is not None:    # which tokens were read: on request
            long_idx, long_sink = mem.long.token_idx[layer, :mem.long.len], mem.long.sink[layer, :mem.long.len]
            if index is not None:
                long_idx, long_sink = long_idx[index], long_sink[index]
            if self.record_selection:
                self.last_selection[layer] = long_idx.cpu()
        s0, s1 = plan.short_from, plan.short_to
        p, n_ctx = mem.prefix_len, self._n_ctx[layer]
        size = (kv.kv_heads, p + n_ctx + n_question + self._room, kv.head_dim)
        if self.arena_capacity >= size[1]:
            keys, values = self._arena_k[layer], self._arena_v[layer]
        else:
            keys = torch.empty(size, dtype=kv.dtype, device=kv.device)
            values = torch.empty_like(keys)
        n_long = len(index) if index is not None else long_k.shape[1]
        keys[:, :p], values[:, :p] = mem.prefix_keys[layer], mem.prefix_values[layer]
        # gathered and rotated in one pass (rope.rotate_into); the context ends right before the question
        cos, sin = self._ctx_rope
        gap = self.context_tokens - n_ctx
        at_long, at_short = slice(gap, gap + n_long), slice(gap + n_long, gap + n_ctx)
        rotate_into(keys[:, p:p + n_long], long_k, 0 if index is None else index, cos[at_long], sin[at_long])
        values[:, p:p + n_long] = (long_v if index is None else long_v[:, index]).to(kv.device, non_blocking=True)
        rotate_into(keys[:, p + n_long:p + n_ctx], mem.short.keys[layer], s0, cos[at_short], sin[at_short])
        values[:, p + n_long:p + n_ctx] = mem.short.values[layer, :, s0:s1]
        self._answer_k[layer], self._answer_v[layer], self._answer_len[layer] = keys, values, p + n_ctx
        if self._evidence_rows is not None:
            self._ctx_frames = torch.cat([long_idx.to(kv.device), mem.short.token_idx[layer, s0:s1]]) \
                // mem.tokens_per_frame
            self._ctx_content = torch.cat([~long_sink.to(kv.device),
                                           torch.ones(s1 - s0, dtype=torch.bool, device=kv.device)]).float()

    def _add_evidence(self, layer: int, context_end: int):
        """Attention the evidence rows pay to this layer's memory tokens, computed here (a forward
        whose attention writes no probabilities out: many new tokens)."""
        rows, (cos, sin) = self._evidence_rows, self._evidence_rope
        keys = self._answer_k[layer][:, :context_end + rows.stop]
        received = self._attention_received(layer, rows, cos, sin, keys, self._row_weights)
        self._add_per_frame(received[self.memory.prefix_len:context_end])

    def _evidence_from_probs(self, context_end: int, n_new: int, probs: torch.Tensor):
        """The same from the attention's own probabilities [1, kv_heads, groups * n_new, keys] (rows
        are (head in group, new token)): their mean over the query heads and the evidence rows."""
        kv, rows = self.memory.kv, self._evidence_rows
        picked = probs[0].view(kv.kv_heads, -1, n_new, probs.shape[-1])[:, :, rows, self.memory.prefix_len:context_end]
        if self._row_weights is None:
            received = picked.sum(dim=(0, 1, 2)) / (kv.q_heads * picked.shape[2])
        else:
            w = self._row_weights.to(picked.dtype)
            received = torch.einsum("hgrk,r->k", picked, w) / (kv.q_heads * w.sum())
        self._add_per_frame(received)

    def _add_per_frame(self, received: torch.Tensor):
        """Attention drawn by this layer's memory tokens, added up per frame. Vision sinks are left
        out: they are kept because they draw attention from every query (attention sinks), so what
        they draw says nothing about what the question is about."""
        self.evidence[0].index_add_(0, self._ctx_frames, received * self._ctx_content)
        self.evidence[1].index_add_(0, self._ctx_frames, self._ctx_content)

    def forget_padding(self, n: int):
        """The last n tokens of the answer's first forward were padding (question_step.py): the
        answer goes on from before them, and decoding writes over their KV."""
        for layer in self._answer_len:
            self._answer_len[layer] -= n

    _ANSWER_STATE = ("mode", "_plan", "_answer_k", "_answer_v", "_answer_len", "context_tokens", "evidence")

    def answer_state(self) -> dict:
        """What the host knows after an answer's first forward (question_step.py records it with
        the forward's graph, and puts it back when it replays that graph)."""
        state = {name: getattr(self, name) for name in self._ANSWER_STATE}
        state["_answer_len"] = dict(state["_answer_len"])
        return state

    def restore_answer_state(self, state: dict):
        for name, value in state.items():
            setattr(self, name, dict(value) if name == "_answer_len" else value)

    def frame_attention(self) -> torch.Tensor:
        """After an answer's first forward with evidence rows: per frame number, the mean attention
        one of its tokens drew (0 for frames not read). A mean, not a sum: a long-past frame that
        compression left a few tokens of competes on equal terms with the whole recent frames."""
        drawn, tokens = self.evidence
        return drawn / tokens.clamp_min(1)

    # ---- shared -----------------------------------------------------------------------------------
    def reset(self):
        """Leave any mode, dropping everything an unfinished ingest or an answer built."""
        self.mode, self._capture = None, False
        self._queries.clear()
        self._keys_pre.clear()
        self._answer_k = self._answer_v = self._keys = self._values = self._parts = None
        self._evidence_rows = self._ctx_frames = self._ctx_content = self._row_weights = None
        self.new_keys_pre = self.new_keys_rot = self.new_values = self.scores = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.mode == "ingest":
            return self._update_ingest(key_states, value_states, layer_idx)
        if self.mode == "answer":
            return self._update_answer(key_states, value_states, layer_idx)
        if self.mode == "decode":
            return self._update_decode(key_states, value_states, layer_idx)
        raise RuntimeError("MemoryKVHook used outside begin_ingest/begin_answer")

    # transformers may ask a cache these; our positions and masks are always given explicitly
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return False
