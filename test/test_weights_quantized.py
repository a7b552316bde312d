"""Quantized language-model weights (`weights`: bf16 | int8 | int4, engine/models/quantize.py), CPU.

The reference is torchao applied by hand to a second instance of the checkpoint and run by
transformers the ordinary way: an int8 engine's answer must equal that model's offline forward, so
the quantized Linears change nothing in how the hook sees and keeps KV (only the products differ
from bf16's). int4 is packed by the engine itself (quantize.Int4Linear); its reference is the same
checkpoint with each weight replaced by its 4-bit levels, computed here from the format's
definition (per group: 16 levels from the minimum to the maximum), not by the engine's code. On a
CPU the int4 product dequantizes first; the CUDA kernel is checked against the same definition in
benchmarks/kernels_interpreted.py and on the GPU. Refusals: an unknown precision, an adapter of
other weights.
"""

import pytest
import torch

from livevlm_ros.engine import EngineConfig, LiveVLMEngine
from livevlm_ros.engine.config import ConfigError
from livevlm_ros.engine.cuda.kernels.merged_products import merge
from livevlm_ros.engine.models import load_adapter, quantize
from logit_spy import same_answer_up_to_a_near_tie, spy_on_logits  # noqa: I100

QUESTION = "Is the door on the left open?"


def int8_rows(w: torch.Tensor) -> torch.Tensor:
    """Each row replaced by the nearest of 255 evenly spaced levels spanning plus and minus its
    largest magnitude: what a token embedding of int8 with a scale a token stands for."""
    scale = w.abs().amax(1, keepdim=True) / 127
    return (w / scale).round().clamp(-127, 127) * scale


def int8_reference(path):
    """The checkpoint on transformers' eager attention, its language model's Linears (and the untied
    lm_head) quantized with torchao's int8 weight-only config directly, not through quantize.py,
    and its token embedding replaced by int8_rows."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from transformers import LlavaOnevisionForConditionalGeneration

    ref = LlavaOnevisionForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    quantize_(ref.model.language_model, Int8WeightOnlyConfig(set_inductor_config=False))
    quantize_(ref.lm_head, Int8WeightOnlyConfig(set_inductor_config=False))
    embedding = ref.model.language_model.embed_tokens.weight
    with torch.no_grad():
        embedding.copy_(int8_rows(embedding))
    return ref


def test_int8_quantizes_the_language_model_only(tiny_model_path):
    adapter = load_adapter(tiny_model_path, "cpu", "float32", weights="int8")
    assert adapter.weights == "int8"
    lm_linears = quantize.language_linears(adapter)
    assert adapter._lm_head in lm_linears                       # untied in the tiny model
    assert lm_linears and all(quantize.is_quantized(m.weight) for m in lm_linears)
    vision = [m for m in adapter.model.model.vision_tower.modules() if isinstance(m, torch.nn.Linear)]
    vision += [m for m in adapter.model.model.multi_modal_projector.modules() if isinstance(m, torch.nn.Linear)]
    assert vision and not any(quantize.is_quantized(m.weight) for m in vision)
    # a quantized layer holds int8 data, not a full-precision copy
    w = adapter._lm.layers[0].self_attn.k_proj.weight
    assert w.qdata.dtype == torch.int8


def full_memory_first_logits(path, video, **options):
    """The engine (nothing dropped: full policy) and its first-token logits after `video`."""
    engine = LiveVLMEngine(EngineConfig(model_path=path, policy="full", budget_tokens=None, sample_fps=0, **options))
    for i, f in enumerate(video):
        engine.ingest(f, float(i))
    return engine, engine.ask(QUESTION, max_new_tokens=1, return_logits=True).first_logits


def offline_first_logits(ref, engine, video) -> torch.Tensor:
    """transformers' own forward of `ref` over [prefix, frames, newline, question], the sequence the
    engine builds."""
    a, T = engine.model, engine.model.tokens_per_frame
    with torch.inference_mode():
        feats = [ref.model.get_video_features(a.preprocess([f])[None]) for f in video]
        hidden = ref.config.text_config.hidden_size
        visual = torch.cat([getattr(x, "pooler_output", x).reshape(-1, hidden)[:T] for x in feats])
        embed = ref.model.get_input_embeddings()
        prefix = embed(torch.tensor(a.tokenize(engine.config.system_prompt)))
        suffix = embed(torch.tensor(a.tokenize(engine.config.question_template.format(question=QUESTION))))
        seq = torch.cat([prefix, visual, ref.model.image_newline[None], suffix])[None]
        return ref(inputs_embeds=seq).logits[0, -1].float()


def test_int8_answer_equals_offline_forward_of_the_int8_model(tiny_model_path, frames):
    """Nothing dropped (full policy), 2 layers: the engine's first logits equal transformers' forward
    over [prefix, frames, newline, question] of the same checkpoint quantized by torchao by hand."""
    video = frames(4)
    engine, answer = full_memory_first_logits(tiny_model_path, video, weights="int8")
    expected = offline_first_logits(int8_reference(tiny_model_path), engine, video)
    torch.testing.assert_close(answer, expected, atol=2e-5, rtol=1e-4)
    # and it is not the bf16 (unquantized) model's answer: the test can tell the two apart
    _, unquantized = full_memory_first_logits(tiny_model_path, video)
    assert (unquantized - answer).abs().max() > 1e-4


def test_gate_up_merge_skips_quantized_weights(tiny_model_path):
    """merged_products merges gate and up weights into one tensor; quantized weights only on CUDA, in
    their own format (a plain concatenation would make them one full-size tensor), so on a CPU
    they are left as they are."""
    adapter = load_adapter(tiny_model_path, "cpu", "float32", weights="int8")
    mlp = adapter._lm.layers[0].mlp
    before = mlp.gate_proj.weight
    assert merge([mlp.gate_proj, mlp.up_proj]) is None
    assert mlp.gate_proj.weight is before and quantize.is_quantized(mlp.gate_proj.weight)
    plain = load_adapter(tiny_model_path, "cpu", "float32")._lm.layers[0].mlp
    assert merge([plain.gate_proj, plain.up_proj]) is not None                    # and a plain MLP is still merged


def test_unknown_precision_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="weights must be one of bf16, int8, int4"):
        EngineConfig(weights="int3").validate()
    with pytest.raises(ConfigError, match="kv_dtype must be one of bf16, int8.*fp8 is not implemented"):
        EngineConfig(kv_dtype="fp8").validate()


def four_bit_levels(w: torch.Tensor, group: int) -> torch.Tensor:
    """Each run of `group` inputs of a row replaced by the nearest of 16 evenly spaced levels from
    its minimum to its maximum: what a 4-bit weight stands for."""
    N, K = w.shape
    runs = w.detach().float().reshape(N, K // group, group)
    low, high = runs.min(-1, keepdim=True).values, runs.max(-1, keepdim=True).values
    step = (high - low) / 15
    return (torch.round((runs - low) / step).clamp(0, 15) * step + low).reshape(N, K)


def test_int4_packs_the_language_model_into_a_quarter_of_its_bytes(tiny_model_path):
    plain = load_adapter(tiny_model_path, "cpu", "float32")
    adapter = load_adapter(tiny_model_path, "cpu", "float32", weights="int4")
    assert adapter.weights == "int4"
    packed = [m for m in adapter._lm.modules() if isinstance(m, quantize.Int4Linear)]
    assert len(packed) == 7 * len(adapter._lm.layers)                  # q k v o gate up down
    assert isinstance(adapter._lm_head, quantize.Int4Linear) and adapter.model.lm_head is adapter._lm_head
    assert not any(isinstance(m, torch.nn.Linear) for m in adapter._lm.modules())
    vision = [m for m in adapter.model.model.vision_tower.modules() if isinstance(m, torch.nn.Linear)]
    assert vision and all(type(m.weight) is torch.nn.Parameter for m in vision)
    linear_bytes = sum(t.numel() * t.element_size() for m in packed for t in (m.packed, m.scale, m.minimum))
    # half a byte a weight, plus two float32 a group (of 128 inputs, or 64 where the input is 64 wide)
    expected = sum(m.weight.numel() * (0.5 + 8 / (128 if m.in_features % 128 == 0 else 64))
                   for m in plain._lm.modules() if isinstance(m, torch.nn.Linear))
    assert linear_bytes == expected


def test_int4_answer_equals_offline_forward_of_the_four_bit_weights(tiny_model_path, frames):
    """Nothing dropped (full policy): the engine's first logits equal transformers' forward of the
    same checkpoint whose language-model weights and token embedding were replaced by
    four_bit_levels (groups of 128 inputs, or 64 where the input is 64 wide), and differ from the
    unquantized model's."""
    from transformers import LlavaOnevisionForConditionalGeneration

    video = frames(4)
    engine, answer = full_memory_first_logits(tiny_model_path, video, weights="int4")
    ref = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_path, attn_implementation="eager").eval()
    lm = ref.model.language_model
    with torch.no_grad():
        for m in [*lm.modules(), ref.lm_head]:
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(four_bit_levels(m.weight, 128 if m.in_features % 128 == 0 else 64))
        table = lm.embed_tokens.weight
        table.copy_(four_bit_levels(table, 128 if table.shape[1] % 128 == 0 else 64))
    torch.testing.assert_close(answer, offline_first_logits(ref, engine, video), atol=2e-5, rtol=1e-4)
    _, unquantized = full_memory_first_logits(tiny_model_path, video)
    assert (unquantized - answer).abs().max() > 1e-3


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_weights_run_bounded_memory_and_static_steps_and_save_memory(tiny_model_path, frames, tmp_path,
                                                                               weights):
    """Through VSB eviction and PaR retrieval, the padded fixed-shape steps (what CUDA graphs
    record) give the quantized model the same answer as its eager path, and a memory file saved by
    it loads back into it (its fingerprint reads the quantized weights: int4's packed ones)."""
    answers, video = [], frames(10)
    for launch in ("eager", "static"):
        engine = LiveVLMEngine(EngineConfig(model_path=tiny_model_path, weights=weights, launch=launch,
                                            budget_tokens=200, page_tokens=4, vision_sinks=4, sample_fps=0))
        for i, f in enumerate(video):
            engine.ingest(f, float(i))
        assert engine.stats()["long_term_tokens"] > 0
        answers.append(engine.ask(QUESTION, max_new_tokens=4, return_logits=True))
    assert answers[0].token_ids == answers[1].token_ids
    torch.testing.assert_close(answers[0].first_logits, answers[1].first_logits, atol=1e-5, rtol=1e-4)
    engine.save_memory(tmp_path / "memory.pt")
    engine.load_memory(tmp_path / "memory.pt")
    assert engine.ask(QUESTION, max_new_tokens=4).token_ids == answers[1].token_ids


def _quantized_tensors(adapter) -> dict[str, torch.Tensor]:
    """Every tensor the language model's quantized modules hold, by name (int8: torchao's data and
    scales; int4: packed, scale, minimum; the int8 token table)."""
    out = {}
    for name, m in adapter.model.named_modules():
        weight = getattr(m, "weight", None)
        if isinstance(m, torch.nn.Linear) and quantize.is_quantized(weight):
            out[name + ".qdata"], out[name + ".scale"] = weight.qdata, weight.scale
        for buffer in ("packed", "scale", "minimum", "qdata"):
            if isinstance(m, (quantize.Int4Linear, quantize.Int8Embedding, quantize.Int4Embedding)) \
                    and hasattr(m, buffer):
                out[f"{name}.{buffer}"] = getattr(m, buffer)
    return out


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_loading_quantizes_each_linear_on_its_way_as_quantizing_afterwards_would(tiny_model_path, frames,
                                                                                 weights):
    """load_adapter quantizes the language model one Linear at a time as it moves it to the device
    (quantize.place: a 16 GB robot never holds 7B's bf16 weights); the same checkpoint loaded at
    full size and quantized afterwards (quantize.apply, the path before) holds the same modules and
    bytes and gives the same first-token logits."""
    from transformers import LlavaOnevisionForConditionalGeneration

    model = quantize.place(LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_path), "cpu", weights)
    lm = model.model.language_model                                   # quantized by place itself
    k_proj = lm.layers[0].self_attn.k_proj
    assert isinstance(lm.embed_tokens, quantize.Int4Embedding if weights == "int4" else quantize.Int8Embedding)
    assert isinstance(k_proj, quantize.Int4Linear) if weights == "int4" else quantize.is_quantized(k_proj.weight)

    placed = load_adapter(tiny_model_path, "cpu", "float32", weights=weights)
    after = load_adapter(tiny_model_path, "cpu", "float32")
    assert quantize.apply(after, weights) == quantize.apply(placed, weights) > 0    # the second: nothing left
    kinds = lambda a: [(n, type(m).__name__) for n, m in a.model.named_modules()]       # noqa: E731
    assert kinds(placed) == kinds(after)
    a, b = _quantized_tensors(placed), _quantized_tensors(after)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logits, video = [], frames(4)
    for adapter in (placed, after):
        engine = LiveVLMEngine(EngineConfig(weights=weights, policy="full", budget_tokens=None, sample_fps=0),
                               adapter=adapter)
        for i, f in enumerate(video):
            engine.ingest(f, float(i))
        logits.append(engine.ask(QUESTION, max_new_tokens=1, return_logits=True).first_logits)
    assert torch.equal(logits[0], logits[1])


def test_an_adapter_of_other_weights_is_refused(tiny_model_path):
    adapter = load_adapter(tiny_model_path, "cpu", "float32")
    with pytest.raises(ConfigError, match="int8 asked for, but the adapter given holds bf16"):
        LiveVLMEngine(EngineConfig(model_path=tiny_model_path, weights="int8"), adapter=adapter)


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_families_get_quantized_weights_and_int8_memory_without_changes(tmp_path, family, weights):
    """The Qwen adapters (models/qwen_vl.py) know nothing of precision: quantization is applied
    after any adapter loads. Their language model's Linears become int8 or int4, the vision tower's
    do not, and with int8 memory too the fixed-shape steps answer as the eager path."""
    import numpy as np

    from livevlm_ros.tools.make_tiny_qwen import build

    path = str(build(family, tmp_path / family, seed=3, layers=2))
    rng = np.random.default_rng(5)
    video = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(10)]
    answers, logged = {}, {}
    for launch in ("eager", "static"):
        engine = LiveVLMEngine(EngineConfig(model_path=path, weights=weights, kv_dtype="int8", launch=launch,
                                            sample_fps=2.0, frame_pixels=112 * 112, short_term_frames=2,
                                            budget_tokens=200, vision_sinks=4, page_tokens=4))
        lm = engine.model._lm
        if weights == "int8":
            linears = quantize.language_linears(engine.model)
            assert linears and all(quantize.is_quantized(m.weight) for m in linears)
        else:
            assert not any(isinstance(m, torch.nn.Linear) for m in lm.modules())
            assert isinstance(lm.layers[0].self_attn.k_proj, quantize.Int4Linear)
        in_lm = {id(m) for m in lm.modules()} | {id(engine.model._lm_head)}
        vision = [m for m in engine.model.model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in in_lm]
        assert vision and not any(quantize.is_quantized(m.weight) for m in vision)
        for i, f in enumerate(video):
            engine.ingest(f, i / 2.0)
        engine.flush()
        assert engine.memory.long.len and engine.memory.long.keys.dtype == torch.int8
        logged[launch] = spy_on_logits(engine)
        answers[launch] = engine.ask(QUESTION, max_new_tokens=4, return_logits=True)
    # the static steps decode from the 8-bit arena, the eager path from float32 buffers: every step's
    # logits within its error (at most 1.25e-3: benchmarks/answer_margins.py), the tokens where those decide them
    same_answer_up_to_a_near_tie(answers["eager"], answers["static"], logged["eager"], logged["static"], 3e-3)
    torch.testing.assert_close(answers["static"].first_logits, answers["eager"].first_logits, atol=2e-5, rtol=1e-4)


def test_a_tied_lm_head_reads_the_int8_embedding_table(smollm2_path):
    """SmolLM2-135M (real weights, lm_head tied to the embedding): with weights int8 the embedding
    is one int8 table, and the head's logits are the hidden state times that table (int8_rows of
    the original), not a full-size copy beside it."""
    from livevlm_ros.engine.memory.sizing import module_bytes

    plain = load_adapter(smollm2_path, "cpu", "float32")
    table = plain._lm.embed_tokens.weight.detach().clone()
    adapter = load_adapter(smollm2_path, "cpu", "float32", weights="int8")
    head = adapter._lm_head
    assert isinstance(head, quantize.TiedHead) and head.embedding is adapter._lm.embed_tokens
    assert adapter.model.lm_head is head and adapter._lm.embed_tokens.qdata.dtype == torch.int8
    ids = torch.tensor(adapter.tokenize("Where did I last see the red toolbox?"))
    torch.testing.assert_close(adapter.embed_tokens(ids), int8_rows(table)[ids])
    hidden = torch.randn(3, table.shape[1])
    torch.testing.assert_close(adapter.logits(hidden), hidden @ int8_rows(table).t(), atol=1e-4, rtol=1e-4)
    assert module_bytes(adapter.model) < module_bytes(plain.model) / 3         # float32 -> int8, nothing kept


def test_with_int4_weights_the_embedding_and_its_tied_head_are_one_int4_table(smollm2_path):
    """SmolLM2-135M (real weights, tied head) at int4: the token embedding is packed as an int4
    Linear's weight is (groups of 64: its 576 inputs are not a multiple of 128), a lookup gives
    four_bit_levels of the table's rows, and the head's logits are the hidden state times that same
    table: half int8's bytes, one copy."""
    from livevlm_ros.engine.memory.sizing import module_bytes

    plain = load_adapter(smollm2_path, "cpu", "float32")
    table = plain._lm.embed_tokens.weight.detach().clone()
    adapter = load_adapter(smollm2_path, "cpu", "float32", weights="int4")
    embedding, head = adapter._lm.embed_tokens, adapter._lm_head
    assert isinstance(embedding, quantize.Int4Embedding) and embedding.group == 64
    assert isinstance(head, quantize.TiedHead) and head.embedding is embedding and adapter.model.lm_head is head
    levels = four_bit_levels(table, 64)
    ids = torch.tensor(adapter.tokenize("Where did I last see the red toolbox?"))
    torch.testing.assert_close(adapter.embed_tokens(ids), levels[ids], atol=1e-6, rtol=1e-5)
    hidden = torch.randn(3, table.shape[1])
    torch.testing.assert_close(adapter.logits(hidden), hidden @ levels.t(), atol=1e-4, rtol=1e-4)
    # half a byte an entry and two float32 a group of 64, against int8's byte and a float32 a row
    assert module_bytes(embedding) == table.numel() // 2 + 2 * 4 * table.numel() // 64


def test_int8_weights_built_a_few_rows_at_a_time_are_torchaos_of_the_whole_weight():
    """quantize.int8_weight quantizes slices of rows (so a Linear goes to the device a slice at a
    time): its data and scales equal torchao's Int8WeightOnlyConfig applied to the whole Linear,
    a slice count that does not divide the rows included."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 250, bias=False).to(torch.bfloat16)
    sliced = quantize.int8_weight(linear.weight, values_at_once=96 * 64)       # 64 rows a slice: 4 slices
    quantize_(linear, Int8WeightOnlyConfig(set_inductor_config=False))
    whole = linear.weight
    assert type(sliced) is type(whole) and sliced.dtype == whole.dtype == torch.bfloat16
    assert torch.equal(sliced.qdata, whole.qdata) and torch.equal(sliced.scale, whole.scale)
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    assert torch.equal(torch.nn.functional.linear(x, sliced), torch.nn.functional.linear(x, whole))
