"""The README's robot recipe, from arithmetic only: for 16, 32 and 64 GB devices, which model,
weights and kv_dtype, and the budget_tokens that `gpu_memory_budget_gb` would size (memory/sizing.py).

    python3 benchmarks/robot_recipe.py

Nothing is loaded or run: LLaVA-OneVision 7B and 0.5B are built on the meta device (shapes and
parameter counts, no memory), their weight bytes at bf16 / int8 / int4 computed the way
models/quantize.py stores them (int8, torchao: a byte a weight and a float32 scale a row; int4: half
a byte a weight, a bf16 scale and minimum a group of 128; the token embedding goes to int8 with a
float32 scale a token, or to int4 as a Linear's weight with int4 weights), the vision tower and
projector at bf16. Checked against the H200 run of 2026-12-03 20:01 UTC (BENCHMARKS.md): 7B 16.09 /
8.48 / 5.16 GB measured, with the embedding at int8 in all three (int4's since 2026-12-07: 0.27 GB
less).
The working space is sizing.py's estimate (CUDA context included). Not measured on a Jetson: the
node's share of a device's shared memory is an assumption (NODE_SHARE below).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_bench import SHAPES  # noqa: E402

from livevlm_ros.engine import EngineConfig  # noqa: E402
from livevlm_ros.engine.memory.sizing import BudgetError, size_memory  # noqa: E402
from livevlm_ros.engine.models.base import KVShape  # noqa: E402

# of a robot computer's shared memory, what the node may take: the OS, ROS 2, camera drivers and
# the robot's own stack keep the rest (an assumption, not a measurement)
NODE_SHARE = {16: 11.0, 32: 24.0, 64: 52.0}
PREFIX_TOKENS = 34                       # the default system prompt in Qwen2's tokenizer (as measured in gpu_bench)


def meta_model(shape: str):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    s = SHAPES[shape]
    cfg = LlavaOnevisionConfig(vision_config=dict(model_type="siglip_vision_model", **s["vision"]),
                               text_config=dict(model_type="qwen2", **s["text"]),
                               vision_feature_layer=-1, vision_feature_select_strategy="full",
                               tie_word_embeddings=shape == "0.5b")
    with torch.device("meta"):
        return LlavaOnevisionForConditionalGeneration(cfg)


def weight_bytes(model, weights: str) -> int:
    """Bytes of the model with its language model's Linears (and an untied lm_head) at `weights`."""
    from livevlm_ros.engine.models.quantize import int4_group

    lm = model.model.language_model
    linears = [m for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    if model.lm_head.weight is not lm.embed_tokens.weight:
        linears.append(model.lm_head)
    quantized = {id(m.weight) for m in linears}
    if weights != "bf16":
        quantized.add(id(lm.embed_tokens.weight))
        vocab, hidden = lm.embed_tokens.weight.shape
        if weights == "int4" and int4_group(hidden):                     # the int4 token embedding
            total = vocab * hidden // 2 + vocab * (hidden // int4_group(hidden)) * 2 * 2
        else:
            total = vocab * hidden + vocab * 4                           # the int8 token embedding
    else:
        total = 0
    total += sum(p.numel() * 2 for p in model.parameters() if id(p) not in quantized)   # bf16
    for m in linears:
        out, inp = m.weight.shape
        if weights == "bf16":
            total += out * inp * 2
        elif weights == "int8":
            total += out * inp + out * 4
        else:
            total += out * inp // 2 + out * (inp // int4_group(inp)) * 2 * 2
        total += 0 if m.bias is None else m.bias.numel() * 2
    return total


def adapter_stub(model):
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    kv = KVShape(layers=text.num_hidden_layers, kv_heads=text.num_key_value_heads, q_heads=text.num_attention_heads,
                 head_dim=head_dim, dtype=torch.bfloat16, device=torch.device("cuda"))
    v = model.config.vision_config
    return SimpleNamespace(kv=kv, tokens_per_frame=(-(-(v.image_size // v.patch_size) // 2)) ** 2,
                           _lm=SimpleNamespace(config=text), model=model)


def main():
    rows = []
    for shape in ("7b", "0.5b"):
        model = meta_model(shape)
        adapter = adapter_stub(model)
        for weights in ("bf16", "int8", "int4"):
            wb = weight_bytes(model, weights)
            for kv_dtype in ("bf16", "int8"):
                for device_gb, node_gb in NODE_SHARE.items():
                    cfg = EngineConfig(gpu_memory_budget_gb=node_gb, kv_dtype=kv_dtype, weights=weights,
                                       dtype="bfloat16", device="cuda")
                    try:
                        s = size_memory(cfg, adapter, PREFIX_TOKENS, weights_bytes=wb)
                        tokens = s.budget_tokens
                        frames = (tokens - PREFIX_TOKENS) // adapter.tokens_per_frame
                        rows.append((device_gb, node_gb, shape, weights, kv_dtype, wb / 1e9, tokens, frames))
                    except BudgetError:
                        rows.append((device_gb, node_gb, shape, weights, kv_dtype, wb / 1e9, None, None))
    print("device GB | node budget GB | model | weights | kv_dtype | weights GB | budget_tokens | frames of 196 tokens")
    for r in sorted(rows, key=lambda r: (r[0], r[2], r[3], r[4])):
        d, n, shape, w, kv, wgb, tokens, frames = r
        fit = f"{tokens:,} | {frames:,}" if tokens is not None else "does not fit | -"
        print(f"{d} | {n:g} | {shape} | {w} | {kv} | {wgb:.2f} | {fit}")


if __name__ == "__main__":
    main()
