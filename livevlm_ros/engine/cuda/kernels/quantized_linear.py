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

Few rows (an answer token, a question: up to MAX_ROWS) are bound by the weight's bytes: one kernel
streams the weight, each program a narrow band of outputs, split along K where N alone leaves SMs
idle (the split's float32 partial sums are added in a fixed order by a second small kernel, so
answers do not change from run to run). x stays in its half dtype (bf16 or fp16); a dequantized
int4 tile is rounded to it once (int8 is exact in it), the sums run in float32 on tensor cores, and
the output is rounded once. Many rows (a clip's prefill) are bound by the tensor cores: the weight
is dequantized to a transient half copy and cuBLAS multiplies, as it would the unquantized weight.
The tile settings come from benchmarks/linear_bench.py on an H200.
"""

from __future__ import annotations

import torch

from .triton_lang import tl, triton

MAX_ROWS = 64                     # more rows: dequantize, then cuBLAS
_WIDE = 264                       # programs that keep an H200's 132 SMs busy twice over


def takes(x: torch.Tensor) -> bool:
    """Whether the kernels can multiply x: Triton is there, x is on CUDA in a half dtype."""
    return triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def int8_fits(x: torch.Tensor, weight) -> bool:
    """x [..., K] (takes) and a torchao Int8Tensor weight [N, K], per-row symmetric, weight-only."""
    q = getattr(weight, "qdata", None)
    return (takes(x) and q is not None
            and q.dtype == torch.int8 and q.dim() == 2 and q.stride(1) == 1 and x.shape[-1] == q.shape[1]
            and getattr(weight, "act_quant_kwargs", 1) is None and getattr(weight, "act_pre_scale", 1) is None
            and tuple(weight.block_size) == (1, q.shape[1]))


def int8_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a torchao Int8Tensor weight (int8_fits)."""
    return product(x, weight.qdata, weight.scale.reshape(1, -1), None, 0, bias)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                group: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, W, bias) for W packed as this module says: packed uint8 [N, K / 2], scale and
    minimum [K / group, N] (the rows of either may be a stride apart: views of a merged weight)."""
    return product(x, packed, scale, minimum, group, bias)


def product(x, q, scale, minimum, group, bias, cfg: dict | None = None) -> torch.Tensor:
    """x [..., K] times the quantized weight: int8 (minimum None; scale [1, N]) or int4."""
    int4 = minimum is not None
    N, K = q.shape[0], q.shape[1] * (2 if int4 else 1)
    rows = x.reshape(-1, K)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    M = rows.shape[0]
    if M > MAX_ROWS and cfg is None:
        if int4:
            out = torch.nn.functional.linear(rows, dequantize_int4_to(q, scale, minimum, group, x.dtype))
        else:                                                        # exact in x's dtype; scaled after
            out = (torch.nn.functional.linear(rows, q.to(x.dtype)) * scale.reshape(-1)).to(x.dtype)
    else:
        cfg = dict(cfg or config(M, N, K, group))
        split = cfg.pop("SPLIT_K")
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
        part = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else out
        if M:
            grid = (triton.cdiv(N, cfg["BN"]), triton.cdiv(M, cfg["BM"]), split)
            _product_kernel[grid](rows, q, scale, minimum if int4 else scale, part, M, N, K, rows.stride(0),
                                  q.stride(0), part.stride(-2), M * N, scale.stride(0), split, INT4=int4,
                                  GROUP=max(group, 2), SPLIT=split > 1, **cfg)
            if split > 1:
                _sum_splits_kernel[(M, triton.cdiv(N, 1024))](part, scale, out, M * N, N, split, SCALE=not int4,
                                                              BLOCK=1024)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], N)


def dequantize_int4_to(q, scale, minimum, group, dtype) -> torch.Tensor:
    """An int4 weight [N, K] at `dtype`, q * scale + minimum rounded once (as the product's tiles are)."""
    N, half_k = q.shape
    out = torch.empty(N, half_k * 2, dtype=dtype, device=q.device)
    _dequantize_int4_kernel[(N, triton.cdiv(half_k, 1024))](q, scale, minimum, out, half_k, q.stride(0),
                                                            scale.stride(0), GROUP=group, BLOCK=1024)
    return out


def config(M: int, N: int, K: int, group: int) -> dict:
    """Tile settings for M <= MAX_ROWS rows times an [N, K] weight (int4 where group > 0)."""
    bm = 16 if M <= 16 else (32 if M <= 32 else 64)
    bn = 32 if M <= 16 else 64
    bk = 128 if group else (256 if M <= 16 else 128)          # int8: inputs; int4: bytes (two inputs each)
    if group:
        bk = max(bk, group // 2)                              # whole groups per step
    width = K // 2 if group else K
    programs, split = triton.cdiv(N, bn), 1
    while programs * split < _WIDE and width // (split * 2) >= 2 * bk:
        split *= 2
    return dict(BM=bm, BN=bn, BK=bk, SPLIT_K=split, num_warps=4, num_stages=3)


if triton is not None:
    @triton.jit(do_not_specialize=["M", "split"])
    def _product_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K, sx, sq, so, s_split, ss, split,
                        INT4: tl.constexpr, GROUP: tl.constexpr, SPLIT: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """One program per (BN outputs, BM rows, 1/split of K). BK: inputs (int8) or bytes (int4,
        two inputs each, whole groups) per step. SPLIT: float32 partial sums into out[split index]
        (unscaled for int8), else the output itself."""
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
                groups: tl.constexpr = BK // half
                g = b0 // half + tl.arange(0, groups)                  # one scale and minimum a group and output
                g_ok = g < end // half
                s = tl.load(s_ptr + g[:, None] * ss + n[None, :], mask=g_ok[:, None] & n_ok[None, :], other=0.0)
                z = tl.load(z_ptr + g[:, None] * ss + n[None, :], mask=g_ok[:, None] & n_ok[None, :], other=0.0)
                s, z = s.to(tl.float32)[:, None, :], z.to(tl.float32)[:, None, :]
                w3 = tl.reshape(w, [groups, half, BN])
                k_lo = (b // half) * GROUP + b % half                  # the low nibbles' inputs; +half: the high ones'
                x_lo = tl.load(x_ptr + m[:, None] * sx + k_lo[None, :], mask=m_ok[:, None] & b_ok[None, :], other=0.0)
                x_hi = tl.load(x_ptr + m[:, None] * sx + (k_lo + half)[None, :], mask=m_ok[:, None] & b_ok[None, :],
                               other=0.0)
                # one row reads the weight at only ~25-30% of the copy bandwidth here (7B, H200); two
                # variants without this conversion ran slower (BENCHMARKS.md, issue 22)
                lo, hi = (w3 & 15).to(tl.float32), (w3 >> 4).to(tl.float32)
                w_lo = tl.reshape(lo * s + z, [BK, BN]).to(x_lo.dtype)
                w_hi = tl.reshape(hi * s + z, [BK, BN]).to(x_lo.dtype)
                acc += tl.dot(x_lo, w_lo)
                acc += tl.dot(x_hi, w_hi)
            else:
                xk = tl.load(x_ptr + m[:, None] * sx + b[None, :], mask=m_ok[:, None] & b_ok[None, :], other=0.0)
                acc += tl.dot(xk, w.to(xk.dtype))                      # int8 -> bf16 / fp16 is exact (|q| <= 127)
        mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT:
            tl.store(out_ptr + tl.program_id(2) * s_split + m[:, None] * so + n[None, :], acc, mask=mask)
        else:
            if not INT4:
                acc *= tl.load(s_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + m[:, None] * so + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _sum_splits_kernel(part_ptr, s_ptr, out_ptr, MN, N, split, SCALE: tl.constexpr, BLOCK: tl.constexpr):
        """out[m, n] = sum over the splits, in their order (scale[n] times it for int8)."""
        n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = n < N
        at = tl.program_id(0) * N + n
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, split):
            acc += tl.load(part_ptr + i * MN + at, mask=ok, other=0.0)
        if SCALE:
            acc *= tl.load(s_ptr + n, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _dequantize_int4_kernel(q_ptr, s_ptr, z_ptr, out_ptr, half_k, sq, ss, GROUP: tl.constexpr,
                                BLOCK: tl.constexpr):
        """One output row's BLOCK bytes -> 2 BLOCK weights at out's dtype."""
        row = tl.program_id(0)
        b = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = b < half_k
        half: tl.constexpr = GROUP // 2
        w = tl.load(q_ptr + row * sq + b, mask=ok, other=0)
        g = b // half
        s = tl.load(s_ptr + g * ss + row, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * ss + row, mask=ok, other=0.0).to(tl.float32)
        k_lo = g * GROUP + b % half
        dtype = out_ptr.dtype.element_ty
        tl.store(out_ptr + row * half_k * 2 + k_lo, ((w & 15).to(tl.float32) * s + z).to(dtype), mask=ok)
        tl.store(out_ptr + row * half_k * 2 + k_lo + half, ((w >> 4).to(tl.float32) * s + z).to(dtype), mask=ok)


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
