"""LLaVA-OneVision (SigLIP + projector + Qwen2) through transformers' own modules.

Video path, as transformers computes it for `pixel_values_videos`: vision tower -> chosen hidden
layer -> projector -> 2x2 bilinear pooling, giving `tokens_per_frame` tokens per frame, and ONE
learned newline embedding after the whole video. We stream frames without the newline and put it
in front of the question at answer time, so an unbounded memory reproduces the offline forward.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from . import prequantized
from .base import DTYPES, ModelLoadError, TransformersLanguageModel, VideoLLMAdapter


class LlavaOnevisionAdapter(TransformersLanguageModel, VideoLLMAdapter):
    model_type = "llava_onevision"

    def __init__(self, model, tokenizer, image_mean, image_std):
        self.model = model.eval()
        cfg = model.config
        param = next(model.parameters())
        self.kv = self._kv_shape(cfg.text_config, param)
        self._init_language_model(model.model.language_model, model.lm_head, tokenizer)
        vision = cfg.vision_config
        side = vision.image_size // vision.patch_size
        self.tokens_per_frame = math.ceil(side / 2) ** 2
        self.frame_size = (vision.image_size, vision.image_size)
        self._mean = torch.tensor(image_mean, dtype=torch.float32, device=param.device).view(1, 3, 1, 1)
        self._std = torch.tensor(image_std, dtype=torch.float32, device=param.device).view(1, 3, 1, 1)

    @classmethod
    def from_pretrained(cls, path: Path, device: str, dtype: str, weights: str = "bf16",
                        **_) -> "LlavaOnevisionAdapter":
        from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

        try:
            model = prequantized.load(LlavaOnevisionForConditionalGeneration, path, device, weights, DTYPES[dtype],
                                      attn_implementation="sdpa")
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load a LLaVA-OneVision checkpoint from {path}: {err}") from err
        mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]          # SigLIP's normalisation
        proc_file = path / "preprocessor_config.json"
        if proc_file.exists():
            proc = json.loads(proc_file.read_text())
            mean, std = proc.get("image_mean", mean), proc.get("image_std", std)
        return cls(model, tokenizer, mean, std)

    # ---- vision -------------------------------------------------------------------------------
    def preprocess(self, frames: list[np.ndarray]) -> torch.Tensor:
        h, w = self.frame_size
        resized = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames])
        pixels = torch.from_numpy(resized).to(self.kv.device).permute(0, 3, 1, 2).float().div_(255.0)
        return ((pixels - self._mean) / self._std).to(self.kv.dtype)

    @torch.inference_mode()
    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = visual_tokens(self.model, pixels)
        return feats.reshape(-1, feats.shape[-1])

    def video_end_embeddings(self) -> torch.Tensor:
        return self.model.model.image_newline.detach()[None, :]


def visual_tokens(model, pixels: torch.Tensor) -> torch.Tensor:
    """[frames, 3, H, W] normalised pixels -> [frames, tokens_per_frame, hidden]: vision tower ->
    chosen hidden layer(s) -> projector -> 2x2 pooling. Differentiable: the demo model's training
    calls it too, so what it learns from is what the engine feeds it."""
    cfg = model.config
    out = model.model.vision_tower(pixels, output_hidden_states=True, return_dict=True)
    layer = cfg.vision_feature_layer
    if isinstance(layer, int):
        feats = out.hidden_states[layer]
    else:
        feats = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
    if cfg.vision_feature_select_strategy == "default":
        feats = feats[:, 1:]
    return pool_2x2(model, model.model.multi_modal_projector(feats))


def pool_2x2(model, feats: torch.Tensor) -> torch.Tensor:
    """transformers' `apply_pooling` (the 2x2 bilinear pooling of the projected patches), run on a
    channels-last view of the patches instead of a channels-first copy: the same bilinear weights,
    and the fast kernel (an 8-frame clip at 3,584 channels, H100: 0.21 ms instead of 11.35 ms,
    benchmarks/ingest_parts.py). Tested equal to `apply_pooling`."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    frames, _, dim = feats.shape
    grid = feats.view(frames, side, side, dim).permute(0, 3, 1, 2)      # NCHW shape, channels-last memory
    grid = F.interpolate(grid, size=[math.ceil(side / 2)] * 2, mode="bilinear")
    return grid.permute(0, 2, 3, 1).reshape(frames, -1, dim)
