"""Build tiny random Qwen2.5-VL / Qwen3-VL checkpoints (+ a small BPE tokenizer) in folders.

The same model classes and `from_pretrained` loading path as real checkpoints, a few MB each, so
tests run the adapters' real code on a CPU: window attention and patch merging in the vision
tower, multimodal RoPE with a real `mrope_section`, q/k norms (Qwen3). Weights are random.

    python -m livevlm_ros.tools.make_tiny_qwen qwen2_5_vl models/tiny_qwen25
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .make_tiny_model import CORPUS

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=QWEN_SPECIAL_TOKENS[1:])


def new_model(family: str, tokenizer, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2):
    """A randomly initialised Qwen2.5-VL or Qwen3-VL: 14-px patches, 2x2 merge, temporal pairs;
    head_dim 16, so the M-RoPE sections [2, 3, 3] (Qwen3: interleaved) cover its 8 frequencies."""
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in
           ("image_pad", "video_pad", "vision_start", "vision_end")}
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=32768, tie_word_embeddings=False)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration as Model

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=hidden,
                      fullatt_block_indexes=[1], tokens_per_second=2)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image_pad"],
                                  video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
                                  vision_end_token_id=ids["vision_end"])
    elif family == "qwen3_vl":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration as Model

        text.update(head_dim=hidden // heads,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                     "mrope_interleaved": True})
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                      num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image_pad"],
                               video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
                               vision_end_token_id=ids["vision_end"])
    else:
        raise ValueError(f"unknown family {family!r}")
    return Model(config)


def save(model, tokenizer, out: Path) -> Path:
    """A from_pretrained folder: weights, config, tokenizer and the image processor's settings."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    vision = model.config.vision_config
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "patch_size": vision.patch_size, "merge_size": vision.spatial_merge_size,
        "temporal_patch_size": vision.temporal_patch_size}))
    return out


def build(family: str, out: Path, seed: int = 0, layers: int = 2) -> Path:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    return save(new_model(family, tokenizer, layers).eval(), tokenizer, out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("family", choices=["qwen2_5_vl", "qwen3_vl"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    print(build(args.family, args.out, args.seed, args.layers))


if __name__ == "__main__":
    main()
