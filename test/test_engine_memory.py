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
    from livevlm_ros.engine.memory.compression import VisionSinkBucketing
    from livevlm_ros.engine.memory.kv_buffer import Tokens

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
    assert (engine.memory.long.capacity, engine.memory.short.capacity) == capacity
    engine.ask("Is the door open?", max_new_tokens=1)


def test_a_batch_goes_to_memory_as_if_short_term_memory_had_held_it(tiny_model_path):
    """A batch bigger than short-term memory: its oldest tokens go straight on to long-term memory,
    in the order they would have left short-term memory (the batch's prefill is the same either way)."""
    engine = make(tiny_model_path, frames_per_clip=1, policy="full", budget_tokens=None)
    hidden = engine.model.model.config.text_config.hidden_size
    torch.manual_seed(0)
    engine.ingest_embeddings(torch.randn(3 * T, hidden), [0.0, 1.0, 2.0])
    engine.ingest_embeddings(torch.randn(7 * T, hidden), [float(3 + i) for i in range(7)])
    mem = engine.memory
    assert mem.short.len == 2 * T and mem.long.len == 8 * T
    assert torch.equal(mem.long.view().token_idx[0], torch.arange(8 * T))
    assert torch.equal(mem.short.view().token_idx[0], torch.arange(8 * T, 10 * T))


def test_rekv_page_summaries_grow_without_copying_every_clip(tiny_model_path, frames):
    """The summaries of offloaded pages are appended into storage that doubles when full (a copy
    of all of them per clip made a long stream quadratic), and stay the summaries of the tier's keys."""
    engine = make(tiny_model_path, policy="rekv", frames_per_clip=1)
    storages = set()
    for i, f in enumerate(frames(40)):
        engine.ingest(f, float(i))
        storages.add(engine.memory.page_summaries.summary.mean.untyped_storage().data_ptr())
    assert len(storages) <= 5          # 76 pages (38 frames x 2) in: none yet, then room for 16, 32, 64, 128
    keys = engine.memory.long.view().keys.float()               # [L, H, N, D], stream order
    L, H, N, D = keys.shape
    P = engine.config.page_tokens
    pages = keys[:, :, :N // P * P].reshape(L, H, N // P, P, D)
    summary = engine.memory.page_summaries.summary
    assert summary.mean.shape[2] == N // P == 38 * T // P
    torch.testing.assert_close(summary.mean, pages.mean(3))
    assert torch.equal(summary.low.float(), pages.amin(3)) and torch.equal(summary.high.float(), pages.amax(3))


def test_a_clip_prefill_keeps_no_queries(tiny_model_path, frames):
    """VSB scores a clip from the queries its attention already has: no layer's q_proj output is
    kept during a clip's prefill (on CUDA it was, for nothing: ~315 MB for an 8-frame 7B clip)."""
    engine = make(tiny_model_path)
    kept = []
    run = engine.model.run_language_model

    def run_and_look(embeds, positions, hook):
        hidden = run(embeds, positions, hook)
        kept.append(len(hook._queries))                         # what the q_proj hooks hold now
        return hidden
    engine.model.run_language_model = run_and_look
    for i, f in enumerate(frames(4)):
        engine.ingest(f, float(i))
    engine.ask("Is the door open?", max_new_tokens=1)           # a question does keep them: PaR scores with them
    assert kept == [0, engine.model.kv.layers]


def test_vsb_without_its_scores_is_an_error_not_zeros(tiny_model_path, frames, monkeypatch):
    """A model whose attention layers never call back after attending (not our attention) leaves
    VSB without scores: that is an error, never memory compressed on zeros. The engine goes on once
    the attention is ours again."""
    from transformers import AttentionInterface

    from livevlm_ros.engine.hook import attention

    def attention_without_callbacks(module, query, key, value, *args, **kwargs):
        return attention.stream_attention(module, query, key[:], value, *args, **kwargs)   # key[:]: no callbacks
    AttentionInterface.register("test_no_callbacks", attention_without_callbacks)
    engine = make(tiny_model_path, frames_per_clip=1)
    video = frames(3)
    engine.ingest(video[0], 0.0)
    monkeypatch.setattr(attention, "NAME", "test_no_callbacks")
    with pytest.raises(RuntimeError, match="VSB has no scores"):
        engine.ingest(video[1], 1.0)
    monkeypatch.undo()
    engine.ingest(video[2], 2.0)
    assert engine.memory.frames_ingested == 2
    assert engine.ask("Is the door open?", max_new_tokens=1).tokens_generated == 1
