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
idle. The split's float32 partial sums are added by the split that finishes last, in split order
(a counter per band of outputs), so answers do not change from run to run and no second kernel is
launched. x stays in its half dtype (bf16 or fp16); the sums run in float32.
  int4, one row: `_gemv_int4_kernel` reads the weight as int32 words and multiplies on the FMA
        units (a tile of tensor-core products would waste 15 of its 16 rows);
  int4, 2-32 rows: tiles dequantized in registers (rounded once to x's dtype), tensor cores;
  int4, 33-64 rows: `FACTORED` tiles: 2^e + q exactly in x's dtype, each group's scale and minimum
        applied to the tensor cores' sums (faster at 64 rows, slower at 32: H100 and H200, BENCHMARKS.md);
  int8, one row: `_gemv_int8_kernel`, words and the FMA units as for int4 (a first word kernel
        that converted with the integer-to-float unit was no faster than the tiles: H100, 2026-12-06);
  int8, 2-64 rows: tiles of q in x's dtype (exact), the row's scale applied to the sums.
Many rows (a clip's prefill) are bound by the tensor cores: the weight is dequantized to a transient
half copy and cuBLAS multiplies, as it would the unquantized weight, a band of outputs at a time
(DEQUANTIZED_ELEMENTS), so the copy stays small.
The tile settings come from benchmarks/linear_bench.py (H100 and H200).
"""

from __future__ import annotations

import os

import torch

from .triton_lang import tl, triton

MAX_ROWS = 64                     # more rows: dequantize, then cuBLAS
# the largest transient half copy of a weight that many rows multiply (32M elements, 64 MB): 7B's
# merged gate/up at once was 272 MB, held by the clip graph's pool and torch's cache for good
DEQUANTIZED_ELEMENTS = 1 << 25
_WIDE = 264                       # programs that keep an H200's 132 SMs busy twice over


def takes(x: torch.Tensor) -> bool:
    """Whether the kernels can multiply x: Triton is there, x is on CUDA in a half dtype."""
    return triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def int8_fits(x: torch.Tensor, weight) -> bool:
    """x [..., K] (takes) and a torchao Int8Tensor weight [N, K] (weight_only_int8)."""
    return (takes(x) and weight_only_int8(weight) and weight.qdata.stride(1) == 1
            and x.shape[-1] == weight.qdata.shape[1])


def weight_only_int8(weight) -> bool:
    """A torchao Int8Tensor in the form the int8 kernels compute: int8 [N, K], one scale per output
    row, no activation quantization (what the merges and pre-quantized checkpoints also require)."""
    q = getattr(weight, "qdata", None)
    return (q is not None and q.dtype == torch.int8 and q.dim() == 2
            and all(getattr(weight, f, 1) is None for f in ("act_quant_kwargs", "act_pre_scale"))
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
    if M == 1 and (cfg is None or ("GPS" if int4 else "BW") in cfg) and _words_fit(q):
        if int4:        # the bias is added where the sums are stored: one launch a product, as F.linear's
            out = _gemv_int4(rows, q, scale, minimum, group, bias, cfg or gemv_config(N, K, group))
        else:
            out = _gemv_int8(rows, q, scale, bias, cfg or gemv_int8_config(N, K))
        return out.view(*x.shape[:-1], N)
    if M > MAX_ROWS and cfg is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
        step = max(256, DEQUANTIZED_ELEMENTS // K // 256 * 256)
        for n in range(0, N, step):     # a band of outputs at a time: the half copy is a band's
            band = slice(n, n + step)
            w = (dequantize_int4_to(q[band], scale[:, band], minimum[:, band], group, x.dtype) if int4
                 else dequantize_int8_to(q[band], scale[:, band], x.dtype))
            torch.mm(rows, w.t(), out=out[:, band])
            del w                       # before the next band's copy: one band alive, not two
    else:
        cfg = dict(cfg or config(M, N, K, group))
        grid = (triton.cdiv(N, cfg["BN"]), triton.cdiv(M, cfg["BM"]), cfg.pop("SPLIT_K"))
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
        part, counts = _partials(grid, M, N, x.device)
        if M:
            _product_kernel[grid](rows, q, scale, minimum if int4 else scale, out, part, counts, M, N, K,
                                  rows.stride(0), q.stride(0), out.stride(0), M * N, scale.stride(0), grid[2],
                                  INT4=int4, GROUP=max(group, 2), SPLIT=grid[2] > 1, **cfg)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], N)


def _words_fit(q: torch.Tensor) -> bool:
    """Whether a weight's rows (int8 or packed int4 bytes) can be read as int32 words."""
    return q.shape[1] % 4 == 0 and q.stride(0) % 4 == 0 and q.data_ptr() % 4 == 0


def _gemv_int4(row, q, scale, minimum, group, bias, cfg) -> torch.Tensor:
    """One row times an int4 weight read as int32 words (_gemv_int4_kernel), plus the bias (or None)."""
    cfg = dict(cfg)
    N, K, bn = q.shape[0], q.shape[1] * 2, cfg.pop("BN")
    grid = (triton.cdiv(N, bn), 1, cfg.pop("SPLIT_K"))
    out = torch.empty(1, N, dtype=row.dtype, device=row.device)
    part, counts = _partials(grid, 1, N, row.device)
    w = q.view(torch.int32)
    even = N % bn == 0 and (K // group) % (cfg["GPS"] * grid[2]) == 0
    _gemv_int4_kernel[grid](row, w, scale, minimum, out, part, counts, N, w.shape[1], w.stride(0), scale.stride(0),
                            N, grid[2], out if bias is None else bias, W=group // 8, BN=bn, SPLIT=grid[2] > 1,
                            EVEN=even, ASM=not _interpreted(), BIAS=bias is not None, **cfg)
    return out


def _interpreted() -> bool:
    """Whether Triton's interpreter runs the kernels (TRITON_INTERPRET=1: no inline assembly there)."""
    knobs = getattr(triton, "knobs", None)
    return bool(knobs.runtime.interpret) if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"


def _gemv_int8(row, q, scale, bias, cfg) -> torch.Tensor:
    """One row times an int8 weight read as int32 words (_gemv_int8_kernel), plus the bias (or None);
    scale [1, N]."""
    cfg = dict(cfg)
    N, bn, bw = q.shape[0], cfg.pop("BN"), cfg.pop("BW")
    grid = (triton.cdiv(N, bn), 1, cfg.pop("SPLIT_K"))
    out = torch.empty(1, N, dtype=row.dtype, device=row.device)
    part, counts = _partials(grid, 1, N, row.device)
    w = q.view(torch.int32)
    even = N % bn == 0 and w.shape[1] % (bw * grid[2]) == 0
    _gemv_int8_kernel[grid](row, w, scale, out, part, counts, N, w.shape[1], w.stride(0), scale.stride(-1), N,
                            grid[2], out if bias is None else bias, BN=bn, BW=bw, SPLIT=grid[2] > 1, EVEN=even,
                            ASM=not _interpreted(), BIAS=bias is not None, **cfg)
    return out


_COUNTS: dict[tuple[torch.device, int], torch.Tensor] = {}
_MAX_BANDS = 1 << 16


def _partials(grid, M, N, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Where a split product leaves its partial sums, and the counters of its bands of outputs:
    zeros that each product's last split leaves at zero again (so a graph replays them as recorded).
    One set per stream: products on one stream run one after another, but two streams' products
    may overlap, and sharing counters they would each count the other's splits (measured: a
    benchmark's two streams left counts that spoilt every later product of those bands). A graph
    keeps the set of the stream it was captured on."""
    if grid[2] == 1:
        return None, None
    assert grid[0] * grid[1] <= _MAX_BANDS, "a split product with more bands of outputs than counters"
    device = torch.device(device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    counts = _COUNTS.get((device, stream))
    if counts is None:
        counts = _COUNTS[(device, stream)] = torch.zeros(_MAX_BANDS, dtype=torch.int32, device=device)
    return torch.empty(grid[2], M, N, dtype=torch.float32, device=device), counts


def gemv_config(N: int, K: int, group: int) -> dict:
    """Settings for one row times an [N, K] int4 weight. A one-row product waits on its loads, so
    what matters is how many programs are in flight: 128 outputs a program, split along K (doubled)
    up to 16 ways while fewer than ~1,000 programs run and a split still holds 4 groups; where the
    groups stop the splitting first (a short K and few outputs: the attention's projections), 64
    outputs a program; two groups a step where a split still takes 16 or more. Measured on one H100
    (2026-12-07 06:39 and 07:06, benchmarks/linear_bench.py, 60-64 settings a shape): 7B's down
    18.0 us split 16 ways (21.2 at 8), q/o 5.9 at 64 outputs (7.1 at 128), the lm_head 141 with two
    groups a step (147 with one), gate+up 40.3 with one (45.8 with two); 128 outputs beat 256
    everywhere else (fewer registers, more programs in flight)."""
    bn, groups = 128, K // group
    programs, split = -(-N // bn), 1
    while split < 16 and programs * split < 1024 and groups >= 4 * split:
        split *= 2
    if split < 16 and programs * split < 1024:                       # the groups stopped the splitting
        bn = 64
    gps = 2 if groups // split >= 16 else 1
    return dict(BN=bn, GPS=gps, SPLIT_K=split, num_warps=4, num_stages=3)


def gemv_int8_config(N: int, K: int) -> dict:
    """Settings for one row times an [N, K] int8 weight: BN outputs and BW words (4 inputs each) a
    program a step, split along K while fewer than ~1,000 programs run (a first guess; linear_bench
    sweeps them)."""
    bn, bw = 64, 64
    programs, split = triton.cdiv(N, bn), 1
    while split < 8 and programs * split < 1024 and K // 4 // bw >= 4 * split:
        split *= 2
    return dict(BN=bn, BW=bw, SPLIT_K=split, num_warps=4, num_stages=3)


def dequantize_int4_to(q, scale, minimum, group, dtype) -> torch.Tensor:
    """An int4 weight [N, K] at `dtype`, q * scale + minimum rounded once (as the product's tiles are)."""
    N, half_k = q.shape
    out = torch.empty(N, half_k * 2, dtype=dtype, device=q.device)
    _dequantize_int4_kernel[(N, triton.cdiv(half_k, 1024))](q, scale, minimum, out, half_k, q.stride(0),
                                                            scale.stride(0), GROUP=group, BLOCK=1024)
    return out


def dequantize_int8_to(q, scale, dtype) -> torch.Tensor:
    """An int8 weight [N, K] at `dtype`: q * scale rounded once. (q at `dtype` and the scale applied
    to cuBLAS's output took twice bf16's time for a clip's prefill: two more passes over the output.)"""
    N, K = q.shape
    out = torch.empty(N, K, dtype=dtype, device=q.device)
    _dequantize_int8_kernel[(N, triton.cdiv(K, 2048))](q, scale, out, K, q.stride(0), scale.stride(-1), BLOCK=2048)
    return out


def config(M: int, N: int, K: int, group: int) -> dict:
    """Tile settings for M <= MAX_ROWS rows times an [N, K] weight (int4 where group > 0)."""
    if group and M > 32:                                      # FACTORED: one group a step
        bm, bn = 64, (128 if N >= 16384 else 64)
        programs, split = triton.cdiv(N, bn), 1
        while split < 8 and programs * split < 512 and K // group >= 4 * split:
            split *= 2
        return dict(BM=bm, BN=bn, BK=group // 2, SPLIT_K=split, num_warps=4, num_stages=3, FACTORED=True)
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
    def _product_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, part_ptr, count_ptr, M, N, K, sx, sq, so, s_split,
                        ss, split,
                        INT4: tl.constexpr, GROUP: tl.constexpr, SPLIT: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FACTORED: tl.constexpr = False):
        """One program per (BN outputs, BM rows, 1/split of K). BK: inputs (int8) or bytes (int4,
        two inputs each, whole groups) per step."""
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
            if INT4 and FACTORED:
                # one group a step (BK = GROUP / 2 bytes): the nibbles become 2^e + q in x's dtype by an
                # OR into the mantissa (exact), the tensor cores sum x (2^e + q), and the group's scale,
                # minimum and the 2^e sum(x) are applied to the [BM, BN] sums once a group
                magic: tl.constexpr = 0x4300 if x_ptr.dtype.element_ty == tl.bfloat16 else 0x6400
                base: tl.constexpr = 128.0 if x_ptr.dtype.element_ty == tl.bfloat16 else 1024.0
                g = b0 // BK
                s = tl.load(s_ptr + g * ss + n, mask=n_ok, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + g * ss + n, mask=n_ok, other=0.0).to(tl.float32)
                k_lo = g * GROUP + (b - b0)
                x_lo = tl.load(x_ptr + m[:, None] * sx + k_lo[None, :], mask=m_ok[:, None] & b_ok[None, :], other=0.0)
                x_hi = tl.load(x_ptr + m[:, None] * sx + (k_lo + BK)[None, :], mask=m_ok[:, None] & b_ok[None, :],
                               other=0.0)
                lo = ((w & 15).to(tl.int16) | magic).to(x_lo.dtype, bitcast=True)
                hi = ((w >> 4).to(tl.int16) | magic).to(x_lo.dtype, bitcast=True)
                d = tl.dot(x_lo, lo)
                d = tl.dot(x_hi, hi, d)
                xs = tl.sum(x_lo.to(tl.float32), axis=1) + tl.sum(x_hi.to(tl.float32), axis=1)
                acc += (d - base * xs[:, None]) * s[None, :] + xs[:, None] * z[None, :]
            elif INT4:
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
                # 2-32 rows. One row read the weight at only 23-33% of the copy bandwidth here (7B,
                # H200): the conversions, likely; it now takes _gemv_int4_kernel (BENCHMARKS.md, issue 22)
                lo, hi = (w3 & 15).to(tl.float32), (w3 >> 4).to(tl.float32)
                w_lo = tl.reshape(lo * s + z, [BK, BN]).to(x_lo.dtype)
                w_hi = tl.reshape(hi * s + z, [BK, BN]).to(x_lo.dtype)
                acc += tl.dot(x_lo, w_lo)
                acc += tl.dot(x_hi, w_hi)
            else:
                xk = tl.load(x_ptr + m[:, None] * sx + b[None, :], mask=m_ok[:, None] & b_ok[None, :], other=0.0)
                acc += tl.dot(xk, w.to(xk.dtype))                      # int8 -> bf16 / fp16 is exact (|q| <= 127)
        mask = m_ok[:, None] & n_ok[None, :]
        band = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        acc, last = _add_up_splits(acc, part_ptr, count_ptr, band, m[:, None] * N + n[None, :], mask, s_split, split,
                                   SPLIT)
        if last:
            if not INT4:
                acc *= tl.load(s_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + m[:, None] * so + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_up_splits(acc, part_ptr, count_ptr, band, at, mask, s_split, split, SPLIT: tl.constexpr):
        """(acc, whether this program stores the output). SPLIT: acc is one split's partial sums of
        its band of outputs; it is left at part[split index], and the band's counter counts the splits
        done. The last split to finish adds all partials in split order and sets the counter back to
        0. The barrier and the acquire-release atomic make the other splits' partials visible to it."""
        if SPLIT:
            tl.store(part_ptr + tl.program_id(2) * s_split + at, acc, mask=mask)
            tl.debug_barrier()
            last = tl.atomic_add(count_ptr + band, 1, sem="acq_rel", scope="gpu") == split - 1
            if last:
                acc = tl.zeros_like(acc)
                for i in range(0, split):
                    acc += tl.load(part_ptr + i * s_split + at, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(count_ptr + band, 0)
        else:
            last = True
        return acc, last

    @triton.jit
    def _store_row(out_ptr, b_ptr, n, n_ok, total, BIAS: tl.constexpr):
        """out[n] = total (+ b[n] where BIAS), rounded once to the output's dtype."""
        if BIAS:
            total += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + n, total.to(out_ptr.dtype.element_ty), mask=n_ok)

    # One row (an answer token) is bound by the weight's bytes, and a tile of tensor-core products
    # wastes 15 of its 16 rows: the kernel below reads the weight as int32 words and multiplies on the
    # FMA units. The integer-to-float conversion would be the limit there (16 a clock per SM on an
    # H100/H200, against the 32 int4 values a clock per SM that the copy bandwidth brings), so a value
    # becomes a float by a mask and an OR into the mantissa of a power of two: 2^e + q exactly, one
    # LOP3 (_field_as_float). The 2^e sum(x) that this adds is the same for every output: subtracted once a
    # group. What is left a value is one LOP3, one FMA and half a shift, and the SM's integer pipe
    # (64 a clock) and its issue rate (128 a clock) are the limits, not the bytes: every instruction
    # in the loop counts (its SASS is counted offline: benchmarks/kernel_sass.py).

    @triton.jit
    def _field_as_float(b, MASK: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr):
        """(b & MASK) | MAGIC read as a float32. ASM: written as one lop3; the compiler otherwise
        spends two on it (an instruction holds one 32-bit constant). Triton's interpreter runs no
        inline assembly, so it takes the two operators."""
        if ASM:
            return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                             [b, tl.full(b.shape, MASK, tl.int32), tl.full(b.shape, MAGIC, tl.int32)],
                                             dtype=tl.float32, is_pure=True, pack=1)
        return ((b & MASK) | MAGIC).to(tl.float32, bitcast=True)

    @triton.jit
    def _words(at, ok, EVEN: tl.constexpr):
        """The weight words at `at` (where `ok`, else 0; EVEN: all of them)."""
        if EVEN:
            return tl.load(at)
        return tl.load(at, mask=ok, other=0)

    @triton.jit(do_not_specialize=["split"])
    def _gemv_int4_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, part_ptr, count_ptr, N, words, sw, ss, s_split,
                          split, b_ptr,
                          W: tl.constexpr, BN: tl.constexpr, GPS: tl.constexpr, SPLIT: tl.constexpr,
                          EVEN: tl.constexpr, ASM: tl.constexpr, BIAS: tl.constexpr = False,
                          PREFETCH: tl.constexpr = False):
        """out[n] = sum_k x[k] (q[n, k] scale[g, n] + minimum[g, n]), GPS groups (W words each) a
        step. Word j of a group holds bytes 4j .. 4j + 3: nibble p = 2i + h is byte i's low (h = 0) or
        high (h = 1) nibble, input 4j + i (+ GROUP / 2 for h = 1). Low nibbles are moved to bits 16-19
        under the exponent of 128 (128 + q), high ones to bits 12-15 under that of 2048 (2048 + q):
        four shifts a word, not seven. A group's sums stay small, so 2048 costs no accuracy that
        matters. EVEN: N is a multiple of BN and every split holds whole steps (no masks). BIAS: b[n] is
        added to the sums before they are rounded to the output's dtype. PREFETCH:
        the next step's words are loaded before this step's arithmetic (Triton does not pipeline
        loads that feed no dot: without it a program's loads wait idle while it computes)."""
        GROUP: tl.constexpr = W * 8
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        n_ok = n < N
        groups = words // W
        per_split = tl.cdiv(tl.cdiv(groups, split), GPS) * GPS
        start = tl.program_id(2) * per_split
        end = tl.minimum(start + per_split, groups)
        j = tl.arange(0, W)
        scaled = tl.zeros([BN, GPS, W], dtype=tl.float32)       # sum of scale * (2^e + q) x, word by word
        offsets = tl.zeros([BN, GPS], dtype=tl.float32)         # sum of minimum * sum(x) - scale * 2^e sum(x)
        row_w = w_ptr + n[:, None, None] * sw + j[None, None, :]
        if PREFETCH:
            g = start + tl.arange(0, GPS)
            w_next = _words(row_w + g[None, :, None] * W, (n_ok[:, None] & (g < end)[None, :])[:, :, None], EVEN)
        for g0 in range(start, end, GPS):
            g = g0 + tl.arange(0, GPS)
            g_ok = g < end
            ok2 = n_ok[:, None] & g_ok[None, :]
            if PREFETCH:
                w = w_next
                g_next = g + GPS
                if EVEN:                                            # the last step reads its own words again
                    g_next = tl.where(g0 + GPS < end, g_next, g)
                w_next = _words(row_w + g_next[None, :, None] * W,
                                (n_ok[:, None] & (g_next < end)[None, :])[:, :, None], EVEN)
            else:
                w = _words(row_w + g[None, :, None] * W, ok2[:, :, None], EVEN)
            at_s = g[None, :] * ss + n[:, None]
            if EVEN:
                s = tl.load(s_ptr + at_s).to(tl.float32)
                z = tl.load(z_ptr + at_s).to(tl.float32)
            else:
                s = tl.load(s_ptr + at_s, mask=ok2, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + at_s, mask=ok2, other=0.0).to(tl.float32)
            k0 = g[:, None] * GROUP + 4 * j[None, :]                         # [GPS, W]: byte 0's low nibble
            dot = tl.zeros([BN, GPS, W], dtype=tl.float32)
            x_low = tl.zeros([GPS, W], dtype=tl.float32)                       # sum of x under low nibbles
            x_high = tl.zeros([GPS, W], dtype=tl.float32)
            for p in tl.static_range(8):
                at_x = x_ptr + k0 + (p // 2) + (p % 2) * (GROUP // 2)
                if EVEN:
                    xp = tl.load(at_x).to(tl.float32)
                else:
                    xp = tl.load(at_x, mask=g_ok[:, None], other=0.0).to(tl.float32)
                if p == 0:
                    b = w << 16
                elif p == 1 or p == 2:
                    b = w << 8
                elif p == 3 or p == 4:
                    b = w
                elif p == 5 or p == 6:
                    b = w >> 8
                else:
                    b = w >> 16
                if p % 2 == 0:
                    dot += _field_as_float(b, 0x000F0000, 0x43000000, ASM) * xp[None, :, :]     # 128 + q
                    x_low += xp
                else:
                    dot += _field_as_float(b, 0x0000F000, 0x45000000, ASM) * xp[None, :, :]     # 2048 + q
                    x_high += xp
            scaled += dot * s[:, :, None]
            low, high = tl.sum(x_low, axis=1), tl.sum(x_high, axis=1)                # [GPS]: a group's sums
            offsets += z * (low + high)[None, :] - s * (128.0 * low + 2048.0 * high)[None, :]
        total = tl.sum(tl.sum(scaled, axis=2), axis=1) + tl.sum(offsets, axis=1)
        total, last = _add_up_splits(total, part_ptr, count_ptr, tl.program_id(0), n, n_ok, s_split, split, SPLIT)
        if last:
            _store_row(out_ptr, b_ptr, n, n_ok, total, BIAS)

    # One row times an int8 weight, the same way: a byte q becomes u = q + 128 by one XOR a word (four
    # values), and u is moved to bits 15-22 under the exponent of 256: 256 + u exactly, one LOP3 (an
    # integer-to-float conversion, 16 a clock per SM, was the limit of the tensor-core tiles for one
    # row: 16 int8 values a clock per SM is what the copy bandwidth brings). The row's scale and the
    # 384 sum(x) that this adds are applied once, to the sums.

    @triton.jit(do_not_specialize=["split"])
    def _gemv_int8_kernel(x_ptr, w_ptr, s_ptr, out_ptr, part_ptr, count_ptr, N, words, sw, ss, s_split, split,
                          b_ptr, BN: tl.constexpr, BW: tl.constexpr, SPLIT: tl.constexpr, EVEN: tl.constexpr,
                          ASM: tl.constexpr, BIAS: tl.constexpr = False, PREFETCH: tl.constexpr = False):
        """out[n] = scale[n] sum_k x[k] q[n, k] (+ b[n]), BW words (inputs 4j .. 4j + 3, byte i input
        4j + i) a step. EVEN, BIAS, PREFETCH: as _gemv_int4_kernel's."""
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        n_ok = n < N
        per_split = tl.cdiv(tl.cdiv(words, split), BW) * BW
        start = tl.program_id(2) * per_split
        end = tl.minimum(start + per_split, words)
        dot = tl.zeros([BN, BW], dtype=tl.float32)              # sum of (384 + q) x, word by word
        xs = tl.zeros([BW], dtype=tl.float32)
        row_w = w_ptr + n[:, None] * sw
        if PREFETCH:
            j = start + tl.arange(0, BW)
            w_next = _words(row_w + j[None, :], n_ok[:, None] & (j < end)[None, :], EVEN)
        for j0 in range(start, end, BW):
            j = j0 + tl.arange(0, BW)
            j_ok = j < end
            if PREFETCH:
                w = w_next
                j_next = j + BW
                if EVEN:                                            # the last step reads its own words again
                    j_next = tl.where(j0 + BW < end, j_next, j)
                w_next = _words(row_w + j_next[None, :], n_ok[:, None] & (j_next < end)[None, :], EVEN)
            else:
                w = _words(row_w + j[None, :], n_ok[:, None] & j_ok[None, :], EVEN)
            u = w ^ -0x7F7F7F80                                     # 0x80808080: each byte q -> q + 128
            for i in tl.static_range(4):
                if EVEN:
                    xi = tl.load(x_ptr + 4 * j + i).to(tl.float32)
                else:
                    xi = tl.load(x_ptr + 4 * j + i, mask=j_ok, other=0.0).to(tl.float32)
                if i == 0:
                    b = u << 15
                elif i == 1:
                    b = u << 7
                elif i == 2:
                    b = u >> 1
                else:
                    b = u >> 9
                dot += _field_as_float(b, 0x007F8000, 0x43800000, ASM) * xi[None, :]            # 256 + u
                xs += xi
        total = (tl.sum(dot, axis=1) - 384.0 * tl.sum(xs, axis=0)) * tl.load(s_ptr + n * ss, mask=n_ok,
                                                                             other=0.0).to(tl.float32)
        total, last = _add_up_splits(total, part_ptr, count_ptr, tl.program_id(0), n, n_ok, s_split, split, SPLIT)
        if last:
            _store_row(out_ptr, b_ptr, n, n_ok, total, BIAS)

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

    @triton.jit
    def _dequantize_int8_kernel(q_ptr, s_ptr, out_ptr, K, sq, ss, BLOCK: tl.constexpr):
        """One output row's BLOCK int8 weights -> out's dtype, times the row's scale."""
        row = tl.program_id(0)
        k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = k < K
        s = tl.load(s_ptr + row * ss).to(tl.float32)
        w = tl.load(q_ptr + row * sq + k, mask=ok, other=0).to(tl.float32) * s
        tl.store(out_ptr + row * K + k, w.to(out_ptr.dtype.element_ty), mask=ok)


def pack_int4(weight: torch.Tensor, group: int, device=None,
              values_at_once: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [N, K] (K a multiple of `group`) -> packed uint8 [N, K / 2], scale and minimum [K / group, N]
    in W's dtype, on `device` (default W's): asymmetric, each group's 16 levels spanning its own range.
    Quantized against the rounded scale and minimum, so dequantize_int4 gives what the kernel computes.
    A few rows at a time (`values_at_once`), each slice moved to `device` alone: the outputs are the
    only full-size tensors, so W may stay on the CPU, and the float32 working copies stay small (a whole
    7B lm_head at once took 6.5 GB of them)."""
    N, K = weight.shape
    device = weight.device if device is None else torch.device(device)
    packed = torch.empty(N, K // 2, dtype=torch.uint8, device=device)
    scale = torch.empty(K // group, N, dtype=weight.dtype, device=device)
    minimum = torch.empty(K // group, N, dtype=weight.dtype, device=device)
    rows = max(1, values_at_once // K)
    half = group // 2
    for i in range(0, N, rows):
        w = weight[i:i + rows].detach().to(device, torch.float32, copy=True)      # a copy: worked in place
        w = w.reshape(-1, K // group, group)
        low, high = w.amin(-1), w.amax(-1)
        s = ((high - low) / 15).clamp_min(1e-8).to(weight.dtype)
        m = low.to(weight.dtype)
        q = w.sub_(m.float()[..., None]).div_(s.float()[..., None]).round_().clamp_(0, 15).to(torch.uint8)
        packed[i:i + rows] = (q[..., :half] | (q[..., half:] << 4)).reshape(-1, K // 2)
        scale[:, i:i + rows] = s.t()
        minimum[:, i:i + rows] = m.t()
    return packed, scale, minimum


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group: int) -> torch.Tensor:
    """The float32 W [N, K] that pack_int4's output stands for (the reference the kernel is checked against)."""
    N = packed.shape[0]
    bytes_ = packed.reshape(N, -1, group // 2)
    q = torch.cat([bytes_ & 15, bytes_ >> 4], dim=-1).float()               # [N, K / group, group]
    w = q * scale.t().float()[..., None] + minimum.t().float()[..., None]
    return w.reshape(N, -1)
