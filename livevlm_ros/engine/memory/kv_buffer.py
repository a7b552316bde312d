"""A growable block of KV for all layers at once, with per-token bookkeeping.

Layout: keys/values [layers, kv_heads, tokens, head_dim]; bookkeeping [layers, tokens]. Keeping
all layers in one tensor lets every memory operation (append, keep, evict) be one kernel for the
whole model instead of one per layer. Capacity doubles when exceeded, so a bounded tier whose
capacity is given up front never reallocates (its footprint is flat), and an unbounded tier grows
in amortised O(1) per token instead of copying itself on every append.

`quantized` (kv_dtype int8, the long-term tier): keys and values are stored as int8 with a float32
scale per token and head, keys also divided by per-channel factors fixed at the first write
(kv_quant.py). Tokens come in and go out at the model's dtype (`append`, `dense_view`); readers
that assemble a context read the int8 rows through `read_keys` / `read_values`, which dequantize
in the same pass as the gather (and the rotation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hook.rope import read_rows, rotate_into
from ..models.base import KVShape
from .kv_quant import channel_factors, dequantize_rows, quantize_rows


@dataclass
class Tokens:
    """A view of some tokens: the tensors a memory tier holds, sliced to what is in use."""
    keys: torch.Tensor        # pre-RoPE keys   [L, H, n, D]
    values: torch.Tensor      #                 [L, H, n, D]
    token_idx: torch.Tensor   # stream index    [L, n] int64 (global visual token counter)
    score: torch.Tensor       # attention received from the newest observation window [L, n] float32
    score_sum: torch.Tensor   # attention received, summed over all observations      [L, n] float32
    sink: torch.Tensor        # vision sink flag                                       [L, n] bool

    BOOKKEEPING = ("token_idx", "score", "score_sum", "sink")

    @property
    def n(self) -> int:
        return self.keys.shape[2]

    def fields(self):
        return (self.keys, self.values) + tuple(getattr(self, f) for f in self.BOOKKEEPING)

    @staticmethod
    def cat(a: "Tokens", b: "Tokens") -> "Tokens":
        """a's tokens, then b's (a copy)."""
        return Tokens(torch.cat([a.keys, b.keys], dim=2), torch.cat([a.values, b.values], dim=2),
                      *(torch.cat([getattr(a, f), getattr(b, f)], dim=1) for f in Tokens.BOOKKEEPING))

    def slice(self, start: int, stop: int | None = None) -> "Tokens":
        return Tokens(self.keys[:, :, start:stop], self.values[:, :, start:stop],
                      *(getattr(self, f)[:, start:stop] for f in self.BOOKKEEPING))


class KVBuffer:
    def __init__(self, kv: KVShape, device: torch.device | str, capacity: int = 0, pin: bool = False,
                 quantized: bool = False):
        self.kv, self.device, self.pin, self.quantized = kv, torch.device(device), pin, quantized
        self.len = 0
        if quantized:    # [L, H, D] float32: keys' channel factors, fixed by the first write (kv_quant.py)
            self.key_channel = torch.ones(kv.layers, kv.kv_heads, kv.head_dim, dtype=torch.float32, device=device)
            self.value_channel = torch.ones_like(self.key_channel)      # values: none
            self._calibrated = False
        self._alloc(max(capacity, 1))

    def _alloc(self, capacity: int):
        L, H, D = self.kv.layers, self.kv.kv_heads, self.kv.head_dim

        def empty(*shape, dtype):
            t = torch.empty(*shape, dtype=dtype, device=self.device)
            return t.pin_memory() if self.pin else t

        old = self.view() if hasattr(self, "keys") else None
        old_scales = (self.key_scale[:, :, :self.len], self.value_scale[:, :, :self.len]) if old is not None and self.quantized else None
        store = torch.int8 if self.quantized else self.kv.dtype
        self.keys = empty(L, H, capacity, D, dtype=store)
        self.values = empty(L, H, capacity, D, dtype=store)
        if self.quantized:
            self.key_scale = empty(L, H, capacity, dtype=torch.float32)
            self.value_scale = empty(L, H, capacity, dtype=torch.float32)
        self.token_idx = empty(L, capacity, dtype=torch.int64)
        self.score = empty(L, capacity, dtype=torch.float32)
        self.score_sum = empty(L, capacity, dtype=torch.float32)
        self.sink = empty(L, capacity, dtype=torch.bool)
        self.capacity = capacity
        if old is not None and old.n:                       # as stored: int8 rows are not quantized twice
            for mine, theirs in zip(self.view_at(old.n).fields(), old.fields()):
                mine.copy_(theirs)
            if old_scales is not None:
                self.key_scale[:, :, :old.n].copy_(old_scales[0])
                self.value_scale[:, :, :old.n].copy_(old_scales[1])

    def view_at(self, n: int) -> Tokens:
        return Tokens(self.keys[:, :, :n], self.values[:, :, :n], *(getattr(self, f)[:, :n] for f in Tokens.BOOKKEEPING))

    def _write(self, start: int, t: Tokens):
        stop = start + t.n
        if self.quantized:
            if not self._calibrated:                      # fixed from the first tokens stored (kv_quant.py),
                self.key_channel.copy_(channel_factors(t.keys))   # in place: graphs keep its address
                self._calibrated = True
            k, ks = quantize_rows(t.keys.to(self.device), self.key_channel)
            v, vs = quantize_rows(t.values.to(self.device))
            self.keys[:, :, start:stop].copy_(k)
            self.values[:, :, start:stop].copy_(v)
            self.key_scale[:, :, start:stop].copy_(ks)
            self.value_scale[:, :, start:stop].copy_(vs)
        else:
            self.keys[:, :, start:stop].copy_(t.keys)
            self.values[:, :, start:stop].copy_(t.values)
        for name in Tokens.BOOKKEEPING:
            getattr(self, name)[:, start:stop].copy_(getattr(t, name))

    def view(self) -> Tokens:
        """The tokens in use, as stored (int8 keys and values where quantized: for the bookkeeping)."""
        return self.view_at(self.len)

    def dense_view(self) -> Tokens:
        """The tokens in use at the model's dtype: the view itself, or a dequantized copy (int8)."""
        t = self.view()
        if not self.quantized:
            return t
        n = self.len
        return Tokens(dequantize_rows(t.keys, self.key_scale[:, :, :n], self.kv.dtype, self.key_channel),
                      dequantize_rows(t.values, self.value_scale[:, :, :n], self.kv.dtype),
                      *(getattr(t, f) for f in Tokens.BOOKKEEPING))

    def read_keys(self, out: torch.Tensor, layer: int, rows, cos, sin):
        """out [H, n, D] = this layer's keys at `rows` (an index or the first of n), rotated by
        cos/sin, dequantized in the same pass where int8 (rope.rotate_into)."""
        if self.quantized:
            rotate_into(out, self.keys[layer], rows, cos, sin, self.key_scale[layer], self.key_channel[layer])
        else:
            rotate_into(out, self.keys[layer], rows, cos, sin)

    def read_values(self, out: torch.Tensor, layer: int, rows):
        """out [H, n, D] = this layer's values at `rows`, dequantized where int8 (rope.read_rows)."""
        if self.quantized:
            read_rows(out, self.values[layer], rows, self.value_scale[layer], self.value_channel[layer])
        else:
            read_rows(out, self.values[layer], rows)

    def bytes_per_token(self) -> int:
        """Device bytes a stored token takes (keys, values and their scales; not the bookkeeping)."""
        e = self.keys.element_size()
        per = 2 * self.kv.layers * self.kv.kv_heads * self.kv.head_dim * e
        return per + (2 * self.kv.layers * self.kv.kv_heads * 4 if self.quantized else 0)

    def reserve(self, capacity: int):
        """Grow to hold `capacity` tokens now (e.g. a known stream length), not by doubling later."""
        if capacity > self.capacity:
            self._alloc(capacity)

    def append(self, t: Tokens):
        if self.len + t.n > self.capacity:
            self._alloc(max(2 * self.capacity, self.len + t.n))
        self._write(self.len, t)
        self.len += t.n

    def keep(self, index: torch.Tensor):
        """Keep only the tokens at `index` [L, m] (per layer, ascending), compacted to the front,
        in place. Keys and values move one layer at a time, so the extra memory this takes is one
        layer's share of the kept tokens, not a second copy of the tier."""
        m = index.shape[1]
        for layer in range(index.shape[0]):
            i = index[layer].to(self.device)
            # the right side is gathered into a temporary before the copy: safe although it aliases
            self.keys[layer, :, :m] = self.keys[layer, :, i]
            self.values[layer, :, :m] = self.values[layer, :, i]
            if self.quantized:                              # a token's scales travel with it
                self.key_scale[layer, :, :m] = self.key_scale[layer, :, i]
                self.value_scale[layer, :, :m] = self.value_scale[layer, :, i]
        index = index.to(self.device)
        for name in Tokens.BOOKKEEPING:
            t = getattr(self, name)
            t[:, :m] = t[:, :self.len].gather(1, index)
        self.len = m

    def pop_front(self, n: int) -> Tokens:
        """Remove and return the oldest n tokens (a copy; the rest moves to the front)."""
        n = min(n, self.len)
        front = Tokens(*(x.clone() for x in self.dense_view().slice(0, n).fields()))
        rest = Tokens(*(x.clone() for x in self.dense_view().slice(n).fields()))
        self.len = 0
        self.append(rest)
        return front
