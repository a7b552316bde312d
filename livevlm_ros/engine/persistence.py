"""Memory that survives a restart: the engine's memory saved to and loaded from a safetensors file.

The file holds every tier's KV and bookkeeping (long-term, short-term), the frame stamps and the
stream counters; the system prompt's KV is not saved (the model recomputes it). Its header names what
the memory is only valid for: the model (architecture, KV shape and a fingerprint of its weights),
the memory rules (policy, budget, page and short-term sizes) and the system prompt. A file made
under anything else, or a file that is not ours or is cut short, is refused with MemoryFileError and
the engine keeps the memory it had.

Writes are atomic: the file is written beside the target, flushed to disk, then renamed over it, so
a crash or SIGKILL mid-save leaves the previous file whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .kv_buffer import Tokens

FORMAT = "livevlm-memory/1"
TIERS = ("long", "short")


class MemoryFileError(ValueError):
    """A memory file that does not fit this engine (or is not a memory file); memory is unchanged."""


def identity(engine) -> dict[str, str]:
    """What a memory is only valid for. The weight fingerprint is taken at bf16 precision, so the
    same checkpoint loaded as float32 or bfloat16 agrees."""
    kv, cfg = engine.model.kv, engine.config
    probe = engine.model.key_projections()[0].weight[:4].detach().to(torch.bfloat16).float().cpu()
    return {
        "format": FORMAT,
        "model": f"{type(engine.model).__name__} layers={kv.layers} kv_heads={kv.kv_heads} head_dim={kv.head_dim} "
                 f"tokens_per_frame={engine.model.tokens_per_frame}",
        "weights": hashlib.sha1(probe.numpy().tobytes()).hexdigest()[:16],
        "policy": cfg.policy,
        "budget_tokens": str(cfg.budget_tokens),
        "short_term_frames": str(cfg.short_term_frames),
        "page_tokens": str(cfg.page_tokens),
        "system_prompt": hashlib.sha1(cfg.system_prompt.encode()).hexdigest()[:16],
    }


def save_memory(engine, path: str | Path):
    """Write the engine's memory to `path` atomically (temp file + fsync + rename)."""
    engine.flush()
    mem = engine.memory
    tensors = {}
    for tier in TIERS:
        view = getattr(mem, tier).view()
        for name, t in zip(("keys", "values") + Tokens.BOOKKEEPING, view.fields()):
            tensors[f"{tier}.{name}"] = t.contiguous().cpu()
    tensors["frame_times"] = torch.tensor(mem.frame_times, dtype=torch.float64)
    cameras = sorted(set(mem.frame_cameras))
    number = {name: i for i, name in enumerate(cameras)}
    tensors["frame_camera"] = torch.tensor([number[c] for c in mem.frame_cameras], dtype=torch.int32)
    meta = dict(identity(engine), next_token=str(mem.next_token), n_sinks=str(mem.n_sinks),
                cameras=json.dumps(cameras),
                frames_seen=str(engine.frames_seen),
                last_sampled=json.dumps(engine._last_sampled))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_memory(engine, path: str | Path):
    """Replace the engine's memory with the one saved at `path`, or raise MemoryFileError."""
    path = Path(path)
    if not path.is_file():
        raise MemoryFileError(f"no memory file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise MemoryFileError(f"{path} is not a readable memory file: {err}") from err
    want = identity(engine)
    if meta.get("format") != FORMAT:
        raise MemoryFileError(f"{path} is not a livevlm memory file (format {meta.get('format')!r})")
    wrong = [f"{k}: file {meta.get(k)!r}, engine {v!r}" for k, v in want.items() if meta.get(k) != v]
    if wrong:
        raise MemoryFileError(f"{path} was saved for another model or memory setting: " + "; ".join(wrong))
    kv = engine.model.kv
    parts = {}
    for tier in TIERS:
        fields = []
        for name in ("keys", "values") + Tokens.BOOKKEEPING:
            key = f"{tier}.{name}"
            if key not in tensors:
                raise MemoryFileError(f"{path} lacks {key}")
            t = tensors[key]
            fields.append(t.to(kv.dtype) if name in ("keys", "values") else t)
        parts[tier] = Tokens(*fields)
    engine.reset()                                   # fresh tiers, the prefix recomputed
    mem = engine.memory
    for tier, tokens in parts.items():
        buf = getattr(mem, tier)
        buf.reserve(tokens.n)
        buf.append(Tokens(*(t.to(buf.device) for t in tokens.fields())))
    if mem.page_summaries is not None and mem.long.len:
        mem.page_summaries.append(mem.long.view().keys.to(kv.device))
    mem.frame_times = tensors["frame_times"].tolist()
    cameras = json.loads(meta.get("cameras", '[""]'))
    mem.frame_cameras = ([cameras[i] for i in tensors["frame_camera"].tolist()] if "frame_camera" in tensors
                         else [""] * len(mem.frame_times))
    mem.next_token, mem.n_sinks = int(meta["next_token"]), int(meta["n_sinks"])
    engine.frames_seen = int(meta["frames_seen"])
    engine._last_sampled = json.loads(meta["last_sampled"])
