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


def test_questions_empty_or_too_long(endless_model, frames):
    engine = LiveVLMEngine(EngineConfig(model_path=endless_model, sample_fps=0, max_question_tokens=32))
    engine.ingest(frames(1)[0], 0.0)
    for bad in ["", "   ", None]:
        with pytest.raises(EngineInputError, match="empty"):
            engine.ask(bad)
    with pytest.raises(EngineInputError, match="limit is 32"):
        engine.ask("where is the red toolbox " * 40)
    # the engine answers after refusing them (a model that never stops: the limit ends the answer)
    assert engine.ask("Is the door open?", max_new_tokens=3).tokens_generated == 3


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


def test_memory_saved_and_loaded_answers_the_same(tiny_model_path, frames, tmp_path):
    """Save, load into a fresh engine (another process would do the same): bit-identical answers;
    a file for another model or memory setting, or a damaged file, is refused and changes nothing."""
    import torch

    from livevlm_ros.engine import MemoryFileError

    cfg = EngineConfig(model_path=tiny_model_path, budget_tokens=34 + 2 * 16 + 48, page_tokens=4, vision_sinks=4,
                       sample_fps=0)
    first = LiveVLMEngine(cfg)
    for i, f in enumerate(frames(12)):
        first.ingest(f, float(i))
    path = tmp_path / "memory.safetensors"
    first.save_memory(path)
    expected = first.ask("Is the door open?", max_new_tokens=3, return_logits=True)

    second = LiveVLMEngine(cfg, adapter=first.model)
    second.load_memory(path)
    got = second.ask("Is the door open?", max_new_tokens=3, return_logits=True)
    assert torch.equal(got.first_logits, expected.first_logits) and got.token_ids == expected.token_ids
    assert second.stats() == first.stats()
    second.ingest(frames(1)[0], 12.0)                        # the stream goes on where it stopped

    other_budget = LiveVLMEngine(cfg.replace(budget_tokens=34 + 2 * 16 + 64), adapter=first.model)
    with pytest.raises(MemoryFileError, match="budget_tokens"):
        other_budget.load_memory(path)
    other_model = LiveVLMEngine(cfg.replace(model_path=str(build_other(tmp_path))))
    with pytest.raises(MemoryFileError, match="weights"):
        other_model.load_memory(path)
    before = second.stats()
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MemoryFileError, match="not a readable memory file"):
        second.load_memory(damaged)
    with pytest.raises(MemoryFileError, match="no memory file"):
        second.load_memory(tmp_path / "missing.safetensors")
    assert second.stats() == before


def build_other(tmp_path):
    from livevlm_ros.tools.make_tiny_model import build

    return build(tmp_path / "other_model", seed=1)


def test_a_save_that_dies_before_its_rename_leaves_the_previous_file_whole(tiny_model_path, frames, tmp_path,
                                                                          monkeypatch):
    """The crash (or SIGKILL) case of an atomic save, made deterministic: the new file is fully
    written, then the process 'dies' before the rename. The old file still loads; no temp is left."""
    import os

    from livevlm_ros.engine.memory import persistence

    engine = LiveVLMEngine(EngineConfig(model_path=tiny_model_path, sample_fps=0))
    engine.ingest(frames(1)[0], 0.0)
    path = tmp_path / "memory.safetensors"
    engine.save_memory(path)
    engine.ingest(frames(1)[0], 1.0)

    def die(*_):
        raise KeyboardInterrupt("killed between write and rename")
    monkeypatch.setattr(persistence.os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        engine.save_memory(path)
    monkeypatch.setattr(persistence.os, "replace", os.replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.safetensors"]
    fresh = LiveVLMEngine(EngineConfig(model_path=tiny_model_path, sample_fps=0), adapter=engine.model)
    fresh.load_memory(path)
    assert fresh.stats()["frames_ingested"] == 1
