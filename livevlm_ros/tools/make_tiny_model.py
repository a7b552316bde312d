"""Build a tiny random LLaVA-OneVision checkpoint (+ a small BPE tokenizer) and save it to a folder.

Same model class and loading path (`from_pretrained`) as real checkpoints, a few MB in size, so
tests and the demo run the engine's real code path on a CPU. Its weights are random: it does not
understand images and its answers are not meaningful text.

    python -m livevlm_ros.tools.make_tiny_model models/tiny [--seed 0] [--image-size 56]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
CORPUS = [
    "You are the onboard vision assistant of a robot. Answer briefly and precisely about what the camera saw.",
    "Describe briefly what is happening right now.",
    "Is the door on the left open? Where did I last see the red toolbox? What colour is the cup?",
    "The robot sees a table, a chair, a person walking, a box on the floor, a door that is open.",
    "yes no left right front behind red green blue yellow white black one two three",
] * 20


def build_tokenizer(corpus: list[str] = CORPUS, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<image>", "<video>"])


def new_model(tokenizer, image_size: int = 56, layers: int = 2, vision_hidden: int = 32, vision_layers: int = 2,
              hidden: int = 64, heads: int = 4, kv_heads: int = 2):
    """A randomly initialised LLaVA-OneVision (SigLIP + projector + Qwen2) of the given size."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=vision_hidden,
                           intermediate_size=2 * vision_hidden if vision_hidden <= 32 else 4 * vision_hidden,
                           num_hidden_layers=vision_layers, num_attention_heads=max(2, vision_hidden // 32),
                           image_size=image_size, patch_size=8),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=2 * hidden if hidden <= 64 else 3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=32768, rope_theta=10000.0, tie_word_embeddings=False),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )
    return LlavaOnevisionForConditionalGeneration(config)


def save(model, tokenizer, out: Path) -> Path:
    """A from_pretrained folder: weights, config, tokenizer and SigLIP's pixel normalisation."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return out


def build(out: Path, seed: int = 0, image_size: int = 56, layers: int = 2) -> Path:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    return save(new_model(tokenizer, image_size, layers).eval(), tokenizer, out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=56)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    print(build(args.out, args.seed, args.image_size, args.layers))


if __name__ == "__main__":
    main()
