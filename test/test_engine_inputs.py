"""Bad input gets a clear error and the engine stays usable."""

import json

import numpy as np
import pytest

from livevlm_ros.engine import (ConfigError, EngineConfig, EngineInputError, LiveVLMEngine, ModelLoadError,
                                NoFramesError)


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    return LiveVLMEngine(EngineConfig(model_path=tiny_model_path, sample_fps=0, max_question_tokens=32))


def test_question_before_any_frame(tiny_model_path):
    fresh = LiveVLMEngine(EngineConfig(model_path=tiny_model_path))
    with pytest.raises(NoFramesError, match="no frame"):
        fresh.ask("Is the door open?")
    with pytest.raises(NoFramesError):
        fresh.describe()


@pytest.mark.parametrize("frame,match", [
    (np.zeros((48, 64), np.uint8), "HxWx3"),
    (np.zeros((48, 64, 4), np.uint8), "HxWx3"),
    (np.zeros((48, 64, 3), np.float32), "uint8"),
    (np.zeros((1, 64, 3), np.uint8), "HxWx3"),
    ([[0, 0, 0]], "numpy"),
])
def test_malformed_frames_are_refused_and_change_nothing(engine, frame, match):
    before = engine.stats()
    with pytest.raises(EngineInputError, match=match):
        engine.ingest(frame, 1e6)
    assert engine.stats() == before


def test_questions_empty_or_too_long(engine, frames):
    engine.ingest(frames(1)[0], 0.0)
    for bad in ["", "   ", None]:
        with pytest.raises(EngineInputError, match="empty"):
            engine.ask(bad)
    with pytest.raises(EngineInputError, match="limit is 32"):
        engine.ask("where is the red toolbox " * 40)
    assert engine.ask("Is the door open?", max_new_tokens=3).tokens_generated <= 3


def test_frames_out_of_time_order_are_refused(tiny_model_path, frames):
    e = LiveVLMEngine(EngineConfig(model_path=tiny_model_path, sample_fps=0))
    f = frames(2)
    e.ingest(f[0], 10.0)
    with pytest.raises(EngineInputError, match="time order"):
        e.ingest(f[1], 9.0)
    assert e.ingest(f[1], 11.0)


def test_sampling_keeps_the_configured_rate(tiny_model_path, frames):
    e = LiveVLMEngine(EngineConfig(model_path=tiny_model_path, sample_fps=2.0))
    kept = [e.ingest(f, i / 30) for i, f in enumerate(frames(60))]     # 2 s of 30 fps camera
    assert sum(kept) == 4 and e.stats()["frames_ingested"] == 4


def test_model_path_errors(tmp_path, tiny_model_path):
    with pytest.raises(ModelLoadError, match="empty"):
        LiveVLMEngine(EngineConfig(model_path=""))
    with pytest.raises(ModelLoadError, match="not found"):
        LiveVLMEngine(EngineConfig(model_path=str(tmp_path / "nope")))
    with pytest.raises(ModelLoadError, match="no config.json"):
        LiveVLMEngine(EngineConfig(model_path=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="'bert'"):
        LiveVLMEngine(EngineConfig(model_path=str(tmp_path)))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((__import__("pathlib").Path(tiny_model_path) / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="could not load"):
        LiveVLMEngine(EngineConfig(model_path=str(broken)))


def test_config_errors(tiny_model_path):
    with pytest.raises(ConfigError, match="policy"):
        EngineConfig(policy="magic").validate()
    with pytest.raises(ConfigError, match="unknown engine option"):
        EngineConfig.from_dict({"budget": 5})
    with pytest.raises(ValueError, match="budget_tokens=40"):
        LiveVLMEngine(EngineConfig(model_path=tiny_model_path, budget_tokens=40))
