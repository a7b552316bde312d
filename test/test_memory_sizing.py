"""`gpu_memory_budget_gb` (memory/sizing.py): budget_tokens sized from bytes, CPU.

What is checked against what the engine really allocates: with the sized budget, the model's bytes
plus every buffer memory and answers allocate (tiers, prefix, answer arena) stay within the budget
less the estimated working space, and the budget is used (one more token's worth of bytes per
token would not fit). A budget too small is refused with its arithmetic.
"""

import pytest
import torch

from livevlm_ros.engine import EngineConfig, LiveVLMEngine
from livevlm_ros.engine.models.base import KVShape
from livevlm_ros.engine.memory.sizing import BudgetError, kv_bytes_per_token, module_bytes

QUESTION = "Is the door on the left open?"


def allocated_memory_bytes(engine) -> int:
    """Bytes of every buffer memory and answers hold now: both tiers (all their tensors, at
    capacity), the prefix, the answer arena."""
    m, total = engine.memory, 0
    for buf in (m.long, m.short):
        total += sum(t.numel() * t.element_size() for t in (buf.keys, buf.values, buf.token_idx, buf.score,
                                                              buf.score_sum, buf.sink))
        if buf.quantized:
            total += sum(t.numel() * t.element_size() for t in (buf.key_scale, buf.value_scale, buf.key_channel,
                                                                  buf.value_channel))
    total += sum(t.numel() * t.element_size() for t in (m.prefix_keys, m.prefix_values))
    arena = engine.hook.arena
    total += sum(t.numel() * t.element_size() for t in (arena.keys, arena.values, arena.key_scale,
                                                          arena.value_scale, arena.scratch) if t is not None)
    return total


# "static": the fixed-shape steps, which answer in the arena (8-bit with kv_dtype int8: hook/arena.py)
@pytest.mark.parametrize("weights, kv_dtype, launch", [("bf16", "bf16", "eager"), ("int8", "bf16", "eager"),
                                                       ("bf16", "int8", "eager"), ("bf16", "bf16", "static"),
                                                       ("bf16", "int8", "static")])
def test_sized_memory_fits_the_budget_and_uses_it(tiny_model_path, frames, weights, kv_dtype, launch):
    budget_gb = 0.004
    engine = LiveVLMEngine(EngineConfig(model_path=tiny_model_path, weights=weights, gpu_memory_budget_gb=budget_gb,
                                        kv_dtype=kv_dtype, budget_tokens=None, page_tokens=4, vision_sinks=4,
                                        sample_fps=0, launch=launch))
    s = engine.sizing
    assert engine.config.budget_tokens == s.budget_tokens == engine.stats()["budget_tokens_sized"]
    assert s.weights_bytes == module_bytes(engine.model.model)
    T = engine.model.tokens_per_frame
    for i, f in enumerate(frames(s.budget_tokens // T + 4)):   # memory full, compressing
        engine.ingest(f, float(i))
    engine.ask(QUESTION, max_new_tokens=4)
    assert (engine.hook.arena.keys is not None) == (launch == "static")
    stats = engine.stats()
    assert stats["device_tokens"] <= s.budget_tokens
    assert stats["long_term_tokens"] > 0
    used = s.weights_bytes + allocated_memory_bytes(engine)
    assert used <= s.budget_bytes - s.working_bytes, (used, s.arithmetic())
    # the sizing spends the budget: one more token of every kind would not have fitted
    assert s.budget_bytes - s.working_bytes - s.weights_bytes - (s.budget_tokens + s.fixed_tokens + 1) * s.bytes_per_token < 0
    assert "GB budget" in stats["memory_sizing"] and stats["weights"] == weights and stats["kv_dtype"] == kv_dtype


def test_int8_kv_holds_more_tokens_in_the_same_budget(tiny_model_path):
    sized = {kv: LiveVLMEngine(EngineConfig(model_path=tiny_model_path, kv_dtype=kv, gpu_memory_budget_gb=0.004,
                                            page_tokens=4, vision_sinks=4, sample_fps=0)).sizing for kv in ("bf16", "int8")}
    assert sized["int8"].bytes_per_token < sized["bf16"].bytes_per_token
    assert sized["int8"].budget_tokens > sized["bf16"].budget_tokens


def test_int8_weights_leave_more_tokens_in_the_same_budget(tiny_model_path):
    engines = {w: LiveVLMEngine(EngineConfig(model_path=tiny_model_path, weights=w, gpu_memory_budget_gb=0.004,
                                             page_tokens=4, vision_sinks=4, sample_fps=0)) for w in ("bf16", "int8")}
    decoder = {w: module_bytes(e.model._lm.layers) for w, e in engines.items()}
    assert decoder["int8"] < 0.3 * decoder["bf16"]               # float32 -> int8 + a scale per row
    sized = {w: e.sizing for w, e in engines.items()}
    assert sized["bf16"].weights_bytes - sized["int8"].weights_bytes > 0.7 * decoder["bf16"]   # lm_head too
    assert sized["int8"].budget_tokens > sized["bf16"].budget_tokens


def test_a_budget_too_small_is_refused_with_the_arithmetic(tiny_model_path):
    with pytest.raises(BudgetError, match=r"gpu_memory_budget_gb=0.0005 cannot hold.*GB budget - .* GB weights - "
                                          r".*memory tokens at \d+ B each \(the smallest memory needs \d+\)"):
        LiveVLMEngine(EngineConfig(model_path=tiny_model_path, gpu_memory_budget_gb=0.0005, sample_fps=0))


def test_int8_kv_holds_about_twice_the_tokens_per_byte_at_7b_shapes():
    """LLaVA-OneVision-7B's language model (Qwen2-7B): 28 layers, 4 kv heads of 128, bf16."""
    kv = KVShape(layers=28, kv_heads=4, q_heads=28, head_dim=128, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert kv_bytes_per_token(kv, "bf16") == 57_344 == kv.bytes_per_token()
    assert kv_bytes_per_token(kv, "int8") == 28_672 + 2 * 4 * 28 * 4
    assert 1.9 < kv_bytes_per_token(kv, "bf16") / kv_bytes_per_token(kv, "int8") < 2.0
