"""LiveVLMEngine: frames in, bounded memory, answers out. ROS-free.

    engine = LiveVLMEngine(EngineConfig(model_path="models/tiny"))
    engine.ingest(frame_rgb, timestamp)          # where frames enter
    engine.ask("Is the door open?")              # where questions are answered
    engine.describe()                            # narration of the last moments
    engine.stats()

Ingest: sample by time -> group into clips -> vision tower -> language-model prefill against the
current memory (through MemoryKVHook) -> StreamingMemory.commit_clip (where memory is compressed).
Ask: the suffix (video-end + question template) is prefilled against a context the selector picks
(PaR), then greedy decoding; the answer context is dropped afterwards, memory is untouched.
Not thread-safe: one caller at a time (the ROS node serialises through its worker thread).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import ConfigError, EngineConfig
from .cuda.decode_step import DecodeStep
from .cuda.ingest_step import IngestStep
from .cuda.question_step import QuestionStep
from .hook.kv_hook import MemoryKVHook
from .inputs import (EngineInputError, NoFramesError, check_frame, check_order, check_pose, check_question,
                     check_stamp)
from .memory import persistence
from .memory.poses import Pose, check_place, frames_near, region_covered
from .memory.region import Region
from .memory.retrieval import ContextSelector, RecentFrames, make_selector
from .memory.sizing import size_memory
from .memory.stamps import Stamp, seconds
from .memory.streaming_memory import StreamingMemory
from .models import VideoLLMAdapter, load_adapter


class EngineResourceError(RuntimeError):
    """The device ran out of memory; the clip or question was dropped, memory is unchanged."""


class AnswerCancelled(RuntimeError):
    """The caller's `cancel()` said stop; the answer was abandoned between two tokens."""


# options that may change while the engine runs (the rest shape memory and need a new engine)
RUNTIME_OPTIONS = ("retrieval_ratio", "page_scoring", "max_new_tokens", "max_question_tokens",
                   "narration_frames", "narration_prompt", "launch")


@dataclass
class Evidence:
    """A frame the question drew attention to: when it was taken (its stamp as ingested), by which
    camera, its weight (its tokens' mean attention, as a share of the sum over all frames read: 0..1),
    and where it was taken (None: unknown)."""
    time: Stamp
    weight: float
    camera: str = ""
    pose: Pose | None = None


@dataclass
class Answer:
    text: str
    latency_s: float                      # question in -> full answer out
    ttft_s: float                         # question in -> first token
    span: tuple[Stamp, Stamp] | None      # stream time (first, last frame stamp) the memory covers
    pages_used: int
    pages_total: int
    context_tokens: int                   # prefix + memory tokens the answer attended to
    tokens_generated: int
    token_ids: list[int] = field(default_factory=list)
    first_logits: torch.Tensor | None = None   # logits that chose the first token (if asked for)
    evidence: list[Evidence] = field(default_factory=list)   # strongest first (if asked for)


class LiveVLMEngine:
    def __init__(self, config: EngineConfig, adapter: VideoLLMAdapter | None = None):
        self.config = config.validate()
        self.model = adapter or load_adapter(config.model_path, config.device, config.dtype, config.weights,
                                             **self._model_options())
        loaded = getattr(self.model, "weights", "bf16")
        if loaded != config.weights:
            raise ConfigError(f"weights {config.weights} asked for, but the adapter given holds {loaded} weights "
                              f"(quantize it with models.quantize.apply, or load it through the engine)")
        self.sizing = None
        if config.gpu_memory_budget_gb is not None:      # budget_tokens from bytes (memory/sizing.py)
            prefix = len(self.model.tokenize(config.system_prompt))
            self.sizing = size_memory(config, self.model, prefix)
            self.config = config = config.replace(budget_tokens=self.sizing.budget_tokens)
        self.selector = make_selector(config)
        self.hook = MemoryKVHook(self.model.rope, self.model.query_projections(), self.model.key_projections(),
                                 self.model.positions)
        self._make_steps()
        try:
            self.reset()                  # makes the memory (allocated once here, not twice)
        except BaseException:
            self.hook.close()             # the model may outlive a failed engine: leave it unhooked
            raise

    def _model_options(self) -> dict:
        """What an adapter may need to know of the stream: the frame rate (Qwen2.5-VL's time axis)
        and the pixels a frame is resized to (0: the family's default)."""
        options = {"sample_fps": self.config.sample_fps}
        if self.config.frame_pixels:
            options["frame_pixels"] = self.config.frame_pixels
        return {**options, **self.config.extra}

    def _make_steps(self):
        """`launch`: how a clip's prefill, a question's prefill and each answer token run. 'graph':
        at fixed shapes, replayed from CUDA graphs once memory is full (graphs.py); 'static': the
        same fixed shapes, kernel by kernel (the CPU tests check them against 'eager'); 'eager':
        shapes as they come."""
        mode = self.config.launch
        if mode == "auto":
            mode = "graph" if self.model.kv.device.type == "cuda" and self.config.bounded else "eager"
        self.ingest_step = self.question_step = self.decode_step = None
        if mode == "eager":
            self.hook.drop_arena()         # its buffers would be assembled in, and an 8-bit one's shared
        else:
            capture = mode == "graph"
            self.ingest_step = IngestStep(self.hook, capture)
            self.question_step = QuestionStep(self.model, self.hook, capture)
            self.decode_step = DecodeStep(self.model, self.hook, capture)

    def reset(self):
        """Forget the stream: empty memory (the system prompt stays), as after start-up. For a
        stream that starts over, e.g. a time jump back when a bag is replayed again."""
        self._use_memory(StreamingMemory(self.model.kv, self.config, self.model.tokens_per_frame))
        self._prefill_prefix()

    def _use_memory(self, memory: StreamingMemory, frames_seen: int = 0, last_sampled: Stamp | None = None):
        """Make `memory` the engine's, with the stream counters that go with it. One place for reset
        and load_memory, which builds its memory aside so that a refused file changes nothing."""
        self.hook.reset()
        self.memory = self.hook.memory = memory
        self.compression = memory.policy
        self._pending: list[tuple[np.ndarray, Stamp, str, Pose | None]] = []
        self._last_sampled = last_sampled
        self.frames_seen = frames_seen

    def save_memory(self, path):
        """Write memory to a safetensors file, atomically (see persistence.py)."""
        persistence.save_memory(self, path)

    def load_memory(self, path):
        """Replace memory with a saved one; MemoryFileError (memory unchanged) if it does not fit."""
        persistence.load_memory(self, path)

    def reconfigure(self, **changes):
        """Change options that do not shape memory (RUNTIME_OPTIONS) between two calls."""
        fixed = sorted(set(changes) - set(RUNTIME_OPTIONS))
        if fixed:
            raise ValueError(f"{', '.join(fixed)} cannot change while the engine runs")
        self.config = self.config.replace(**changes)
        self.memory.config = self.config
        self.selector = make_selector(self.config)
        if "launch" in changes:
            self._make_steps()
        elif self.question_step is not None and {"retrieval_ratio", "page_scoring"} & set(changes):
            # graphs of the old selector would never replay again, but would hold their memory
            self.question_step.recorded.clear()

    # ---- ingest -------------------------------------------------------------------------------------
    def ingest(self, frame: np.ndarray, timestamp: Stamp, camera: str = "", pose=None) -> bool:
        """Offer one RGB uint8 HxWx3 frame. Returns True if it was sampled (kept for the memory).
        `timestamp`: int nanoseconds (a ROS stamp) or float seconds, kept exactly as given (evidence,
        spans, memory files give it back); one stream uses one kind. Frames of several cameras taken
        at one instant share its timestamp; `camera` names the source, which memory keeps per frame
        (answers' evidence says which camera saw it). `pose`: where it was taken (a Pose, or x, y, z
        [, qx, qy, qz, qw] in one fixed frame), or None: unknown; questions about a place use it."""
        check_frame(frame)
        timestamp = self._check_stamp(timestamp)
        pose = check_pose(pose)
        self._check_order([timestamp])
        if (self._last_sampled is not None and self.config.sample_fps > 0
                and seconds(timestamp - self._last_sampled) < 1.0 / self.config.sample_fps - 1e-6):
            return False
        self.frames_seen += 1
        self._last_sampled = timestamp
        self._pending.append((np.ascontiguousarray(frame), timestamp, camera, pose))
        if len(self._pending) >= self.config.frames_per_clip:
            self.flush()
        return True

    def flush(self):
        """Prefill any sampled frames still waiting for a full clip."""
        if not self._pending:
            return
        frames, times, cameras, poses = zip(*self._pending)
        self._pending = []
        with _device_errors("ingest a clip"):
            pixels = self.model.preprocess(list(frames))

            def prefill(embeds):
                return self._prefill(embeds, self.compression.needs_scores)
            if self.ingest_step is None:
                out = prefill(self.model.encode_frames(pixels))
            elif self.model.tower_replays:              # the tower and the prefill in one graph
                out = self.ingest_step.run(pixels, lambda pixels: prefill(self.model.encode_frames(pixels)))
            else:                                       # the tower eagerly, the prefill replayed
                out = self.ingest_step.run(self.model.encode_frames(pixels), prefill)
            self._commit(out, list(times), list(cameras), list(poses))

    def ingest_embeddings(self, embeds: torch.Tensor, timestamps: list[Stamp], poses: list | None = None):
        """Prefill precomputed token embeddings [n_frames * tokens_per_frame, hidden] as frames,
        e.g. chunks of text streamed through a text-only model (the quality benchmark does this).
        Stamps as in `ingest`, in time order and not older than the stream's newest; poses as in
        `ingest`, one per frame (None: all unknown)."""
        timestamps = [self._check_stamp(t) for t in timestamps]
        if poses is not None and len(poses) != len(timestamps):
            raise EngineInputError(f"{len(poses)} poses for {len(timestamps)} frames")
        poses = [check_pose(p) for p in poses] if poses is not None else [None] * len(timestamps)
        if not timestamps:
            raise EngineInputError("no timestamps: nothing to ingest")
        if len({type(t) for t in timestamps}) > 1:
            raise EngineInputError("timestamps mix int nanoseconds and float seconds")
        self._check_order(timestamps)
        if embeds.ndim != 2 or embeds.shape[0] != len(timestamps) * self.model.tokens_per_frame:
            raise EngineInputError(f"need [{len(timestamps)} x {self.model.tokens_per_frame}, hidden] embeddings, "
                                   f"got {tuple(embeds.shape)}")
        self.flush()                      # sampled frames waiting for a clip are older: they go first
        with _device_errors("ingest embeddings"):
            embeds = embeds.to(self.model.kv.device, self.model.kv.dtype)
            self._commit(self._prefill(embeds, self.compression.needs_scores), list(timestamps),
                         [""] * len(timestamps), poses)

    def _commit(self, prefill: tuple, times: list[Stamp], cameras: list[str], poses: list[Pose | None]):
        """A prefilled clip (what `_prefill` returns) into memory: the attention memory drew from it
        (VSB's scores), then the clip itself (StreamingMemory.commit_clip: eviction and compression)."""
        keys_pre, _, values, scores = prefill
        if scores is not None:
            p, start = self.memory.prefix_len, self.memory.prefix_len + self.memory.attendable_len()
            self.memory.add_observations(scores[:, p:start])
            scores = scores[:, start:]
        self.memory.commit_clip(keys_pre, values, scores, times, cameras, poses)

    def _prefill_prefix(self):
        # a family whose video sits between markers ends the prefix with the opening one
        ids = torch.tensor(self.model.tokenize(self.config.system_prompt + self.model.video_start),
                           dtype=torch.long)
        if len(ids) == 0:                 # no system prompt: an empty prefix, nothing to run
            kv = self.model.kv
            empty = torch.empty(kv.layers, kv.kv_heads, 0, kv.head_dim, dtype=kv.dtype, device=kv.device)
            self.memory.set_prefix(empty, empty.clone())
            return
        _, keys_rot, values, _ = self._prefill(self.model.embed_tokens(ids), score=False, text=True)
        self.memory.set_prefix(torch.stack(keys_rot), values)

    @torch.inference_mode()
    def _prefill(self, embeds: torch.Tensor, score: bool, text: bool = False):
        """New tokens after prefix + memory (frames; `text`: the prefix's text) -> their pre-RoPE
        keys [L, H, n, D], post-RoPE keys (per layer), values, and (score) the attention every token
        drew from the observation window [L, p + memory + n]. Changes nothing: ingest_step.py may
        replay it from a graph."""
        n = embeds.shape[0]
        place = self.hook.place_memory(self.memory.attendable_len())
        positions = place.text(n) if text else place.new_tokens(n)
        window = self.config.observation_window or self.model.tokens_per_frame
        self.hook.begin_ingest(place, n, window if score else None)
        try:
            self.model.run_language_model(embeds[None], positions, self.hook)
        except BaseException:
            self.hook.reset()
            raise
        return self.hook.finish_ingest()

    # ---- answer -------------------------------------------------------------------------------------
    def ask(self, question: str, max_new_tokens: int | None = None, return_logits: bool = False,
            cancel: Callable[[], bool] | None = None,
            on_token: Callable[[list[int], float], None] | None = None,
            window: tuple[Stamp | None, Stamp | None] | None = None, evidence: int = 0,
            near: tuple[float, ...] | None = None, radius_m: float | None = None) -> Answer:
        """Answer from memory as it is now, including sampled frames still waiting for a full clip
        (they are prefilled first). The answer itself does not change memory.
        on_token(ids, ttft)  gets the answer's token ids so far after every token
        cancel()             is asked after every token; True stops the answer with AnswerCancelled
        window               (start, end) stream times, None = open: only memory of frames taken in
                             it is read (and the vision sinks); nothing kept from it = EngineInputError.
                             Stamps of the kind memory's are (int ns or float s): compared exactly
        near, radius_m       a place: only memory of frames taken within radius_m of near, (x, y) in
                             the plane or (x, y, z), is read (and the vision sinks); with a window,
                             frames in both. Frames of unknown pose are outside every place
        evidence             how many frames to name in `Answer.evidence`: those whose tokens drew
                             the most of the question's attention (0 = do not measure it)"""
        question = check_question(question, self.model.tokenize, self.config.max_question_tokens)
        self.flush()
        if (near is None) != (radius_m is None):
            raise EngineInputError("a place needs both near and radius_m")
        place = None
        if near is not None:
            try:
                place = check_place(near, radius_m)
            except ValueError as err:
                raise EngineInputError(str(err)) from None
        return self._answer(question, self.selector, max_new_tokens, return_logits, cancel, on_token,
                            window, evidence, place)

    def _region(self, window, place) -> Region | None:
        """What the question may read, from its time window and place (None: all of memory); an
        EngineInputError, before anything is read, when memory keeps nothing of it."""
        if window is None and place is None:
            return None
        where = []
        first, stop = 0, Region().stop
        if window is not None:
            start, end = window
            lo = -math.inf if start is None else self._check_stamp(start, "the window's start")
            hi = math.inf if end is None else self._check_stamp(end, "the window's end")
            if lo > hi:
                raise EngineInputError(f"time window starts ({seconds(lo):.3f} s) after it ends ({seconds(hi):.3f} s)")
            first, stop = self.memory.window_tokens(lo, hi)
            where.append(f"the window [{seconds(lo):.3f}, {seconds(hi):.3f}] s")
        frames = None
        if place is not None:
            if self.memory.page_summaries is not None:
                raise EngineInputError("questions about a place read memory on the device; the offloaded "
                                       f"long-term tier of policy {self.config.policy!r} is not read by place")
            (point, radius) = place
            frames = torch.tensor(frames_near(self.memory.frame_poses, point, radius), dtype=torch.bool,
                                  device=self.memory.long.device)
            where.append(f"within {radius:g} m of {point}")
        region = Region(first, stop, frames)
        if not self.memory.holds(region):
            span = self.memory.time_span()
            covers = (f"{seconds(span[0]):.3f} .. {seconds(span[1]):.3f} s" if span else "nothing")
            if place is not None:
                covers += "; " + region_covered(self.memory.frame_poses)
            raise EngineInputError(f"memory keeps nothing from {' and '.join(where)} (memory covers {covers})")
        return region

    def describe(self, max_new_tokens: int | None = None, cancel: Callable[[], bool] | None = None) -> Answer:
        """Narrate the last `narration_frames` frames (short-term memory only)."""
        self.flush()
        return self._answer(self.config.narration_prompt, RecentFrames(self.config.narration_frames),
                            max_new_tokens, False, cancel, None)

    @torch.inference_mode()
    def _answer(self, question: str, selector: ContextSelector, max_new_tokens, return_logits, cancel,
                on_token, window=None, evidence=0, place=None) -> Answer:
        if self.memory.frames_ingested == 0:
            raise NoFramesError("no frame has been ingested yet: nothing to answer from")
        region = self._region(window, place)
        t0 = time.perf_counter()
        ids, q_rows = self._question_ids(question)
        video_end = self.model.video_end_embeddings()
        # only the question's own tokens score pages: the template around it is the same for every
        # question and would pull every question towards the same pages
        rows = slice(video_end.shape[0] + q_rows.start, video_end.shape[0] + q_rows.stop)
        embeds = torch.cat([video_end, self.model.embed_tokens(torch.tensor(ids))])
        limit = max_new_tokens or self.config.max_new_tokens
        out, first_logits, ttft = [], None, 0.0
        n = embeds.shape[0]
        with _device_errors("answer"):
            try:
                if self.question_step is not None and region is None:     # fixed shapes (graph replay)
                    view, logits = self.question_step.run(selector, embeds, rows, limit, bool(evidence))
                else:
                    view = self.hook.begin_answer(selector, rows, limit, region, rows if evidence else None)
                    if self.decode_step is not None:
                        self.hook.reserve_arena(view.context_end + n + limit)
                    positions = view.place.text(n)
                    hidden = self.model.run_language_model(embeds[None], positions, self.hook)
                    logits = self.model.logits(hidden[:, -1])[0]
                start = view.start
                pages_used, pages_total = view.pages()
                first_logits = logits.float().cpu() if return_logits else None
                token = int(logits.argmax())
                ttft = time.perf_counter() - t0
                for step in range(limit):
                    if token in self.model.stop_token_ids:
                        break
                    out.append(token)
                    if on_token is not None:
                        on_token(out, ttft)
                    if step + 1 == limit:
                        break
                    if cancel is not None and cancel():
                        raise AnswerCancelled(f"cancelled after {len(out)} tokens")
                    token = self._next_token(token, start + n + step, step == 0)
                context_tokens = view.context_end
                found = self._evidence(view, evidence) if evidence else []
            finally:
                self.hook.reset()
        return Answer(text=self.model.detokenize(out).strip(), latency_s=time.perf_counter() - t0, ttft_s=ttft,
                      span=self.memory.time_span(), pages_used=pages_used, pages_total=pages_total,
                      context_tokens=context_tokens, tokens_generated=len(out), token_ids=out,
                      first_logits=first_logits, evidence=found)

    def _question_ids(self, question: str) -> tuple[list[int], slice]:
        """The question in its template, as token ids, and the rows of the question's own tokens."""
        marker = "\x00question\x00"          # found by position, never by searching for the question
        before, after = self.config.question_template.format(question=marker).split(marker, 1)
        return self.model.tokenize_around(before, question, after)

    def _next_token(self, token: int, position: int, first: bool) -> int:
        """Decode `token` at `position`; the greedy next token."""
        if self.decode_step is not None:                  # fixed shape, replayed from a CUDA graph
            if first:
                self.decode_step.begin(token, position)
            return self.decode_step.step()
        device = self.model.kv.device
        hidden = self.model.run_language_model(self.model.embed_tokens(torch.tensor([token]))[None],
                                               torch.tensor([position], device=device), self.hook)
        return int(self.model.logits(hidden[:, -1])[0].argmax())

    def _evidence(self, view, n: int) -> list[Evidence]:
        """The n frames whose tokens drew the most of the question's attention (AnswerView.frame_attention);
        weights are shares of the whole, summing to 1 over all frames read."""
        per_frame = view.frame_attention()
        total = per_frame.sum()
        top = per_frame.topk(min(n, int((per_frame > 0).sum()))) if total > 0 else None
        if top is None:
            return []
        mem = self.memory
        return [Evidence(mem.frame_times[f], w, mem.frame_cameras[f], mem.frame_poses[f])
                for w, f in zip((top.values / total).tolist(), top.indices.tolist())]

    def close(self):
        """Detach from the model (which the caller may keep using, e.g. for another engine)."""
        self.hook.close()

    # ---- state --------------------------------------------------------------------------------------
    def stats(self) -> dict:
        s = self.memory.stats()
        s.update(policy=self.config.policy, frames_seen=self.frames_seen, frames_pending=len(self._pending),
                 stream_span=self.memory.time_span(), weights=self.config.weights, kv_dtype=self.config.kv_dtype)
        if self.sizing is not None:
            s.update(self.sizing.report())
        device = self.model.kv.device
        if device.type == "cuda":                    # resident, as the allocator sees it (weights, memory, buffers)
            s["device_allocated_gb"] = round(torch.cuda.memory_allocated(device) / 1e9, 3)
        return s

    # ---- validation (inputs.py) ----------------------------------------------------------------------
    def _check_stamp(self, t, what: str = "timestamp") -> Stamp:
        return check_stamp(t, self._stamp_kind(), what)

    def _stamp_kind(self) -> type | None:
        """int or float: the kind of stamps the stream uses (set by its first), None before any."""
        known = self.memory.frame_times[:1] + [p[1] for p in self._pending[:1]] + [self._last_sampled]
        return next((type(t) for t in known if t is not None), None)

    def _check_order(self, stamps: list[Stamp]):
        times = self.memory.frame_times
        check_order(stamps, max((t for t in (self._last_sampled, times[-1] if times else None) if t is not None),
                                default=None))


class _device_errors:
    """Turn a device out-of-memory into EngineResourceError (the caller keeps running)."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, torch.OutOfMemoryError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise EngineResourceError(f"out of device memory while trying to {self.what}; dropped it") from exc
        return False
