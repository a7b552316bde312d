"""A few rows times an int8 weight-only Linear (`weights: int8`, models/quantize.py), on CUDA.

torchao's Int8Tensor computes a weight-only product as `x @ qdata.t().to(bf16) * scale`: outside
torch.compile the int8 weight is first converted to a full bf16 copy, so an answer token reads the
int8 weight, writes and reads a bf16 copy of it: more bytes than bf16 weights alone, for a step
that is bound by the bytes it reads. Here the int8 tiles are converted in registers as they are
loaded, so an answer token reads one byte a weight. For up to MAX_ROWS rows (decode, a padded
question); more rows (a clip's prefill, bound by compute, not bytes) keep torchao's product.

y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]: x in its own half dtype (bf16 or fp16), q converted
to it exactly, sums in float32 on tensor cores, one rounding to the output dtype at the end
(torchao rounds the product and then the scaled product).
"""

from __future__ import annotations

import torch

from .triton_lang import tl, triton

MAX_ROWS = 16
_BN, _BK = 32, 256


def fits(x: torch.Tensor, weight) -> bool:
    """x [..., K] and a torchao Int8Tensor weight [N, K], per-row symmetric, weight-only."""
    rows = x.numel() // max(x.shape[-1], 1)
    q = getattr(weight, "qdata", None)
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and q is not None and q.dtype == torch.int8 and q.dim() == 2
            and getattr(weight, "act_quant_kwargs", 1) is None and getattr(weight, "act_pre_scale", 1) is None
            and tuple(weight.block_size) == (1, q.shape[1]) and 1 <= rows <= MAX_ROWS
            and x.shape[-1] == q.shape[1] and q.stride(1) == 1)


def int8_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for an Int8Tensor weight and up to MAX_ROWS rows of x."""
    q, scale = weight.qdata, weight.scale.reshape(-1)
    N, K = q.shape
    rows = x.reshape(-1, K)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], N, dtype=x.dtype, device=x.device)
    _int8_rows_kernel[(triton.cdiv(N, _BN),)](rows, q, scale, out, rows.shape[0], N, K, rows.stride(0),
                                              q.stride(0), out.stride(0), BM=MAX_ROWS, BN=_BN, BK=_BK)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], N)


if triton is not None:
    @triton.jit(do_not_specialize=["M"])
    def _int8_rows_kernel(x_ptr, q_ptr, s_ptr, out_ptr, M, N, K, sx, sq, so,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """One program per BN output columns: all (<= BM) rows, the whole K."""
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        m = tl.arange(0, BM)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + m[:, None] * sx + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
            w = tl.load(q_ptr + n[None, :] * sq + k[:, None], mask=(n[None, :] < N) & (k[:, None] < K), other=0)
            acc += tl.dot(x, w.to(x.dtype))                # int8 -> bf16 / fp16 is exact (|q| <= 127)
        scale = tl.load(s_ptr + n, mask=n < N, other=0.0).to(tl.float32)
        y = acc * scale[None, :]
        tl.store(out_ptr + m[:, None] * so + n[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=(m[:, None] < M) & (n[None, :] < N))
