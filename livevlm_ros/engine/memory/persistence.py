"""Memory that survives a restart: the engine's memory saved to and loaded from a safetensors file.

The file holds every tier's KV and bookkeeping (long-term, short-term), the frame stamps and the
stream counters; the system prompt's KV is not saved (the model recomputes it). Its header names what
the memory is only valid for: the model (architecture, KV shape and a fingerprint of its weights),
the memory rules (policy, budget, page and short-term sizes) and the system prompt, and carries a
checksum of everything else in the file.

Loading checks the whole file before it touches memory: every tensor there with its exact dtype and
a shape that fits the model and the other tensors, the token counts the budget and the stream give,
stream indices, sinks, stamps and cameras consistent with the header, the checksum. A file that
fails any check (not ours, cut short, made for another model or setting, changed after it was
written) is refused with MemoryFileError saying why, and the engine keeps the memory it had: the
new memory is built aside and only then swapped in.

Stamps are kept exactly: int stamps (nanoseconds) as int64, float stamps (seconds) as float64; the
header's time_unit says which ("ns" | "s"; files from before it hold seconds).

Writes are atomic: the file is written beside the target, flushed to disk, then renamed over it, so
a crash or SIGKILL mid-save leaves the previous file whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .kv_buffer import Tokens
from .poses import Pose, check_pose
from .streaming_memory import StreamingMemory

FORMAT = "livevlm-memory/1"
TIERS = ("long", "short")
FIELDS = ("keys", "values") + Tokens.BOOKKEEPING
BOOKKEEPING_DTYPES = {"token_idx": torch.int64, "score": torch.float32, "score_sum": torch.float32,
                      "sink": torch.bool}
# keys and values may be in any dtype an engine runs in (the weight fingerprint lets a bfloat16
# engine's memory load into a float32 engine of the same checkpoint); they are converted on load
KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TIME_DTYPES = {"ns": torch.int64, "s": torch.float64}     # int stamps are nanoseconds, float ones seconds
INT64 = (-2 ** 63, 2 ** 63)


class MemoryFileError(ValueError):
    """A memory file that does not fit this engine (or is not a memory file); memory is unchanged."""


def identity(engine) -> dict[str, str]:
    """What a memory is only valid for. The weight fingerprint is taken at bf16 precision, so the
    same checkpoint loaded as float32 or bfloat16 agrees."""
    kv, cfg = engine.model.kv, engine.config
    probe = engine.model.weight_probe().detach().to(torch.bfloat16).float().cpu()
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


def checksum(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """sha256 of every tensor (name, dtype, shape, bytes) and every other header field: what shapes
    and counts cannot tell (keys and values swapped, a damaged byte) is still refused."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    h.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    return h.hexdigest()


def save_memory(engine, path: str | Path):
    """Write the engine's memory to `path` atomically (temp file + fsync + rename)."""
    engine.flush()
    mem = engine.memory
    tensors = {}
    for tier in TIERS:
        view = getattr(mem, tier).dense_view()          # int8: dequantized; re-quantized when loaded
        for name, t in zip(FIELDS, view.fields()):
            tensors[f"{tier}.{name}"] = t.contiguous().cpu()
    stamps = mem.frame_times[:1] + [engine._last_sampled]
    unit = "ns" if any(isinstance(t, int) for t in stamps) else "s"
    tensors["frame_times"] = torch.tensor(mem.frame_times, dtype=TIME_DTYPES[unit])
    cameras = sorted(set(mem.frame_cameras))
    number = {name: i for i, name in enumerate(cameras)}
    tensors["frame_camera"] = torch.tensor([number[c] for c in mem.frame_cameras], dtype=torch.int32)
    # where each frame was taken: x, y, z, qx, qy, qz, qw; NaN where unknown
    tensors["frame_pose"] = torch.tensor([list(p) if p is not None else [math.nan] * 7 for p in mem.frame_poses],
                                         dtype=torch.float64).reshape(-1, 7)
    meta = dict(identity(engine), next_token=str(mem.next_token), n_sinks=str(mem.n_sinks),
                cameras=json.dumps(cameras),
                frames_seen=str(engine.frames_seen),
                time_unit=unit,
                last_sampled=json.dumps(engine._last_sampled))
    meta["checksum"] = checksum(tensors, meta)
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
    """Replace the engine's memory with the one saved at `path`, or raise MemoryFileError (and
    change nothing) if any part of the file does not fit."""
    path = Path(path)
    if not path.is_file():
        raise MemoryFileError(f"no memory file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:           # whatever the parser trips on, the file is not readable
        raise MemoryFileError(f"{path} is not a readable memory file: {err}") from err
    want = identity(engine)
    if meta.get("format") != FORMAT:
        raise MemoryFileError(f"{path} is not a livevlm memory file (format {meta.get('format')!r})")
    wrong = [f"{k}: file {meta.get(k)!r}, engine {v!r}" for k, v in want.items() if meta.get(k) != v]
    if wrong:
        raise MemoryFileError(f"{path} was saved for another model or memory setting: " + "; ".join(wrong))
    try:
        state = _validated(engine, tensors, meta)
    except _Invalid as err:
        raise MemoryFileError(f"{path} does not hold a memory this engine can use: {err}") from None
    try:
        memory = _build(engine, **state["memory"])
    except torch.OutOfMemoryError as err:
        raise MemoryFileError(f"{path}: not enough device memory to load it beside the current memory") from err
    engine._use_memory(memory, frames_seen=state["frames_seen"], last_sampled=state["last_sampled"])


class _Invalid(Exception):
    """One thing wrong with a memory file (load_memory names the file)."""


def _need(ok, why: str):
    if not ok:
        raise _Invalid(why)


def _count(meta: dict, key: str) -> int:
    value = meta.get(key)
    _need(value is not None, f"its header lacks {key}")
    _need(re.fullmatch(r"[0-9]{1,18}", value), f"header {key}={value!r} is not a count")
    return int(value)


def _json(meta: dict, key: str):
    _need(key in meta, f"its header lacks {key}")
    try:
        return json.loads(meta[key])
    except ValueError:
        raise _Invalid(f"header {key}={meta[key]!r} is not JSON") from None


def _validated(engine, tensors: dict, meta: dict) -> dict:
    """Everything in the file checked against this engine and against itself, before anything
    changes; what memory is built from. Raises _Invalid with the first thing wrong."""
    kv, cfg, T = engine.model.kv, engine.config, engine.model.tokens_per_frame

    # ---- header
    next_token, n_sinks, frames_seen = (_count(meta, k) for k in ("next_token", "n_sinks", "frames_seen"))
    unit = meta.get("time_unit", "s")                     # files from before int stamps hold seconds
    _need(unit in TIME_DTYPES, f"header time_unit={unit!r} is neither 'ns' nor 's'")
    last_sampled = _json(meta, "last_sampled")
    if last_sampled is not None:
        if unit == "ns":
            _need(type(last_sampled) is int and INT64[0] <= last_sampled < INT64[1],
                  f"header last_sampled={meta['last_sampled']!r} is not an int64 stamp in nanoseconds")
        else:
            _need(type(last_sampled) in (int, float) and math.isfinite(last_sampled),
                  f"header last_sampled={meta['last_sampled']!r} is not a finite stamp in seconds")
            last_sampled = float(last_sampled)
    # files from before cameras have neither the camera list nor frame_camera: frames of camera ""
    no_cameras = "cameras" not in meta and "frame_camera" not in tensors
    cameras = [""] if no_cameras else _json(meta, "cameras")
    _need(isinstance(cameras, list) and all(isinstance(c, str) for c in cameras) and len(set(cameras)) == len(cameras),
          f"header cameras={meta.get('cameras')!r} is not a list of distinct camera names")

    # ---- tensors: names, dtypes, shapes
    names = {f"{tier}.{f}" for tier in TIERS for f in FIELDS} | {"frame_times"}
    names |= set() if no_cameras else {"frame_camera"}
    names |= {"frame_pose"} & set(tensors)                 # files from before poses have none
    missing, unknown = sorted(names - set(tensors)), sorted(set(tensors) - names)
    _need(not missing, f"it lacks {', '.join(missing)}")
    _need(not unknown, f"it holds tensors a memory file does not have: {', '.join(unknown)}")
    kv_dtype = tensors["long.keys"].dtype
    _need(kv_dtype in KV_DTYPES, f"long.keys is {kv_dtype}, not one of {', '.join(map(str, KV_DTYPES))}")
    dtypes = {f"{tier}.{f}": kv_dtype if f in ("keys", "values") else BOOKKEEPING_DTYPES.get(f)
              for tier in TIERS for f in FIELDS}
    dtypes.update(frame_times=TIME_DTYPES[unit], frame_camera=torch.int32, frame_pose=torch.float64)
    for name in sorted(names):
        _need(tensors[name].dtype == dtypes[name], f"{name} is {tensors[name].dtype}, expected {dtypes[name]}"
              + (f" (time_unit {unit!r})" if name == "frame_times" else ""))
    n = {}
    for tier in TIERS:
        keys = tensors[f"{tier}.keys"]
        _need(keys.ndim == 4,
              f"{tier}.keys has shape {list(keys.shape)}, expected [layers, kv_heads, tokens, head_dim]")
        n[tier] = keys.shape[2]
        for f in FIELDS:
            shape = ((kv.layers, kv.kv_heads, n[tier], kv.head_dim) if f in ("keys", "values")
                     else (kv.layers, n[tier]))
            got = tuple(tensors[f"{tier}.{f}"].shape)
            _need(got == shape, f"{tier}.{f} has shape {list(got)}, expected {list(shape)}")
    frames = tensors["frame_times"].shape[0] if tensors["frame_times"].ndim == 1 else -1
    _need(frames >= 0, f"frame_times has shape {list(tensors['frame_times'].shape)}, expected [frames]")
    if not no_cameras:
        got = tuple(tensors["frame_camera"].shape)
        _need(got == (frames,), f"frame_camera has shape {list(got)}, expected [{frames}] (one per frame)")

    # ---- token counts: the stream's, the tiers' capacities
    _need(next_token == frames * T,
          f"next_token={next_token}, but {frames} frames of {T} tokens make {frames * T}")
    short = min(next_token, cfg.short_term_frames * T)
    _need(n["short"] == short, f"the short-term tier holds {n['short']} tokens; the stream and "
          f"short_term_frames={cfg.short_term_frames} give {short}")
    older = next_token - short                             # stream tokens that left short-term memory
    capacity = engine.memory.long_capacity
    long = older if capacity is None else min(capacity, older)
    _need(n["long"] == long, f"the long-term tier holds {n['long']} tokens; the stream gives {older}"
          + ("" if capacity is None else f" and the budget keeps {capacity}") + f", so {long}")

    # ---- stream indices, sinks
    short_idx = tensors["short.token_idx"]
    _need(torch.equal(short_idx, torch.arange(older, next_token).expand(kv.layers, -1)),
          f"short.token_idx is not the stream tokens [{older}, {next_token}) on every layer")
    long_idx = tensors["long.token_idx"]
    if n["long"]:
        _need(bool((long_idx[:, 0] >= 0).all() and (long_idx[:, -1] < older).all()
                   and (long_idx.diff(dim=1) > 0).all()),
              f"long.token_idx is not increasing stream tokens in [0, {older}) on every layer")
    _need(not tensors["short.sink"].any(), "short.sink marks vision sinks (only long-term memory has them)")
    most = 0 if cfg.compression == "keep_all" else n["long"]
    _need(n_sinks <= most, f"n_sinks={n_sinks}, but {cfg.policy} keeps at most {most} here")
    per_layer = tensors["long.sink"].sum(dim=1).tolist()
    _need(all(s == n_sinks for s in per_layer), f"long.sink marks {per_layer} sinks per layer, n_sinks={n_sinks}")

    # ---- stamps and cameras
    times = tensors["frame_times"]
    if unit == "s":
        _need(bool(times.isfinite().all()), "frame_times holds a stamp that is not finite")
    _need(bool((times.diff() >= 0).all()), "frame_times is not in time order")
    if no_cameras:
        frame_cameras = [""] * frames
    else:
        index = tensors["frame_camera"]
        _need(bool(((index >= 0) & (index < len(cameras))).all()),
              f"frame_camera names a camera outside the {len(cameras)} of the header's list")
        frame_cameras = [cameras[i] for i in index.tolist()]
    frame_poses = [None] * frames
    if "frame_pose" in tensors:
        poses = tensors["frame_pose"]
        _need(tuple(poses.shape) == (frames, 7), f"frame_pose has shape {list(poses.shape)}, expected [{frames}, 7]")
        known = ~poses.isnan().any(dim=1)
        _need(bool(poses[known].isfinite().all()) and bool(poses[~known].isnan().all()),
              "frame_pose holds a pose that is partly unknown or not finite")
        try:
            frame_poses = [check_pose(p) if k else None for p, k in zip(poses.tolist(), known.tolist())]
        except ValueError as err:
            _need(False, f"frame_pose: {err}")

    if "checksum" in meta:                                 # files from before it have none
        _need(meta["checksum"] == checksum(tensors, meta),
              "its checksum does not match its content (changed or damaged after it was written)")

    parts = {tier: Tokens(*(tensors[f"{tier}.{f}"] for f in FIELDS)) for tier in TIERS}
    return {"memory": dict(parts=parts, frame_times=times.tolist(), frame_cameras=frame_cameras,
                           frame_poses=frame_poses, next_token=next_token, n_sinks=n_sinks),
            "frames_seen": frames_seen, "last_sampled": last_sampled}


def _build(engine, parts: dict[str, Tokens], frame_times: list, frame_cameras: list[str],
           frame_poses: list[Pose | None], next_token: int, n_sinks: int) -> StreamingMemory:
    """A new memory holding a checked file's content, built beside the engine's own: nothing the
    engine uses changes until it is swapped in."""
    kv, old = engine.model.kv, engine.memory
    mem = StreamingMemory(kv, engine.config, engine.model.tokens_per_frame)
    mem.set_prefix(old.prefix_keys, old.prefix_values)    # the same system prompt: the header says so
    for tier, tokens in parts.items():
        buf = getattr(mem, tier)
        buf.reserve(tokens.n)
        buf.append(Tokens(*(t.to(buf.device, kv.dtype if i < 2 else t.dtype) for i, t in enumerate(tokens.fields()))))
    if mem.page_summaries is not None and mem.long.len:
        mem.page_summaries.append(mem.long.view().keys.to(kv.device))
    mem.frame_times, mem.frame_cameras, mem.frame_poses = frame_times, frame_cameras, frame_poses
    mem.next_token, mem.n_sinks = next_token, n_sinks
    return mem
