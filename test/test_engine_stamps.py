"""Stamps are exact: int stamps are nanoseconds (the ROS convention) and come back bit for bit -
in memory's frame times, evidence, spans, windows and memory files; float stamps are seconds, as
before. One memory holds one kind; frames out of time order are refused before anything changes."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from livevlm_ros.engine import EngineConfig, EngineInputError, LiveVLMEngine, MemoryFileError

QUESTION = "Where did I last see the red toolbox?"
# 1.764e18 ns is past 2**60: float64 holds it to 256 ns, so these stamps do not survive a float
BASE = 1_764_000_000_123_456_789
STEP = 100_000_001
SMALL = dict(budget_tokens=34 + 2 * 16 + 48, page_tokens=4, vision_sinks=4, sample_fps=0)


@pytest.fixture(scope="module")
def model(tiny_model_path):
    """One loaded model for the module's engines (each engine hooks it; closed after use)."""
    engine = LiveVLMEngine(EngineConfig(model_path=tiny_model_path, **SMALL))
    yield engine.model
    engine.close()


def engine_on(model, tiny_model_path, **options):
    return LiveVLMEngine(EngineConfig(model_path=tiny_model_path, **dict(SMALL, **options)), adapter=model)


def video(n, seed=5):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(n)]


def state(engine) -> tuple:
    """What a refused input must leave as it was."""
    mem = engine.memory
    tiers = tuple(t.clone() for tier in (mem.long, mem.short) for t in tier.view().fields())
    return ([(type(t), t) for t in mem.frame_times], list(mem.frame_cameras), mem.next_token, mem.n_sinks,
            engine.frames_seen, (type(engine._last_sampled), engine._last_sampled), len(engine._pending), tiers)


def same(a: tuple, b: tuple) -> bool:
    return a[:-1] == b[:-1] and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a[-1], b[-1]))


def typed(values) -> list:
    return [(type(v), v) for v in values]


def test_nanosecond_stamps_come_back_bit_for_bit(model, tiny_model_path, tmp_path):
    stamps = [BASE + k * STEP for k in range(12)]
    assert any(int(float(t)) != t for t in stamps)               # what a float would have lost
    engine = engine_on(model, tiny_model_path)
    for k, (frame, t) in enumerate(zip(video(12), stamps)):
        assert engine.ingest(frame, t, camera=("front", "rear")[k % 2])
    assert typed(engine.memory.frame_times) == typed(stamps)
    assert engine._last_sampled == stamps[-1] and type(engine._last_sampled) is int
    answer = engine.ask(QUESTION, max_new_tokens=2, evidence=12)
    assert answer.evidence and all(type(e.time) is int and e.time in stamps for e in answer.evidence)
    first, last = answer.span
    assert type(first) is type(last) is int and last == stamps[-1] and first in stamps
    assert answer.span == engine.memory.time_span() == engine.stats()["stream_span"]

    path = tmp_path / "memory.safetensors"
    engine.save_memory(path)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["time_unit"] == "ns" and json.loads(f.metadata()["last_sampled"]) == stamps[-1]
        assert f.get_tensor("frame_times").dtype == torch.int64 and f.get_tensor("frame_times").tolist() == stamps
    loaded = engine_on(model, tiny_model_path)
    loaded.load_memory(path)
    assert typed(loaded.memory.frame_times) == typed(stamps)
    assert typed([loaded._last_sampled]) == typed([stamps[-1]])
    again = loaded.ask(QUESTION, max_new_tokens=2, evidence=12)
    assert typed(again.span) == typed(answer.span)
    assert [(type(e.time), e.time, e.camera, e.weight) for e in again.evidence] == \
        [(type(e.time), e.time, e.camera, e.weight) for e in answer.evidence]
    assert again.token_ids == answer.token_ids

    # the stream goes on in nanoseconds; the order check compares exactly (1 ns older is older)
    assert loaded.ingest(video(1)[0], stamps[-1] + 1)
    with pytest.raises(EngineInputError, match=r"timestamp 1764000001\.\d{3} is older .*\(1764000001\.\d{3}\)"):
        loaded.ingest(video(1)[0], stamps[-1])
    for e in (engine, loaded):
        e.close()


def test_sampling_keeps_the_configured_rate_in_nanoseconds(model, tiny_model_path):
    engine = engine_on(model, tiny_model_path, sample_fps=2.0)
    stamps = [BASE + i * 1_000_000_000 // 30 for i in range(60)]      # 2 s of a 30 fps camera
    kept = [engine.ingest(f, t) for f, t in zip(video(60), stamps)]
    assert sum(kept) == 4 and engine.memory.frame_times == [stamps[i] for i in (0, 15, 30, 45)]
    engine.close()


SECONDS = [100.0 + 0.5 * k for k in range(12)]
NANOSECONDS = [BASE + 500_000_000 * k for k in range(12)]


@pytest.fixture(scope="module")
def twins(model, tiny_model_path):
    """The same 12 frames, stamped in float seconds in one memory and in int nanoseconds in the other."""
    engines = []
    for stamps in (SECONDS, NANOSECONDS):
        engine = engine_on(model, tiny_model_path)
        for frame, t in zip(video(12), stamps):
            engine.ingest(frame, t)
        engines.append(engine)
    yield engines
    for e in engines:
        e.close()


@pytest.mark.parametrize("window", [(None, None), (None, 3.0), (2.5, None), (2.0, 5.0), (2.05, 4.95), (0.0, 0.0),
                                    (5.5, 5.5), (1.0, 1.0), (20.0, 30.0), (0.2, 0.3)])
def test_windows_in_nanoseconds_read_what_the_same_windows_in_seconds_read(twins, window):
    """The same window (offsets from the first frame) in each memory's own unit reads the same
    tokens, gives the same answer and the same evidence (stamps mapped to frames)."""
    as_s = tuple(None if w is None else 100.0 + w for w in window)
    as_ns = tuple(None if w is None else BASE + round(w * 1e9) for w in window)
    results = []
    for engine, w, stamps in zip(twins, (as_s, as_ns), (SECONDS, NANOSECONDS)):
        frame_of = dict(zip(stamps, range(12)))
        try:
            a = engine.ask(QUESTION, max_new_tokens=2, return_logits=True, window=w, evidence=4)
            bounds = (-np.inf if w[0] is None else w[0], np.inf if w[1] is None else w[1])
            results.append((a.token_ids, a.first_logits, [(frame_of[e.time], e.weight) for e in a.evidence],
                            frame_of[a.span[0]], frame_of[a.span[1]], engine.memory.window_tokens(*bounds)))
        except EngineInputError as err:
            results.append(("refused", "keeps nothing" in str(err)))
    (s, n) = results
    if s[0] == "refused":
        assert n == s and s[1], results            # after the stream, or between two frames
    else:
        assert s[0] == n[0] and torch.equal(s[1], n[1]) and s[2:] == n[2:]


def test_a_window_of_the_other_kind_of_stamp_is_refused(twins):
    """Not compared across units: a float window on a nanosecond memory would be off by 1e9."""
    for engine, w in ((twins[0], (BASE, None)), (twins[1], (None, 105.0))):
        with pytest.raises(EngineInputError, match="memory's stamps are"):
            engine.ask(QUESTION, window=w)


def test_a_window_refused_in_nanoseconds_says_seconds(model, tiny_model_path):
    engine = engine_on(model, tiny_model_path)
    for frame, t in zip(video(3), [BASE, BASE + STEP, BASE + 2 * STEP]):
        engine.ingest(frame, t)
    with pytest.raises(EngineInputError, match=r"window \[1764000010\.123, 1764000020\.123\] s \(memory covers "
                                               r"1764000000\.123 \.\. 1764000000\.323 s\)"):
        engine.ask(QUESTION, window=(BASE + 10 ** 10, BASE + 2 * 10 ** 10))
    with pytest.raises(EngineInputError, match=r"starts \(1764000000\.323 s\) after it ends"):
        engine.ask(QUESTION, window=(BASE + 2 * STEP, BASE))
    engine.close()


def test_int_and_float_stamps_do_not_mix_in_one_memory(model, tiny_model_path):
    engine = engine_on(model, tiny_model_path, frames_per_clip=2)
    f = video(4)
    assert engine.ingest(f[0], BASE)                            # waits for its clip: the kind is set already
    before = state(engine)
    for bad in (float(BASE + STEP), 1.5, np.float32(2.0)):
        with pytest.raises(EngineInputError, match="is float seconds, but memory.s stamps are int nanoseconds"):
            engine.ingest(f[1], bad)
        with pytest.raises(EngineInputError, match="memory's stamps are int nanoseconds"):
            engine.ingest_embeddings(torch.zeros(16, 64), [bad])
    for bad, match in ((True, "must be int nanoseconds or float seconds"), ("1", "got str"), (None, "got NoneType"),
                       (2 ** 63, "out of range"), (float("nan"), "not a finite")):
        with pytest.raises(EngineInputError, match=match):
            engine.ingest(f[1], bad)
    assert same(state(engine), before)
    assert engine.ingest(f[1], np.int64(BASE + STEP))            # numpy ints are ints (exactly)
    assert typed(engine.memory.frame_times) == typed([BASE, BASE + STEP])
    engine.reset()                                               # a new stream may use the other kind
    assert engine.ingest(f[2], 1.5) and engine.ingest(f[3], 2.0)
    with pytest.raises(EngineInputError, match="float seconds"):
        engine.ingest(f[0], 3)
    fresh = engine_on(model, tiny_model_path)
    with pytest.raises(EngineInputError, match="mix int nanoseconds and float seconds"):
        fresh.ingest_embeddings(torch.zeros(32, 64), [BASE, 2.0])
    assert fresh.memory.frames_ingested == 0 and fresh._last_sampled is None
    for e in (engine, fresh):
        e.close()


def test_stamps_out_of_time_order_are_refused_before_anything_changes(model, tiny_model_path):
    engine = engine_on(model, tiny_model_path, sample_fps=1.0)
    T = engine.model.tokens_per_frame
    engine.ingest_embeddings(torch.randn(3 * T, 64), [10.0, 11.0, 12.0])
    before = state(engine)
    for stamps in ([13.0, 19.0, 5.0, 1.0], [14.0, 13.5], [11.0, 13.0], [12.5, 12.5, 12.4]):
        with pytest.raises(EngineInputError, match="time order"):
            engine.ingest_embeddings(torch.randn(len(stamps) * T, 64), stamps)
        assert same(state(engine), before), stamps
    # older than the newest frame in memory (ingest_embeddings sets no sampling stamp: memory's counts)
    with pytest.raises(EngineInputError, match="time order"):
        engine.ingest(video(1)[0], 11.5)
    assert same(state(engine), before)
    engine.ingest_embeddings(torch.randn(2 * T, 64), [12.0, 12.0])          # equal stamps are in order
    assert engine.ingest(video(1)[0], 20.0) and engine._last_sampled == 20.0
    assert not engine.ingest(video(1)[0], 20.5)                            # sampled out: nothing moves
    after = state(engine)
    with pytest.raises(EngineInputError, match="time order"):              # refused: nothing moves
        engine.ingest(video(1)[0], 19.0)
    assert same(state(engine), after) and engine._last_sampled == 20.0
    assert engine.ingest(video(1)[0], 21.0)
    assert engine.memory.frame_times == [10.0, 11.0, 12.0, 12.0, 12.0, 20.0, 21.0]
    engine.close()


def test_an_older_float_file_still_loads_as_floats(model, tiny_model_path, tmp_path):
    """Files from before time_unit and checksums (and before cameras) hold float64 seconds; their
    last_sampled may be an int (ingest kept it unconverted then): it loads as a float."""
    engine = engine_on(model, tiny_model_path)
    for k, frame in enumerate(video(6)):
        engine.ingest(frame, 100.0 + k)
    engine.save_memory(tmp_path / "new.safetensors")
    tensors = load_file(str(tmp_path / "new.safetensors"))
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
        meta = f.metadata()
    old = {k: v for k, v in meta.items() if k not in ("time_unit", "checksum", "cameras")}
    old["last_sampled"] = "105"
    save_file({k: v for k, v in tensors.items() if k != "frame_camera"}, str(tmp_path / "old.safetensors"),
              metadata=old)
    loaded = engine_on(model, tiny_model_path)
    loaded.load_memory(tmp_path / "old.safetensors")
    assert typed(loaded.memory.frame_times) == typed([100.0 + k for k in range(6)])
    assert typed([loaded._last_sampled]) == [(float, 105.0)]
    assert loaded.ask(QUESTION, max_new_tokens=2).token_ids == engine.ask(QUESTION, max_new_tokens=2).token_ids
    assert loaded.ingest(video(1)[0], 106.0) and type(loaded.memory.frame_times[-1]) is float
    for e in (engine, loaded):
        e.close()


def test_a_file_whose_stamps_do_not_match_its_time_unit_is_refused(model, tiny_model_path, tmp_path):
    engine = engine_on(model, tiny_model_path)
    for k, frame in enumerate(video(4)):
        engine.ingest(frame, BASE + k * STEP)
    engine.save_memory(tmp_path / "ns.safetensors")
    tensors = load_file(str(tmp_path / "ns.safetensors"))
    with safe_open(str(tmp_path / "ns.safetensors"), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "checksum"}
    target = engine_on(model, tiny_model_path)
    target.ingest(video(1)[0], 7.0)
    before = state(target)
    for name, t, m, match in (
            ("seconds", tensors, dict(meta, time_unit="s"), "frame_times is torch.int64, expected torch.float64"),
            ("no unit", tensors, {k: v for k, v in meta.items() if k != "time_unit"}, "expected torch.float64"),
            ("float times", dict(tensors, frame_times=tensors["frame_times"].double()), meta, "expected torch.int64"),
            ("float last_sampled", tensors, dict(meta, last_sampled=json.dumps(float(BASE))), "last_sampled"),
            ("out of order", dict(tensors, frame_times=tensors["frame_times"].flip(0)), meta, "time order")):
        save_file(t, str(tmp_path / "bad.safetensors"), metadata=m)
        with pytest.raises(MemoryFileError, match=match):
            target.load_memory(tmp_path / "bad.safetensors")
        assert same(state(target), before), name
    for e in (engine, target):
        e.close()
