"""A checkpoint saved with its language model already quantized (models/prequantized.py) loads what
loading the original checkpoint and quantizing it gives, from a file holding the quantized bytes only,
through every adapter's own from_pretrained (load_adapter)."""

import json

import pytest
import torch

from livevlm_ros.engine.models import ModelLoadError, load_adapter, prequantized, quantize

FRAME_FREE_PROMPT = "Is the door on the left open?"


def first_logits(adapter) -> torch.Tensor:
    ids = adapter.tokenizer(FRAME_FREE_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return adapter.model(input_ids=ids).logits[0, -1]


def language_bytes(model) -> int:
    """Bytes of the language model's tensors (decoder and lm_head) as the model holds them."""
    lm = model.get_decoder()
    head = model.get_output_embeddings()
    seen, total = set(), 0
    for module in (lm, head):
        for t in [*module.parameters(), *module.buffers()]:
            parts = (t.qdata, t.scale) if quantize.is_quantized(t) else (t,)
            for p in parts:
                if p.data_ptr() not in seen:
                    seen.add(p.data_ptr())
                    total += p.numel() * p.element_size()
    return total


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_a_saved_quantized_checkpoint_loads_what_quantizing_at_load_gives(tiny_model_path, tmp_path, weights):
    dst = prequantized.save(tiny_model_path, tmp_path / f"tiny_{weights}", weights, dtype="float32")
    marker = json.loads((dst / prequantized.MARKER).read_text())
    assert marker["weights"] == weights and marker["dtype"] == "float32"
    assert (dst / "config.json").exists() and (dst / "tokenizer_config.json").exists()
    assert not (dst / "model.safetensors.index.json").exists()

    reference = load_adapter(str(tiny_model_path), "cpu", "float32", weights=weights)
    loaded = load_adapter(str(dst), "cpu", "float32", weights=weights)
    kinds = [type(m).__name__ for m in reference.model.modules()]
    assert [type(m).__name__ for m in loaded.model.modules()] == kinds
    assert ("Int4Linear" in kinds) == (weights == "int4")
    assert ("Int4Embedding" if weights == "int4" else "Int8Embedding") in kinds
    for (name, a), (_, b) in zip(reference.model.state_dict().items(), loaded.model.state_dict().items()):
        if quantize.is_quantized(a):
            assert type(b) is type(a), name
            a, b = torch.cat([a.qdata.flatten().float(), a.scale.flatten().float()]), \
                torch.cat([b.qdata.flatten().float(), b.scale.flatten().float()])
        assert torch.equal(a, b), name
    torch.testing.assert_close(first_logits(loaded), first_logits(reference), rtol=0, atol=0)
    # the file holds the language model's quantized bytes, not its float32 ones
    saved = (dst / prequantized.WEIGHTS_FILE).stat().st_size
    full = load_adapter(str(tiny_model_path), "cpu", "float32").model
    assert language_bytes(loaded.model) < 0.6 * language_bytes(full)
    assert saved < sum(p.numel() * p.element_size() for p in full.parameters()) - \
        0.4 * language_bytes(full)


def test_a_saved_checkpoint_refuses_another_precision_or_dtype_with_the_reason(tiny_model_path, tmp_path):
    dst = prequantized.save(tiny_model_path, tmp_path / "tiny_int4", "int4", dtype="float32")
    with pytest.raises(ModelLoadError, match="saved with int4 weights.*set weights: int4"):
        load_adapter(str(dst), "cpu", "float32", weights="int8")
    with pytest.raises(ModelLoadError, match="saved at dtype float32"):
        load_adapter(str(dst), "cpu", "bfloat16", weights="int4")
    config = json.loads((dst / "config.json").read_text())      # a config the file does not fit
    config["text_config"]["intermediate_size"] *= 2
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="does not fit its config"):
        load_adapter(str(dst), "cpu", "float32", weights="int4")


def test_a_text_model_with_a_tied_head_saves_and_loads(tmp_path):
    """A causal LM whose lm_head is the token embedding (Qwen2-0.5B, SmolLM2): the int4 table is
    saved once and the head reads it again after loading."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from livevlm_ros.tools.make_tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen2Config(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    dst = prequantized.save(tmp_path / "src", tmp_path / "int4", "int4", dtype="float32")
    assert json.loads((dst / prequantized.MARKER).read_text())["aliases"]        # the table, once
    reference = load_adapter(str(tmp_path / "src"), "cpu", "float32", weights="int4")
    loaded = load_adapter(str(dst), "cpu", "float32", weights="int4")
    head = loaded.model.get_output_embeddings()
    assert type(head).__name__ == "TiedHead" and head.embedding is loaded.model.get_input_embeddings()
    assert type(head.embedding).__name__ == "Int4Embedding"
    torch.testing.assert_close(first_logits(loaded), first_logits(reference), rtol=0, atol=0)
