"""A clip's prefill attention on CUDA: flash attention in Triton, for a block of new tokens after a
long context (the memory).

At 7B shapes an 8-frame clip is 1,568 new tokens over ~12.4k keys of memory: the attention is a
third of the clip's time. torch's flash kernel (flash-attention 2) ran it at 37% of the H100's bf16
rate, cuDNN's slower. This kernel is the same algorithm shaped for this one job:
- the causal mask is aligned bottom-right (new token i sees the context and new tokens <= i); a
  program runs the keys every one of its rows sees without any mask, then the few blocks on the
  diagonal with it;
- the query heads that share a kv head are neighbouring programs, so their keys and values come from
  L2 after the first read; keys and values are read in place (no repeat for grouped heads);
- it writes the output in the [new tokens, heads, dim] layout the model's o_proj reads (no transpose
  copy) and each row's log-sum-exp, from which VSB's scores are computed (received.py).
"""

from __future__ import annotations

import math

import torch

from .triton_lang import tl, triton

# (rows of new tokens a program, keys a step, warps, pipeline stages), by clip size. One H100,
# 12,288 memory tokens, benchmarks/fused_parts.py (results/h100_7b_issue13g_clip_attention.json):
# 1,568 rows (8 frames) 688 us, torch's flash kernel 1,006, floor 372; 196 rows (1 frame) 147 us
# with 64-row programs (128-row programs: 210 us, 56 of them for 132 SMs), flash 164, floor 44.
_FEW_ROWS, _CONFIG_FEW_ROWS, _CONFIG_MANY_ROWS = 512, (64, 64, 4, 4), (128, 64, 8, 3)


def clip_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """q [1, Hq, n, D], k/v [1, Hkv, n_ctx + n, D] -> (output [1, n, Hq, D], log-sum-exp of
    scale * logits per row [1, Hq, n] float32); None where the kernel does not apply (no CUDA or
    Triton, other shapes)."""
    b, hq, n, D = q.shape
    hkv, n_keys = k.shape[1], k.shape[2]
    if not (q.is_cuda and b == 1 and n > 0 and triton is not None and D in (64, 128)
            and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
            and hq % hkv == 0 and n_keys >= n and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1):
        return None
    return launch(q, k, v, scale, *(_CONFIG_FEW_ROWS if n <= _FEW_ROWS else _CONFIG_MANY_ROWS))


def launch(q, k, v, scale, block_m: int, block_n: int, warps: int,
           stages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on inputs clip_attention accepted (or a CPU under Triton's interpreter); the
    block sizes, warps and stages are arguments for benchmarks/fused_parts.py's sweep."""
    hq, n, D = q.shape[1:]
    hkv, n_keys = k.shape[1], k.shape[2]
    out = torch.empty(1, n, hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(1, hq, n, dtype=torch.float32, device=q.device)
    _kernel[(-(-n // block_m), hq)](
        q, k, v, out, lse, scale * math.log2(math.e), n, n_keys - n,
        q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1), v.stride(2),
        GROUPS=hq // hkv, D=D, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return out, lse


if triton is not None:
    @triton.jit
    def _step(acc, m, s_sum, q, k_ptrs, v_ptrs, start, keys, rows, n_ctx, scale_log2,
              MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
        """One block of keys [start, start + BLOCK_N) into the running max, sum and output (base 2)."""
        cols = start + tl.arange(0, BLOCK_N)
        if MASKED:
            k = tl.load(k_ptrs, mask=(cols < keys)[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=(cols < keys)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        if MASKED:       # new token `row` sees keys <= n_ctx + row; none past the last key
            sees = (cols[None, :] <= n_ctx + rows[:, None]) & (cols[None, :] < keys)
            s = tl.where(sees, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m - m_new)
        s_sum = s_sum * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        return acc, m_new, s_sum

    @triton.jit(do_not_specialize=["n", "n_ctx"])
    def _kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, scale_log2, n, n_ctx,
                sq_h, sq_n, sk_h, sk_n, sv_h, sv_n,
                GROUPS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        block, head = tl.program_id(0), tl.program_id(1)
        kv_head = head // GROUPS
        hq = tl.num_programs(1)
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + head * sq_h + rows[:, None] * sq_n + d[None, :], mask=(rows < n)[:, None], other=0.0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)      # every row sees key 0: m is finite after a block
        s_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        keys = n_ctx + n
        cols = tl.arange(0, BLOCK_N)
        k_ptrs = k_ptr + kv_head * sk_h + cols[:, None] * sk_n + d[None, :]
        v_ptrs = v_ptr + kv_head * sv_h + cols[:, None] * sv_n + d[None, :]
        # keys below n_ctx + the block's first row are seen by all of its rows: no mask
        unmasked = (n_ctx + block * BLOCK_M) // BLOCK_N * BLOCK_N
        for start in range(0, unmasked, BLOCK_N):
            acc, m, s_sum = _step(acc, m, s_sum, q, k_ptrs + start * sk_n, v_ptrs + start * sv_n, start, keys, rows,
                                  n_ctx, scale_log2, MASKED=False, BLOCK_N=BLOCK_N)
        end = tl.minimum(n_ctx + (block + 1) * BLOCK_M, keys)
        for start in range(unmasked, end, BLOCK_N):
            acc, m, s_sum = _step(acc, m, s_sum, q, k_ptrs + start * sk_n, v_ptrs + start * sv_n, start, keys, rows,
                                  n_ctx, scale_log2, MASKED=True, BLOCK_N=BLOCK_N)
        real = rows < n
        # rows past n (the last block's padding) saw real keys too: s_sum > 0 everywhere
        tl.store(out_ptr + rows[:, None] * (hq * D) + head * D + d[None, :],
                 (acc / s_sum[:, None]).to(out_ptr.dtype.element_ty), mask=real[:, None])
        tl.store(lse_ptr + head * n + rows, (m + tl.math.log2(s_sum)) * 0.6931471805599453, mask=real)
