"""The answer at fixed shapes - the question's prefill padded to a bucket, its rows weighted
(question_step.py), and the decode step (decode_step.py: one arena per layer, lengths on the device,
a mask instead of a slice) - gives the tokens, first logits and evidence of the ordinary per-answer
path. On the GPU the same steps are replayed from CUDA graphs; gpu_bench.py checks that replay the
same way (CI has no GPU)."""

import pytest
import torch

from livevlm_ros.engine import EngineConfig, LiveVLMEngine
from logit_spy import same_answer_up_to_a_near_tie, spy_on_logits  # noqa: I100

QUESTIONS = ["Where did I last see the red toolbox?", "Is the door open?", "What is on the left?"]


def engines(path, **options):
    return [LiveVLMEngine(EngineConfig(model_path=path, sample_fps=0, launch=mode, max_new_tokens=24, **options))
            for mode in ("eager", "static")]


# The 8-bit arena's error on this model's logits (scale ~0.6): at most 8.1e-4 (benchmarks/answer_margins.py).
INT8_LOGIT_ERROR = 2e-3


# kv_dtype int8: the fixed-shape steps decode from an 8-bit arena (hook/arena.py), the ordinary path
# from its own buffers at full precision; the first logits (the prefill, at full precision in both)
# must agree as closely, every decode step's within the arena's error (test_kv_int8.py bounds it)
@pytest.mark.parametrize("options", [dict(policy="livevlm", budget_tokens=34 + 2 * 16 + 64, page_tokens=4,
                                          retrieval_ratio=0.5),
                                     dict(policy="livevlm", budget_tokens=34 + 2 * 16 + 64, page_tokens=4,
                                          retrieval_ratio=0.5, kv_dtype="int8"),
                                     dict(policy="full", budget_tokens=None)])
def test_static_decode_gives_the_same_tokens(endless_model, frames, options):
    eager, static = engines(endless_model, **options)
    int8 = options.get("kv_dtype") == "int8"
    logged = [spy_on_logits(e) for e in (eager, static)]
    video = frames(16)
    for n_frames in (3, 16):                   # memory grows between answers: the arena grows with it
        for i in range(len(eager.memory.frame_times), n_frames):
            for engine in (eager, static):
                engine.ingest(video[i], float(i))
        for question in QUESTIONS:
            for window in (None, (2.0, 9.0) if n_frames == 16 else None):
                for rows in logged:
                    rows.clear()
                a, b = (e.ask(question, window=window, evidence=3, return_logits=True) for e in (eager, static))
                assert a.tokens_generated == 24, "the test needs answers that run to the limit"
                if int8:
                    same_answer_up_to_a_near_tie(a, b, *logged, INT8_LOGIT_ERROR)
                else:                         # the same float32 arithmetic: the same bits here
                    assert a.token_ids == b.token_ids, (question, window)
                torch.testing.assert_close(a.first_logits, b.first_logits, rtol=1e-4, atol=1e-4)
                assert [e.time for e in a.evidence] == [e.time for e in b.evidence]
                assert [e.weight for e in a.evidence] == pytest.approx([e.weight for e in b.evidence], rel=1e-4)
                assert a.context_tokens == b.context_tokens and a.pages_used == b.pages_used
        for rows in logged:
            rows.clear()
        a, b = eager.describe(), static.describe()
        if int8:
            same_answer_up_to_a_near_tie(a, b, *logged, INT8_LOGIT_ERROR)
        else:
            assert a.token_ids == b.token_ids
    assert static.hook.arena.capacity >= static.memory.total_tokens()
    assert static.hook.arena.quantized == int8


def test_decode_mode_is_checked(tiny_model_path):
    from livevlm_ros.engine.config import ConfigError

    with pytest.raises(ConfigError, match="needs a CUDA device"):
        EngineConfig(model_path=tiny_model_path, launch="graph").validate()
    with pytest.raises(ConfigError, match="launch must be one of"):
        EngineConfig(model_path=tiny_model_path, launch="fast").validate()


def test_reconfigure_drops_the_question_steps_of_the_old_selector(tiny_model_path, frames):
    """A question step is kept per selector (its retrieval ratio, its scoring): after a runtime change
    of either, the old ones can never run again and are dropped, not kept holding their graphs."""
    engine = LiveVLMEngine(EngineConfig(model_path=tiny_model_path, sample_fps=0, launch="static",
                                        budget_tokens=34 + 2 * 16 + 64, page_tokens=4, retrieval_ratio=0.5))
    for i, f in enumerate(frames(8)):
        engine.ingest(f, float(i))
    steps = engine.question_step.recorded
    engine.ask(QUESTIONS[1], max_new_tokens=1)
    assert len(steps.seen) == 1                                   # this question shape, on this memory
    engine.reconfigure(max_new_tokens=8)                          # not the selector: kept
    assert len(steps.seen) == 1
    engine.reconfigure(retrieval_ratio=0.25)
    assert not steps.seen and not steps.graphs
    engine.ask(QUESTIONS[1], max_new_tokens=1)
    assert len(steps.seen) == 1 and next(iter(steps.seen))[4] == (("page_tokens", 4), ("ratio", 0.25),
                                                                  ("scoring", "quest"))


REGROWN_LOGIT_ERROR = 1e-5      # the same rows in larger buffers: 0.0 here (2026-12-07), float32 rounding elsewhere


@pytest.mark.parametrize("kv_dtype", ["bf16", "int8"])
def test_a_question_graph_kept_from_before_an_answer_in_a_window_regrew_the_arena_is_never_replayed(
        endless_model, frames, kv_dtype):
    """A time-window answer runs kernel by kernel and reserves its own room in the arena: if that
    regrows it, graphs recorded on the old buffers would write freed memory (and, 8-bit, decode from
    slots this answer never filled). CUDA graphs exist only on a GPU (benchmarks/arena_on_device.py
    replays real ones); here the rule itself: a graph kept under this question's key before the
    regrowth is dropped, not replayed (replaying the stand-in would raise)."""
    engine = LiveVLMEngine(EngineConfig(model_path=endless_model, sample_fps=0, launch="static", kv_dtype=kv_dtype,
                                        policy="livevlm", budget_tokens=34 + 2 * 16 + 64, page_tokens=4,
                                        retrieval_ratio=0.5))
    for i, f in enumerate(frames(16)):
        engine.ingest(f, float(i))
    logged = spy_on_logits(engine)
    first = engine.ask(QUESTIONS[1], max_new_tokens=4)
    before = list(logged)
    graphs, generation = engine.question_step.recorded.graphs, engine.hook.arena.generation
    graphs.update({key: "a graph recorded on this arena" for key in engine.question_step.recorded.seen})
    assert graphs
    engine.ask(QUESTIONS[1], window=(2.0, 9.0), max_new_tokens=400)       # room for 400 more tokens
    assert engine.hook.arena.generation > generation
    logged.clear()
    again = engine.ask(QUESTIONS[1], max_new_tokens=4)
    assert not graphs
    # the same answer from the larger buffers (their extra slots masked; sums over more slots may round
    # otherwise on another CPU, so the tokens are compared as far as the logits decide them)
    same_answer_up_to_a_near_tie(first, again, before, logged, REGROWN_LOGIT_ERROR)
