"""One new token's attention over its context on CUDA: split-K flash decoding in Triton.

An answer token reads each layer's context once (at 7B shapes ~5k tokens, 5 MB of keys and values
a layer). With torch that took 8 kernels a layer (scale, logits, mask, softmax, cast, product, ...),
25 us on an H100 where reading the context takes 3.5. Here it is two: the first splits the context over
programs (one per kv head and block of keys), each keeping a running max, sum and weighted values
for the query heads that share the kv head; the second merges the splits, `MERGE_BLOCK` at a time
(a block of all splits at once grew with the context and passed Triton's largest block, 2^20
elements, at 524k keys: the full-cache baseline's answers failed at 3,072 frames). Slots of a
fixed-size buffer past the last one in use (`last`, decode_step.py) are skipped without being read.

Keys and values may be int8 with a float32 scale per slot and head, keys also with a factor per
channel (an 8-bit answer arena, hook/arena.py): the int8 numbers are exact in bf16, so they enter
the products as they are; the channel factors multiply the query, and the scales the logits (keys)
and the probabilities (values) of their slots. Those products are rounded to bf16 for a bf16 model's
tensor cores; an fp16 one's stay in float32 (a query times a large factor could pass fp16's 65,504,
and small probabilities times small scales fall below its range).
"""

from __future__ import annotations

import torch

from .triton_lang import tl, triton


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, last: torch.Tensor | None,
                     scale: float, kv_scales: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor | None:
    """q [1, Hq, 1, D], k/v [1, Hkv, n_keys, D], last long [1] (slots after it are not read) or None
    (all are) -> [1, 1, Hq, D]; kv_scales: with int8 k/v, their scales ([1, Hkv, n_keys] float32 each)
    and the keys' channel factors ([1, Hkv, D] float32);
    None where the kernel does not apply (no CUDA or Triton, other shapes)."""
    b, hq, n, D = q.shape
    hkv, n_keys = k.shape[1], k.shape[2]
    if not (q.is_cuda and b == 1 and n == 1 and triton is not None and D & (D - 1) == 0
            and hq % hkv == 0 and hq // hkv <= _GROUP_ROWS and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and n_keys and (kv_scales is None) == (k.dtype != torch.int8)
            and (kv_scales is None or all(s.stride(-1) == 1 for s in kv_scales))):
        return None
    return launch(q, k, v, last, scale, kv_scales=kv_scales)


def launch(q, k, v, last, scale, merge_block: int = 0, kv_scales=None) -> torch.Tensor:
    """The two kernels, without decode_attention's checks (the interpreter checks call it on the
    CPU). merge_block: splits the merge reads at a time (0: up to MERGE_BLOCK)."""
    hq, D = q.shape[1], q.shape[3]
    hkv, n_keys = k.shape[1], k.shape[2]
    splits = -(-n_keys // _KEYS_PER_SPLIT)
    m = torch.empty(hkv, splits, _GROUP_ROWS, dtype=torch.float32, device=q.device)
    s_sum = torch.empty_like(m)
    acc = torch.empty(hkv, splits, _GROUP_ROWS, D, dtype=torch.float32, device=q.device)
    ks, vs, kc = kv_scales if kv_scales is not None else (k, v, k)      # (unread without scales)
    _partial_kernel[(hkv, splits)](
        q, k, v, ks, vs, kc, last if last is not None else k, m, s_sum, acc, n_keys, scale,
        q.stride(1), k.stride(1), k.stride(2), v.stride(1), v.stride(2), ks.stride(1), vs.stride(1), kc.stride(1),
        HAS_LAST=last is not None, INT8=kv_scales is not None, G=hq // hkv, GP=_GROUP_ROWS, D=D, BN=_BN,
        KPS=_KEYS_PER_SPLIT)
    out = torch.empty(1, 1, hq, D, dtype=q.dtype, device=q.device)
    block = merge_block or min(MERGE_BLOCK, max(16, 1 << (splits - 1).bit_length()))
    _merge_kernel[(hkv, hq // hkv)](m, s_sum, acc, out, splits, G=hq // hkv, GP=_GROUP_ROWS, D=D, SP=block)
    return out


# tl.dot wants at least 16 rows: the query heads of a kv head (7 at 7B shapes) are padded to 16
_GROUP_ROWS, _BN, _KEYS_PER_SPLIT = 16, 64, 64
MERGE_BLOCK = 256          # splits merged at a time: [256, 128] float32 values, whatever the context


if triton is not None:
    @triton.jit(do_not_specialize=["n_keys"])
    def _partial_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, kc_ptr, last_ptr, m_ptr, l_ptr, acc_ptr, n_keys, scale,
                        sq_h, sk_h, sk_n, sv_h, sv_n, sks_h, svs_h, skc_h, HAS_LAST: tl.constexpr, INT8: tl.constexpr,
                        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, KPS: tl.constexpr):
        h, split = tl.program_id(0), tl.program_id(1)
        splits = tl.num_programs(1)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + (h * G + g)[:, None] * sq_h + d[None, :], mask=g[:, None] < G, other=0.0)
        if INT8:                                        # the keys' channel factors, moved onto the query
            q = q.to(tl.float32) * tl.load(kc_ptr + h * skc_h + d)[None, :]
            if q_ptr.dtype.element_ty == tl.bfloat16:
                q = q.to(tl.bfloat16)
        m = tl.full([GP], float("-inf"), tl.float32)
        s_sum = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        end = n_keys
        if HAS_LAST:
            end = tl.minimum(end, tl.load(last_ptr).to(tl.int32) + 1)
        for n0 in range(0, KPS, BN):
            n = split * KPS + n0 + tl.arange(0, BN)
            ok = n < end
            if split * KPS + n0 < end:                          # a block with no context is not read
                k = tl.load(k_ptr + h * sk_h + n[:, None] * sk_n + d[None, :], mask=ok[:, None], other=0.0)
                if INT8:
                    k = k.to(q.dtype)                   # |k| <= 127: exact in bf16 and float32
                s = tl.dot(q, tl.trans(k)) * scale
                if INT8:
                    s = s * tl.load(ks_ptr + h * sks_h + n, mask=ok, other=0.0)[None, :]
                s = tl.where(ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp(s - safe[:, None])
                alpha = tl.exp(m - safe)
                s_sum = s_sum * alpha + tl.sum(p, axis=1)
                vv = tl.load(v_ptr + h * sv_h + n[:, None] * sv_n + d[None, :], mask=ok[:, None], other=0.0)
                if INT8:
                    vv = vv.to(q.dtype)
                    pv = p * tl.load(vs_ptr + h * svs_h + n, mask=ok, other=0.0)[None, :]
                else:
                    pv = p
                acc = acc * alpha[:, None] + tl.dot(pv.to(vv.dtype), vv)
                m = m_new
        at = (h * splits + split) * GP + g
        tl.store(m_ptr + at, m)
        tl.store(l_ptr + at, s_sum)
        tl.store(acc_ptr + at[:, None] * D + d[None, :], acc)

    @triton.jit(do_not_specialize=["splits"])
    def _merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, splits, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                      SP: tl.constexpr):
        """One program per (kv head, query head of its group): the splits, SP at a time, merged
        with a running max (as the partial kernel merges blocks of keys)."""
        h, g = tl.program_id(0), tl.program_id(1)
        d = tl.arange(0, D)
        top = tl.max(tl.full([SP], float("-inf"), tl.float32), axis=0)
        total = tl.sum(tl.zeros([SP], tl.float32), axis=0)
        out = tl.zeros([D], tl.float32)
        for s0 in range(0, splits, SP):
            sp = s0 + tl.arange(0, SP)
            at = (h * splits + sp) * GP + g
            m = tl.load(m_ptr + at, mask=sp < splits, other=float("-inf"))
            new_top = tl.maximum(top, tl.max(m, axis=0))
            safe = tl.where(new_top == float("-inf"), 0.0, new_top)
            w = tl.where(m == float("-inf"), 0.0, tl.exp(m - safe))
            alpha = tl.where(top == float("-inf"), 0.0, tl.exp(top - safe))
            total = total * alpha + tl.sum(tl.load(l_ptr + at, mask=sp < splits, other=0.0) * w, axis=0)
            acc = tl.load(acc_ptr + at[:, None] * D + d[None, :], mask=(sp < splits)[:, None], other=0.0)
            out = out * alpha + tl.sum(acc * w[:, None], axis=0)
            top = new_top
        tl.store(out_ptr + (h * G + g) * D + d, (out / total).to(out_ptr.dtype.element_ty))
