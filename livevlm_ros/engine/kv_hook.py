"""The cache object the language model's attention layers call: our one hook into model code.

transformers' attention layers call `cache.update(key_states, value_states, layer_idx, ...)` with
the new tokens' post-RoPE keys and attend to whatever comes back. That is where this hook works:
  ingest  - hands back memory (pre-RoPE keys rotated to fresh positions) + the new clip, keeps the
            clip's pre-RoPE keys, and, for VSB, measures the vision-to-vision attention the clip's
            last `observation_window` tokens pay to every token (queries come from a forward hook
            on each layer's query projection, because update() does not see queries);
  answer  - on the first call per layer, asks the selector which long-term tokens this layer reads
            (PaR scores pages with the question's pre-RoPE queries), assembles the context, and
            then grows it token by token while the answer is decoded. Nothing is written back into
            memory: when the answer ends, the whole answer context is dropped.
"""

from __future__ import annotations

import torch

from .kv_buffer import Tokens
from .memory import StreamingMemory
from .retrieval import ContextSelector
from .rope import apply_rope, remove_rope


class MemoryKVHook:
    def __init__(self, memory: StreamingMemory, rope, query_modules: list[torch.nn.Module]):
        self.memory, self.rope = memory, rope
        self._queries: dict[int, torch.Tensor] = {}
        self._capture = False
        for i, module in enumerate(query_modules):
            module.register_forward_hook(self._query_hook(i))
        self.mode = None
        # For tests and benchmarks: the stream indices of the long-term tokens each layer read in
        # the last answer (off by default: it costs a device->host copy per layer).
        self.record_selection = False
        self.last_selection: dict[int, torch.Tensor] = {}

    def _query_hook(self, layer: int):
        def hook(module, args, output):
            if self._capture:
                self._queries[layer] = output
        return hook

    def _query_heads(self, layer: int, rows: slice) -> torch.Tensor:
        """Captured pre-RoPE queries of `layer` for the given token rows -> [q_heads, n, D]."""
        q = self._queries[layer][0, rows]
        return q.view(q.shape[0], self.memory.kv.q_heads, -1).transpose(0, 1)

    # ---- ingest -----------------------------------------------------------------------------------
    def begin_ingest(self, new_positions: torch.Tensor, observation_window: int | None):
        """Prefill of new tokens at `new_positions`, after prefix + attendable memory."""
        mem = self.memory
        self.mode = "ingest"
        self._ctx = mem.attendable() if mem.prefix_keys is not None else None
        p = mem.prefix_len
        n_ctx = self._ctx.n if self._ctx is not None else 0
        self._ctx_rope = self.rope(torch.arange(p, p + n_ctx))
        self._new_rope = self.rope(new_positions)
        self._window = observation_window
        self._capture = observation_window is not None
        self.new_keys_pre, self.new_keys_rot, self.new_values, self.scores = [], [], [], []

    def _update_ingest(self, k_new, v_new, layer):
        cos, sin = self._new_rope
        self.new_keys_rot.append(k_new[0])
        self.new_keys_pre.append(remove_rope(k_new[0], cos, sin))
        self.new_values.append(v_new[0])
        keys, values = self._context(layer, self._ctx, self._ctx_rope)
        keys, values = torch.cat([keys, k_new[0]], 1), torch.cat([values, v_new[0]], 1)
        if self._window is not None:
            self.scores.append(self._observation_scores(layer, keys))
        return keys[None], values[None]

    def _observation_scores(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """Mean softmax attention that the last r new tokens pay to every key, [n_keys].
        Computed one kv-head group at a time: never more than (group * r) x n_keys scores live."""
        n_new = self._new_rope[0].shape[0]
        r = min(self._window, n_new)
        cos, sin = self._new_rope
        q = apply_rope(self._query_heads(layer, slice(n_new - r, n_new)), cos[-r:], sin[-r:])
        kv_heads, n_keys, D = keys.shape
        group = q.shape[0] // kv_heads
        # causal: query j of the window sits at key position n_keys - r + j
        blocked = torch.arange(n_keys, device=keys.device)[None] > (n_keys - r + torch.arange(r, device=keys.device))[:, None]
        total = torch.zeros(n_keys, dtype=torch.float32, device=keys.device)
        for h in range(kv_heads):
            logits = (q[h * group:(h + 1) * group].float() @ keys[h].float().T) * D ** -0.5
            total += logits.masked_fill(blocked, float("-inf")).softmax(-1).sum(dim=(0, 1))
        return total / (q.shape[0] * r)

    def finish_ingest(self):
        out = (torch.stack(self.new_keys_pre), torch.stack(self.new_keys_rot), torch.stack(self.new_values),
               torch.stack(self.scores) if self.scores else None)
        self.new_keys_pre = self.new_keys_rot = self.new_values = self.scores = None
        self.reset()
        return out

    # ---- answer -----------------------------------------------------------------------------------
    def begin_answer(self, selector: ContextSelector, question_rows: slice, max_new_tokens: int):
        mem = self.memory
        self.mode = "answer"
        self._selector, self._question_rows = selector, question_rows
        self._room = max_new_tokens
        n_long, self._short_from = selector.plan(mem)
        self.context_tokens = n_long + mem.short.len - self._short_from
        p = mem.prefix_len
        self._ctx_rope = self.rope(torch.arange(p, p + self.context_tokens))
        self._capture = selector.uses_question
        self._answer_k: dict[int, torch.Tensor] = {}     # per layer: context + question + room to decode
        self._answer_v: dict[int, torch.Tensor] = {}
        self._answer_len: dict[int, int] = {}
        return p + self.context_tokens

    def _update_answer(self, k_new, v_new, layer):
        if layer not in self._answer_k:                      # question prefill: build the context
            mem = self.memory
            q = self._query_heads(layer, self._question_rows) if self._selector.uses_question else None
            index = self._selector.select_long(mem, layer, q)
            if self.record_selection:
                chosen = mem.long.view().token_idx[layer]
                self.last_selection[layer] = (chosen if index is None else chosen[index]).cpu()
            long = mem.long.view().slice(0, None)
            long_layer = _layer(long, layer, index)
            short_layer = _layer(mem.short.view().slice(self._short_from), layer, None)
            ctx = Tokens.cat([long_layer.to(mem.kv.device, non_blocking=True), short_layer])
            keys, values = self._context(layer, ctx, self._ctx_rope, layer_sliced=True)
            # one allocation per answer: decoding writes in place instead of re-copying the context
            n = keys.shape[1]
            size = (keys.shape[0], n + k_new.shape[2] + self._room, keys.shape[2])
            self._answer_k[layer] = keys.new_empty(size)
            self._answer_v[layer] = values.new_empty(size)
            self._answer_k[layer][:, :n] = keys
            self._answer_v[layer][:, :n] = values
            self._answer_len[layer] = n
        start = self._answer_len[layer]
        stop = start + k_new.shape[2]
        self._answer_k[layer][:, start:stop] = k_new[0]
        self._answer_v[layer][:, start:stop] = v_new[0]
        self._answer_len[layer] = stop
        return self._answer_k[layer][None, :, :stop], self._answer_v[layer][None, :, :stop]

    def reset(self):
        """Leave any mode, dropping everything an unfinished ingest or an answer built."""
        self.mode, self._capture, self._queries = None, False, {}
        self._answer_k = self._answer_v = self._ctx = None

    # ---- shared -----------------------------------------------------------------------------------
    def _context(self, layer, ctx: Tokens | None, rope, layer_sliced=False):
        """prefix (post-RoPE) + ctx keys rotated to the positions right after it."""
        mem = self.memory
        if mem.prefix_keys is None:
            empty = torch.empty(mem.kv.kv_heads, 0, mem.kv.head_dim, dtype=mem.kv.dtype, device=mem.kv.device)
            return empty, empty
        if ctx is None or ctx.n == 0:
            return mem.prefix_keys[layer], mem.prefix_values[layer]
        k = ctx.keys[0] if layer_sliced else ctx.keys[layer]
        v = ctx.values[0] if layer_sliced else ctx.values[layer]
        cos, sin = rope
        return (torch.cat([mem.prefix_keys[layer], apply_rope(k, cos, sin)], 1),
                torch.cat([mem.prefix_values[layer], v], 1))

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


def _layer(t: Tokens, layer: int, index: torch.Tensor | None) -> Tokens:
    """One layer of `t` (kept 4-D with a layer axis of 1), optionally only the tokens at `index`."""
    keys, values = t.keys[layer:layer + 1], t.values[layer:layer + 1]
    if index is not None:
        keys, values = keys[:, :, index], values[:, :, index]
    return Tokens(keys, values, *(x[layer:layer + 1] if index is None else x[layer:layer + 1, index]
                                  for x in (t.token_idx, t.score_sum, t.score_cnt, t.sink)))
