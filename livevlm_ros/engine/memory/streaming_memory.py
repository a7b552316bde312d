"""The streaming memory: one object owns all KV the engine keeps, and its rules.

Tiers, oldest first (this is also the order a context is assembled in):
  prefix      the system prompt, post-RoPE at positions 0..p-1, never changes
  long-term   compressed (VSB), windowed, or everything (full / ReKV); on the GPU, or the CPU (ReKV)
  short-term  the most recent `short_term_frames` frames, whole, on the GPU

Keys of visual tokens are stored pre-RoPE, so they can be placed at any position later.
The budget (`budget_tokens`) caps prefix + long-term + short-term after every ingest; during one
clip's prefill the clip's own tokens come on top of it.
"""

from __future__ import annotations

import bisect

import torch

from ..config import EngineConfig
from ..models.base import KVShape
from .compression import KeepAll, make_compression
from .kv_buffer import KVBuffer, Tokens
from .pages import PageSummaries
from .poses import Pose
from .region import Region
from .stamps import Stamp


class StreamingMemory:
    def __init__(self, kv: KVShape, config: EngineConfig, tokens_per_frame: int):
        self.kv, self.config, self.tokens_per_frame = kv, config, tokens_per_frame
        self.policy = make_compression(config)
        offload = config.long_term_tier == "cpu"
        if offload and not isinstance(self.policy, KeepAll):
            raise ValueError("a CPU long-term tier is only used with keep_all compression")
        short_cap = (config.short_term_frames + config.frames_per_clip) * tokens_per_frame
        long_cap = (config.budget_tokens or 0) + short_cap if config.bounded else 0
        self.long = KVBuffer(kv, "cpu" if offload else kv.device, long_cap,
                             pin=offload and kv.device.type == "cuda", quantized=config.kv_dtype == "int8")
        self.short = KVBuffer(kv, kv.device, short_cap)
        self.page_summaries = PageSummaries(kv, config.page_tokens) if offload else None
        self.prefix_keys = self.prefix_values = None
        self.long_capacity: int | None = None
        self.frame_times: list[Stamp] = []     # stamp of every ingested frame, by frame number
        self.frame_cameras: list[str] = []     # and the camera that took it
        self.frame_poses: list[Pose | None] = []   # and where it was taken (None: unknown)
        self.next_token = 0                     # stream index of the next visual token
        self.n_sinks = 0                        # vision sinks per layer (same on every layer)

    # ---- set-up -------------------------------------------------------------------------------
    def set_prefix(self, keys_rot: torch.Tensor, values: torch.Tensor):
        self.prefix_keys, self.prefix_values = keys_rot, values
        if self.config.bounded:
            short = self.config.short_term_frames * self.tokens_per_frame
            self.long_capacity = self.config.budget_tokens - self.prefix_len - short
            if self.long_capacity < self.config.vision_sinks + self.config.page_tokens:
                raise ValueError(
                    f"budget_tokens={self.config.budget_tokens} leaves {self.long_capacity} long-term tokens after "
                    f"the prefix ({self.prefix_len}) and {self.config.short_term_frames} short-term frames "
                    f"({short}); need at least vision_sinks + page_tokens")

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix_keys is None else self.prefix_keys.shape[2]

    # ---- what a new clip attends to -------------------------------------------------------------
    def attendable_buffers(self) -> list[KVBuffer]:
        """Visual memory a new clip attends to while being prefilled, in time order. An offloaded
        (CPU) long-term tier is not attended during ingest: that is what makes ReKV cheap."""
        return [self.short] if self.page_summaries is not None else [self.long, self.short]

    def attendable_len(self) -> int:
        return sum(b.len for b in self.attendable_buffers())

    def add_observations(self, scores: torch.Tensor):
        """scores [L, n_attendable]: attention the attendable tokens just received from the
        newest clip's observation window. It becomes their current score and adds to their
        accumulated attention."""
        n_long = self.long.len if self.page_summaries is None else 0
        for buf, part in ((self.long, scores[:, :n_long]), (self.short, scores[:, n_long:])):
            if part.shape[1]:
                view = buf.view()
                view.score.copy_(part)
                view.score_sum.add_(part)

    # ---- ingest ---------------------------------------------------------------------------------
    def commit_clip(self, keys_pre: torch.Tensor, values: torch.Tensor, scores: torch.Tensor | None,
                    frame_times: list[Stamp], cameras: list[str] | None = None,
                    poses: list[Pose | None] | None = None):
        """Add a prefilled clip to short-term memory; what leaves it (its oldest tokens, and of a
        batch bigger than short-term memory, the batch's oldest) moves to long-term. Short-term
        memory never holds more than its frames, whatever the batch."""
        L, n = keys_pre.shape[0], keys_pre.shape[2]
        dev = keys_pre.device
        idx = torch.arange(self.next_token, self.next_token + n, device=dev).expand(L, -1)
        if scores is None:
            scores = torch.zeros(L, n, device=dev)
        scores = scores.float()
        new = Tokens(keys_pre, values, idx, scores, scores, torch.zeros(L, n, dtype=torch.bool, device=dev))
        self.next_token += n
        self.frame_times.extend(frame_times)
        self.frame_cameras.extend(cameras or [""] * len(frame_times))
        self.frame_poses.extend(poses or [None] * len(frame_times))
        over = self.short.len + n - self.config.short_term_frames * self.tokens_per_frame
        if over <= 0:
            self.short.append(new)
            return
        evicted = self.short.pop_front(min(over, self.short.len))
        if over > evicted.n:                          # the batch's oldest go straight on
            evicted, new = Tokens.cat(evicted, new.slice(0, over - evicted.n)), new.slice(over - evicted.n)
        self.short.append(new)
        self._to_long_term(evicted)

    def _to_long_term(self, evicted: Tokens):
        if self.page_summaries is not None:
            self.page_summaries.append(evicted.keys)
        # The long-term buffer has room for its capacity plus one clip: candidates are appended and
        # compacted in place, never copied as a whole. A bigger batch (ingest_embeddings of many
        # frames) is taken in steps that fit, so the buffer never grows.
        step = evicted.n if self.long_capacity is None else self.long.capacity - self.long_capacity
        left_short_term = self.next_token - self.short.len - evicted.n
        for start in range(0, evicted.n, step):
            part = evicted.slice(start, start + step)
            self.long.append(part)
            left_short_term += part.n                                # stream tokens the candidates span
            keep, self.n_sinks = self.policy.select(self.long.view(), self.long_capacity, self.n_sinks,
                                                    left_short_term)
            if keep is not None:
                self.long.keep(keep)

    # ---- bookkeeping ------------------------------------------------------------------------------
    @property
    def frames_ingested(self) -> int:
        return len(self.frame_times)

    def visual_tokens(self) -> int:
        return self.long.len + self.short.len

    def total_tokens(self) -> int:
        return self.prefix_len + self.visual_tokens()

    def window_tokens(self, start: Stamp, end: Stamp) -> tuple[int, int]:
        """The stream tokens [a, b) of the frames taken in [start, end] (frames are in time order;
        bounds in memory's own unit, or +-inf)."""
        T = self.tokens_per_frame
        return (bisect.bisect_left(self.frame_times, start) * T, bisect.bisect_right(self.frame_times, end) * T)

    def holds(self, region: Region) -> bool:
        """Does memory keep any token of `region`? (A device sync: for questions only.)"""
        return any(bool(region.allows(tier.view().token_idx, self.tokens_per_frame).any())
                   for tier in (self.long, self.short) if tier.len)

    def time_span(self) -> tuple[Stamp, Stamp] | None:
        """Stream time (first, last frame timestamp) the memory still holds tokens of."""
        if self.visual_tokens() == 0:
            return None
        first = self.long.view().token_idx.min() if self.long.len else self.short.view().token_idx.min()
        return self.frame_times[int(first) // self.tokens_per_frame], self.frame_times[-1]

    def stats(self) -> dict:
        bpt = self.kv.bytes_per_token()
        offloaded = self.page_summaries is not None
        device_tokens = self.prefix_len + self.short.len + (0 if offloaded else self.long.len)
        offload_tokens = self.long.len if offloaded else 0
        long_bytes = self.long.len * self.long.bytes_per_token()      # int8: keys, values and scales
        return {
            "frames_ingested": self.frames_ingested,
            "tokens_per_frame": self.tokens_per_frame,
            "prefix_tokens": self.prefix_len,
            "long_term_tokens": self.long.len,
            "short_term_tokens": self.short.len,
            "vision_sinks": self.n_sinks,
            "budget_tokens": self.config.budget_tokens if self.config.bounded else None,
            # "device" is the model's device (the GPU on a robot); "offload" is host memory (ReKV)
            "device_tokens": device_tokens,
            "device_bytes": (self.prefix_len + self.short.len) * bpt + (0 if offloaded else long_bytes),
            "offload_tokens": offload_tokens,
            "offload_bytes": offload_tokens * bpt,
            "pages": self.long.len // self.config.page_tokens,
        }
