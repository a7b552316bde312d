"""A growable block of KV for all layers at once, with per-token bookkeeping.

Layout: keys/values [layers, kv_heads, tokens, head_dim]; bookkeeping [layers, tokens]. Keeping
all layers in one tensor lets every memory operation (append, keep, evict) be one kernel for the
whole model instead of one per layer. Capacity doubles when exceeded, so a bounded tier whose
capacity is given up front never reallocates (its footprint is flat), and an unbounded tier grows
in amortised O(1) per token instead of copying itself on every append.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.base import KVShape


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
    def __init__(self, kv: KVShape, device: torch.device | str, capacity: int = 0, pin: bool = False):
        self.kv, self.device, self.pin = kv, torch.device(device), pin
        self.len = 0
        self._alloc(max(capacity, 1))

    def _alloc(self, capacity: int):
        L, H, D = self.kv.layers, self.kv.kv_heads, self.kv.head_dim

        def empty(*shape, dtype):
            t = torch.empty(*shape, dtype=dtype, device=self.device)
            return t.pin_memory() if self.pin else t

        old = self.view() if hasattr(self, "keys") else None
        self.keys = empty(L, H, capacity, D, dtype=self.kv.dtype)
        self.values = empty(L, H, capacity, D, dtype=self.kv.dtype)
        self.token_idx = empty(L, capacity, dtype=torch.int64)
        self.score = empty(L, capacity, dtype=torch.float32)
        self.score_sum = empty(L, capacity, dtype=torch.float32)
        self.sink = empty(L, capacity, dtype=torch.bool)
        self.capacity = capacity
        if old is not None and old.n:
            self._write(0, old)

    def _write(self, start: int, t: Tokens):
        stop = start + t.n
        self.keys[:, :, start:stop].copy_(t.keys)
        self.values[:, :, start:stop].copy_(t.values)
        for name in Tokens.BOOKKEEPING:
            getattr(self, name)[:, start:stop].copy_(getattr(t, name))

    def view(self) -> Tokens:
        n = self.len
        return Tokens(self.keys[:, :, :n], self.values[:, :, :n], *(getattr(self, f)[:, :n] for f in Tokens.BOOKKEEPING))

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
        index = index.to(self.device)
        for name in Tokens.BOOKKEEPING:
            t = getattr(self, name)
            t[:, :m] = t[:, :self.len].gather(1, index)
        self.len = m

    def pop_front(self, n: int) -> Tokens:
        """Remove and return the oldest n tokens (a copy; the rest moves to the front)."""
        n = min(n, self.len)
        front = Tokens(*(x.clone() for x in self.view().slice(0, n).fields()))
        rest = Tokens(*(x.clone() for x in self.view().slice(n).fields()))
        self.len = 0
        self.append(rest)
        return front
