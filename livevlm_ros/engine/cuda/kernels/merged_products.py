"""Linears that read the same input, computed as one product with their weights side by side.

An answer token reads each weight once, and at 7B shapes a layer's small products are as much launch
as bytes: the key and value projections are 512 outputs each. One product for the gate and up
projections (the SiLU MLP) and one for the query, key and value projections (the attention) read the
same bytes in two launches where there were five.

`merge(linears)` moves the weights into one tensor at start-up, and each Linear keeps a view of its
rows, so the model computes the same everywhere else and no memory is added once the old tensors are
freed. Quantized weights are merged in their own format (an int8 weight's int8 rows and scales; an
int4 Linear's packed rows, scales and minimums), never as one full-size tensor. Weights that are
already views side by side (merged before: models/quantize.py merges each group as soon as it is
quantized) are taken as they are, not copied again.

The attention calls its three projections itself, one after another on the same input.
`QueryKeyValue` swaps their forwards: the query's computes all three for one row (a decoded token)
and holds the key's and value's outputs for the two calls that follow on that same tensor; any other
call (more rows, another input) runs the Linear's own product. The outputs are views of one row, so
they are contiguous; for more rows they would not be, and the projections stay apart there.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from . import quantized_linear


def merge(linears: list) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
    """One product x [.., K] -> [.., sum of the outputs], the Linears' weights (and biases) becoming
    views of its rows; it returns None where the quantized kernel cannot take x (not a CUDA half).
    None where the Linears are not of one kind, input width, dtype and device, or their biases differ
    in kind (all or none)."""
    first = linears[0]
    if any(type(m) is not type(first) for m in linears):
        return None
    if any((getattr(m, "bias", None) is None) != (getattr(first, "bias", None) is None) for m in linears):
        return None
    if type(first) is torch.nn.Linear:
        weights = [m.weight for m in linears]
        w0 = weights[0]
        if any(type(w) is not type(w0) or w.shape[1] != w0.shape[1] or w.dtype != w0.dtype or w.device != w0.device
               for w in weights):
            return None
        if type(w0) in (torch.Tensor, torch.nn.Parameter):
            with torch.no_grad():
                both = _side_by_side([w.detach() for w in weights])
                for m, rows in zip(linears, both.split([w.shape[0] for w in weights])):
                    m.weight.data = rows
            return functools.partial(torch.nn.functional.linear, weight=both, bias=_merged_bias(linears))
        if (type(w0).__name__ == "Int8Tensor" and w0.qdata.is_cuda
                and all(quantized_linear.weight_only_int8(w) for w in weights)):
            # weights: int8
            q, scale = _side_by_side([w.qdata for w in weights]), _side_by_side([w.scale for w in weights])
            sizes = [w.qdata.shape[0] for w in weights]
            for w, q_rows, s_rows in zip(weights, q.split(sizes), scale.split(sizes)):
                w.qdata, w.scale = q_rows, s_rows
            return functools.partial(_quantized_product, q, scale.reshape(1, -1), None, 0, _merged_bias(linears))
        return None
    if (type(first).__name__ == "Int4Linear" and first.packed.is_cuda
            and all((m.group, m.in_features, m.scale.dtype) == (first.group, first.in_features, first.scale.dtype)
                    for m in linears)):
        packed = _side_by_side([m.packed for m in linears])                    # weights: int4
        scale, minimum = _side_by_side([m.scale for m in linears], 1), _side_by_side([m.minimum for m in linears], 1)
        sizes = [m.packed.shape[0] for m in linears]
        for m, p, s, z in zip(linears, packed.split(sizes), scale.split(sizes, 1), minimum.split(sizes, 1)):
            m.packed, m.scale, m.minimum = p, s, z
        return functools.partial(_quantized_product, packed, scale, minimum, first.group, _merged_bias(linears))
    return None


def _side_by_side(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """The parts joined along `dim`: the tensor they are consecutive views of, where they are (no
    copy), else a new one (torch.cat)."""
    first = parts[0]
    at, storage = first.storage_offset(), first.untyped_storage().data_ptr()
    others = lambda t: t.shape[:dim] + t.shape[dim + 1:]       # noqa: E731
    for p in parts:
        if (p.untyped_storage().data_ptr() != storage or p.stride() != first.stride()
                or p.storage_offset() != at or others(p) != others(first)):
            return torch.cat(parts, dim)
        at += p.shape[dim] * p.stride(dim)
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    return first.as_strided(shape, first.stride(), first.storage_offset())


class QueryKeyValue:
    """The query, key and value projections of one attention layer as one product for a single row
    (`forwards()` gives the three forwards to swap in)."""

    def __init__(self, attention: torch.nn.Module, product: Callable, own: Callable):
        self._q, self._k, self._v = attention.q_proj, attention.k_proj, attention.v_proj
        self._sizes = [m.out_features for m in (self._q, self._k, self._v)]
        self._product, self._own = product, own       # own(module, x): the Linear's own product
        self._held: tuple | None = None               # (input, key output, value output)

    def forwards(self) -> list[tuple[torch.nn.Module, Callable]]:
        return [(self._q, self._query), (self._k, self._key), (self._v, self._value)]

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        self._held = None
        if x.numel() == x.shape[-1]:                  # one row: a decoded token
            out = self._product(x)
            if out is not None:
                q, k, v = out.split(self._sizes, dim=-1)
                self._held = (x, k, v)
                return q
        return self._own(self._q, x)

    def _key(self, x: torch.Tensor) -> torch.Tensor:
        if self._held is not None and self._held[0] is x:
            return self._held[1]
        return self._own(self._k, x)

    def _value(self, x: torch.Tensor) -> torch.Tensor:
        held, self._held = self._held, None
        if held is not None and held[0] is x:
            return held[2]
        return self._own(self._v, x)


def _merged_bias(linears) -> torch.Tensor | None:
    """The Linears' biases in one tensor, each Linear's bias becoming a view of its part (None: none)."""
    if linears[0].bias is None:
        return None
    with torch.no_grad():
        bias = torch.cat([m.bias.detach() for m in linears])
        for m, rows in zip(linears, bias.split([m.bias.shape[0] for m in linears])):
            m.bias.data = rows
    return bias


def _quantized_product(q, scale, minimum, group, bias, x):
    """The merged quantized product, or None where the kernel cannot take x (not a CUDA half)."""
    if not quantized_linear.takes(x):
        return None
    return quantized_linear.product(x, q, scale, minimum, group, bias)
