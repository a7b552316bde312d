"""Bounds and rules of the streaming memory over long streams (tiny model, CPU)."""

import numpy as np
import pytest
import torch

from livevlm_ros.engine import EngineConfig, LiveVLMEngine

T = 16                     # tokens per frame of the tiny model (56 px, patch 8, 2x2 pooling)
PREFIX = 34                # tokens of the default system prompt with the tiny tokenizer


def snapshot(engine):
    m = engine.memory
    views = [m.long.view(), m.short.view()]
    return [m.prefix_keys.clone(), m.prefix_values.clone()] + [t.clone() for v in views for t in v.fields()]


def make(tiny_model_path, **kw):
    cfg = dict(model_path=tiny_model_path, sample_fps=0, frames_per_clip=4, short_term_frames=2,
               budget_tokens=PREFIX + 2 * T + 96, vision_sinks=4, page_tokens=8, bucket_tokens=4)
    cfg.update(kw)
    return LiveVLMEngine(EngineConfig(**cfg))


@pytest.mark.parametrize("policy", ["livevlm", "sliding_window"])
def test_memory_never_exceeds_budget_and_keeps_its_sinks_over_long_stream(tiny_model_path, policy):
    engine = make(tiny_model_path, policy=policy)
    assert engine.memory.prefix_len == PREFIX
    budget = engine.config.budget_tokens
    bpt = engine.model.kv.bytes_per_token()
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    capacity = (engine.memory.long.capacity, engine.memory.short.capacity)
    sinks = None
    n_frames = 2000
    for i in range(n_frames):
        frame = np.roll(frame, 3, axis=1)          # a slowly panning, never repeating scene
        frame[i % 32] = rng.integers(0, 256, (32, 3), dtype=np.uint8)
        engine.ingest(frame, i * 0.5)
        if i % 4 == 3:                            # a clip was just committed
            s = engine.stats()
            assert s["device_tokens"] <= budget
            assert s["device_bytes"] <= budget * bpt
            long = engine.memory.long.view()
            if s["vision_sinks"]:
                assert s["vision_sinks"] == 4 and (long.sink.sum(dim=1) == 4).all()
                if policy == "sliding_window":      # positional sinks: the first tokens, kept for good
                    if sinks is None:
                        sinks = long.token_idx[long.sink].view(long.sink.shape[0], -1).clone()
                    for layer in range(long.token_idx.shape[0]):
                        assert torch.isin(sinks[layer], long.token_idx[layer][long.sink[layer]]).all()
                else:                               # VSB: the tokens that drew the most attention so far
                    total = long.score_sum
                    weakest_sink = total.masked_fill(~long.sink, float("inf")).amin(dim=1)
                    strongest_other = total.masked_fill(long.sink, float("-inf")).amax(dim=1)
                    assert (weakest_sink >= strongest_other).all()
    s = engine.stats()
    assert s["frames_ingested"] == n_frames
    assert s["device_tokens"] == budget                           # full, not under-used
    # the footprint is flat: no buffer ever had to grow after start-up
    assert (engine.memory.long.capacity, engine.memory.short.capacity) == capacity


def test_vsb_buckets_cover_the_whole_stream(tiny_model_path):
    engine = make(tiny_model_path)
    rng = np.random.default_rng(1)
    n_frames = 600
    for i in range(n_frames):
        engine.ingest(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), float(i))
    long = engine.memory.long.view()
    stream_tokens = engine.memory.next_token - 2 * T              # what has left short-term memory
    for layer in range(long.token_idx.shape[0]):
        kept = long.token_idx[layer][~long.sink[layer]]
        tenths = torch.bincount(kept * 10 // stream_tokens, minlength=10)
        assert (tenths > 0).all(), f"layer {layer}: a tenth of the stream has no token left: {tenths.tolist()}"


def test_sliding_window_forgets_the_middle(tiny_model_path):
    """The contrast to the test above: a window keeps only sinks + the newest tokens."""
    engine = make(tiny_model_path, policy="sliding_window")
    rng = np.random.default_rng(1)
    for i in range(600):
        engine.ingest(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), float(i))
    long = engine.memory.long.view()
    kept = long.token_idx[0][~long.sink[0]]
    assert kept.min() > engine.memory.next_token * 0.9


@pytest.mark.parametrize("policy", ["livevlm", "full", "sliding_window", "rekv"])
def test_questions_and_narration_never_change_memory(tiny_model_path, frames, policy):
    engine = make(tiny_model_path, policy=policy, frames_per_clip=1)
    for i, f in enumerate(frames(20)):
        engine.ingest(f, float(i))
    before, stats = snapshot(engine), engine.stats()
    engine.ask("Where did I last see the red toolbox?", max_new_tokens=5)
    engine.describe(max_new_tokens=5)
    after = snapshot(engine)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert engine.stats() == stats
    # and answering twice gives the same answer (nothing leaked from the first answer)
    a1 = engine.ask("Is the door open?", max_new_tokens=4, return_logits=True)
    a2 = engine.ask("Is the door open?", max_new_tokens=4, return_logits=True)
    assert a1.token_ids == a2.token_ids and torch.equal(a1.first_logits, a2.first_logits)


def test_rekv_offloads_history_and_keeps_device_memory_bounded(tiny_model_path, frames):
    engine = make(tiny_model_path, policy="rekv", frames_per_clip=1)
    for i, f in enumerate(frames(30)):
        engine.ingest(f, float(i))
    s = engine.stats()
    assert s["offload_tokens"] == 28 * T and s["device_tokens"] == PREFIX + 2 * T
    assert engine.memory.long.keys.device.type == "cpu"
    a = engine.ask("What happened?", max_new_tokens=2)
    assert 0 < a.pages_used < a.pages_total


def test_full_cache_grows_without_bound(tiny_model_path, frames):
    engine = make(tiny_model_path, policy="full", frames_per_clip=1)
    for i, f in enumerate(frames(30)):
        engine.ingest(f, float(i))
    assert engine.stats()["device_tokens"] == PREFIX + 30 * T


def test_closed_engines_leave_the_model_clean(tiny_model_path):
    """Benchmarks build many engines on one model: closing one must unhook it (no leak), an engine
    that fails to start must not stay hooked, and the model keeps its own attention outside our calls."""
    first = make(tiny_model_path)
    lm = first.model.model.model.language_model
    q_proj, k_proj = first.model.query_projections()[0], first.model.key_projections()[0]
    assert len(q_proj._forward_hooks) == 1 and len(k_proj._forward_hooks) == 1
    second = LiveVLMEngine(first.config, adapter=first.model)
    assert len(q_proj._forward_hooks) == 2
    with pytest.raises(ValueError, match="budget_tokens"):
        LiveVLMEngine(first.config.replace(budget_tokens=40), adapter=first.model)
    assert len(q_proj._forward_hooks) == 2 and len(k_proj._forward_hooks) == 2
    second.ingest(np.zeros((32, 32, 3), np.uint8), 0.0)
    second.ask("Is the door open?", max_new_tokens=1)                # runs on our attention, then not
    assert lm.config._attn_implementation == "sdpa"
    first.close()
    second.close()
    assert len(q_proj._forward_hooks) == 0 and len(k_proj._forward_hooks) == 0
    assert lm.config._attn_implementation == "sdpa"


def test_vsb_span_option_keeps_whole_spans():
    from livevlm_ros.engine.compression import VisionSinkBucketing
    from livevlm_ros.engine.kv_buffer import Tokens

    torch.manual_seed(0)
    L, n = 3, 64
    score = torch.rand(L, n)
    cand = Tokens(torch.randn(L, 2, n, 4), torch.randn(L, 2, n, 4), torch.arange(n).expand(L, -1).clone(),
                  score, score.clone(), torch.zeros(L, n, dtype=torch.bool))
    keep, sinks = VisionSinkBucketing(sinks=0, bucket_tokens=8, saliency_share=1.0, span_tokens=8).select(
        cand, 32, 0, n)
    assert sinks == 0 and keep.shape == (L, 32)
    for layer in range(L):
        spans = torch.bincount(keep[layer] // 8, minlength=8)
        assert sorted(spans.tolist()) == [0, 0, 0, 0, 8, 8, 8, 8]        # four whole spans, nothing split
    # and per-token selection (span 1) does split spans on random scores
    keep1, _ = VisionSinkBucketing(sinks=0, bucket_tokens=8, saliency_share=1.0).select(cand, 32, 0, n)
    assert any(sorted(torch.bincount(keep1[l] // 8, minlength=8).tolist()) != [0, 0, 0, 0, 8, 8, 8, 8]
               for l in range(L))


def test_a_batch_bigger_than_a_clip_does_not_grow_memory(tiny_model_path):
    """ingest_embeddings may hand over many frames at once: eviction takes them in steps that fit
    the long-term buffer, which therefore never reallocates (its footprint stays flat)."""
    engine = make(tiny_model_path, frames_per_clip=1)
    capacity = (engine.memory.long.capacity, engine.memory.short.capacity)
    hidden = engine.model.model.config.text_config.hidden_size
    torch.manual_seed(0)
    for batch in range(3):
        engine.ingest_embeddings(torch.randn(20 * T, hidden), [float(batch * 20 + i) for i in range(20)])
        assert engine.stats()["device_tokens"] <= engine.config.budget_tokens
    assert engine.memory.long.capacity == capacity[0]
    engine.ask("Is the door open?", max_new_tokens=1)
