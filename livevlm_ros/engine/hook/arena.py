"""The answer arena: fixed buffers an answer's context is assembled in, so captured steps find it
at the same addresses every time (cuda/question_step.py, cuda/decode_step.py).

One key and one value buffer per layer, allocated once and reused by every answer. It grows,
rarely, when an answer needs more (prefix + context + question + answer); memory is bounded, so it
stops growing. `generation` counts the buffers: a graph recorded on older ones must be recorded
again. `lengths` (on the device) says where each layer's context ends while an answer is decoded
one token at a time: the decode step writes there and advances it, and the host never reads it.
"""

from __future__ import annotations

import torch

from ..models.base import KVShape


class AnswerArena:
    def __init__(self):
        self.keys = self.values = None              # [L, kv_heads, capacity, D]
        self.lengths: torch.Tensor | None = None    # [L] long, on the device
        self.generation = 0

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def reserve(self, kv: KVShape, tokens: int):
        """Room for `tokens` per layer from now on (no-op if there is)."""
        if self.capacity >= tokens:
            return
        # some slack, so that a memory still filling up does not grow it answer after answer
        capacity = -(-tokens * 9 // 8 // 256) * 256
        self.keys = self.values = None                      # free the old ones first
        # zeros, not empty: masked slots still enter the product (0 x -inf is NaN, garbage may be NaN)
        self.keys = torch.zeros(kv.layers, kv.kv_heads, capacity, kv.head_dim, dtype=kv.dtype, device=kv.device)
        self.values = torch.zeros_like(self.keys)
        self.lengths = torch.zeros(kv.layers, dtype=torch.long, device=kv.device)
        self.generation += 1

    def begin_decode(self, lengths: list[int]):
        """Each layer's context ends at lengths[layer] (it was assembled here by an answer's prefill)."""
        self.lengths.copy_(torch.tensor(lengths))

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, layer: int):
        """One decoded token's KV, written where the layer's context ends; the whole buffer goes
        back, its last slot in use marked (hook/attention.py masks the slots beyond)."""
        at = self.lengths[layer:layer + 1]
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(1, at, k_new[0])
        values.index_copy_(1, at, v_new[0])
        keys, values = keys[None], values[None]
        keys.livevlm_last = at
        return keys, values
