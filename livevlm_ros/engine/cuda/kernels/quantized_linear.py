"""Rows times a weight-only quantized Linear (`weights: int8 | int4`, models/quantize.py), on CUDA:
the weight is dequantized in registers as it is read, so every row count reads its bytes once.

Why not the library's own products: outside torch.compile, torchao's int8 weight-only product
converts the whole int8 weight to a bf16 copy first (an answer token then moves more bytes than bf16
weights would), and its int4 product (tinygemm) is built for one row: a 20-token question took
twice bf16's time and a clip's prefill five times (H200, benchmarks/results/h200_precision_7b_*).

  int8  torchao's Int8Tensor as it stores it: q int8 [N, K], one scale per output row;
        y[m, n] = scale[n] * sum_k x[m, k] q[n, k].
  int4  packed here (models/quantize.py, Int4Linear): groups of GROUP inputs, each with a scale
        and a minimum per output [K / GROUP, N]; w = q * scale + minimum, q in 0..15. A group's
        GROUP / 2 bytes hold its first half in the low nibbles and its second half in the high
        ones, so a tile of bytes unpacks into two contiguous runs of inputs, no interleaving.

x stays in its half dtype (bf16 or fp16); the dequantized tile is rounded to it once, the sums run
in float32 on tensor cores, and the output is rounded once. `config(M, N, K)` picks the tile: few
rows (decode, a question) are bound by the weight's bytes and want many programs each streaming a
narrow band of outputs, split along K where N is small; many rows (a clip's prefill) are bound by
the tensor cores and want wide tiles. The table comes from benchmarks/linear_bench.py on an H200.
"""

from __future__ import annotations

import torch

from .triton_lang import tl, triton


def int8_fits(x: torch.Tensor, weight) -> bool:
    """x [..., K] (CUDA, bf16/fp16) and a torchao Int8Tensor weight [N, K], per-row symmetric, weight-only."""
    q = getattr(weight, "qdata", None)
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and q is not None
            and q.dtype == torch.int8 and q.dim() == 2 and q.stride(1) == 1 and x.shape[-1] == q.shape[1]
            and getattr(weight, "act_quant_kwargs", 1) is None and getattr(weight, "act_pre_scale", 1) is None
            and tuple(weight.block_size) == (1, q.shape[1]))


def int8_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a torchao Int8Tensor weight (int8_fits)."""
    q = weight.qdata
    return _launch(x, q, weight.scale.reshape(1, -1), None, bias, q.shape[0], q.shape[1], group=q.shape[1])


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                group: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, W, bias) for W packed as this module says: packed uint8 [N, K / 2], scale and
    minimum [K / group, N]."""
    return _launch(x, packed, scale, minimum, bias, packed.shape[0], packed.shape[1] * 2, group=group)


def config(M: int, N: int, K: int, int4: bool) -> dict:
    """Tile sizes and launch settings for an [M, K] x [K, N] product (see the module's docstring)."""
    if M > 64:                                    # bound by the tensor cores
        return dict(BM=64 if M <= 256 else 128, BN=128, BK=64, SPLIT_K=1, num_warps=4 if M <= 256 else 8,
                    num_stages=3)
    bm = 16 if M <= 16 else (32 if M <= 32 else 64)
    bn = 32 if M <= 16 else 64
    bk = 256 if int4 else 256
    programs = triton.cdiv(N, bn)
    split = 1
    while programs * split < 264 and K // (split * 2) >= 4 * bk:   # fill the SMs twice over
        split *= 2
    return dict(BM=bm, BN=bn, BK=bk, SPLIT_K=split, num_warps=4, num_stages=4)


def _launch(x, q, scale, minimum, bias, N, K, group, cfg: dict | None = None):
    rows = x.reshape(-1, K)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    M = rows.shape[0]
    int4 = minimum is not None
    cfg = dict(cfg or config(M, N, K, int4))
    split = cfg.pop("SPLIT_K")
    if split > 1:                                 # partial sums meet in float32
        out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M:
        grid = (triton.cdiv(N, cfg["BN"]), triton.cdiv(M, cfg["BM"]), split)
        _product_kernel[grid](rows, q, scale, minimum if int4 else scale, out, M, N, K, rows.stride(0), q.stride(0),
                              out.stride(0), scale.stride(0), split, INT4=int4, GROUP=group, ATOMIC=split > 1, **cfg)
    if split > 1:
        out = out.to(x.dtype)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], N)


if triton is not None:
    @triton.jit(do_not_specialize=["M", "split"])
    def _product_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K, sx, sq, so, ss, split,
                        INT4: tl.constexpr, GROUP: tl.constexpr, ATOMIC: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """One program per (BN outputs, BM rows, 1/split of K). BK: inputs (int8) or bytes (int4,
        two inputs each) per step. ATOMIC (split > 1): float32 partial sums added into `out`."""
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        m = tl.program_id(1) * BM + tl.arange(0, BM)
        m_ok, n_ok = m < M, n < N
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        width = K // 2 if INT4 else K                                 # bytes a weight row holds
        per_split = tl.cdiv(tl.cdiv(width, split), BK) * BK
        start = tl.program_id(2) * per_split
        end = tl.minimum(start + per_split, width)
        for b0 in range(start, end, BK):
            b = b0 + tl.arange(0, BK)
            b_ok = b < end
            w = tl.load(q_ptr + n[None, :] * sq + b[:, None], mask=b_ok[:, None] & n_ok[None, :], other=0)
            if INT4:
                half: tl.constexpr = GROUP // 2
                g = b // half
                k_lo = g * GROUP + b % half                            # the low nibbles' inputs; +half: the high ones'
                s = tl.load(s_ptr + g[:, None] * ss + n[None, :], mask=b_ok[:, None] & n_ok[None, :], other=0.0)
                z = tl.load(z_ptr + g[:, None] * ss + n[None, :], mask=b_ok[:, None] & n_ok[None, :], other=0.0)
                s, z = s.to(tl.float32), z.to(tl.float32)
                x_lo = tl.load(x_ptr + m[:, None] * sx + k_lo[None, :], mask=m_ok[:, None] & b_ok[None, :], other=0.0)
                x_hi = tl.load(x_ptr + m[:, None] * sx + (k_lo + half)[None, :], mask=m_ok[:, None] & b_ok[None, :],
                               other=0.0)
                w_lo = ((w & 15).to(tl.float32) * s + z).to(x_lo.dtype)
                w_hi = ((w >> 4).to(tl.float32) * s + z).to(x_lo.dtype)
                acc += tl.dot(x_lo, w_lo)
                acc += tl.dot(x_hi, w_hi)
            else:
                xk = tl.load(x_ptr + m[:, None] * sx + b[None, :], mask=m_ok[:, None] & b_ok[None, :], other=0.0)
                acc += tl.dot(xk, w.to(xk.dtype))                      # int8 -> bf16 / fp16 is exact (|q| <= 127)
        if not INT4:
            acc *= tl.load(s_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        mask = m_ok[:, None] & n_ok[None, :]
        if ATOMIC:
            tl.atomic_add(out_ptr + m[:, None] * so + n[None, :], acc, mask=mask)
        else:
            tl.store(out_ptr + m[:, None] * so + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def pack_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [N, K] (K a multiple of `group`) -> packed uint8 [N, K / 2], scale and minimum [K / group, N]
    in W's dtype: asymmetric, each group's 16 levels spanning its own range. Quantized against the
    rounded scale and minimum, so dequantize_int4 gives what the kernel computes."""
    N, K = weight.shape
    w = weight.detach().float().reshape(N, K // group, group)
    low, high = w.amin(-1), w.amax(-1)
    scale = ((high - low) / 15).clamp_min(1e-8).to(weight.dtype)
    minimum = low.to(weight.dtype)
    q = ((w - minimum.float()[..., None]) / scale.float()[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    half = group // 2
    packed = (q[..., :half] | (q[..., half:] << 4)).reshape(N, K // 2)
    return packed.contiguous(), scale.t().contiguous(), minimum.t().contiguous()


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group: int) -> torch.Tensor:
    """The float32 W [N, K] that pack_int4's output stands for (the reference the kernel is checked against)."""
    N = packed.shape[0]
    bytes_ = packed.reshape(N, -1, group // 2)
    q = torch.cat([bytes_ & 15, bytes_ >> 4], dim=-1).float()               # [N, K / group, group]
    w = q * scale.t().float()[..., None] + minimum.t().float()[..., None]
    return w.reshape(N, -1)
