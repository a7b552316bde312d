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

from .base import KVShape, ModelLoadError, VideoLLMAdapter, cache_kwarg_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LlavaOnevisionAdapter(VideoLLMAdapter):
    model_type = "llava_onevision"

    def __init__(self, model, tokenizer, image_mean, image_std):
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = model.config
        self._lm = model.model.language_model
        self._cache_kwarg = cache_kwarg_name(self._lm.forward)
        self._layer_types = sorted(set(getattr(cfg.text_config, "layer_types", None) or ["full_attention"]))

        text = cfg.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        param = next(model.parameters())
        self.kv = KVShape(layers=text.num_hidden_layers, kv_heads=text.num_key_value_heads,
                          q_heads=text.num_attention_heads, head_dim=head_dim,
                          dtype=param.dtype, device=param.device)

        vision = cfg.vision_config
        side = vision.image_size // vision.patch_size
        self.tokens_per_frame = math.ceil(side / 2) ** 2
        self.frame_size = (vision.image_size, vision.image_size)
        self._mean = torch.tensor(image_mean, dtype=torch.float32, device=param.device).view(1, 3, 1, 1)
        self._std = torch.tensor(image_std, dtype=torch.float32, device=param.device).view(1, 3, 1, 1)

        stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
        self.stop_token_ids = tuple(sorted(t for t in stops if isinstance(t, int) and t >= 0))

    # ---- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: Path, device: str, dtype: str) -> "LlavaOnevisionAdapter":
        from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

        try:
            model = LlavaOnevisionForConditionalGeneration.from_pretrained(
                str(path), dtype=DTYPES[dtype], attn_implementation="sdpa").to(device)
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
        cfg = self.model.config
        out = self.model.model.vision_tower(pixels, output_hidden_states=True, return_dict=True)
        layer = cfg.vision_feature_layer
        if isinstance(layer, int):
            feats = out.hidden_states[layer]
        else:
            feats = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        feats = self.model.model.multi_modal_projector(feats)
        feats = self.model.model.apply_pooling(feats)
        return feats.reshape(-1, feats.shape[-1])

    def video_end_embeddings(self) -> torch.Tensor:
        return self.model.model.image_newline.detach()[None, :]

    # ---- text ---------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self._lm.embed_tokens(ids.to(self.kv.device))

    # ---- language model -----------------------------------------------------------------------
    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probe = torch.empty(0, dtype=self.kv.dtype, device=self.kv.device)
        cos, sin = self._lm.rotary_emb(probe, positions.to(self.kv.device)[None])
        return cos[0], sin[0]

    def query_projections(self) -> list[torch.nn.Module]:
        return [layer.self_attn.q_proj for layer in self._lm.layers]

    @torch.inference_mode()
    def run_language_model(self, embeds, positions, mask, kv_hook):
        # A ready-made mask dict makes transformers skip its own mask construction (which would
        # query the cache object for sizes it does not have).
        masks = {kind: mask for kind in self._layer_types}
        out = self._lm(inputs_embeds=embeds, position_ids=positions[None], attention_mask=masks,
                       use_cache=True, **{self._cache_kwarg: kv_hook})
        return out.last_hidden_state

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)
