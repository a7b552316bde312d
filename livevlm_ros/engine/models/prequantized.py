"""Checkpoints saved with the language model already quantized (`weights: int8 | int4`), and the
loading every adapter goes through.

transformers reads an ordinary checkpoint whole into CPU memory at `dtype` before `quantize.place`
moves and quantizes it Linear by Linear: 7B's language model alone is 15.2 GB at bf16 there, which a
16 GB Jetson's shared memory cannot hold beside anything else. A checkpoint saved by `save` holds
the language model as the engine stores it, so loading reads those bytes only (7B int4: ~4.9 GB):

    python -m livevlm_ros.engine.models.prequantized SRC DST --weights int4 [--dtype bfloat16]

DST gets SRC's config, tokenizer and processor files; `model.safetensors`, where an int4 Linear is
its packed bytes, scales and minimums, an int8 Linear its int8 rows and scales (torchao's tensor
taken apart), the token embedding int8 rows and scales (or, with int4 weights, packed as an int4
Linear is; int4 files saved before 2026-12-07 hold an int8 table, and load with it), and everything else (vision tower,
projector, norms) at `dtype`; and `livevlm_quantized.json`, naming the precision, the dtype and
which module is what. `load` builds the model's modules without memory (parameters on the meta
device), puts quantized modules where the file has them, and assigns the file's tensors.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from ..cuda.kernels import quantized_linear
from . import quantize
from .base import ModelLoadError

MARKER = "livevlm_quantized.json"
WEIGHTS_FILE = "model.safetensors"
_SKIPPED = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json", ".bin.index.json")


def load(model_class, path: Path, device, weights: str, dtype: torch.dtype, **from_pretrained) -> torch.nn.Module:
    """The model at `path` on `device`, its language model at `weights`: transformers' from_pretrained
    and quantize.place for an ordinary checkpoint; for one `save` wrote, its quantized tensors as
    they are (refused with the reason where `weights` or `dtype` is not what it was saved at)."""
    marker = path / MARKER
    if not marker.exists():
        model = model_class.from_pretrained(str(path), dtype=dtype, **from_pretrained)
        return quantize.place(model, device, weights)
    saved = json.loads(marker.read_text())
    if saved["weights"] != weights:
        raise ModelLoadError(f"{path} was saved with {saved['weights']} weights (set weights: {saved['weights']}), "
                             f"not {weights}")
    if saved["dtype"] != str(dtype).removeprefix("torch."):
        raise ModelLoadError(f"{path} was saved at dtype {saved['dtype']} (set dtype to it), not {dtype}")
    why = quantize.refusal(weights, torch.device(device))
    if why:
        raise ModelLoadError(why)
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    build = getattr(model_class, "_from_config", None) or model_class.from_config      # a model class, or an Auto one
    with init_empty_weights(include_buffers=False):        # parameters without memory; small buffers made
        model = build(config, dtype=dtype, **from_pretrained)
    tensors = load_file(str(path / WEIGHTS_FILE))
    try:
        for alias, kept in saved["aliases"].items():
            tensors[alias] = tensors[kept]
        _put_quantized(model, tensors, saved, dtype)
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    except (KeyError, RuntimeError, ModelLoadError) as err:     # a tensor missing, or not the config's shape
        raise ModelLoadError(f"{path}/{WEIGHTS_FILE} does not fit its config: {err}") from err
    del tensors                                       # the file's CPU tensors go as the model moves
    buffers = dict(model.named_buffers())
    empty = [name for name, t in [*model.named_parameters(), *buffers.items()] if t.is_meta]
    built = tuple(f"{name}." for name in [*saved["int4"], *saved["int8"], *saved["int8_embeddings"],
                                          *saved.get("int4_embeddings", {}), *saved["tied_heads"]])
    # (the quantized modules: made from the file)
    empty += [name for name in missing if name in buffers and not name.startswith(built)]    # the constructor's
    if unexpected or empty:
        raise ModelLoadError(f"{path}/{WEIGHTS_FILE} does not fit its config: unexpected {unexpected[:5]}, "
                             f"missing {empty[:5]}")
    return model.eval().to(device)


def save(src: Path, dst: Path, weights: str, dtype: str = "bfloat16") -> Path:
    """SRC's checkpoint with its language model quantized to `weights` (on the CPU) into DST."""
    from safetensors.torch import save_file

    from . import load_adapter

    if weights not in ("int8", "int4"):
        raise ValueError(f"weights must be int8 or int4, got {weights!r}")
    src, dst = Path(src), Path(dst)
    model = load_adapter(str(src), "cpu", dtype, weights=weights).model
    saved = dict(weights=weights, dtype=str(next(model.parameters()).dtype).removeprefix("torch."), int4={},
                 int8=[], int8_embeddings=[], int4_embeddings={}, tied_heads={}, aliases={})
    names = {id(m): name for name, m in model.named_modules()}
    for name, m in model.named_modules():
        if isinstance(m, quantize.Int4Linear):
            saved["int4"][name] = m.group
        elif isinstance(m, torch.nn.Linear) and quantize.is_quantized(m.weight):
            saved["int8"].append(name)
        elif isinstance(m, quantize.Int8Embedding):
            saved["int8_embeddings"].append(name)
        elif isinstance(m, quantize.Int4Embedding):
            saved["int4_embeddings"][name] = m.group
        elif isinstance(m, quantize.TiedHead):
            saved["tied_heads"][name] = names[id(m.embedding)]
    tensors, kept_at = {}, {}
    for name in saved["int8"]:                         # weight-only, symmetric, a scale per row: what loading rebuilds
        w = model.get_submodule(name).weight
        zero = getattr(w, "zero_point", None)
        if not quantized_linear.weight_only_int8(w) or (zero is not None and bool(zero.any())):
            raise ValueError(f"{name}: an int8 weight this format does not hold (activation scales, a zero "
                             f"point or blocks other than a row)")
    for key, t in model.state_dict().items():
        parts = {f"{key}.qdata": t.qdata, f"{key}.scale": t.scale} if quantize.is_quantized(t) else {key: t}
        for k, v in parts.items():
            where = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
            if where in kept_at:                           # one tensor under two names (a tied head)
                saved["aliases"][k] = kept_at[where]
            else:
                kept_at[where] = k
                tensors[k] = v.contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(_SKIPPED) and f.name != MARKER:
            shutil.copy2(f, dst / f.name)
    save_file(tensors, str(dst / WEIGHTS_FILE))
    (dst / MARKER).write_text(json.dumps(saved, indent=1))
    return dst


def _put_quantized(model, tensors: dict, saved: dict, dtype: torch.dtype):
    """The quantized modules, built from the file's tensors (which they take out of `tensors`), in
    place of the empty ones the config made."""
    from torchao.quantization import Int8Tensor

    for name, group in saved["int4"].items():
        linear = model.get_submodule(name)
        _same_shape(name, (linear.out_features, linear.in_features // 2), tensors[f"{name}.packed"])
        bias = tensors.pop(f"{name}.bias", None)
        _replace(model, name, quantize.Int4Linear.from_packed(
            tensors.pop(f"{name}.packed"), tensors.pop(f"{name}.scale"), tensors.pop(f"{name}.minimum"), group,
            linear.in_features, None if bias is None else torch.nn.Parameter(bias, requires_grad=False)))
    for name in saved["int8"]:
        linear = model.get_submodule(name)
        qdata, scale = tensors.pop(f"{name}.weight.qdata"), tensors.pop(f"{name}.weight.scale")
        _same_shape(name, tuple(linear.weight.shape), qdata)
        weight = Int8Tensor(qdata, scale, [1, qdata.shape[1]], dtype)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    for name in saved["int8_embeddings"]:
        _same_shape(name, tuple(model.get_submodule(name).weight.shape), tensors[f"{name}.qdata"])
        _replace(model, name, quantize.Int8Embedding.from_quantized(
            tensors.pop(f"{name}.qdata"), tensors.pop(f"{name}.scale"), dtype))
    for name, group in saved.get("int4_embeddings", {}).items():      # files saved before int4 tables have none
        vocab, hidden = model.get_submodule(name).weight.shape
        _same_shape(name, (vocab, hidden // 2), tensors[f"{name}.packed"])
        _replace(model, name, quantize.Int4Embedding.from_packed(
            tensors.pop(f"{name}.packed"), tensors.pop(f"{name}.scale"), tensors.pop(f"{name}.minimum"), group))
    for name, embedding in saved["tied_heads"].items():
        for key in [k for k in tensors if k.startswith(f"{name}.embedding.")]:
            tensors.pop(key)
        _replace(model, name, quantize.TiedHead(model.get_submodule(embedding)))


def _same_shape(name: str, expected: tuple, saved: torch.Tensor):
    if tuple(saved.shape) != expected:
        raise ModelLoadError(f"{name}: the file holds {tuple(saved.shape)}, the config makes {expected}")


def _replace(model, name: str, module: torch.nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def main():
    ap = argparse.ArgumentParser(description="Save a checkpoint with its language model quantized (int8 / int4), "
                                             "so a device loads the quantized bytes only.")
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--weights", choices=("int8", "int4"), required=True)
    ap.add_argument("--dtype", default="bfloat16", help="the rest of the model (vision tower, norms) is saved at it")
    args = ap.parse_args()
    out = save(args.src, args.dst, args.weights, args.dtype)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"{out}: {args.weights} weights, {size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
