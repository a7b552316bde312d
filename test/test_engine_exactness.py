"""With nothing dropped and every page read, streaming must equal one offline forward."""

import pytest
import torch

from livevlm_ros.engine import EngineConfig, LiveVLMEngine
from livevlm_ros.engine.rope import apply_rope, remove_rope


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


def test_rope_unrotate_identities(tiny_model_path):
    engine = LiveVLMEngine(EngineConfig(model_path=tiny_model_path))
    D = engine.model.kv.head_dim
    torch.manual_seed(0)
    k = torch.randn(2, 50, D, dtype=torch.float64)
    pos = torch.arange(100, 150)
    cos, sin = (t.double() for t in engine.model.rope(pos))
    rotated = apply_rope(k, cos, sin)
    # un-rotating a key at its own position gives back the pre-RoPE key
    torch.testing.assert_close(remove_rope(rotated, cos, sin), k, atol=1e-6, rtol=1e-6)
    # moving a key to a new position equals computing RoPE there directly
    cos2, sin2 = (t.double() for t in engine.model.rope(torch.arange(7, 57)))
    moved = apply_rope(remove_rope(rotated, cos, sin), cos2, sin2)
    torch.testing.assert_close(moved, apply_rope(k, cos2, sin2), atol=1e-6, rtol=1e-6)
    # and it is not the identity: the position really matters
    assert (moved - rotated).abs().max() > 1e-2
