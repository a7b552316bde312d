"""The fixed-shape decode step (decode_step.py: one arena per layer, lengths on the device, a mask
instead of a slice) gives exactly the tokens the ordinary per-answer path gives. On the GPU the same
step is replayed from a CUDA graph; gpu_bench.py checks that replay the same way (CI has no GPU)."""

import pytest

from livevlm_ros.engine import EngineConfig, LiveVLMEngine

QUESTIONS = ["Where did I last see the red toolbox?", "Is the door open?", "What is on the left?"]


def engines(path, **options):
    return [LiveVLMEngine(EngineConfig(model_path=path, sample_fps=0, decode=mode, max_new_tokens=24, **options))
            for mode in ("eager", "static")]


@pytest.mark.parametrize("options", [dict(policy="livevlm", budget_tokens=34 + 2 * 16 + 64, page_tokens=4,
                                          retrieval_ratio=0.5),
                                     dict(policy="full", budget_tokens=None)])
def test_static_decode_gives_the_same_tokens(endless_model, frames, options):
    eager, static = engines(endless_model, **options)
    video = frames(16)
    for n_frames in (3, 16):                   # memory grows between answers: the arena grows with it
        for i in range(len(eager.memory.frame_times), n_frames):
            for engine in (eager, static):
                engine.ingest(video[i], float(i))
        for question in QUESTIONS:
            for window in (None, (2.0, 9.0) if n_frames == 16 else None):
                a, b = (e.ask(question, window=window) for e in (eager, static))
                assert a.tokens_generated == 24, "the test needs answers that run to the limit"
                assert a.token_ids == b.token_ids, (question, window)
    assert static.hook.arena_capacity >= static.memory.total_tokens()


def test_decode_mode_is_checked(tiny_model_path):
    from livevlm_ros.engine.config import ConfigError

    with pytest.raises(ConfigError, match="needs a CUDA device"):
        EngineConfig(model_path=tiny_model_path, decode="graph").validate()
    with pytest.raises(ConfigError, match="decode must be one of"):
        EngineConfig(model_path=tiny_model_path, decode="fast").validate()
