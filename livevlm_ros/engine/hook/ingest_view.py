"""One clip's prefill against memory, as the model's attention layers see it.

Each layer's `update` gets the clip's post-RoPE keys and hands back [prefix | memory | clip]: the
prefix as stored (post-RoPE), memory's pre-RoPE keys rotated to where `place` puts them (right
after the prefix; hook/positions.py), then the clip. Along the way the view keeps what memory will
store of the clip: its pre-RoPE keys, exactly as each layer's key projection made them (the hook
captures them), and its values.

For VSB it also measures the vision-to-vision attention the clip's last `window` tokens paid every
token, once each layer's attention has run (hook/attention.py calls back with the rows' queries,
after RoPE, and their log-sum-exp where its flash kernel returned one). A layer that never calls
back is an error, not a zero score: VSB would silently keep the wrong tokens.
"""

from __future__ import annotations

import functools

import torch

from ..memory.streaming_memory import StreamingMemory
from .received import attention_received


class IngestView:
    def __init__(self, memory: StreamingMemory, place, keys_pre: dict[int, torch.Tensor], n: int,
                 window: int | None):
        """place: where memory's tokens sit (hook/positions.py); n: new tokens."""
        kv = memory.kv
        self.memory, self._keys_pre_captured, self.place = memory, keys_pre, place
        p, n_att = memory.prefix_len, memory.attendable_len()
        self._parts = [b for b in memory.attendable_buffers() if b.len]
        # one [prefix | memory | new] buffer, reused by every layer: the device runs layer i's
        # attention before layer i+1's update overwrites it (same stream, in order)
        self._keys = torch.empty(kv.kv_heads, p + n_att + n, kv.head_dim, dtype=kv.dtype, device=kv.device)
        self._values = torch.empty_like(self._keys)
        self.window = None if window is None else min(window, n)
        self.keys_pre, self.keys_rot, self.values = [], [], []
        self.scores: dict[int, torch.Tensor] = {}

    def update(self, k_new, v_new, layer: int):
        mem = self.memory
        p, n = mem.prefix_len, k_new.shape[2]
        keys, values = self._keys, self._values
        if p:
            keys[:, :p], values[:, :p] = mem.prefix_keys[layer], mem.prefix_values[layer]
        start = p
        for buf in self._parts:
            stop = start + buf.len
            cos, sin = self.place.rope(layer, buf, slice(0, buf.len), slice(start - p, stop - p))
            # dequantized here where the tier is int8: one layer's rows at a time (kv_buffer.py)
            buf.read_keys(keys[:, start:stop], layer, 0, cos, sin)
            buf.read_values(values[:, start:stop], layer, 0)
            start = stop
        keys[:, start:], values[:, start:] = k_new[0], v_new[0]
        self.keys_rot.append(k_new[0])
        pre = self._keys_pre_captured.pop(layer)[0]              # [n, kv_heads * D], as k_proj made it
        self.keys_pre.append(pre.view(n, -1, keys.shape[2]).transpose(0, 1))
        self.values.append(v_new[0])
        keys_out = keys[None]
        if self.window is not None:
            keys_out.livevlm_on_lse = functools.partial(self._score, layer, keys)
        return keys_out, values[None]

    def _score(self, layer: int, keys: torch.Tensor, query: torch.Tensor, lse: torch.Tensor | None, scale: float):
        """VSB's scores of this layer: the mean attention the window's rows (query [1, q_heads, n, D],
        after RoPE) paid every key, [n_keys]."""
        kv, r, n = self.memory.kv, self.window, query.shape[2]
        q = query[0, :, n - r:].reshape(kv.kv_heads, -1, query.shape[-1])    # query heads grouped by kv head
        if lse is not None:
            lse = lse[0, :, n - r:n].reshape(kv.kv_heads, -1)
        received = attention_received(q, keys, r, lse=lse, scale=scale)
        self.scores[layer] = received.sum(dim=0) / (kv.q_heads * r)

    def finish(self) -> tuple:
        """(pre-RoPE keys [L, H, n, D], post-RoPE keys per layer, values [L, H, n, D], VSB's scores
        [L, p + memory + n] or None). Post-RoPE keys stay a per-layer list: only the prefix keeps
        them, so clips skip the copy."""
        layers = self.memory.kv.layers
        scores = None
        if self.window is not None:
            missing = [layer for layer in range(layers) if layer not in self.scores]
            if missing:
                raise RuntimeError(
                    f"VSB has no scores for layers {missing[:8]}{'...' if len(missing) > 8 else ''}: the model's "
                    "attention did not call back after attending (is it running hook/attention.py's attention?)")
            scores = torch.stack([self.scores[layer] for layer in range(layers)])
        return torch.stack(self.keys_pre), self.keys_rot, torch.stack(self.values), scores
