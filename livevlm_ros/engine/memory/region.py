"""A region of the stream: what a question may read of memory (a time window, a place, both)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Region:
    """The stream tokens an answer may read (the vision sinks are read whatever it says): those in
    [first, stop) (a time window) whose frame is allowed (a place: `frames`, one bool per frame
    number, on memory's device)."""
    first: int = 0
    stop: int = 1 << 62
    frames: torch.Tensor | None = None

    def allows(self, token_idx: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
        ok = (token_idx >= self.first) & (token_idx < self.stop)
        if self.frames is not None:
            ok &= self.frames[token_idx // tokens_per_frame]
        return ok
