"""The answer arena: fixed buffers an answer's context is assembled in, so captured steps find it
at the same addresses every time (cuda/question_step.py, cuda/decode_step.py).

One key and one value buffer per layer, allocated once and reused by every answer. It grows,
rarely, when an answer needs more (prefix + context + question + answer); memory is bounded, so it
stops growing. `generation` counts the buffers: a graph recorded on older ones must be recorded
again. `lengths` (on the device) says where each layer's context ends while an answer is decoded
one token at a time: the decode step writes there and advances it, and the host never reads it.

With `kv_dtype: int8` the arena is 8-bit too: int8 keys and values with a float32 scale per slot
and head (post-RoPE rows, symmetric: cuda/kernels/quantize_rows.py), half the bytes to hold and half
for each decoded token to read (decode_attention.py reads them as they are). Keys are first divided
by a factor per channel: a few channels of real keys are far larger than the rest, and a scale per
row alone left the rest a few steps (synthetic keys with 4 of 128 channels 10x: attention 5.5% off,
1.2% with factors, bf16 0.6%). The factors are memory's own (memory/kv_quant.py), turned as RoPE
turns channel pairs (`use_channel_factors`, once per answer: computed from each layer's context
they cost an H100 1 ms of each answer's first token). An answer's prefill still attends at full
precision: each layer's context is assembled in one shared buffer at the model's dtype (`scratch`,
one layer's size), attended to, and stored into the layer's 8-bit slots.
"""

from __future__ import annotations

import torch

from ..cuda.kernels import quantize_rows
from ..memory import kv_quant
from ..models.base import KVShape


class AnswerArena:
    def __init__(self):
        self.keys = self.values = None              # [L, kv_heads, capacity, D] at the model's dtype, or int8
        self.key_scale = self.value_scale = None    # int8: [L, kv_heads, capacity] float32
        self.key_channel = None                     # int8: [L, kv_heads, D] float32, keys' channel factors
        self.scratch = None                         # int8: [2, kv_heads, capacity, D] one layer's, at the model's dtype
        self.lengths: torch.Tensor | None = None    # [L] long, on the device
        self.generation = 0

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def quantized(self) -> bool:
        return self.scratch is not None

    def reserve(self, kv: KVShape, tokens: int, quantized: bool = False):
        """Room for `tokens` per layer from now on, 8-bit or not (no-op if there is)."""
        if self.capacity >= tokens and self.quantized == quantized:
            return
        # some slack, so that a memory still filling up does not grow it answer after answer
        capacity = -(-tokens * 9 // 8 // 256) * 256
        # free the old ones first
        self.keys = self.values = self.key_scale = self.value_scale = self.key_channel = self.scratch = None
        # zeros, not empty: masked slots still enter the product (0 x -inf is NaN, garbage may be NaN)
        shape = (kv.layers, kv.kv_heads, capacity, kv.head_dim)
        self.keys = torch.zeros(shape, dtype=torch.int8 if quantized else kv.dtype, device=kv.device)
        self.values = torch.zeros_like(self.keys)
        if quantized:
            self.key_scale = torch.zeros(shape[:3], dtype=torch.float32, device=kv.device)
            self.value_scale = torch.zeros_like(self.key_scale)
            self.key_channel = torch.ones(shape[0], shape[1], shape[3], dtype=torch.float32, device=kv.device)
            self.scratch = torch.zeros(2, *shape[1:], dtype=kv.dtype, device=kv.device)
        self.lengths = torch.zeros(kv.layers, dtype=torch.long, device=kv.device)
        self.generation += 1

    def context_buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[kv_heads, capacity, D] keys and values at the model's dtype where an answer's prefill
        assembles `layer`'s context: the layer's own slots, or (8-bit) the shared scratch, which
        `keep` then stores into them."""
        if self.quantized:
            return self.scratch[0], self.scratch[1]
        return self.keys[layer], self.values[layer]

    def use_channel_factors(self, pre_rope: torch.Tensor):
        """8-bit: the keys' channel factors from memory's [L, kv_heads, D] (before RoPE)."""
        if self.quantized:
            self.key_channel.copy_(kv_quant.rotated_channel_factors(pre_rope))

    def keep(self, layer: int, stop: int):
        """8-bit: the scratch's first `stop` slots, quantized into `layer`'s (a no-op otherwise)."""
        if self.quantized:
            self._store(layer, self.scratch[0, :, :stop], self.scratch[1, :, :stop], first=0)

    def begin_decode(self, lengths: list[int]):
        """Each layer's context ends at lengths[layer] (it was assembled here by an answer's prefill)."""
        self.lengths.copy_(torch.tensor(lengths))

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, layer: int):
        """One decoded token's KV, written where the layer's context ends; the whole buffer goes
        back, its last slot in use marked (hook/attention.py masks the slots beyond)."""
        at = self.lengths[layer:layer + 1]
        keys, values = self.keys[layer], self.values[layer]
        if self.quantized:
            self._store(layer, k_new[0], v_new[0], at=at)
        else:
            keys.index_copy_(1, at, k_new[0])
            values.index_copy_(1, at, v_new[0])
        keys, values = keys[None], values[None]
        keys.livevlm_last = at
        if self.quantized:
            keys.livevlm_scales = (self.key_scale[layer][None], self.value_scale[layer][None],
                                   self.key_channel[layer][None])
        return keys, values

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor, first: int = 0, at: torch.Tensor | None = None):
        """k/v [kv_heads, n, D] quantized into `layer`'s slots from `first`, or from `at` (on the device)."""
        k8, v8, ks, vs = self.keys[layer], self.values[layer], self.key_scale[layer], self.value_scale[layer]
        channel = self.key_channel[layer]
        if quantize_rows.fits(k, v, k8, v8, ks, vs, channel):
            quantize_rows.store(k, v, k8, v8, ks, vs, channel, first, at)
            return
        slots = (torch.arange(k.shape[1], device=k.device) + (first if at is None else at))
        for src, q8, scale, factors in ((k, k8, ks, channel), (v, v8, vs, None)):
            q, s = kv_quant.quantize_rows(src, factors)
            q8.index_copy_(1, slots, q)
            scale.index_copy_(1, slots, s)
