"""8-bit long-term memory (kv_dtype int8, memory/kv_quant.py), CPU: the quantization, the readers
that dequantize as they read (rope.rotate_into, PageSummary.in_time_order; their Triton kernels are
checked in benchmarks/kernels_interpreted.py), the int8 tier (compaction, bytes, memory files), and
PaR's page ranking from int8 summaries against bf16's. VSB's and PaR's references at 8 bits are in
test_engine_references.py (tolerance-checked)."""

import pytest
import torch

from livevlm_ros.engine import EngineConfig, LiveVLMEngine
from livevlm_ros.engine.hook.rope import apply_rope, rotate_into
from livevlm_ros.engine.memory.kv_buffer import KVBuffer, Tokens
from livevlm_ros.engine.memory.kv_quant import dequantize_rows, quantize_rows
from livevlm_ros.engine.models.base import KVShape
from livevlm_ros.engine.memory.pages import PageSummary, page_scores


def test_quantize_rows_error_is_at_most_half_a_step():
    x = torch.randn(3, 4, 50, 128) * torch.rand(3, 4, 50, 1) * 10
    x[0, 0, 0] = 0.0                                             # an all-zero row stays exact
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == x.shape[:-1]
    err = (dequantize_rows(q, scale, torch.float32) - x).abs()
    assert (err <= scale[..., None] / 2 + 1e-6).all()
    assert err[0, 0, 0].max() == 0


def test_rotate_into_dequantizes_the_rows_it_reads():
    H, N, D, n = 2, 40, 16, 9
    q8, scale = quantize_rows(torch.randn(H, N, D))
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.arange(n).float()[:, None] * inv[None]
    cos, sin = torch.cat([emb, emb], -1).cos(), torch.cat([emb, emb], -1).sin()
    rows = torch.randperm(N)[:n]
    out = torch.empty(H, n, D, dtype=torch.bfloat16)
    rotate_into(out, q8, rows, cos, sin, scale)
    expected = apply_rope(dequantize_rows(q8[:, rows], scale[:, rows], torch.float32), cos, sin).bfloat16()
    assert torch.equal(out, expected)
    rotate_into(out, q8, 5, cos, sin, scale)                    # consecutive rows from 5
    expected = apply_rope(dequantize_rows(q8[:, 5:5 + n], scale[:, 5:5 + n], torch.float32), cos, sin).bfloat16()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("scoring", ["quest", "softmax_mean"])
@pytest.mark.parametrize("outliers", [False, True])
def test_int8_page_summaries_rank_pages_as_bf16_does(scoring, outliers):
    """Keys like a layer's (channels of different scales, optionally a few outlier channels, as real
    keys have), an object's tokens planted in a few pages, questions that look for it; the keys go
    through an int8 tier (its channel factors fixed by the first 64 tokens it stores). The pages PaR
    reads (top 40%) from the int8 tier's summaries are the ones it reads from bf16's (mean overlap
    >= 95%), and no object page bf16 reads is lost unless bf16 itself ranked it in its last 2 slots
    (a near-tie at the boundary). Without channel factors, quest with outliers lost 3 of 50 object
    pages here, ranked well inside the top 40%."""
    torch.manual_seed(0)
    L, H, D, P, pages, q_heads = 1, 2, 64, 16, 40, 4
    channel_scale = torch.rand(D) * 2 + 0.2
    if outliers:
        channel_scale[:3] = 8.0
    keys = (torch.randn(L, H, pages * P, D) * channel_scale).bfloat16()
    obj = torch.randn(H, D) * channel_scale
    planted = [3, 17, 31]
    for p in planted:
        keys[0, :, p * P + 5] = (obj * 1.5).bfloat16()
    order = torch.arange(pages * P)[None]
    exact = PageSummary.in_time_order(keys, order, pages, P).layer(0)
    tier = int8_tier(keys, first=64)
    approx = PageSummary.in_time_order(tier.keys, order, pages, P, tier.key_scale, torch.bfloat16,
                                       tier.key_channel).layer(0)
    k = int(0.4 * pages)
    overlaps = []
    for trial in range(20):
        question = (obj.repeat_interleave(q_heads // H, 0)[:, None] + torch.randn(q_heads, 6, D)) * 0.5
        ranked = page_scores(question, exact, scoring).argsort(descending=True).tolist()
        a, b = set(ranked[:k]), set(page_scores(question, approx, scoring).topk(k).indices.tolist())
        overlaps.append(len(a & b) / k)
        lost = {p for p in (set(planted) & a) - b if ranked.index(p) < k - 2}
        assert not lost, f"trial {trial}: int8 summaries lost object pages {lost} that bf16 reads"
    assert sum(overlaps) / len(overlaps) >= 0.95, overlaps


def int8_tier(keys, first):
    """keys [L, H, N, D] stored in an int8 KVBuffer, `first` tokens first (they fix the channel factors)."""
    L, H, N, D = keys.shape
    kv = KVShape(layers=L, kv_heads=H, q_heads=H, head_dim=D, dtype=keys.dtype, device=torch.device("cpu"))
    tier = KVBuffer(kv, "cpu", N, quantized=True)
    for a, b in ((0, first), (first, N)):
        n = b - a
        tier.append(Tokens(keys[:, :, a:b], keys[:, :, a:b], torch.arange(a, b).expand(L, n),
                           torch.zeros(L, n), torch.zeros(L, n), torch.zeros(L, n, dtype=torch.bool)))
    return tier


def test_int8_tier_keeps_scales_with_their_tokens_and_counts_its_bytes():
    """keep() compacts tokens in place: each token's int8 row and its scale move together, so what
    is read back is the token that was kept; a token takes one byte an element and a scale a row."""
    torch.manual_seed(1)
    keys = (torch.randn(2, 2, 48, 32) * (torch.rand(48)[:, None] * 5 + 0.1)).bfloat16()
    tier = int8_tier(keys, first=16)
    before = tier.dense_view().keys.clone()
    keep = torch.stack([torch.tensor([1, 5, 9, 30, 47]), torch.tensor([0, 2, 3, 40, 41])])
    tier.keep(keep)
    after = tier.dense_view().keys
    for layer in range(2):
        assert torch.equal(after[layer], before[layer][:, keep[layer]])
    assert (after.float() - keys.float().gather(2, keep[:, None, :, None].expand(2, 2, 5, 32))).abs().max() < \
        keys.float().abs().max() / 100
    L, H, D = 2, 2, 32                                          # bf16: 2 bytes an element; int8: 1 + a scale per row
    assert KVBuffer(tier.kv, "cpu", 8).bytes_per_token() == 2 * L * H * D * 2
    assert tier.bytes_per_token() == 2 * L * H * (D + 4)


def test_int8_memory_survives_a_memory_file(tiny_model_path, frames, tmp_path):
    """A memory file holds the int8 tier dequantized; loaded, it is quantized again (channel factors
    from the loaded tokens), and the answer after loading equals the one before, within an int8 step."""
    config = EngineConfig(model_path=tiny_model_path, kv_dtype="int8", budget_tokens=200, page_tokens=4,
                          vision_sinks=4, sample_fps=0)
    engine = LiveVLMEngine(config)
    for i, f in enumerate(frames(10)):
        engine.ingest(f, float(i))
    assert engine.memory.long.len and engine.memory.long.keys.dtype == torch.int8
    before = engine.ask("Is the door open?", max_new_tokens=1, return_logits=True).first_logits
    engine.save_memory(tmp_path / "m.safetensors")
    other = LiveVLMEngine(config)
    other.load_memory(tmp_path / "m.safetensors")
    after = other.ask("Is the door open?", max_new_tokens=1, return_logits=True).first_logits
    torch.testing.assert_close(after, before, atol=1e-3, rtol=1e-3)


def test_int8_engine_answers_before_memory_reaches_long_term(tiny_model_path, frames):
    """An empty int8 tier (its channel factors not yet fixed) is read like any empty tier."""
    engine = LiveVLMEngine(EngineConfig(model_path=tiny_model_path, kv_dtype="int8", budget_tokens=200,
                                        page_tokens=4, vision_sinks=4, sample_fps=0))
    engine.ingest(frames(1)[0], 0.0)
    assert engine.memory.long.len == 0
    assert engine.ask("Is the door open?", max_new_tokens=2).tokens_generated >= 1


def test_int8_memory_stats_count_int8_bytes(tiny_model_path, frames):
    engines = {kv: LiveVLMEngine(EngineConfig(model_path=tiny_model_path, kv_dtype=kv, budget_tokens=200,
                                              page_tokens=4, vision_sinks=4, sample_fps=0)) for kv in ("bf16", "int8")}
    video = frames(10)
    for e in engines.values():
        for i, f in enumerate(video):
            e.ingest(f, float(i))
    s = {kv: e.stats() for kv, e in engines.items()}
    assert s["int8"]["long_term_tokens"] == s["bf16"]["long_term_tokens"] > 0
    kv = engines["bf16"].model.kv                           # float32 here: int8 is a quarter plus scales
    dense_long = s["bf16"]["long_term_tokens"] * kv.bytes_per_token()
    int8_long = s["int8"]["long_term_tokens"] * (kv.bytes_per_token() // 4 + 2 * kv.layers * kv.kv_heads * 4)
    assert s["bf16"]["device_bytes"] - s["int8"]["device_bytes"] == dense_long - int8_long


def test_int8_is_refused_for_an_offloaded_tier():
    with pytest.raises(ValueError, match="kv_dtype int8 is for a long-term tier on the device"):
        EngineConfig(policy="rekv", kv_dtype="int8").validate()


def test_an_8bit_arena_stores_each_row_within_half_a_step_and_decodes_from_it():
    """The answer arena with kv_dtype int8 (hook/arena.py): a prefill's context, assembled at full
    precision in the shared scratch, is stored as int8 rows with a scale per slot and head; a decoded
    token is stored at the slot the device says; attention over the 8-bit slots (dequantized where the
    Triton kernel does not run) equals attention over those rows dequantized by hand, and is near
    attention over the rows themselves. References here are written out, not kv_quant's."""
    from livevlm_ros.engine.hook.arena import AnswerArena
    from livevlm_ros.engine.hook.attention import stream_attention

    torch.manual_seed(0)
    L, H, Hq, D, n = 2, 2, 6, 32, 50
    kv = KVShape(layers=L, kv_heads=H, q_heads=Hq, head_dim=D, dtype=torch.float32, device=torch.device("cpu"))
    arena = AnswerArena()
    arena.reserve(kv, n + 8, quantized=True)
    assert arena.keys.dtype == torch.int8 and arena.scratch.shape == (2, H, arena.capacity, D)
    # memory's channel factors (before RoPE); RoPE turns channel i with i + D/2, so a pair shares one
    memory_factors = torch.rand(L, H, D) + 0.5
    memory_factors[..., :2] *= 10
    arena.use_channel_factors(memory_factors)
    half = D // 2
    pairs = (memory_factors[..., :half] ** 2 + memory_factors[..., half:] ** 2).sqrt()
    factors = torch.cat([pairs, pairs], -1)
    rows = {}
    for layer in range(L):
        k_buf, v_buf = arena.context_buffers(layer)
        k, v = torch.randn(H, n, D), torch.randn(H, n, D)
        k[:, :, :2] *= 10                                          # outlier channels (real keys have them)
        k_buf[:, :n], v_buf[:, :n] = k, v
        arena.keep(layer, n)
        rows[layer] = (k, v)

    def by_hand(x, factor=None):
        """Keys divided by a factor per channel, then symmetric, a scale per row: the row's largest
        magnitude is 127 steps."""
        f = torch.ones(x.shape[-1]) if factor is None else factor[:, None]
        y = x / f
        step = y.abs().amax(-1, keepdim=True) / 127
        return (y / step).round().clamp(-127, 127) * step * f, step * f

    for layer, (k, v) in rows.items():
        for x, q8, scale, f in ((k, arena.keys, arena.key_scale, factors[layer]),
                                (v, arena.values, arena.value_scale, None)):
            exact, step = by_hand(x, f)
            got = q8[layer, :, :n].float() * scale[layer, :, :n, None]
            if f is not None:
                got = got * arena.key_channel[layer][:, None]
            assert (got - x).abs().le(step / 2 + 1e-5).all()
            torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)
    # one decoded token a layer, at slot n (the device's lengths), then attention from the slots
    arena.begin_decode([n, n])
    for layer, (k, v) in rows.items():
        k_new, v_new = torch.randn(1, H, 1, D), torch.randn(1, H, 1, D)
        keys, values = arena.update(k_new, v_new, layer)
        assert keys.dtype == torch.int8 and int(keys.livevlm_last) == n
        q = torch.randn(1, Hq, 1, D)
        out, _ = stream_attention(None, q, keys, values, scaling=D ** -0.5)

        def attend(kk, vv):          # [H, n + 1, D]: softmax over the first n + 1 slots, query heads grouped
            qq = q[0, :, 0].view(H, Hq // H, D)
            p = (qq @ kk.transpose(1, 2) * D ** -0.5).softmax(-1)
            return (p @ vv).reshape(1, 1, Hq, D)
        k_all, v_all = torch.cat([k, k_new[0]], 1), torch.cat([v, v_new[0]], 1)
        torch.testing.assert_close(out, attend(by_hand(k_all, factors[layer])[0], by_hand(v_all)[0]),
                                   rtol=1e-5, atol=1e-5)
        exact = attend(k_all, v_all)           # the rows themselves: within 2% (bf16's own rounding: ~0.6%)
        assert (out - exact).norm() < 0.02 * exact.norm()
