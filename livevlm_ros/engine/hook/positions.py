"""Where memory's tokens sit in a context: the positions their pre-RoPE keys are rotated to.

Memory keeps pre-RoPE keys, so every forward places them afresh (Position-agnostic KV Retrieval).
How depends on the family's rotary embedding:

  SlotPositions   1-D RoPE (LLaVA-OneVision, text LMs). A context's memory tokens sit at
                  consecutive positions right after the prefix, whatever their place in the stream:
                  the paper's re-assignment, and the positions stay bounded by the budget.
  GridPositions   multimodal RoPE (Qwen2.5-VL, Qwen3-VL): a position is (time, row, column). A
                  token keeps its row and column inside its frame (spatial layout), and its frame
                  gets a fresh *ordinal*: its rank among the frames memory still holds tokens of. With
                  nothing dropped, the ordinals are the frame numbers and the positions are exactly
                  those the model's own `get_rope_index` gives the whole video; with a bounded memory
                  they stay bounded by the frames memory holds, not by the stream's length, and time
                  order is kept. Every layer places the same frame at the same time, so a question
                  sees one timeline on all layers (layers keep different tokens under VSB).

A family's grid is two small tables: `offsets` [3, tokens_per_frame], each token's position
relative to its frame's start, and `frame_step` [3], how far one frame's start is from the next
(Qwen2.5-VL: one video block, time advancing by `tokens_per_second` x seconds per frame; Qwen3-VL:
one block per frame, wrapped in <|vision_start|> .. <|vision_end|>, each the next text run).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Rope = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class SlotPositions:
    by_token = False

    def place(self, memory, rope: Rope, start: int, n_context: int) -> "SlotPlacement":
        return SlotPlacement(rope, start, n_context, memory.kv.device)


class SlotPlacement:
    """Memory tokens at start .. start + n_context - 1; text and new tokens after them."""
    by_token = False

    def __init__(self, rope: Rope, start: int, n_context: int, device):
        self._cos, self._sin = rope(torch.arange(start, start + n_context, device=device))
        self.end = start + n_context
        self._device = device

    def end_int(self) -> int:
        return self.end

    def rope(self, layer: int, token_idx: torch.Tensor | None, at: slice):
        return self._cos[at], self._sin[at]

    def new_tokens(self, n: int) -> torch.Tensor:
        return torch.arange(self.end, self.end + n, device=self._device)

    text = new_tokens                     # text right after memory: the same next positions


class GridPositions:
    by_token = True

    def __init__(self, offsets: torch.Tensor, frame_step: tuple[float, float, float],
                 end_after: Callable[[torch.Tensor], torch.Tensor]):
        """offsets [3, tokens_per_frame] (long); frame_step: per axis, how far frame k+1's start
        is from frame k's (positions are floor(k * step)); end_after(K): where text resumes after
        K frames, relative to the block's start (K and the result: device scalars)."""
        self.offsets, self.frame_step, self.end_after = offsets, frame_step, end_after
        self._step = torch.tensor(frame_step, dtype=torch.float32)[:, None]
        self.tokens_per_frame = offsets.shape[1]

    def to(self, device) -> "GridPositions":
        """Its tables on the model's device (a graph being recorded may not copy from the host)."""
        self.offsets, self._step = self.offsets.to(device), self._step.to(device)
        return self

    def place(self, memory, rope: Rope, start: int, n_context: int) -> "GridPlacement":
        return GridPlacement(self, rope, start, memory)

    def positions(self, start, ordinals: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """[3, n] positions of tokens: their frame's ordinal and their cell in the frame."""
        frame_start = (ordinals.float()[None] * self._step).long()     # as get_rope_index: floor(k * interval)
        return start + frame_start + self.offsets[:, cells]


class GridPlacement:
    """Memory's frames at ordinals 0 .. K-1 from `start`; a new clip's frames at K, K+1, ...

    Everything is computed on the device at shapes fixed by memory's lengths (no host sync), so a
    CUDA graph can record it and replay it after later clips changed which frames memory holds:
    the frames of every token memory holds, sorted; a frame's rank is the number of distinct
    frames before it. `end` (where text resumes) is a device scalar; `end_int()` reads it."""
    by_token = True

    def __init__(self, grid: GridPositions, rope: Rope, start: int, memory):
        self.grid, self._rope, self.start = grid, rope, start
        T, device = grid.tokens_per_frame, memory.kv.device
        held = [t.token_idx[:, :t.len].reshape(-1).to(device) for t in (memory.long, memory.short) if t.len]
        frames = (torch.cat(held) if held else torch.empty(0, dtype=torch.long, device=device)) // T
        self._frames = frames.sort().values
        first = torch.ones_like(self._frames, dtype=torch.bool)
        first[1:] = self._frames[1:] != self._frames[:-1]
        self._rank = first.cumsum(0) - 1                       # rank of each sorted entry's frame
        self.frames_held = first.sum()                         # K, on the device
        self.end = start + grid.end_after(self.frames_held)

    def end_int(self) -> int:
        return int(self.end)

    def rope(self, layer: int, token_idx: torch.Tensor, at: slice):
        T = self.grid.tokens_per_frame
        token_idx = token_idx.to(self._frames.device)
        ordinals = self._rank[torch.searchsorted(self._frames, token_idx // T)]
        return self._rope(self.grid.positions(self.start, ordinals, token_idx % T))

    def new_tokens(self, n: int) -> torch.Tensor:
        T = self.grid.tokens_per_frame
        if n % T:
            raise ValueError(f"{n} new tokens are not whole frames of {T}")
        cells = torch.arange(n, device=self._frames.device)
        return self.grid.positions(self.start, self.frames_held + cells // T, cells % T)

    def text(self, n: int) -> torch.Tensor:
        """n text tokens where text resumes after memory (all three axes alike)."""
        return self.end + torch.arange(n, device=self._frames.device)


def grid_of_one_block(rows: int, cols: int, interval: float, text_after_time: bool) -> GridPositions:
    """Qwen2.5-VL: all frames one video block; frame k at time floor(k * interval), its tokens at
    (time, row, col). Text after the block resumes at max(rows, cols) (transformers >= 5.x) or, as
    in the original release, one past the largest position (`text_after_time`)."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    offsets = torch.stack([torch.zeros(rows * cols, dtype=torch.long), r.reshape(-1), c.reshape(-1)])
    span = max(rows, cols)

    def end_after(k: torch.Tensor) -> torch.Tensor:
        if text_after_time:
            last = ((k - 1).float() * interval).floor().long()
            after = torch.clamp(last, min=span - 1) + 1
        else:
            after = torch.full_like(k, span)
        return torch.where(k > 0, after, 0)              # no frame yet (the prefix): text goes on
    return GridPositions(offsets, (interval, 0.0, 0.0), end_after)


def grid_of_wrapped_frames(rows: int, cols: int) -> GridPositions:
    """Qwen3-VL: each frame its own block, <|vision_start|> grid <|vision_end|>: the start token at
    s, the grid at (s + 1, s + 1 + row, s + 1 + col), the end token at s + 1 + max(rows, cols), and
    the next frame's start token right after it."""
    span = max(rows, cols)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    grid = torch.stack([torch.zeros(rows * cols, dtype=torch.long), r.reshape(-1), c.reshape(-1)]) + 1
    first, last = torch.zeros(3, 1, dtype=torch.long), torch.full((3, 1), 1 + span)
    step = float(span + 2)
    return GridPositions(torch.cat([first, grid, last], dim=1), (step, step, step), lambda k: k * int(step))
