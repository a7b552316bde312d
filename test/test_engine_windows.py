"""Questions about a stretch of time: a window reads only memory of frames taken in it (and the
vision sinks), on every policy; a window memory keeps nothing of is refused; evidence names frames
inside it."""

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
