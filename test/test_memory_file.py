"""Memory across restarts. Node level: ~/save_memory, the memory_file loaded at start and saved on a
clean shutdown, SIGKILL around a save, a damaged file refused with the node running on empty memory.
Engine level: loading never damages memory - a few hundred mutated files (cut short, a tensor
missing, reshaped, retyped, swapped, out of range, over the budget, a header changed, another model,
random bytes) are each refused with memory bit for bit as it was, or, where the change is harmless,
load and answer as the original does; every policy's own file loads."""

import json
import signal
import subprocess

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ros_harness import Client, client, node_params, ros2, start  # noqa: F401,I100 (domain first; fixtures)


def saved_frames(path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return f.get_slice("frame_times").get_shape()[0]


def feed(client, stamps):  # noqa: F811
    before = int(client.node_status()["frames_ingested"])
    for t in stamps:
        client.image_pub.publish(client.image(t))
    client.wait_for(lambda: int(client.node_status()["frames_ingested"]) == before + len(stamps), 10,
                    f"{len(stamps)} frames")


@pytest.mark.timeout(240)
def test_memory_survives_restarts_kills_and_damage(client, start, tiny_model_path, tmp_path):  # noqa: F811
    memory = tmp_path / "memory.safetensors"
    params = node_params(tiny_model_path, memory_file=str(memory))
    first = start(params)
    client.wait_ready(first)
    feed(client, [1.0, 1.2, 1.4])
    out = ros2("service", "call", "/livevlm/save_memory", "std_srvs/srv/Trigger")
    assert "success=True" in out and "saved 3 frames" in out, out
    feed(client, [1.6, 1.8])
    # a save requested, and the node killed around it: the file on disk is a whole one, old or new
    call = subprocess.Popen(["ros2", "service", "call", "/livevlm/save_memory", "std_srvs/srv/Trigger"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client.wait_for(lambda: call.poll() is not None or memory.stat().st_mtime_ns > 0, 1, "the call to start")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(5)
    call.kill()
    assert saved_frames(memory) in (3, 5)
    assert [p.name for p in tmp_path.glob(".memory.safetensors*")] in ([], [p.name for p in tmp_path.glob(".*tmp")])

    # a killed server can look alive to an old client for a while: each restart gets a fresh client
    client.close()
    client = Client()
    second = start(params)                                   # loads the file at start
    client.wait_ready(second)
    answer = client.query("Is the door open?")
    assert answer.success and answer.span_start.sec == 1
    feed(client, [2.0])
    loaded = saved_frames(memory)
    second.proc.send_signal(signal.SIGINT)                   # a clean shutdown saves
    second.proc.wait(10)
    assert saved_frames(memory) == loaded + 1

    memory.write_bytes(memory.read_bytes()[:100])           # damaged: refused, the node runs on empty memory
    client.close()
    client = Client()
    third = start(params)
    status = client.wait_ready(third)
    status = client.wait_for(lambda: (s := client.node_status()) and s["level"] == 1 and s, 10, "WARN status")
    assert "memory file refused" in status["message"]
    empty = client.query("Is the door open?")
    assert not empty.success and "no frame" in empty.error_message
    assert third.alive()
    client.close()


@pytest.fixture(scope="module", autouse=True)
def _rclpy_shutdown_at_end():
    yield
    import rclpy
    rclpy.try_shutdown()


# ---- engine level: loading a memory file never damages memory --------------------------------------

QUESTION = "Is the door open?"
FIELDS = ("keys", "values", "token_idx", "score", "score_sum", "sink")
TIER_TENSORS = [f"{tier}.{f}" for tier in ("long", "short") for f in FIELDS]
# prefix 34 + short-term 2 x 16 + long-term 48: 10 frames of 16 tokens fill long-term memory and VSB compresses
SMALL = dict(budget_tokens=34 + 2 * 16 + 48, page_tokens=4, vision_sinks=4, sample_fps=0)


def snapshot(engine) -> dict:
    """Everything memory holds (and the stream counters), copied, to compare bit for bit."""
    mem = engine.memory
    out = {name: t.clone() for tier in ("long", "short")
           for name, t in zip((f"{tier}.{f}" for f in FIELDS), getattr(mem, tier).view().fields())}
    out.update(prefix_keys=mem.prefix_keys.clone(), prefix_values=mem.prefix_values.clone(),
               frame_times=[(type(t), t) for t in mem.frame_times], frame_cameras=list(mem.frame_cameras),
               frame_poses=list(mem.frame_poses),
               next_token=mem.next_token, n_sinks=mem.n_sinks, frames_seen=engine.frames_seen,
               last_sampled=(type(engine._last_sampled), engine._last_sampled), pending=len(engine._pending))
    return out


def differences(got: dict, want: dict) -> list[str]:
    out = []
    for k, w in want.items():
        g = got[k]
        if isinstance(w, torch.Tensor):
            if g.dtype != w.dtype or g.shape != w.shape or not torch.equal(g, w):
                out.append(f"{k} {g.dtype}{list(g.shape)} != {w.dtype}{list(w.shape)}")
        elif g != w:
            out.append(f"{k}: {str(g)[:60]} != {str(w)[:60]}")
    return out


def write(path, tensors: dict, meta: dict):
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def read(path):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), meta


def same_content(a, b) -> bool:
    (ta, ma), (tb, mb) = a, b
    return ma == mb and ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and torch.equal(ta[k], tb[k]) for k in ta)


def with_(src: dict, **put):
    out = dict(src)
    out.update(put)
    return out


def without(src: dict, *names):
    return {k: v for k, v in src.items() if k not in names}


def resized(t: torch.Tensor, axis: int, delta: int) -> torch.Tensor:
    """t one element shorter (delta -1) or longer (+1, the last slice repeated) along `axis`."""
    if delta < 0:
        return t.narrow(axis, 0, t.shape[axis] - 1)
    return torch.cat([t, t.narrow(axis, t.shape[axis] - 1, 1)], dim=axis)


def dict_mutations(tensors: dict, meta: dict, T: int):
    """(family, name, tensors, meta, expect) for mutations of the file's content. Checks that shapes
    and counts cannot make (two tensors of one shape swapped) keep the file's checksum; the others
    drop it, so that each must be refused by the check that looks at what it changed (a file without
    a checksum is one from before checksums: it loads when nothing else is wrong). expect: "refuse",
    or a dict of what a harmless change changes in memory (loads, answers as the original does)."""
    bare = without(meta, "checksum")
    n_frames = tensors["frame_times"].shape[0]

    # harmless, decided here: an older file's header (no checksum, no time_unit: seconds; no
    # cameras at all: camera ""), an extra header field, a changed counter that nothing depends on
    yield "harmless", "no checksum", tensors, bare, {}
    yield "harmless", "no time_unit (seconds)", tensors, without(bare, "time_unit"), {}
    yield "harmless", "no cameras (older file)", without(tensors, "frame_camera"), without(bare, "cameras"), \
        {"frame_cameras": [""] * n_frames}
    yield "harmless", "no poses (older file)", without(tensors, "frame_pose"), bare, {"frame_poses": [None] * n_frames}
    yield "harmless", "extra header field", tensors, with_(bare, note="hello"), {}
    fs = int(meta["frames_seen"])
    for v in (fs + 1, fs - 1, 0):
        yield "harmless", f"frames_seen={v}", tensors, with_(bare, frames_seen=str(v)), {"frames_seen": v}
    for raw, value in (("null", None), ("3.25", 3.25), ("104", 104.0)):
        yield "harmless", f"last_sampled={raw}", tensors, with_(bare, last_sampled=raw), \
            {"last_sampled": (type(value), value)}

    for name in [n for n in tensors if n != "frame_pose"]:  # (poses may be missing: above)
        yield "missing", name, without(tensors, name), bare, "refuse"
    poses = tensors["frame_pose"]
    for what, bad in (("partly unknown", (0, 3, float("nan"))), ("not a unit quaternion", (0, 6, 3.0)),
                      ("infinite", (1, 0, float("inf")))):
        changed = poses.clone()
        changed[bad[0], bad[1]] = bad[2]
        yield "value", f"frame_pose {what}", with_(tensors, frame_pose=changed), bare, "refuse"
    yield "missing", "every tensor", {}, bare, "refuse"
    yield "unknown", "long.extra", with_(tensors, **{"long.extra": tensors["long.keys"]}), bare, "refuse"
    yield "unknown", "notes", with_(tensors, notes=torch.zeros(3)), bare, "refuse"

    for name, t in tensors.items():
        for axis in range(t.ndim):
            for delta in (-1, 1):
                yield "shape", f"{name} axis {axis} {delta:+d}", with_(tensors, **{name: resized(t, axis, delta)}), \
                    bare, "refuse"
        yield "shape", f"{name} unsqueezed", with_(tensors, **{name: t[None]}), bare, "refuse"
        if t.ndim > 1:
            yield "shape", f"{name} flattened", with_(tensors, **{name: t.reshape(-1)}), bare, "refuse"
    for tier, axis in (("long", 2), ("short", 2)):
        for delta in (-1, 1):
            tier_put = {f"{tier}.{f}": resized(tensors[f"{tier}.{f}"], axis if f in ("keys", "values") else 1, delta)
                        for f in FIELDS}
            yield "shape", f"whole {tier} tier {delta:+d} token", with_(tensors, **tier_put), bare, "refuse"
    yield "shape", "one frame fewer", with_(tensors, frame_times=tensors["frame_times"][:-1],
                                            frame_camera=tensors["frame_camera"][:-1]), bare, "refuse"
    yield "shape", "one frame fewer, next_token to match", \
        with_(tensors, frame_times=tensors["frame_times"][:-1], frame_camera=tensors["frame_camera"][:-1]), \
        with_(bare, next_token=str((n_frames - 1) * T)), "refuse"

    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
              torch.bool)
    for name, t in tensors.items():
        for dtype in dtypes:
            if dtype != t.dtype:
                yield "dtype", f"{name} as {dtype}", with_(tensors, **{name: t.to(dtype)}), bare, "refuse"

    # swapped: tensors of one shape and dtype the checksum tells apart; the others by shape or dtype
    for a, b in (("long.keys", "long.values"), ("short.keys", "short.values"), ("long.score", "long.score_sum"),
                 ("short.score", "short.score_sum")):
        yield "swap", f"{a} <-> {b} (checksum kept)", with_(tensors, **{a: tensors[b], b: tensors[a]}), meta, "refuse"
    for a, b in (("long.keys", "short.keys"), ("long.token_idx", "long.score"), ("long.sink", "short.sink"),
                 ("frame_times", "frame_camera"), ("long.token_idx", "short.token_idx")):
        yield "swap", f"{a} <-> {b}", with_(tensors, **{a: tensors[b], b: tensors[a]}), bare, "refuse"
    tiers = {f"{t}.{f}": tensors[f"{o}.{f}"] for t, o in (("long", "short"), ("short", "long")) for f in FIELDS}
    yield "swap", "long tier <-> short tier", with_(tensors, **tiers), bare, "refuse"
    yield "swap", "header next_token <-> frames_seen", tensors, \
        with_(bare, next_token=meta["frames_seen"], frames_seen=meta["next_token"]), "refuse"

    # contents out of range or inconsistent, shapes right
    idx, sidx = tensors["long.token_idx"], tensors["short.token_idx"]
    for name, t in (("long.token_idx", idx), ("short.token_idx", sidx)):
        for view in ("[:1, :1]", "[:, :1]", "[:1]"):
            yield "token_idx", f"{name}{view} (broadcast)", with_(tensors, **{name: eval(f"t{view}")}), bare, "refuse"

    def edited(t, at, value):
        t = t.clone()
        t[at] = value
        return t
    older = int(meta["next_token"]) - sidx.shape[1]
    for what, t in (("duplicate", edited(idx, (0, 5), idx[0, 4])), ("negative", edited(idx, (0, 0), -1)),
                    ("past short-term", edited(idx, (1, -1), older)),
                    ("past next_token", edited(idx, (1, -1), 10 ** 6)),
                    ("out of order", edited(edited(idx, (0, 3), idx[0, 7]), (0, 7), idx[0, 3]))):
        yield "token_idx", f"long.token_idx {what}", with_(tensors, **{"long.token_idx": t}), bare, "refuse"
    yield "token_idx", "short.token_idx shifted", with_(tensors, **{"short.token_idx": sidx + 1}), bare, "refuse"
    yield "token_idx", "short.token_idx one layer shifted", \
        with_(tensors, **{"short.token_idx": edited(sidx, 1, sidx[1] - 1)}), bare, "refuse"

    sink = tensors["long.sink"]
    free = int((~sink[0]).nonzero()[0])
    yield "sinks", "one more sink on layer 0", with_(tensors, **{"long.sink": edited(sink, (0, free), True)}), \
        bare, "refuse"
    yield "sinks", "no sinks", with_(tensors, **{"long.sink": torch.zeros_like(sink)}), bare, "refuse"
    yield "sinks", "a sink in short-term memory", \
        with_(tensors, **{"short.sink": edited(tensors["short.sink"], (0, 0), True)}), bare, "refuse"
    for v in (int(meta["n_sinks"]) + 1, int(meta["n_sinks"]) - 1, 0, 10 ** 6):
        yield "sinks", f"n_sinks={v}", tensors, with_(bare, n_sinks=str(v)), "refuse"

    cam = tensors["frame_camera"]
    n_cameras = len(json.loads(meta["cameras"]))
    for v in (n_cameras, -1, 1000):
        yield "cameras", f"frame_camera {v}", with_(tensors, frame_camera=edited(cam, 3, v)), bare, "refuse"
    for raw in ("abc", "[1, 2]", '"front"', '["front", "front"]', '["front"]', "[]", "null", "{}"):
        yield "cameras", f"cameras={raw}", tensors, with_(bare, cameras=raw), "refuse"
    yield "cameras", "frame_camera without the cameras header", tensors, without(bare, "cameras"), "refuse"
    yield "cameras", "cameras header without frame_camera", without(tensors, "frame_camera"), bare, "refuse"

    times = tensors["frame_times"]
    for what, t in (("out of order", edited(edited(times, 2, times[6]), 6, times[2])),
                    ("NaN", edited(times, 4, np.nan)),
                    ("inf", edited(times, 9, np.inf)), ("-inf", edited(times, 0, -np.inf))):
        yield "frame_times", what, with_(tensors, frame_times=t), bare, "refuse"

    # the long-term tier 10x what the budget keeps, everything else consistent with it
    L, n_long, n_short = idx.shape[0], idx.shape[1], sidx.shape[1]
    big, frames = 10 * n_long, (10 * n_long + n_short) // T
    huge = {f"long.{f}": tensors[f"long.{f}"].repeat(*((1, 1, 10, 1) if f in ("keys", "values") else (1, 10)))
            for f in FIELDS}
    huge.update({"long.token_idx": torch.arange(big).expand(L, -1), "long.sink": torch.zeros(L, big, dtype=torch.bool),
                 "short.token_idx": torch.arange(big, big + n_short).expand(L, -1),
                 "frame_times": 100.0 + 0.5 * torch.arange(frames, dtype=torch.float64),
                 "frame_camera": torch.zeros(frames, dtype=torch.int32)})
    huge["long.sink"][:, :int(meta["n_sinks"])] = True
    yield "budget", "long tier 10x the budget", with_(tensors, **huge), with_(bare, next_token=str(big + n_short)), \
        "refuse"
    yield "budget", "long tier 10x, next_token not matching", with_(tensors, **huge), bare, "refuse"
    double = {f"short.{f}": torch.cat([tensors[f"short.{f}"]] * 2, dim=2 if f in ("keys", "values") else 1)
              for f in FIELDS}
    double["short.token_idx"] = torch.arange(older, older + 2 * n_short).expand(L, -1)
    more = n_frames + n_short // T
    yield "budget", "short tier 2x short_term_frames", \
        with_(tensors, **double, frame_times=100.0 + 0.5 * torch.arange(more, dtype=torch.float64),
              frame_camera=torch.zeros(more, dtype=torch.int32)), with_(bare, next_token=str(more * T)), "refuse"

    # the header
    for key in meta:
        if key not in ("checksum", "time_unit"):
            yield "header", f"no {key}", tensors, without(bare, key), "refuse"
    for key in ("next_token", "n_sinks", "frames_seen"):
        v = int(meta[key])
        bad = ["abc", "", "-1", "1.5", "1e3", " 12", "0x10", "99999999999999999999"]
        bad += [] if key == "frames_seen" else [str(v + 1), str(v - 1), str(v + T)]
        for raw in bad:
            yield "header", f"{key}={raw!r}", tensors, with_(bare, **{key: raw}), "refuse"
    for key in ("format", "model", "weights", "policy", "budget_tokens", "short_term_frames", "page_tokens",
                "system_prompt"):
        for raw in ("x", meta[key] + " ", "None"):
            yield "header", f"{key}={raw!r}", tensors, with_(bare, **{key: raw}), "refuse"
    yield "header", "policy=full", tensors, with_(bare, policy="full"), "refuse"
    yield "header", "format=livevlm-memory/2", tensors, with_(bare, format="livevlm-memory/2"), "refuse"
    for raw in ("ns", "ms", "", "S"):
        yield "header", f"time_unit={raw!r}", tensors, with_(bare, time_unit=raw), "refuse"
    for raw in ("abc", "NaN", "Infinity", "1e400", '"104.5"', "true", "[1]", ""):
        yield "header", f"last_sampled={raw!r}", tensors, with_(bare, last_sampled=raw), "refuse"
    yield "header", "changed, checksum kept", tensors, with_(meta, frames_seen="0"), "refuse"
    yield "header", "checksum wrong", tensors, with_(meta, checksum="0" * 64), "refuse"


def byte_mutations(raw: bytes):
    """(family, name, bytes) of damaged files: cut short anywhere, bytes flipped anywhere (the
    checksum or the parser catches them), random bytes, zeros."""
    header_end = 8 + int.from_bytes(raw[:8], "little")
    cuts = set(range(0, len(raw), max(1, len(raw) // 60))) | {1, 7, 8, 9, header_end - 1, header_end, header_end + 1,
                                                             len(raw) - 8, len(raw) - 1}
    for n in sorted(cuts):
        yield "truncated", f"first {n} of {len(raw)} bytes", raw[:n]
    flips = set(range(3, len(raw), max(1, len(raw) // 70))) | {0, 2, 9, 20, header_end - 3, header_end - 1, header_end}
    for at in sorted(flips):
        yield "flipped", f"byte {at} ^ 0x01", raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1:]
    rng = np.random.default_rng(0)
    for i, n in enumerate((8, 64, 1024, len(raw)) * 2):
        yield "random", f"{n} random bytes ({i})", rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    yield "random", "random bytes after a real header", raw[:header_end] + rng.integers(
        0, 256, len(raw) - header_end, dtype=np.uint8).tobytes()
    yield "random", "zeros", bytes(len(raw))
    yield "random", "a JSON file", json.dumps({"frames": [1, 2, 3]}).encode()


@pytest.fixture(scope="module")
def saved_memory(tiny_model_path, tmp_path_factory):
    """A VSB memory of 10 frames of two cameras (long-term memory full and compressed), saved;
    where each was taken is known but for frames 3 and 4."""
    from livevlm_ros.engine import EngineConfig, LiveVLMEngine

    tmp = tmp_path_factory.mktemp("memory_files")
    source = LiveVLMEngine(EngineConfig(model_path=tiny_model_path, **SMALL))
    rng = np.random.default_rng(7)
    for i in range(10):
        source.ingest(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), 100.0 + 0.5 * i,
                      camera=("front", "rear")[i % 2],
                      pose=None if i in (3, 4) else (0.5 * i, -1.0, 0.25, 0.0, 0.0, 0.6, 0.8))
    path = tmp / "memory.safetensors"
    source.save_memory(path)
    yield source, path, tmp
    source.close()


def test_a_file_that_does_not_fit_never_changes_memory(saved_memory, tiny_model_path):
    """Hundreds of mutated files, each loaded into an engine with a memory of its own: refused with
    MemoryFileError and that memory bit for bit as it was (and the same answer), or, for a harmless
    change (decided in dict_mutations; a damaged file whose content still reads the same is one),
    loaded, equal to the original memory but for what the change changes, answering as it does."""
    from livevlm_ros.engine import LiveVLMEngine, MemoryFileError
    from livevlm_ros.tools.make_tiny_model import build

    source, path, tmp = saved_memory
    cfg = source.config
    original = read(path)
    want_loaded, want_answer = snapshot(source), source.ask(QUESTION, max_new_tokens=3).text
    T = source.model.tokens_per_frame

    target = LiveVLMEngine(cfg, adapter=source.model)
    rng = np.random.default_rng(99)
    for i in range(4):
        target.ingest(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), 5.0 + i, camera="left")
    own = tmp / "own.safetensors"
    target.save_memory(own)
    before, before_answer = snapshot(target), target.ask(QUESTION, max_new_tokens=3).text
    assert before_answer != want_answer or differences(before, want_loaded)

    cases = [(fam, name, ("tensors", t, m), expect) for fam, name, t, m, expect in dict_mutations(*original, T)]
    cases += [(fam, name, ("bytes", b), "refuse") for fam, name, b in byte_mutations(path.read_bytes())]
    other_model = LiveVLMEngine(cfg.replace(model_path=str(build(tmp / "other_model", seed=1))))
    other_model.ingest(np.zeros((48, 64, 3), np.uint8), 1.0)
    for what, engine in (("another model", other_model),
                         ("another budget", LiveVLMEngine(cfg.replace(budget_tokens=cfg.budget_tokens + 16),
                                                          adapter=source.model)),
                         ("another policy", LiveVLMEngine(cfg.replace(policy="sliding_window"), adapter=source.model))):
        if not engine.memory.frames_ingested:
            engine.ingest(np.zeros((48, 64, 3), np.uint8), 1.0)
        engine.save_memory(tmp / "other.safetensors")
        cases.append(("other", what, ("bytes", (tmp / "other.safetensors").read_bytes()), "refuse"))
        engine.close()
    weights = (tmp / "other_model" / "model.safetensors").read_bytes()
    cases.append(("other", "the model's weights file", ("bytes", weights), "refuse"))
    cases.append(("other", "a safetensors file not ours", ("tensors", {"x": torch.ones(3)}, {}), "refuse"))
    cases.append(("other", "a directory", ("dir",), "refuse"))
    assert len(cases) > 300

    failures, refused, loaded = [], 0, 0
    by_family: dict[str, int] = {}
    for i, (family, name, payload, expect) in enumerate(cases):
        case = f"{family}: {name}"
        file = tmp / f"case{i}.safetensors"
        if payload[0] == "bytes":
            file.write_bytes(payload[1])
        elif payload[0] == "tensors":
            write(file, payload[1], payload[2])
        else:
            file.mkdir()
        try:
            target.load_memory(file)
            outcome = None
        except Exception as err:                                     # noqa: BLE001 (any but MemoryFileError fails)
            outcome = err
        if outcome is not None and not isinstance(outcome, MemoryFileError):
            diff = differences(snapshot(target), before)
            failures.append(f"{case}: raised {type(outcome).__name__}: {outcome}"
                            + (f"; memory changed: {diff[:3]}" if diff else ""))
        if outcome is None and expect == "refuse" and payload[0] == "bytes" and same_content(read(file), original):
            expect = {}                                              # damaged where nothing reads it
        if isinstance(outcome, MemoryFileError):
            refused += 1
            if expect != "refuse":
                failures.append(f"{case}: refused a harmless change: {outcome}")
            elif diff := differences(snapshot(target), before):
                failures.append(f"{case}: refused, but memory changed: {diff[:3]}")
        elif outcome is None:
            loaded += 1
            if expect == "refuse":
                failures.append(f"{case}: loaded (memory now holds {target.memory.frames_ingested} frames, "
                                f"had {len(before['frame_times'])})")
            else:
                diff = differences(snapshot(target), {**want_loaded, **expect})
                answer = target.ask(QUESTION, max_new_tokens=3).text
                if diff or answer != want_answer:
                    failures.append(f"{case}: loaded, but not as the original: {diff[:3]} {answer!r}")
        if outcome is None or differences(snapshot(target), before):
            target.load_memory(own)                                  # back to its own memory, for the next case
            assert not differences(snapshot(target), before)
        by_family[family] = by_family.get(family, 0) + 1
        last = i + 1 == len(cases) or cases[i + 1][0] != family
        if last and target.ask(QUESTION, max_new_tokens=3).text != before_answer:
            failures.append(f"{family}: the answer from the engine's own memory changed")
    print(f"{len(cases)} files: {refused} refused, {loaded} loaded; {by_family}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:60])


def test_a_bfloat16_engines_memory_loads_into_a_float32_engine(saved_memory):
    """Keys and values may come in any engine dtype (the weight fingerprint is taken at bf16 so the
    same checkpoint agrees): converted on load; all four must share one dtype (the mutations above)."""
    from livevlm_ros.engine import LiveVLMEngine

    source, path, tmp = saved_memory
    tensors, meta = read(path)
    kv = {k: v.to(torch.bfloat16) for k, v in tensors.items() if k.endswith((".keys", ".values"))}
    engine = LiveVLMEngine(source.config, adapter=source.model)
    engine.load_memory(write(tmp / "bf16.safetensors", with_(tensors, **kv), without(meta, "checksum")))
    for name, t in kv.items():
        tier, field = name.split(".")
        assert torch.equal(getattr(getattr(engine.memory, tier).view(), field), t.float())
    engine.close()


def test_a_file_from_before_poses_loads_with_poses_unknown(saved_memory):
    """Files written before memory kept poses have no frame_pose: they load, every pose unknown."""
    from livevlm_ros.engine import LiveVLMEngine

    source, path, tmp = saved_memory
    assert [p is None for p in source.memory.frame_poses] == [i in (3, 4) for i in range(10)]
    tensors, meta = read(path)
    assert tensors["frame_pose"].shape == (10, 7) and tensors["frame_pose"][3].isnan().all()
    engine = LiveVLMEngine(source.config, adapter=source.model)
    engine.load_memory(write(tmp / "old.safetensors", without(tensors, "frame_pose"), without(meta, "checksum")))
    assert engine.memory.frame_poses == [None] * 10
    want = snapshot(source)
    assert differences(snapshot(engine), dict(want, frame_poses=[None] * 10)) == []
    engine.close()


@pytest.mark.parametrize("policy, options", [
    ("livevlm", dict(SMALL)),
    ("livevlm", dict(SMALL, budget_tokens=None)),
    ("livevlm", dict(SMALL, frames_per_clip=3)),
    ("sliding_window", dict(SMALL)),
    ("full", dict(SMALL, budget_tokens=None)),
    ("rekv", dict(SMALL, budget_tokens=None))])
def test_every_policys_memory_round_trips(tiny_model_path, policy, options, tmp_path):
    """The checks refuse nothing an engine saves: each policy's memory (also empty, also after a
    batch of embeddings that evicts in several steps) loads bit for bit and answers the same."""
    from livevlm_ros.engine import EngineConfig, LiveVLMEngine

    cfg = EngineConfig(model_path=tiny_model_path, policy=policy, **options)
    engine = LiveVLMEngine(cfg)
    other = LiveVLMEngine(cfg, adapter=engine.model)
    rng = np.random.default_rng(3)
    for step in range(3):
        if step == 1:
            T, hidden = engine.model.tokens_per_frame, engine.model.embed_tokens(torch.tensor([1])).shape[-1]
            engine.ingest_embeddings(torch.randn(9 * T, hidden), [20.0 + k for k in range(9)])
        else:
            for k in range(4):
                engine.ingest(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), 40.0 * step + k)
        engine.save_memory(tmp_path / "m.safetensors")
        other.load_memory(tmp_path / "m.safetensors")
        assert not differences(snapshot(other), snapshot(engine))
        assert other.ask(QUESTION, max_new_tokens=2).token_ids == engine.ask(QUESTION, max_new_tokens=2).token_ids
    engine.reset()
    engine.save_memory(tmp_path / "empty.safetensors")
    other.load_memory(tmp_path / "empty.safetensors")
    assert not differences(snapshot(other), snapshot(engine))
