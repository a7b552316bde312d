"""The seam between the engine and a Video LLM family.

The engine never touches model internals directly: an adapter turns frames into visual token
embeddings, text into token embeddings, runs the language model over embeddings with a KV hook,
and tells the engine the few shapes it needs. A new family (Qwen2.5-VL, ...) is a new adapter
registered in `models/__init__.py`, not a fork of the engine.
"""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass

import numpy as np
import torch

from ..hook import attention
from ..hook.positions import SlotPositions
from ..cuda.kernels.fused_layers import FusedLayers


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model folder is missing, incomplete, or holds a model family we have no adapter for."""


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    q_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    def bytes_per_token(self) -> int:
        """Keys + values of one token over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


class VideoLLMAdapter(abc.ABC):
    model_type: str                      # the checkpoint's config.json `model_type` (memory files name it)
    kv: KVShape
    tokens_per_frame: int
    frame_size: tuple[int, int]          # (height, width) the vision tower takes
    stop_token_ids: tuple[int, ...]
    positions = SlotPositions()          # where memory's tokens sit in a context (hook/positions.py)
    video_start = ""                     # text the prefix ends with, right before the video
    tower_replays = True                 # the vision tower can be recorded in a CUDA graph

    # ---- vision -------------------------------------------------------------------------------
    @abc.abstractmethod
    def preprocess(self, frames: list[np.ndarray]) -> torch.Tensor:
        """RGB uint8 HxWx3 frames -> the pixel tensor encode_frames takes, on the model device
        ([F, 3, H, W]; Qwen: [F x patches, patch values])."""

    @abc.abstractmethod
    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """preprocess's pixels of F frames -> their token embeddings [F * tokens_per_frame, hidden]
        (what run_language_model takes as a frame's tokens)."""

    @abc.abstractmethod
    def video_end_embeddings(self) -> torch.Tensor:
        """Embeddings the model expects right after a video ([k, hidden], k may be 0)."""

    # ---- text ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def detokenize(self, ids: list[int]) -> str: ...

    def tokenize_around(self, before: str, text: str, after: str) -> tuple[list[int], slice]:
        """The ids of before + text + after, and the rows of `text`'s own tokens. Here the three
        parts are tokenized apart and concatenated; an adapter whose tokenizer gives character
        offsets tokenizes the whole as one string instead (as the model saw text in training)."""
        head, middle, tail = self.tokenize(before), self.tokenize(text), self.tokenize(after)
        return head + middle + tail, slice(len(head), len(head) + len(middle))

    @abc.abstractmethod
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [n] -> embeddings [n, hidden]."""

    # ---- language model -----------------------------------------------------------------------
    @abc.abstractmethod
    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [n] (or [3, n], multimodal RoPE) -> (cos, sin), each [n, head_dim], as the
        model's own rotary module gives them."""

    @abc.abstractmethod
    def query_projections(self) -> list[torch.nn.Module]:
        """Per layer, the module whose output is that layer's pre-RoPE queries [1, n, q_heads*head_dim]."""

    @abc.abstractmethod
    def key_projections(self) -> list[torch.nn.Module]:
        """Per layer, the module whose output is that layer's pre-RoPE keys [1, n, kv_heads*head_dim]."""

    @abc.abstractmethod
    def run_language_model(self, embeds: torch.Tensor, positions: torch.Tensor, kv_hook) -> torch.Tensor:
        """embeds [1, n, hidden], positions [n] (or [3, n]) -> final hidden states [1, n, hidden].

        `kv_hook` is handed to every attention layer as its cache: layer i calls
        kv_hook.update(key_states, value_states, i, ...) and attends to what it returns, new
        token j seeing all context keys and new keys up to j (see attention.py)."""

    @abc.abstractmethod
    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


class TransformersLanguageModel:
    """The language-model half of an adapter, shared by every transformers decoder whose attention
    layers call `cache.update(...)` (Qwen2, Llama, ...). Needs `self._lm` (the decoder model with
    `.layers`, `.rotary_emb`, `.embed_tokens`), `self._lm_head`, `self.tokenizer` and `self.kv`."""

    weights = "bf16"                     # the language model's weights as loaded; quantize.apply changes it

    def _init_language_model(self, lm, lm_head, tokenizer):
        self._lm, self._lm_head, self.tokenizer = lm, lm_head, tokenizer
        self._cache_kwarg = cache_kwarg_name(lm.forward)
        self.rebuild_fused_layers()
        attention.register()
        stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
        self.stop_token_ids = tuple(sorted(t for t in stops if isinstance(t, int) and t >= 0))

    def rebuild_fused_layers(self):
        """The fused kernels for the decoder and lm_head as their weights are now (again after
        quantization: the gate/up and q/k/v merges are remade in the quantized format, merged_products.py)."""
        self._fused_layers = self._fused_head = None  # the old merge's tensor goes before a new one is made
        self._fused_layers = FusedLayers(self._lm)    # nothing to swap without CUDA and Triton
        self._fused_head = FusedLayers(self._lm_head)

    @staticmethod
    def _kv_shape(text_config, param) -> KVShape:
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        return KVShape(layers=text_config.num_hidden_layers, kv_heads=text_config.num_key_value_heads,
                       q_heads=text_config.num_attention_heads, head_dim=head_dim,
                       dtype=param.dtype, device=param.device)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def tokenize_around(self, before: str, text: str, after: str) -> tuple[list[int], slice]:
        """The whole tokenized as one string; `text`'s rows are the tokens whose characters overlap it
        (a token that joins a template's space to the question's first word is the question's)."""
        if not getattr(self.tokenizer, "is_fast", False):      # no character offsets
            return VideoLLMAdapter.tokenize_around(self, before, text, after)
        a, b = len(before), len(before) + len(text)
        enc = self.tokenizer(before + text + after, add_special_tokens=False, return_offsets_mapping=True)
        rows = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < b and e > a]
        return enc["input_ids"], slice(rows[0], rows[-1] + 1) if rows else slice(0, 0)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self._lm.embed_tokens(ids.to(self.kv.device))

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probe = torch.empty(0, dtype=self.kv.dtype, device=self.kv.device)
        # [n] -> [1, n]; [3, n] -> [3, 1, n] (a multimodal rotary module's layout)
        cos, sin = self._lm.rotary_emb(probe, positions.to(self.kv.device).unsqueeze(-2))
        return cos[0], sin[0]

    def query_projections(self) -> list[torch.nn.Module]:
        return [layer.self_attn.q_proj for layer in self._lm.layers]

    def weight_probe(self) -> torch.Tensor:
        """A few weights that tell checkpoints apart (memory files carry their fingerprint)."""
        k_proj = self._lm.layers[0].self_attn.k_proj
        first_rows = getattr(k_proj, "first_rows", None)        # int4 (quantize.Int4Linear) has no weight tensor
        # an int8 weight is a torchao tensor subclass (no .numpy()); a plain one dequantizes to itself
        return first_rows(4) if first_rows else k_proj.weight.dequantize()[:4]

    def key_projections(self) -> list[torch.nn.Module]:
        # Qwen2 / Llama / Mistral rotate k_proj's output directly (no key norm in between)
        return [layer.self_attn.k_proj for layer in self._lm.layers]

    @torch.inference_mode()
    def run_language_model(self, embeds, positions, kv_hook):
        # only the language model switches to our attention and fused layers, only for this call
        with attention.in_use(self._lm.config), self._fused_layers:
            out = self._lm(inputs_embeds=embeds, position_ids=positions.unsqueeze(-2), use_cache=True,
                           **{self._cache_kwarg: kv_hook})
        return out.last_hidden_state

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with self._fused_head:                        # an int8 lm_head: the int8 product
            return self._lm_head(hidden)


def cache_kwarg_name(forward) -> str:
    """transformers 5.24 renamed the forward argument `past_key_values` to `cache` (the old name
    is deprecated until 5.40); 5.17 only knows `past_key_values`. Passing the wrong one is
    silently swallowed by **kwargs, so ask the signature."""
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"
