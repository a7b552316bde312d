"""Model adapters, chosen by the checkpoint's `model_type`."""

from __future__ import annotations

import json
from pathlib import Path

from . import quantize
from .base import KVShape, ModelLoadError, VideoLLMAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen_vl import Qwen2_5_VLAdapter, Qwen3VLAdapter
from .text_lm import TextLMAdapter

ADAPTERS: dict[str, type[VideoLLMAdapter]] = {
    adapter.model_type: adapter for adapter in (LlavaOnevisionAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter)
}
TEXT_MODEL_TYPES = ("llama", "qwen2", "mistral")      # text-only decoders: benchmarks, not the node


def load_adapter(model_path: str, device: str, dtype: str, weights: str = "bf16", **options) -> VideoLLMAdapter:
    """The adapter for the checkpoint at `model_path`, its language model quantized to `weights`
    (quantize.py: one step after any adapter loads, so every family gets it)."""
    why = quantize.refusal(weights, _torch_device(device))
    if why:                                       # before minutes of loading
        raise ModelLoadError(why)
    adapter = _load(model_path, device, dtype, weights=weights, **options)   # quantized on the way (place)
    quantize.apply(adapter, weights)          # counts, checks, rebuilds the fused layers
    return adapter


def _torch_device(device: str):
    import torch

    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ModelLoadError(f"unknown device {device!r}: {err}") from err


def _load(model_path: str, device: str, dtype: str, **options) -> VideoLLMAdapter:
    if not model_path:
        raise ModelLoadError("model_path is empty: point it at a local from_pretrained folder")
    path = Path(model_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return TextLMAdapter.from_pretrained(path, device, dtype, **options)
    if not path.is_dir():
        raise ModelLoadError(f"model folder not found: {path}")
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{path} has no config.json: not a transformers checkpoint folder")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{config_file} is not valid JSON: {err}") from err
    if model_type in TEXT_MODEL_TYPES:
        return TextLMAdapter.from_pretrained(path, device, dtype, **options)
    if model_type not in ADAPTERS:
        raise ModelLoadError(f"{path} holds a {model_type!r} model; supported: {sorted(ADAPTERS)} "
                             f"(and text-only {list(TEXT_MODEL_TYPES)})")
    return ADAPTERS[model_type].from_pretrained(path, device, dtype, **options)


__all__ = ["ADAPTERS", "KVShape", "ModelLoadError", "VideoLLMAdapter", "load_adapter"]
