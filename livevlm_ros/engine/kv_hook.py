"""The cache object the language model's attention layers call: our one hook into model code.

transformers' attention layers call `cache.update(key_states, value_states, layer_idx, ...)` with
the new tokens' post-RoPE keys and attend to whatever comes back. That is where this hook works:
  ingest  - hands back memory (pre-RoPE keys rotated to fresh positions) + the new clip, keeps the
            clip's pre-RoPE keys exactly as each layer's key projection made them, and, for VSB,
            measures the vision-to-vision attention the clip's last `observation_window` tokens pay
            to every token (pre-RoPE queries and keys come from forward hooks on each layer's
            q_proj / k_proj, because update() sees only rotated keys and no queries);
  answer  - on the first call per layer, asks the retrieval plan which long-term tokens this layer
            reads (PaR scores pages with the question's pre-RoPE queries), assembles the context in
            a buffer with room for the answer, then appends in place while the answer is decoded.
            Nothing is written back into memory: when the answer ends, the buffers are dropped.
Nothing here waits for the device (no .item(), no nonzero()), so the host can run ahead.
"""

from __future__ import annotations

import torch

from .memory import StreamingMemory
from .retrieval import ContextSelector
from .rope import apply_rope


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
        self._mem_rope = self.rope(torch.arange(p, p + n_att))
        self._new_rope = self.rope(new_positions)
        # one [prefix | memory | new] buffer, reused by every layer: the device runs layer i's
        # attention before layer i+1's update overwrites it (same stream, in order)
        self._keys = torch.empty(kv.kv_heads, p + n_att + n, kv.head_dim, dtype=kv.dtype, device=kv.device)
        self._values = torch.empty_like(self._keys)
        self._window = None if observation_window is None else min(observation_window, n)
        self._capture = observation_window is not None
        if self._capture:
            # window row i sees every key before the window and window keys <= i: only the last
            # r columns are ever masked
            r = self._window
            blocked = torch.ones(r, r, dtype=torch.bool, device=kv.device).triu(1)
            self._blocked = blocked.repeat(kv.q_heads // kv.kv_heads, 1)       # rows: (head in group, query)
        self.new_keys_pre, self.new_keys_rot, self.new_values, self.scores = [], [], [], []

    def _update_ingest(self, k_new, v_new, layer):
        mem = self.memory
        p, n = mem.prefix_len, k_new.shape[2]
        keys, values = self._keys, self._values
        if p:
            keys[:, :p], values[:, :p] = mem.prefix_keys[layer], mem.prefix_values[layer]
        start = p
        for buf in self._parts:
            stop = start + buf.len
            keys[:, start:stop] = buf.keys[layer, :, :buf.len]
            values[:, start:stop] = buf.values[layer, :, :buf.len]
            start = stop
        if start > p:
            cos, sin = self._mem_rope
            keys[:, p:start] = apply_rope(keys[:, p:start], cos, sin)
        keys[:, start:], values[:, start:] = k_new[0], v_new[0]
        self.new_keys_rot.append(k_new[0])
        pre = self._keys_pre.pop(layer)[0]                       # [n, kv_heads * D], as k_proj made it
        self.new_keys_pre.append(pre.view(n, -1, keys.shape[2]).transpose(0, 1))
        self.new_values.append(v_new[0])
        if self._window is not None:
            self.scores.append(self._observation_scores(layer, keys))
        return keys[None], values[None]

    def _observation_scores(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """Mean softmax attention that the last r new tokens pay to every key, [n_keys]. Only the
        r observation rows are computed (per kv head: group*r x n_keys), never the full matrix."""
        r = self._window
        cos, sin = self._new_rope
        n_new = cos.shape[0]
        q = apply_rope(self._query_heads(layer, slice(n_new - r, n_new)), cos[-r:], sin[-r:])
        kv_heads, _, D = keys.shape
        q = (q.reshape(kv_heads, -1, D) * D ** -0.5).to(keys.dtype)      # query heads grouped by kv head
        # [kv_heads, rows, keys] is the largest thing VSB touches (7 x 196 rows x 12k keys per kv
        # head at 7B shapes): it stays in the model's dtype, so every pass over it moves half the
        # bytes of float32 (softmax and the row sum still accumulate in float32)
        logits = torch.matmul(q, keys.transpose(1, 2))
        logits[..., -r:].masked_fill_(self._blocked, float("-inf"))
        received = logits.softmax(dim=-1).sum(dim=1, dtype=torch.float32)   # [kv_heads, keys]
        return received.sum(dim=0) / (q.shape[0] * q.shape[1])

    def finish_ingest(self):
        # post-RoPE keys stay a per-layer list: only the prefix keeps them, so clips skip the copy
        out = (torch.stack(self.new_keys_pre), self.new_keys_rot, torch.stack(self.new_values),
               torch.stack(self.scores) if self.scores else None)
        self.reset()
        return out

    # ---- answer -----------------------------------------------------------------------------------
    def begin_answer(self, selector: ContextSelector, question_rows: slice, max_new_tokens: int):
        mem = self.memory
        self.mode = "answer"
        self._plan = selector.plan(mem)
        self._question_rows, self._room = question_rows, max_new_tokens
        self.context_tokens = self._plan.n_long + mem.short.len - self._plan.short_from
        p = mem.prefix_len
        self._ctx_rope = self.rope(torch.arange(p, p + self.context_tokens))
        self._capture = self._plan.uses_question
        self._answer_k: dict[int, torch.Tensor] = {}     # per layer: context + question + room to decode
        self._answer_v: dict[int, torch.Tensor] = {}
        self._answer_len: dict[int, int] = {}
        return p + self.context_tokens

    def pages(self) -> tuple[int, int]:
        return self._plan.pages_used, self._plan.pages_total

    def _update_answer(self, k_new, v_new, layer):
        if layer not in self._answer_k:
            self._build_answer_context(layer, k_new.shape[2])
        start = self._answer_len[layer]
        stop = start + k_new.shape[2]
        self._answer_k[layer][:, start:stop] = k_new[0]
        self._answer_v[layer][:, start:stop] = v_new[0]
        self._answer_len[layer] = stop
        return self._answer_k[layer][None, :, :stop], self._answer_v[layer][None, :, :stop]

    def _build_answer_context(self, layer: int, n_question: int):
        """prefix + the long-term tokens this layer reads + short-term memory, re-rotated to
        positions p.., in one buffer with room for the question and the answer."""
        mem, kv = self.memory, self.memory.kv
        q = self._query_heads(layer, self._question_rows) if self._plan.uses_question else None
        index = self._plan.long_index(layer, q)
        long_k, long_v = mem.long.keys[layer, :, :mem.long.len], mem.long.values[layer, :, :mem.long.len]
        if index is not None:
            index = index.to(long_k.device)
            long_k, long_v = long_k[:, index], long_v[:, index]
            if self.record_selection:
                self.last_selection[layer] = mem.long.token_idx[layer, index].cpu()
        elif self.record_selection:
            self.last_selection[layer] = mem.long.token_idx[layer, :mem.long.len].cpu()
        s0, s1 = self._plan.short_from, mem.short.len
        p, n_ctx = mem.prefix_len, self.context_tokens
        size = (kv.kv_heads, p + n_ctx + n_question + self._room, kv.head_dim)
        keys = torch.empty(size, dtype=kv.dtype, device=kv.device)
        values = torch.empty_like(keys)
        n_long = long_k.shape[1]
        keys[:, :p], values[:, :p] = mem.prefix_keys[layer], mem.prefix_values[layer]
        keys[:, p:p + n_long] = long_k.to(kv.device, non_blocking=True)
        values[:, p:p + n_long] = long_v.to(kv.device, non_blocking=True)
        keys[:, p + n_long:p + n_ctx] = mem.short.keys[layer, :, s0:s1]
        values[:, p + n_long:p + n_ctx] = mem.short.values[layer, :, s0:s1]
        cos, sin = self._ctx_rope
        keys[:, p:p + n_ctx] = apply_rope(keys[:, p:p + n_ctx], cos, sin)
        self._answer_k[layer], self._answer_v[layer], self._answer_len[layer] = keys, values, p + n_ctx

    # ---- shared -----------------------------------------------------------------------------------
    def reset(self):
        """Leave any mode, dropping everything an unfinished ingest or an answer built."""
        self.mode, self._capture = None, False
        self._queries.clear()
        self._keys_pre.clear()
        self._answer_k = self._answer_v = self._keys = self._values = self._parts = None
        self.new_keys_pre = self.new_keys_rot = self.new_values = self.scores = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.mode == "ingest":
            return self._update_ingest(key_states, value_states, layer_idx)
        if self.mode == "answer":
            return self._update_answer(key_states, value_states, layer_idx)
        raise RuntimeError("MemoryKVHook used outside begin_ingest/begin_answer")

    # transformers may ask a cache these; our positions and masks are always given explicitly
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return False
