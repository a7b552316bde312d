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

from .models.base import KVShape


@dataclass
class Tokens:
    """A view of some tokens: the tensors a memory tier holds, sliced to what is in use."""
    keys: torch.Tensor        # pre-RoPE keys   [L, H, n, D]
    values: torch.Tensor      #                 [L, H, n, D]
    token_idx: torch.Tensor   # stream index    [L, n] int64 (global visual token counter)
    score_sum: torch.Tensor   # attention received, summed over observations [L, n] float32
    score_cnt: torch.Tensor   # number of observations                      [L, n] float32
    sink: torch.Tensor        # vision sink flag                             [L, n] bool

    @property
    def n(self) -> int:
        return self.keys.shape[2]

    def scores(self) -> torch.Tensor:
        return self.score_sum / self.score_cnt.clamp_min(1.0)

    def fields(self):
        return (self.keys, self.values, self.token_idx, self.score_sum, self.score_cnt, self.sink)

    def gather(self, index: torch.Tensor) -> "Tokens":
        """index [L, m] into the token axis (per layer)."""
        kv_index = index[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[3])
        return Tokens(self.keys.gather(2, kv_index), self.values.gather(2, kv_index),
                      *(t.gather(1, index) for t in (self.token_idx, self.score_sum, self.score_cnt, self.sink)))

    def slice(self, start: int, stop: int | None = None) -> "Tokens":
        return Tokens(self.keys[:, :, start:stop], self.values[:, :, start:stop],
                      *(t[:, start:stop] for t in (self.token_idx, self.score_sum, self.score_cnt, self.sink)))

    @staticmethod
    def cat(parts: list["Tokens"]) -> "Tokens":
        parts = [p for p in parts if p.n > 0] or parts[:1]
        if len(parts) == 1:
            return parts[0]
        return Tokens(torch.cat([p.keys for p in parts], 2), torch.cat([p.values for p in parts], 2),
                      *(torch.cat([getattr(p, f) for p in parts], 1)
                        for f in ("token_idx", "score_sum", "score_cnt", "sink")))


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
        self.score_sum = empty(L, capacity, dtype=torch.float32)
        self.score_cnt = empty(L, capacity, dtype=torch.float32)
        self.sink = empty(L, capacity, dtype=torch.bool)
        self.capacity = capacity
        if old is not None and old.n:
            self._write(0, old)

    def _write(self, start: int, t: Tokens):
        stop = start + t.n
        self.keys[:, :, start:stop].copy_(t.keys)
        self.values[:, :, start:stop].copy_(t.values)
        for name in ("token_idx", "score_sum", "score_cnt", "sink"):
            getattr(self, name)[:, start:stop].copy_(getattr(t, name))

    def view(self) -> Tokens:
        n = self.len
        return Tokens(self.keys[:, :, :n], self.values[:, :, :n], self.token_idx[:, :n],
                      self.score_sum[:, :n], self.score_cnt[:, :n], self.sink[:, :n])

    def reserve(self, capacity: int):
        """Grow to hold `capacity` tokens now (e.g. a known stream length), not by doubling later."""
        if capacity > self.capacity:
            self._alloc(capacity)

    def append(self, t: Tokens):
        if self.len + t.n > self.capacity:
            self._alloc(max(2 * self.capacity, self.len + t.n))
        self._write(self.len, t)
        self.len += t.n

    def replace(self, t: Tokens):
        """Make `t` (which may alias this buffer) the whole content."""
        t = Tokens(*(x.clone() for x in t.fields())) if t.keys.device == self.device else t
        self.len = 0
        self.append(t)

    def pop_front(self, n: int) -> Tokens:
        """Remove and return the oldest n tokens."""
        n = min(n, self.len)
        front = Tokens(*(x.clone() for x in self.view().slice(0, n).fields()))
        self.replace(self.view().slice(n))
        return front
