"""Weight-only quantization of the language model's Linears (`weights`: bf16 | int8 | int4).

Decode on a robot's computer is bound by the bytes of weights read per token, and 7B's bf16
weights (15.2 GB) do not fit beside anything else in 16 GB.
  int8  torchao (PyTorch's own quantization library), its int8 weight-only tensor (what
        Int8WeightOnlyConfig makes; `int8_weight` builds it a few rows at a time): one int8 per
        weight, one scale per output row (symmetric). The weight becomes a tensor subclass; the module
        stays an `nn.Linear`. On CUDA the engine's forwards compute its product with
        cuda/kernels/quantized_linear.py (torchao's own converts the weight to bf16 first).
  int4  Int4Linear here: groups of 128 inputs, each with a scale and a minimum per output; the
        format and its product are cuda/kernels/quantized_linear.py's. torchao's int4 product
        (tinygemm) is faster for one row (an answer token: 45.6 us against 58.3 for 7B's gate+up,
        H200) but not for more: a question's 16 rows took 185 us against 59, and a clip's prefill
        8.4 ms against 1.7 (then 0.34 dequantized for cuBLAS); a 7B engine on it answered its
        first token in 26 ms against bf16's 13 and ingested a frame in 116 ms against 21. It has no
        CPU kernel either; here, where Triton is absent (a CPU), the product dequantizes the
        weight first: correct, and slow.
Only the language model: the decoder's Linears, an untied lm_head, and the token embedding (at
7B 1.09 GB in bf16, as much as a third of the rest of the int4 decoder; a lookup reads a few rows),
in int8 (a scale a token) or, with int4 weights, in int4 packed as an Int4Linear's weight (7B:
0.28 GB against int8's 0.55). A tied lm_head reads that same table (TiedHead: the table's product,
its rows the head's outputs), so it is not kept at full size beside it. The vision
tower and projector stay at `dtype` (a small share of the bytes, run once per frame, not per
token). The engine's forward hooks on q_proj / k_proj are registered after this runs, on whatever
module is then there, and see the quantized products exactly as the attention does.

Two entry points, one code path (`_quantize_language`): `place`, which every adapter's
from_pretrained calls to move the model it loaded on the CPU to the device, quantizing the language
model one Linear at a time on arrival (the device never holds it at full size), and `apply`, run on
the built adapter (by load_adapter, and by benchmarks that build a model on the device), which
quantizes what is left, counts, and rebuilds the fused layers.
"""

from __future__ import annotations

import gc

import torch

from ..config import WEIGHTS             # bf16 = not quantized: the weights stay at `dtype`
from ..cuda.kernels import quantized_linear
from ..cuda.kernels.fused_layers import merge_groups
from ..cuda.kernels.merged_products import merge
from .base import ModelLoadError

INT4_GROUP = 128                          # inputs sharing one scale and minimum (or 64, 32: int4_group)


def refusal(weights: str, device: torch.device) -> str | None:
    """Why `weights` cannot run on `device`, or None."""
    if weights not in WEIGHTS:
        return f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}"
    if weights != "int8":
        return None                       # bf16: nothing to do; int4: quantized here, any device
    try:
        _import_torchao()
    except ImportError as err:
        return f"weights {weights} need torchao (pip install torchao): {err}"
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


def place(model: torch.nn.Module, device, weights: str) -> torch.nn.Module:
    """A transformers model just loaded on the CPU, moved to `device` with its language model
    quantized to `weights` on the way (what every adapter's from_pretrained calls), one module at a
    time, so the device never holds the full-size language model (7B's: 15.2 GB at bf16; the whole
    model then holds 4.9 GB at int4). Each Linear and the token embedding are quantized from the
    CPU onto the device a few rows at a time (the device holds no full-size weight at all). Then the
    rest (vision tower, projector, norms) follows at its dtype. `apply` then finds the work done."""
    if weights != "bf16":
        why = refusal(weights, torch.device(device))
        if why:
            raise ModelLoadError(why)
        _quantize_language(model, model.get_decoder(), model.get_output_embeddings(), weights, torch.device(device))
    return model.to(device)


def apply(adapter, weights: str) -> int:
    """Quantize the adapter's language model to `weights` in place (what `place` left undone: nothing
    when the adapter was loaded through it); returns the Linears that are quantized. Raises
    ModelLoadError with the reason when the device or library cannot."""
    why = refusal(weights, adapter.kv.device)
    if why:
        raise ModelLoadError(why)
    if weights == "bf16":
        return 0
    quantized, total, adapter._lm_head = _quantize_language(adapter.model, adapter._lm, adapter._lm_head, weights)
    if quantized == 0:
        raise ModelLoadError(f"weights {weights}: none of the language model's {total} Linears could "
                             f"be quantized (int4 needs input sizes divisible by 32)")
    adapter.weights = weights
    adapter.rebuild_fused_layers()        # the gate/up and q/k/v merges were made from the unquantized weights
    # full-size weights left in reference cycles stay on the device until the collector happens to
    # run: torchao's int4 conversion left 7.9 GB at 7B (H200); collect them now
    gc.collect()
    if adapter.kv.device.type == "cuda":
        torch.cuda.empty_cache()          # the full-size weights' blocks go back to the device, not the cache
    return quantized


def _quantize_language(model, decoder, head, weights: str, device: torch.device | None = None):
    """Quantize the decoder's Linears and an untied head to `weights` (int8: torchao's tensor in the
    same nn.Linear; int4: an Int4Linear in its place), and the token embedding to int8, or int4 with
    int4 weights (a tied head then reads it), one module at a time, onto `device` when one is given;
    modules already quantized are left (biases, and Linears left as they are, go with place's
    model.to). Returns (Linears quantized, Linears in all, the head module now)."""
    tied = _tied(decoder, head)
    linears = [m for m in decoder.modules() if isinstance(m, (torch.nn.Linear, Int4Linear))]
    if isinstance(head, (torch.nn.Linear, Int4Linear)) and not tied:
        linears.append(head)
    parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    # the Linears the fused layers compute as one product, merged as soon as the last is quantized
    completes = {(id(owner), names[-1]): (owner, names) for owner, names in merge_groups(decoder)}
    quantized = 0
    with torch.no_grad():
        for linear in linears:
            if _is_quantized_linear(linear):
                quantized += 1
                continue
            parent, name = parents[id(linear)]
            if weights == "int8":
                linear.weight = torch.nn.Parameter(int8_weight(linear.weight, device), requires_grad=False)
            else:
                group = int4_group(linear.in_features)
                if group is None:
                    continue                           # stays as it is
                packed = Int4Linear(linear, group, device)       # packed from where the weight is, onto `device`
                setattr(parent, name, packed)
                if linear is head:
                    head = packed
                linear.weight = None                   # the full-size weight goes now, not when `linears` does
            quantized += 1
            if (id(parent), name) in completes and device is not None and device.type == "cuda":
                owner, names = completes[id(parent), name]
                # now, not when the fused layers are built: the parts' blocks are freed while the next
                # layer's, of the same sizes, are still to come, and are cut from them. Merged after all
                # were placed, 7B int4 left 0.27 GB of holes in segments still in use (H100, 2026-12-07)
                merge([getattr(owner, n) for n in names])
            _release_working_memory(device)
        embed = decoder.embed_tokens
        if isinstance(embed, torch.nn.Embedding):
            group = int4_group(embed.embedding_dim) if weights == "int4" else None
            table = Int4Embedding(embed, group, device) if group else Int8Embedding(embed, device=device)
            decoder.embed_tokens = table
            if tied:
                parent, name = parents[id(head)]
                head = TiedHead(table)
                setattr(parent, name, head)
            embed.weight = None                    # the full-size table goes now
            _release_working_memory(device)
    return quantized, len(linears), head


def _release_working_memory(device: torch.device | None) -> None:
    """Give the blocks a module's quantization worked in back to the device before the next module's
    outputs are allocated. Left in torch's cache, the next outputs are cut from them, and the rest of
    each block can then never be returned: after a 7B int4 load that was 3.2 GB reserved beyond the
    5.2 GB allocated; with this and the slices, 0.26 GB (H100, 2026-12-07 06:44 and 08:18)."""
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()


def int8_weight(weight: torch.Tensor, device=None, values_at_once: int = 1 << 24):
    """torchao's int8 weight-only tensor of `weight` (Int8Tensor.from_hp with a scale per row: what
    Int8WeightOnlyConfig makes of a Linear's weight), on `device` (default the weight's). A few rows
    at a time, each slice moved to `device` alone, written into outputs allocated first at full size:
    the weight may stay on the CPU, and the working copies stay small. A row's numbers depend on that
    row only, so they are the whole weight's (torchao applied by hand is the tests' reference)."""
    from torchao.quantization import Int8Tensor
    from torchao.quantization.granularity import PerRow

    N, K = weight.shape
    device = weight.device if device is None else torch.device(device)
    qdata = torch.empty(N, K, dtype=torch.int8, device=device)
    scale = zero_point = None
    rows = max(1, values_at_once // K)
    for i in range(0, N, rows):
        part = Int8Tensor.from_hp(weight[i:i + rows].detach().to(device), granularity=PerRow())
        if scale is None:
            scale = torch.empty(N, *part.scale.shape[1:], dtype=part.scale.dtype, device=device)
            zero_point = (None if part.zero_point is None else          # symmetric: zeros, kept as torchao has them
                          torch.zeros(N, *part.zero_point.shape[1:], dtype=part.zero_point.dtype, device=device))
        qdata[i:i + rows] = part.qdata
        scale[i:i + rows] = part.scale
    return Int8Tensor(qdata, scale, [1, K], weight.dtype, zero_point=zero_point)


def _is_quantized_linear(module) -> bool:
    return isinstance(module, Int4Linear) or is_quantized(module.weight)


def language_linears(adapter) -> list[torch.nn.Linear]:
    """The nn.Linears of the language model: every one in the decoder, and the lm_head unless tied."""
    linears = [m for m in adapter._lm.modules() if isinstance(m, torch.nn.Linear)]
    head = adapter._lm_head
    if isinstance(head, torch.nn.Linear) and not _tied(adapter._lm, head):
        linears.append(head)
    return linears


def _tied(decoder, head) -> bool:
    weight = getattr(decoder.embed_tokens, "weight", None)
    return weight is not None and getattr(head, "weight", None) is weight


def is_quantized(weight: torch.Tensor) -> bool:
    """A torchao tensor subclass rather than a plain tensor."""
    return type(weight) not in (torch.Tensor, torch.nn.Parameter)


class Int4Matrix(torch.nn.Module):
    """A 4-bit matrix [rows, cols]: packed uint8 [rows, cols / 2], a scale and a minimum per group of
    `group` columns and row ([cols / group, rows]; the format: cuda/kernels/quantized_linear.py),
    at the scale's dtype. What an Int4Linear's weight and an Int4Embedding's table are, and the one
    product both take."""

    def _hold(self, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group: int):
        self.group = group
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("minimum", minimum)

    def times(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ matrix^T (+ bias): the kernel on CUDA; without Triton, dequantized, then multiplied."""
        if quantized_linear.takes(x):
            return quantized_linear.int4_linear(x, self.packed, self.scale, self.minimum, self.group, bias)
        return torch.nn.functional.linear(x, self.first_rows(self.packed.shape[0]).to(x.dtype), bias)

    def first_rows(self, n: int) -> torch.Tensor:
        """The matrix's first n rows, dequantized, at the scale's dtype."""
        return quantized_linear.dequantize_int4(self.packed[:n], self.scale[:, :n], self.minimum[:, :n],
                                                self.group).to(self.scale.dtype)


class Int4Linear(Int4Matrix):
    """A Linear whose weight is an Int4Matrix [out, in]: groups of `group` inputs."""

    def __init__(self, linear: torch.nn.Linear, group: int, device=None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._hold(*quantized_linear.pack_int4(linear.weight, group, device), group)
        self.bias = linear.bias

    @classmethod
    def from_packed(cls, packed, scale, minimum, group: int, in_features: int, bias=None) -> "Int4Linear":
        """An Int4Linear holding tensors already packed (a pre-quantized checkpoint, prequantized.py)."""
        self = cls.__new__(cls)
        Int4Matrix.__init__(self)
        self.in_features, self.out_features = in_features, packed.shape[0]
        self._hold(packed, scale, minimum, group)
        self.bias = bias
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.times(x, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group}"


def int4_group(in_features: int) -> int | None:
    """INT4_GROUP, or the largest of 64 and 32 that divides the input size (small models); None
    where none does (the Linear stays as it is)."""
    return next((g for g in (INT4_GROUP, 64, 32) if in_features % g == 0), None)


class Int8Embedding(torch.nn.Module):
    """The token embedding in int8: a scale per token (row), symmetric; a lookup dequantizes only
    the rows it gathers. Quantized onto `device` (default the table's) a slice at a time."""

    def __init__(self, embedding: torch.nn.Embedding, rows_at_once: int = 16384, device=None):
        super().__init__()
        weight = embedding.weight.detach()
        device = weight.device if device is None else device
        self.dtype = weight.dtype
        q = torch.empty(weight.shape, dtype=torch.int8, device=device)
        scale = torch.empty(weight.shape[0], dtype=torch.float32, device=device)
        for i in range(0, weight.shape[0], rows_at_once):        # a float32 copy of a slice at a time
            rows = weight[i:i + rows_at_once].to(device, torch.float32)
            scale[i:i + rows_at_once] = rows.abs().amax(1).clamp_min(1e-12) / 127
            q[i:i + rows_at_once] = (rows / scale[i:i + rows_at_once, None]).round_().clamp_(-127, 127).to(torch.int8)
        self.register_buffer("qdata", q)
        self.register_buffer("scale", scale)

    @classmethod
    def from_quantized(cls, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> "Int8Embedding":
        """An Int8Embedding holding int8 rows and their scales (a pre-quantized checkpoint)."""
        self = cls.__new__(cls)
        torch.nn.Module.__init__(self)
        self.dtype = dtype
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", scale)
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.qdata[ids].float() * self.scale[ids].unsqueeze(-1)).to(self.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden @ table^T (a tied head): the int8 product on CUDA, its per-token scales per-output."""
        if quantized_linear.takes(hidden):
            return quantized_linear.product(hidden, self.qdata, self.scale.reshape(1, -1), None, 0, None)
        return torch.nn.functional.linear(hidden, (self.qdata.float() * self.scale[:, None]).to(hidden.dtype))


class Int4Embedding(Int4Matrix):
    """The token embedding in int4 (with int4 weights): the table [vocab, hidden] as an Int4Matrix
    (groups of `group` along a token's row); a lookup dequantizes only the rows it gathers, a tied
    head multiplies by the whole (`logits`). Packed onto `device` (default the table's)."""

    def __init__(self, embedding: torch.nn.Embedding, group: int, device=None):
        super().__init__()
        self._hold(*quantized_linear.pack_int4(embedding.weight, group, device), group)

    @classmethod
    def from_packed(cls, packed, scale, minimum, group: int) -> "Int4Embedding":
        """An Int4Embedding holding a table already packed (a pre-quantized checkpoint)."""
        self = cls.__new__(cls)
        Int4Matrix.__init__(self)
        self._hold(packed, scale, minimum, group)
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = quantized_linear.dequantize_int4(self.packed[flat], self.scale[:, flat], self.minimum[:, flat],
                                                self.group)
        return rows.to(self.scale.dtype).reshape(*ids.shape, -1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden @ table^T (a tied head)."""
        return self.times(hidden)


class TiedHead(torch.nn.Module):
    """An lm_head tied to a quantized token embedding (Int8Embedding, Int4Embedding): logits =
    hidden @ table^T, the table's own product."""

    def __init__(self, embedding: Int8Embedding | Int4Embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embedding.logits(hidden)
