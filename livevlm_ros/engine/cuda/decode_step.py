"""The decode step at one fixed shape, so that a CUDA graph can replay it (issue 13).

One token through a 7B model is ~30 small kernels per layer; launched from Python one by one, the
GPU idles between them (decode ran at 55 tokens/s against a weight-bandwidth floor of 199). A CUDA
graph records the step's kernels once and replays them with one launch. A graph replays fixed
addresses and shapes, so everything the step touches is fixed here:

  arena     each layer's answer KV lives in one buffer, allocated once and reused by every answer
            (hook/arena.py); it grows, rarely, when an answer needs more (memory is
            bounded, so it stops growing), and the graph is then captured again;
  lengths   a device tensor of per-layer context lengths: the step writes the new token's KV at
            `lengths[layer]`, attends to the slots up to it (the attention reads where the
            context ends from the device: no slice), then adds one;
  inputs    the token id and its position are device tensors the step reads and advances itself;
            the step also writes its greedy choice back as the next input, so the host only reads
            one integer per token.

Without CUDA (or with capture off) the same fixed-shape step runs eagerly: the CPU test suite checks
it gives the tokens the ordinary path gives, and the GPU benchmark checks the captured replay does.
"""

from __future__ import annotations

import torch

from .graphs import record


class DecodeStep:
    def __init__(self, model, hook, capture: bool):
        self.model, self.hook, self.capture = model, hook, capture
        kv = model.kv
        self.token = torch.zeros(1, dtype=torch.long, device=kv.device)
        self.position = torch.zeros(1, dtype=torch.long, device=kv.device)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self._generation = None              # of the arena the graph was recorded on
        self.captures = 0                    # how many times a graph was recorded (for benchmarks)

    def begin(self, token: int, position: int):
        """After the question's prefill: the first answer token and its position."""
        self.token.fill_(token)
        self.position.fill_(position)
        self.hook.begin_decode()

    @torch.inference_mode()
    def _forward(self):
        hidden = self.model.run_language_model(self.model.embed_tokens(self.token)[None], self.position, self.hook)
        self.logits = self.model.logits(hidden[:, -1])[0]
        self.hook.arena.lengths.add_(1)
        self.position.add_(1)
        self.token.copy_(self.logits.argmax().view(1))

    def step(self) -> int:
        """Decode the current token; returns the next one (greedy). `self.logits` chose it."""
        if not self.capture:
            self._forward()
        else:
            if self.graph is None or self._generation != self.hook.arena.generation:
                self._record()
            self.graph.replay()
        return int(self.token)

    def _record(self):
        # the warm-up and the recording both advance the step's state: put it back after each
        state = (self.token, self.position, self.hook.arena.lengths)
        saved = [t.clone() for t in state]

        def restore():
            for t, s in zip(state, saved):
                t.copy_(s)
        self.graph = None                    # free the old one's pool first
        self.graph, _ = record(self._forward, None, restore)
        self._generation = self.hook.arena.generation
        self.captures += 1
