"""Qwen2.5-VL and Qwen3-VL through transformers' own modules.

Frames: each camera frame is resized to a fixed size (`frame_pixels`, so tokens per frame and the
memory's arithmetic never change), normalised, and cut into the patches the vision tower takes,
as the family's image processor does. The tower takes time in pairs of frames (temporal patch 2):
each frame is its own pair (the frame twice), which is what the processors do with a still image
and with the odd last frame of a video. So every frame keeps its own tokens, stamp and pose, and
frames of several cameras never share a patch; the price is the tower's work for two frames per
frame (docs/engine-design.md). Window attention and 2x2 patch merging run inside the tower.

Positions: multimodal RoPE (time, row, column), placed by hook/positions.py:
  Qwen2.5-VL  the whole stream is one video block after <|vision_start|>; frame k at time
              floor(k x tokens_per_second / fps), its tokens at their row and column;
  Qwen3-VL    each frame is its own block, <|vision_start|> grid <|vision_end|>, both markers
              part of the frame's tokens (so memory keeps or drops them like any token), and
              DeepStack: features from early vision layers are added to the first decoder layers'
              hidden states at the frame's visual tokens. Qwen3-VL's processor also writes each
              frame's time as text ("<3.0 seconds>"); the engine does not (time is in the order and
              the positions only), and says so in the README.
Keys: Qwen2.5-VL rotates k_proj's output; Qwen3-VL normalises it per head first (k_norm), so the
pre-RoPE keys memory stores are k_norm's output (and queries q_norm's).
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import cv2
import numpy as np
import torch

from ..hook.positions import grid_of_one_block, grid_of_wrapped_frames
from . import prequantized
from .base import DTYPES, ModelLoadError, TransformersLanguageModel, VideoLLMAdapter

DEFAULT_GRID = 14         # tokens per side of a frame by default: 196, as LLaVA-OneVision's 384-px frame
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class _QwenVL(TransformersLanguageModel, VideoLLMAdapter):
    model_class: str
    # the towers lay out attention windows and sequence lengths on the host (.tolist(), .item()):
    # a clip's tower runs eagerly, its language-model prefill replays (cuda/ingest_step.py)
    tower_replays = False

    def __init__(self, model, tokenizer, processor_config: dict, frame_pixels: int, sample_fps: float):
        self.model = model.eval()
        cfg, vision = model.config, model.config.vision_config
        param = next(model.parameters())
        self.kv = self._kv_shape(cfg.text_config, param)
        self._init_language_model(model.model.language_model, model.lm_head, tokenizer)
        self.patch, self.merge = vision.patch_size, vision.spatial_merge_size
        self.temporal_patch = vision.temporal_patch_size
        unit = self.patch * self.merge                     # pixels a token covers, per side
        frame_pixels = frame_pixels or (DEFAULT_GRID * unit) ** 2     # Qwen2.5-VL 392 px, Qwen3-VL 448 px
        side = max(unit, round(math.sqrt(frame_pixels) / unit) * unit)
        self.frame_size = (side, side)
        self.grid = (side // self.patch, side // self.patch)                # patches
        self.rows, self.cols = self.grid[0] // self.merge, self.grid[1] // self.merge
        mean = processor_config.get("image_mean", CLIP_MEAN)
        std = processor_config.get("image_std", CLIP_STD)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=param.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=param.device).view(1, 3, 1, 1)
        self._visual = model.model.visual

    @classmethod
    def from_pretrained(cls, path: Path, device: str, dtype: str, frame_pixels: int = 0,
                        sample_fps: float = 1.0, weights: str = "bf16", **_):
        import transformers
        from transformers import AutoTokenizer

        try:
            model = prequantized.load(getattr(transformers, cls.model_class), path, device, weights, DTYPES[dtype],
                                      attn_implementation="sdpa")
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load a {cls.model_type} checkpoint from {path}: {err}") from err
        proc_file = path / "preprocessor_config.json"
        processor_config = json.loads(proc_file.read_text()) if proc_file.exists() else {}
        return cls(model, tokenizer, processor_config, frame_pixels, sample_fps)

    def describe_frames(self) -> str:
        h, w = self.frame_size
        return f"{h}x{w} px a frame, {self.tokens_per_frame} tokens a frame ({self.rows}x{self.cols} grid)"

    # ---- vision -------------------------------------------------------------------------------
    def preprocess(self, frames: list[np.ndarray]) -> torch.Tensor:
        """Frames -> [F x patches, 3 x 2 x patch x patch], each frame its own temporal pair, the
        patches in the order the image processor lays them out (2x2 merge blocks together)."""
        h, w = self.frame_size
        resized = np.stack([f if f.shape[:2] == (h, w) else cv2.resize(f, (w, h), interpolation=cv2.INTER_CUBIC)
                            for f in frames])
        pixels = torch.from_numpy(resized).to(self.kv.device).permute(0, 3, 1, 2).float().div_(255.0)
        pixels = (pixels - self._mean) / self._std
        return patchify(pixels, self.patch, self.merge, self.temporal_patch).to(self.kv.dtype)

    def _grid_thw(self, pixels: torch.Tensor) -> torch.Tensor:
        frames = pixels.shape[0] // (self.grid[0] * self.grid[1])
        return torch.tensor([[frames, *self.grid]], device=pixels.device)

    def video_end_embeddings(self) -> torch.Tensor:
        return self.embed_tokens(torch.tensor(self.tokenize("<|vision_end|>")))


class Qwen2_5_VLAdapter(_QwenVL):
    model_type = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    video_start = "<|vision_start|>"

    def __init__(self, model, tokenizer, processor_config, frame_pixels, sample_fps):
        super().__init__(model, tokenizer, processor_config, frame_pixels, sample_fps)
        self.tokens_per_frame = self.rows * self.cols
        # a frame is one temporal patch: 1 / fps seconds of video (the processor's 2 fps when every
        # frame is kept), and the time axis advances tokens_per_second per second
        seconds = 1.0 / (sample_fps or 2.0)
        self.frame_seconds = seconds
        interval = model.config.vision_config.tokens_per_second * seconds
        self.text_after_time = self._text_after_time(model)        # which rule this transformers follows
        self.positions = grid_of_one_block(self.rows, self.cols, interval, self.text_after_time).to(self.kv.device)

    @staticmethod
    def _text_after_time(model) -> bool:
        """Where this transformers version resumes text after a video: one past the largest position
        (the original release) or after the spatial span (5.x). Asked of its own get_rope_index."""
        cfg = model.config
        m = cfg.vision_config.spatial_merge_size
        ids = torch.tensor([[cfg.vision_start_token_id] + [cfg.video_token_id] * 8 + [cfg.vision_end_token_id]])
        kwargs = dict(video_grid_thw=torch.tensor([[2, 2 * m, 2 * m]]), second_per_grid_ts=torch.tensor([10.0]))
        if "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters:     # 5.24; not 5.17
            kwargs["mm_token_type_ids"] = (ids == cfg.video_token_id).int() * 2
        pos, _ = model.model.get_rope_index(ids, **kwargs)
        return int(pos[0, 0, -1]) - 1 != 2

    @torch.inference_mode()
    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self._visual(pixels, grid_thw=self._grid_thw(pixels))
        return out if torch.is_tensor(out) else out.pooler_output        # transformers < 5.2x: a tensor


class Qwen3VLAdapter(_QwenVL):
    model_type = "qwen3_vl"
    model_class = "Qwen3VLForConditionalGeneration"

    def __init__(self, model, tokenizer, processor_config, frame_pixels, sample_fps):
        super().__init__(model, tokenizer, processor_config, frame_pixels, sample_fps)
        self.tokens_per_frame = self.rows * self.cols + 2         # <|vision_start|> grid <|vision_end|>
        self.positions = grid_of_wrapped_frames(self.rows, self.cols).to(self.kv.device)
        marks = self.tokenize("<|vision_start|><|vision_end|>")
        self._marks = self.embed_tokens(torch.tensor(marks))      # [2, hidden]
        # DeepStack: early vision layers' features are added to the first decoder layers' output at
        # the frame's tokens. transformers adds them through a boolean mask (a device sync, which a
        # CUDA graph cannot record); a forward hook adds them to every row instead, zeros at the
        # markers, which is the same sum.
        self._deepstack_now: list[torch.Tensor] | None = None
        for i in range(min(len(model.config.vision_config.deepstack_visual_indexes), len(self._lm.layers))):
            self._lm.layers[i].register_forward_hook(self._add_deepstack(i))

    def query_projections(self) -> list[torch.nn.Module]:
        return [layer.self_attn.q_norm for layer in self._lm.layers]

    def key_projections(self) -> list[torch.nn.Module]:
        return [layer.self_attn.k_norm for layer in self._lm.layers]      # normalised, before RoPE

    def video_end_embeddings(self) -> torch.Tensor:
        return self._marks[:0]                                  # every frame closes its own block

    @torch.inference_mode()
    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """[F x (grid + 2), hidden x (1 + DeepStack layers)]: per frame the start marker, the grid
        tokens and the end marker; the DeepStack features ride along in the same row (zeros at the
        markers, where adding them changes nothing), so a frame's tokens stay one tensor."""
        out = self._visual(pixels, grid_thw=self._grid_thw(pixels))
        merged, deepstack = out if isinstance(out, tuple) else (out.pooler_output, out.deepstack_features)
        grid = self.rows * self.cols
        frames, hidden = merged.shape[0] // grid, merged.shape[-1]
        rows = torch.cat([merged] + list(deepstack), dim=-1).view(frames, grid, -1)
        marks = torch.zeros(2, rows.shape[-1], dtype=rows.dtype, device=rows.device)
        marks[:, :hidden] = self._marks
        return torch.cat([marks[:1].expand(frames, 1, -1), rows, marks[1:].expand(frames, 1, -1)], dim=1
                         ).reshape(frames * (grid + 2), -1)

    def run_language_model(self, embeds, positions, kv_hook):
        hidden = self._lm.config.hidden_size
        if embeds.shape[-1] > hidden:                        # a frame's tokens: DeepStack rides along
            self._deepstack_now = embeds[0, :, hidden:].split(hidden, dim=-1)
        try:
            return super().run_language_model(embeds[..., :hidden], positions, kv_hook)
        finally:
            self._deepstack_now = None

    def _add_deepstack(self, layer: int):
        def hook(module, args, output):
            if self._deepstack_now is None:
                return output
            if isinstance(output, tuple):                    # transformers versions differ here
                return (output[0] + self._deepstack_now[layer],) + output[1:]
            return output + self._deepstack_now[layer]
        return hook


def patchify(pixels: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """[F, C, H, W] -> [F x (H/patch) x (W/patch), C x temporal x patch x patch]: each frame
    repeated `temporal` times in time, patches grouped merge x merge, as Qwen2-VL's image
    processor lays them out."""
    F_, C, H, W = pixels.shape
    gh, gw = H // patch, W // patch
    x = pixels.reshape(F_, C, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)                       # F, gh/m, gw/m, m, m, C, p, p
    x = x[:, :, :, :, :, :, None].expand(*x.shape[:6], temporal, patch, patch)
    return x.reshape(F_ * gh * gw, C * temporal * patch * patch)
