"""Fused kernels for the language model's small layers, on CUDA, while the engine runs the model.

An answer token at 7B shapes is ~1,450 kernels replayed from a CUDA graph, and ~1,200 of them are
tiny: each RMSNorm is 8 (cast, square, mean, add, rsqrt, multiply, cast, scale), each RoPE 10, each
SiLU gate 2. Once launches are replayed, every kernel still costs ~2 us of a step whose weights take
5 ms to read, so their number is what is left to cut (issue 13). Here each becomes one Triton
kernel:
  RMSNorm      one program per row: the mean square in float32, rounded to the input dtype, then
               scaled by the weight (the order transformers' Qwen2/Llama RMSNorm uses);
  SiLU gate    act(gate) * up in one pass (Qwen2/Llama MLP with hidden_act "silu"), after one
               product with the gate and up weights side by side (merged_products.py);
  q, k, v      one product for a decoded token's query, key and value projections (merged_products.py);
  RoPE         the query and key rotation of every attention layer (rope.rotate_into);
  int8 Linear  a torchao int8 weight-only Linear (the decoder's and the lm_head), reading the int8
               weight once (quantized_linear.py; `weights: int8`; int4 Linears call it themselves).
The same idea as transformers' `kernels` hub (which swaps layer forwards for hub kernels), without
the hub: nothing is downloaded, and only layers whose forward is known to compute exactly this are
swapped. `FusedLayers` swaps them in for the engine's forwards only, like attention.in_use, and
does nothing without CUDA or Triton. The one lasting change: the gate and up weights, and the query,
key and value weights, are moved into one tensor each at start-up, and the Linears keep views of it,
so the model computes the same everywhere else.
"""

from __future__ import annotations

import functools
import sys

import torch

from . import quantized_linear
from .merged_products import QueryKeyValue, merge
from .triton_lang import tl, triton

from ...hook.rope import rotate_into

# transformers classes whose forward is exactly what the kernels compute
_RMS_NORMS = {"Qwen2RMSNorm", "LlamaRMSNorm", "MistralRMSNorm", "Qwen2_5_VLRMSNorm", "Qwen3VLTextRMSNorm"}
_SILU_MLPS = {"Qwen2MLP", "LlamaMLP", "MistralMLP", "Qwen3VLTextMLP"}
# ... whose forward calls q_proj, k_proj and v_proj, in that order, on the same hidden states
_ATTENTIONS = {"Qwen2Attention", "LlamaAttention", "MistralAttention", "Qwen2_5_VLAttention", "Qwen3VLTextAttention"}


_GATE_UP, _QUERY_KEY_VALUE = ("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj")


def _merged_names(module: torch.nn.Module) -> tuple[str, ...] | None:
    """The Linears of `module` computed as one product: a SiLU MLP's gate and up projections, an
    attention's query, key and value projections; None for any other module."""
    name = type(module).__name__
    if name in _SILU_MLPS and getattr(module.config, "hidden_act", None) == "silu":
        return _GATE_UP
    return _QUERY_KEY_VALUE if name in _ATTENTIONS else None


def merge_groups(lm: torch.nn.Module) -> list[tuple[torch.nn.Module, tuple[str, ...]]]:
    """What FusedLayers merges (merged_products.merge), as (owner, the Linears' names)."""
    return [(m, names) for m in lm.modules() if (names := _merged_names(m))]


class FusedLayers:
    """`with FusedLayers(lm):` the decoder's RMSNorms, SiLU MLPs and RoPE run fused kernels, its
    query, key and value projections one product for a decoded token, and its int8 Linears the int8
    product (`lm` may also be a lone lm_head)."""

    def __init__(self, lm: torch.nn.Module):
        self._swaps: list[tuple[object, str, object, object]] = []    # (owner, name, fused, original)
        param = next(lm.parameters(), None)
        if param is None or not param.is_cuda or triton is None:
            return
        merged = set()                                 # the projections QueryKeyValue swaps (before their turn)
        for m in lm.modules():
            names = _merged_names(m)
            if type(m).__name__ in _RMS_NORMS:
                self._swaps.append((m, "forward", functools.partial(_rms_norm, m), None))
            elif names == _GATE_UP:
                gate_up = merge([m.gate_proj, m.up_proj])
                self._swaps.append((m, "forward", functools.partial(_silu_mlp, m, gate_up), None))
            elif names == _QUERY_KEY_VALUE:
                product = merge([m.q_proj, m.k_proj, m.v_proj])
                if product is not None:
                    for linear, forward in QueryKeyValue(m, product, own_product).forwards():
                        self._swaps.append((linear, "forward", forward, None))
                        merged.add(id(linear))
            elif id(m) in merged:
                continue
            elif isinstance(m, torch.nn.Linear) and type(m.weight).__name__ == "Int8Tensor":
                # weights: int8 (models/quantize.py): the int8 weight read once (quantized_linear.py)
                self._swaps.append((m, "forward", functools.partial(_int8_linear_forward, m), None))
        # RoPE is a module-level function of the modeling file the attention layers come from
        modules = {sys.modules[type(layer.self_attn).__module__] for layer in getattr(lm, "layers", [])}
        for module in modules:
            original = getattr(module, "apply_rotary_pos_emb", None)
            if callable(original):
                self._swaps.append((module, "apply_rotary_pos_emb", _rope_with_fallback(original), original))

    def __enter__(self):
        for owner, name, fused, _ in self._swaps:
            setattr(owner, name, fused)
        return self

    def __exit__(self, *exc):
        for owner, name, _, original in self._swaps:
            if original is None:
                delattr(owner, name)            # the instance attribute goes: the class's forward is back
            else:
                setattr(owner, name, original)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) over the last dim, as transformers' RMSNorm computes it."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    n = rows.shape[1]
    if rows.shape[0] == 0:
        return out.view(*x.shape[:-1], n)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, n, rows.stride(0), out.stride(0), eps,
                                       BLOCK=1 << (n - 1).bit_length(), num_warps=8 if n >= 2048 else 4)
    return out.view(*x.shape[:-1], n)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, each rounded to the inputs' dtype as the two torch kernels round it. gate
    and up may be views with a row stride (the two halves of one merged product's output)."""
    cols = gate.shape[-1]
    g, u = gate.reshape(-1, cols), up.reshape(-1, cols)
    if g.stride(-1) != 1 or u.stride(-1) != 1:
        g, u = g.contiguous(), u.contiguous()
    out = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        block = 1024
        _silu_mul_kernel[(g.shape[0], -(-cols // block))](g, u, out, cols, g.stride(0), u.stride(0), BLOCK=block)
    return out.view(*gate.shape)


def _int8_linear_forward(module, x):
    if quantized_linear.int8_fits(x, module.weight):
        return quantized_linear.int8_linear(x, module.weight, module.bias)
    return torch.nn.functional.linear(x, module.weight, module.bias)


def own_product(module, x):
    """A Linear's own product (int8 weights: the int8 kernel), where a merged one is not taken."""
    if isinstance(module, torch.nn.Linear) and type(module.weight).__name__ == "Int8Tensor":
        return _int8_linear_forward(module, x)
    return type(module).forward(module, x)


def _rms_norm(module, hidden_states):
    return rms_norm(hidden_states, module.weight, module.variance_epsilon)


def _silu_mlp(module, gate_up, x):
    both = gate_up(x) if gate_up is not None else None
    if both is None:
        return module.down_proj(silu_mul(module.gate_proj(x), module.up_proj(x)))
    inter = both.shape[-1] // 2
    return module.down_proj(silu_mul(both[..., :inter], both[..., inter:]))


def _rope_with_fallback(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        """transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1) for one sequence
        ([1, heads, n, D], cos/sin [1, n, D]) in one kernel each; anything else goes to `original`."""
        if (args or set(kwargs) - {"unsqueeze_dim"} or kwargs.get("unsqueeze_dim", 1) != 1 or not q.is_cuda
                or q.dim() != 4 or q.shape[0] != 1 or cos.dim() != 3 or cos.shape[0] != 1):
            return original(q, k, cos, sin, *args, **kwargs)
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        rotate_into(q_out[0], q[0], 0, cos[0], sin[0])
        rotate_into(k_out[0], k[0], 0, cos[0], sin[0])
        return q_out, k_out
    return apply_rotary_pos_emb


if triton is not None:
    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n, sx, so, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        live = cols < n
        x = tl.load(x_ptr + row * sx + cols, mask=live, other=0.0).to(tl.float32)
        normed = x * tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
        normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)          # hidden_states.to(input_dtype)
        w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * so + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, cols, sg, su, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = i < cols
        g = tl.load(g_ptr + row * sg + i, mask=live, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * su + i, mask=live, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * cols + i, (act * u).to(out_ptr.dtype.element_ty), mask=live)
