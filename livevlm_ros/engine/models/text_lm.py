"""A text-only causal LM (Llama, Qwen2, ... e.g. SmolLM2-135M) behind the same seam.

Used to measure memory policies on a model whose attention was really learned: the quality
benchmark streams text in "frames" of `tokens_per_frame` tokens through `ingest_embeddings`.
Loads a transformers folder or a GGUF file (transformers dequantises GGUF on load).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import prequantized, quantize
from .base import DTYPES, ModelLoadError, TransformersLanguageModel, VideoLLMAdapter


class TextLMAdapter(TransformersLanguageModel, VideoLLMAdapter):
    model_type = "text"
    frame_size = (0, 0)

    def __init__(self, model, tokenizer, tokens_per_frame: int):
        self.model = model.eval()
        self.kv = self._kv_shape(model.config, next(model.parameters()))
        self._init_language_model(model.model, model.lm_head, tokenizer)
        self.tokens_per_frame = tokens_per_frame

    @classmethod
    def from_pretrained(cls, path: Path, device: str, dtype: str, tokens_per_frame: int = 32,
                        weights: str = "bf16", **_):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, extra = (path.parent, {"gguf_file": path.name}) if path.suffix == ".gguf" else (path, {})
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), **extra)
            if extra:                                 # a GGUF file: transformers dequantizes it
                model = quantize.place(AutoModelForCausalLM.from_pretrained(
                    str(folder), dtype=DTYPES[dtype], attn_implementation="sdpa", **extra), device, weights)
            else:
                model = prequantized.load(AutoModelForCausalLM, folder, device, weights, DTYPES[dtype],
                                          attn_implementation="sdpa")
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load a causal LM from {path}: {err}") from err
        return cls(model, tokenizer, tokens_per_frame)

    def preprocess(self, frames: list[np.ndarray]) -> torch.Tensor:
        raise TypeError("a text-only model takes no frames; use LiveVLMEngine.ingest_embeddings")

    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        raise TypeError("a text-only model takes no frames; use LiveVLMEngine.ingest_embeddings")

    def video_end_embeddings(self) -> torch.Tensor:
        return torch.empty(0, self._lm.config.hidden_size, dtype=self.kv.dtype, device=self.kv.device)
