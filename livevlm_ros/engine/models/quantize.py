"""Weight-only quantization of the language model's Linears (`weights`: bf16 | int8 | int4).

Decode on a robot's computer is bound by the bytes of weights read per token, and 7B's bf16
weights (15.2 GB) do not fit beside anything else in 16 GB. torchao (PyTorch's own quantization
library) swaps each Linear's weight for a tensor subclass that computes `F.linear` itself:
  int8  Int8WeightOnlyConfig: one int8 per weight, one scale per output row (symmetric);
  int4  Int4WeightOnlyConfig, tinygemm packing: groups of 128 weights along the input, each with
        a bf16 scale and zero point; the product is aten._weight_int4pack_mm (CUDA, sm80+).
        torchao 0.18 has no CPU kernel for it, so int4 on a CPU is refused.
Only the language model: the decoder's Linears and an untied lm_head. The vision tower and
projector stay at `dtype` (a small share of the bytes, run once per frame, not per token). A tied
lm_head is left alone: quantizing it would keep the embedding at full size beside an 8- or 4-bit
copy. The modules stay `nn.Linear` (only their weights change), so the engine's forward hooks on
q_proj / k_proj see the quantized products exactly as the attention does.

One place, applied after any adapter has loaded (`apply`): every adapter built on
`TransformersLanguageModel` gets it without changes.
"""

from __future__ import annotations

import torch

from ..config import WEIGHTS             # bf16 = not quantized: the weights stay at `dtype`
from .base import ModelLoadError
INT4_GROUP = 128                          # weights sharing one scale and zero point (torchao's default)


def refusal(weights: str, device: torch.device) -> str | None:
    """Why `weights` cannot run on `device`, or None."""
    if weights not in WEIGHTS:
        return f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}"
    if weights == "bf16":
        return None
    try:
        _import_torchao()
    except ImportError as err:
        return f"weights {weights} need torchao (pip install torchao): {err}"
    if weights == "int4":
        if device.type != "cuda":
            return ("weights int4 need a CUDA GPU: torchao's int4 weight-only kernel (tinygemm) has no CPU "
                    "implementation; use int8 on a CPU")
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"weights int4 need a GPU of compute capability 8.0 or newer (tinygemm); this one is {major}.{minor}"
    return None


def _import_torchao():
    """torchao logs a warning for each of its CUDA extensions it cannot load (cutlass, mxfp8: on a
    CPU, always); neither is used by the weight-only products here, so those stay out of our log."""
    import logging

    log = logging.getLogger("torchao")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401
    finally:
        log.setLevel(level)


def apply(adapter, weights: str) -> int:
    """Quantize the adapter's language model to `weights` in place; returns the Linears quantized.
    Raises ModelLoadError with the reason when the device or library cannot."""
    why = refusal(weights, adapter.kv.device)
    if why:
        raise ModelLoadError(why)
    if weights == "bf16":
        return 0
    linears = language_linears(adapter)
    config = _torchao_config(weights)
    from torchao.quantization import quantize_

    with torch.no_grad():
        for linear in linears:
            quantize_(linear, config)
    quantized = sum(is_quantized(linear.weight) for linear in linears)
    if quantized == 0:
        raise ModelLoadError(f"weights {weights}: none of the language model's {len(linears)} Linears could be "
                             f"quantized (int4 needs input sizes divisible by {INT4_GROUP})")
    adapter.weights = weights
    adapter.rebuild_fused_layers()        # the gate/up merge was made from the unquantized weights
    if adapter.kv.device.type == "cuda":
        torch.cuda.empty_cache()          # the full-size weights' blocks go back to the device, not the cache
    return quantized


def language_linears(adapter) -> list[torch.nn.Linear]:
    """The Linears of the language model: every one in the decoder, and the lm_head unless tied."""
    linears = [m for m in adapter._lm.modules() if isinstance(m, torch.nn.Linear)]
    head = adapter._lm_head
    if head.weight is not adapter._lm.embed_tokens.weight:
        linears.append(head)
    return linears


def is_quantized(weight: torch.Tensor) -> bool:
    """A torchao tensor subclass rather than a plain tensor."""
    return type(weight) not in (torch.Tensor, torch.nn.Parameter)


def _torchao_config(weights: str):
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    # set_inductor_config=False: we do not compile, and it would change torch's global settings
    if weights == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    return Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d",
                                set_inductor_config=False)
