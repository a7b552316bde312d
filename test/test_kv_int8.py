"""8-bit KV pieces (memory/kv_quant.py), CPU: the quantization, the readers that dequantize as they
read (rope.rotate_into, PageSummary.in_time_order; their Triton kernels are checked in
benchmarks/kernels_interpreted.py), and PaR's page ranking from int8 summaries against bf16's.
The tier itself does not store int8 yet: kv_dtype int8 is refused at start (tested last)."""

import pytest
import torch

from livevlm_ros.engine import EngineConfig, LiveVLMEngine
from livevlm_ros.engine.hook.rope import apply_rope, rotate_into
from livevlm_ros.engine.memory.kv_quant import dequantize_rows, quantize_rows
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


PER_TOKEN_SCALES_LOSE_QUEST_PAGES = pytest.mark.xfail(strict=True, reason=(
    "found here: with a scale per token, outlier key channels (which real keys have) take the int8 range "
    "and the small channels lose resolution; quest's per-channel bounds then lose 3 of 50 object pages. "
    "Keys need per-channel scales (as KIVI quantizes them) before the tier stores int8"))


@pytest.mark.parametrize("scoring, outliers", [
    ("softmax_mean", True), ("quest", False),
    pytest.param("quest", True, marks=PER_TOKEN_SCALES_LOSE_QUEST_PAGES)])
def test_int8_page_summaries_rank_pages_as_bf16_does(scoring, outliers):
    """Keys like a layer's (channels of different scales, optionally a few outlier channels), an
    object's tokens planted in a few pages, questions that look for it: the pages PaR reads (top
    40%) from int8 summaries are the ones it reads from bf16 summaries, up to near-ties, and no
    object page bf16 reads is lost."""
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
    q8, scale = quantize_rows(keys)
    approx = PageSummary.in_time_order(q8, order, pages, P, scale, torch.bfloat16).layer(0)
    k = int(0.4 * pages)
    overlaps = []
    for trial in range(20):
        question = (obj.repeat_interleave(q_heads // H, 0)[:, None] + torch.randn(q_heads, 6, D)) * 0.5
        a = page_scores(question, exact, scoring).topk(k).indices
        b = page_scores(question, approx, scoring).topk(k).indices
        overlaps.append(len(set(a.tolist()) & set(b.tolist())) / k)
        lost = (set(planted) & set(a.tolist())) - set(b.tolist())
        assert not lost, f"trial {trial}: int8 summaries lost object pages {lost} that bf16's read"
    assert sum(overlaps) / len(overlaps) >= 0.95, overlaps


def test_kv_dtype_int8_is_refused_until_the_tier_stores_it(tiny_model_path):
    with pytest.raises(ValueError, match="kv_dtype int8: 8-bit memory is not implemented yet"):
        LiveVLMEngine(EngineConfig(model_path=tiny_model_path, kv_dtype="int8", sample_fps=0))
