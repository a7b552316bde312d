"""Questions about a stretch of time or a place: a time window (a radius around a point) reads only
memory of frames taken in it (and the vision sinks), on every policy; a window or place memory keeps
nothing of is refused; evidence names frames inside it."""

import pytest
import torch

from livevlm_ros.engine import EngineConfig, EngineInputError, LiveVLMEngine

QUESTION = "Where did I last see the red toolbox?"


def stream(path, frames, policy, n=24, **options):
    options = dict(dict(page_tokens=4, vision_sinks=4), **options)
    engine = LiveVLMEngine(EngineConfig(model_path=path, policy=policy, sample_fps=0, short_term_frames=2, **options))
    for i, f in enumerate(frames(n)):
        engine.ingest(f, 100.0 + i)
    engine.hook.record_selection = True
    return engine


@pytest.mark.parametrize("policy, options, first, last", [
    ("livevlm", dict(budget_tokens=34 + 2 * 16 + 64, retrieval_ratio=0.5), 5, 12),
    ("rekv", dict(budget_tokens=None, page_tokens=6), 5, 12),    # the window's edges cut pages
    ("sliding_window", dict(budget_tokens=34 + 2 * 16 + 64), 19, 20),  # it keeps only the newest frames
    ("full", dict(budget_tokens=None), 5, 12)])
def test_a_window_reads_only_its_frames_and_the_sinks(tiny_model_path, frames, policy, options, first, last):
    engine = stream(tiny_model_path, frames, policy, **options)
    T = engine.model.tokens_per_frame
    start, end = 100.0 + first, 100.0 + last                   # frames in long-term memory only
    answer = engine.ask(QUESTION, max_new_tokens=2, window=(start, end), evidence=3)
    long = engine.memory.long.view()
    counts = set()
    for layer, read in engine.hook.last_selection.items():
        sinks = set(long.token_idx[layer][long.sink[layer]].tolist())
        outside = [t for t in read.tolist() if not first * T <= t < (last + 1) * T and t not in sinks]
        assert not outside, f"layer {layer} read tokens of frames outside the window: {outside[:5]}"
        assert len(read) > len(sinks), "nothing of the window was read"
        counts.add(len(read))
    assert all(start <= e.time <= end for e in answer.evidence) and answer.evidence
    if policy == "livevlm":
        # VSB keeps different tokens per layer, so a window holds different numbers of them
        assert len(counts) > 1, "the test must cover layers reading different numbers of tokens"
        assert answer.pages_used < answer.pages_total


def test_a_window_changes_what_is_read_and_the_evidence(tiny_model_path, frames):
    engine = stream(tiny_model_path, frames, "livevlm", budget_tokens=34 + 2 * 16 + 64)
    whole = engine.ask(QUESTION, max_new_tokens=1, evidence=24)
    early = engine.ask(QUESTION, max_new_tokens=1, evidence=24, window=(None, 107.5))
    assert max(e.time for e in whole.evidence) == 123.0        # the newest frame is always read
    assert max(e.time for e in early.evidence) <= 107.0
    assert early.context_tokens < whole.context_tokens


def test_windows_memory_keeps_nothing_of_are_refused(tiny_model_path, frames):
    engine = stream(tiny_model_path, frames, "livevlm", n=6, budget_tokens=None)
    before = engine.stats()
    with pytest.raises(EngineInputError, match="keeps nothing from the window"):
        engine.ask(QUESTION, window=(200.0, 300.0))
    with pytest.raises(EngineInputError, match="keeps nothing from the window"):
        engine.ask(QUESTION, window=(100.2, 100.8))                # between two frames
    with pytest.raises(EngineInputError, match="starts .* after it ends"):
        engine.ask(QUESTION, window=(103.0, 102.0))
    assert engine.stats() == before
    # a window of one instant reads that frame alone (and the sinks, which evidence leaves out)
    one = engine.ask(QUESTION, max_new_tokens=1, window=(100.0, 100.0), evidence=3)
    whole = engine.ask(QUESTION, max_new_tokens=1, evidence=3)
    assert [e.time for e in one.evidence] == [100.0] and len(whole.evidence) == 3
    assert one.context_tokens < whole.context_tokens


def test_evidence_names_the_camera(tiny_model_path, frames):
    engine = LiveVLMEngine(EngineConfig(model_path=tiny_model_path, policy="full", budget_tokens=None,
                                        sample_fps=0))
    for i, f in enumerate(frames(6)):
        engine.ingest(f, 100.0 + i // 2, camera="front" if i % 2 == 0 else "rear")
    answer = engine.ask(QUESTION, max_new_tokens=1, evidence=6)
    assert sorted((e.time, e.camera) for e in answer.evidence) == \
        [(t, c) for t in (100.0, 101.0, 102.0) for c in ("front", "rear")]
    rear = engine.ask(QUESTION, max_new_tokens=1, evidence=6, window=(101.0, 101.0))
    assert {(e.time, e.camera) for e in rear.evidence} == {(101.0, "front"), (101.0, "rear")}
    assert torch.isclose(torch.tensor(sum(e.weight for e in answer.evidence)), torch.tensor(1.0))


# ---- places ----------------------------------------------------------------------------------
def walk(tiny_model_path, frames, policy="livevlm", **options):
    """12 frames on a line x = 0..11 m; frame 6's pose is unknown."""
    engine = stream(tiny_model_path, frames, policy, n=0, **options)
    for i, f in enumerate(frames(12)):
        engine.ingest(f, 100.0 + i, pose=None if i == 6 else (float(i), 0.0, 0.0))
    return engine


def test_places_read_only_frames_taken_there_and_never_unknown_ones(tiny_model_path, frames):
    engine = walk(tiny_model_path, frames, budget_tokens=None, policy="full")
    a = engine.ask(QUESTION, max_new_tokens=1, near=(6.0, 0.0), radius_m=1.5, evidence=5)
    assert sorted(e.time for e in a.evidence) == [105.0, 107.0]          # frame 6 is there, but unknown
    assert all(e.pose is not None and abs(e.pose.x - 6.0) <= 1.5 for e in a.evidence)
    whole = engine.ask(QUESTION, max_new_tokens=1, evidence=12)
    assert [e.pose for e in whole.evidence if e.time == 106.0] == [None]


@pytest.mark.parametrize("policy, options", [("livevlm", dict(budget_tokens=34 + 2 * 16 + 64, retrieval_ratio=0.5)),
                                             ("sliding_window", dict(budget_tokens=34 + 2 * 16 + 64))])
def test_places_read_sinks_and_tokens_of_frames_in_the_radius_only(tiny_model_path, frames, policy, options):
    engine = walk(tiny_model_path, frames, policy, **options)
    T = engine.model.tokens_per_frame
    engine.ask(QUESTION, max_new_tokens=1, near=(2.0, 0.0), radius_m=3.0)
    for layer, read in engine.hook.last_selection.items():
        long = engine.memory.long.view()
        sinks = long.token_idx[layer][long.sink[layer]]
        inside = (read // T <= 5) & (read // T != 6)
        assert bool((inside | torch.isin(read, sinks)).all()), layer


def test_bad_places_are_refused_and_change_nothing(tiny_model_path, frames):
    engine = walk(tiny_model_path, frames, budget_tokens=None, policy="full")
    before = engine.stats()
    for near, radius, match in [((1.0, 0.0), -1.0, "radius_m must be"), ((1.0, 0.0), float("nan"), "radius_m must be"),
                                ((1.0, 0.0), float("inf"), "radius_m must be"), ((1.0, 0.0), 0.0, "radius_m must be"),
                                ((float("nan"), 0.0), 1.0, "not finite"), ((1.0,), 1.0, r"\(x, y\) or \(x, y, z\)"),
                                ((1.0, 0.0), None, "both near and radius_m"), (None, 1.0, "both near and radius_m"),
                                ("here", 1.0, "a place is near")]:
        with pytest.raises(EngineInputError, match=match):
            engine.ask(QUESTION, near=near, radius_m=radius)
    # a place memory keeps nothing of: the error names where memory's frames were taken
    where = r"within 1 m of \(50.0, 0.0\).*x 0.00\.\.11.00, y 0.00\.\.0.00.*11 of 12"
    with pytest.raises(EngineInputError, match=where):
        engine.ask(QUESTION, near=(50.0, 0.0), radius_m=1.0)
    with pytest.raises(EngineInputError, match="keeps nothing"):           # only frame 6 is there: unknown
        engine.ask(QUESTION, near=(6.0, 0.0), radius_m=0.5)
    with pytest.raises(EngineInputError, match="keeps nothing"):           # the place, but not in the window
        engine.ask(QUESTION, near=(1.0, 0.0), radius_m=0.5, window=(105.0, 110.0))
    for pose, match in [((1.0, 2.0), "3 numbers"), ((0.0, 0.0, float("nan")), "not finite"),
                        ((0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0), "unit quaternion")]:
        with pytest.raises(EngineInputError, match=match):
            engine.ingest(frames(1)[0], 200.0, pose=pose)
    assert engine.stats() == before


def test_places_are_not_read_from_an_offloaded_tier(tiny_model_path, frames):
    engine = walk(tiny_model_path, frames, "rekv", budget_tokens=None)
    with pytest.raises(EngineInputError, match="offloaded"):
        engine.ask(QUESTION, near=(1.0, 0.0), radius_m=1.0)
    assert engine.ask(QUESTION, max_new_tokens=1, window=(100.0, 103.0)).pages_total > 0
