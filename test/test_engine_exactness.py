"""With nothing dropped and every page read, streaming must equal one offline forward."""

import pytest
import torch

from livevlm_ros.engine import EngineConfig, LiveVLMEngine
from livevlm_ros.engine.hook.rope import apply_rope


def offline_logits(engine: LiveVLMEngine, frames, question: str) -> torch.Tensor:
    """The reference: transformers' own LlavaOnevision forward over the whole video at once."""
    adapter = engine.model
    cfg = adapter.model.config
    prefix = adapter.tokenize(engine.config.system_prompt)
    suffix = adapter.tokenize(engine.config.question_template.format(question=question))
    n_video = len(frames) * adapter.tokens_per_frame + 1          # + one newline after the video
    ids = torch.tensor([prefix + [cfg.video_token_index] * n_video + suffix])
    pixels = adapter.preprocess(frames)[None]
    with torch.inference_mode():
        return adapter.model(input_ids=ids, pixel_values_videos=pixels).logits[0, -1].float()


# (ReKV is not in this list: it encodes each clip against a local window only, by design.)
@pytest.mark.parametrize("policy,frames_per_clip", [("livevlm", 1), ("livevlm", 3), ("full", 2)])
def test_unbounded_memory_matches_offline_forward(tiny_model_path, frames, policy, frames_per_clip):
    cfg = EngineConfig(model_path=tiny_model_path, policy=policy, budget_tokens=None, retrieval_ratio=1.0,
                       sample_fps=0, frames_per_clip=frames_per_clip, short_term_frames=2)
    engine = LiveVLMEngine(cfg)
    video = frames(7)
    for i, f in enumerate(video):
        engine.ingest(f, float(i))
    engine.flush()
    assert engine.stats()["long_term_tokens"] > 0, "the test must exercise long-term memory"
    answer = engine.ask("Is the door on the left open?", max_new_tokens=1, return_logits=True)
    ref = offline_logits(engine, video, "Is the door on the left open?")
    # float32 on CPU; the un-rotate/re-rotate of keys costs a few ulps
    torch.testing.assert_close(answer.first_logits, ref, atol=2e-5, rtol=1e-4)
    assert answer.pages_used == answer.pages_total


def test_bounded_memory_does_not_match_offline(tiny_model_path, frames):
    """Guard that the comparison above can fail: dropping tokens must change the logits."""
    cfg = EngineConfig(model_path=tiny_model_path, budget_tokens=34 + 2 * 16 + 24, retrieval_ratio=1.0,
                       sample_fps=0, vision_sinks=4, page_tokens=4)
    engine = LiveVLMEngine(cfg)
    video = frames(7)
    for i, f in enumerate(video):
        engine.ingest(f, float(i))
    answer = engine.ask("Is the door on the left open?", max_new_tokens=1, return_logits=True)
    ref = offline_logits(engine, video, "Is the door on the left open?")
    assert (answer.first_logits - ref).abs().max() > 1e-3


def test_rope_equals_the_models_own_rotation(tiny_model_path):
    """Keys stored pre-RoPE and rotated to new positions must equal transformers' own rotation there."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    engine = LiveVLMEngine(EngineConfig(model_path=tiny_model_path))
    D = engine.model.kv.head_dim
    torch.manual_seed(0)
    k = torch.randn(1, 2, 50, D)
    cos, sin = engine.model.rope(torch.arange(100, 150))
    _, expected = apply_rotary_pos_emb(k, k, cos[None], sin[None])
    torch.testing.assert_close(apply_rope(k, cos, sin), expected)
    assert (apply_rope(k, *engine.model.rope(torch.arange(7, 57))) - expected).abs().max() > 1e-2


def test_empty_system_prompt_still_places_clips_one_after_another(tiny_model_path, frames):
    """With no prefix every clip used to start at position 0; the offline forward catches that."""
    cfg = EngineConfig(model_path=tiny_model_path, policy="full", system_prompt="", sample_fps=0)
    engine = LiveVLMEngine(cfg)
    video = frames(4)
    for i, f in enumerate(video):
        engine.ingest(f, float(i))
    assert engine.memory.prefix_len == 0
    answer = engine.ask("Is the door on the left open?", max_new_tokens=1, return_logits=True)
    torch.testing.assert_close(answer.first_logits, offline_logits(engine, video, "Is the door on the left open?"),
                               atol=2e-5, rtol=1e-4)
