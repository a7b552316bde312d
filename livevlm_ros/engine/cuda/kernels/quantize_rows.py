"""hook/arena.py's 8-bit store: rows of keys and values quantized to int8, a float32 scale per head
and row (symmetric; keys first divided by their channel factors: memory/kv_quant.quantize_rows),
written into the arena's slots, keys and values in one kernel. An answer's prefill stores its whole
context this way once per layer; a decode step stores one token a layer, at a slot it reads from the
device (`at`), so a graph replays it. In torch each tensor would take about eight kernels (divide,
amax, divide, round, clamp, cast, two copies): at 7B shapes ~450 a decoded token, where the bf16
arena's copies were 56."""

from __future__ import annotations

import torch

from .triton_lang import tl, triton


def fits(*tensors: torch.Tensor) -> bool:
    """store's tensors (k, v, k8, v8, scales, channel factors): on CUDA, rows contiguous."""
    D = tensors[0].shape[-1]
    return (tensors[0].is_cuda and triton is not None and D & (D - 1) == 0
            and all(t.stride(-1) == 1 for t in tensors))


def store(k, v, k8, v8, k_scale, v_scale, k_channel, first, at=None):
    """k/v [H, n, D] -> int8 rows k8/v8 [H, capacity, D] and scales [H, capacity] float32, keys
    divided by k_channel [H, D] float32 first, into slots first .. first + n - 1, where first is an
    int, or (at, long [1] on the device) read there."""
    H, n, D = k.shape
    rows = min(_ROWS, triton.next_power_of_2(n))
    at_ptr = at if at is not None else k_scale
    _store_kernel[(triton.cdiv(n, rows), H, 2)](
        k, v, k8, v8, k_scale, v_scale, k_channel, at_ptr, n, first,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k8.stride(0), k8.stride(1), v8.stride(0), v8.stride(1),
        k_scale.stride(0), v_scale.stride(0), k_channel.stride(0), FROM_DEVICE=at is not None, D=D, BN=rows)


_ROWS = 16


if triton is not None:
    @triton.jit(do_not_specialize=["n", "first"])
    def _store_kernel(k_ptr, v_ptr, k8_ptr, v8_ptr, ks_ptr, vs_ptr, kc_ptr, at_ptr, n, first,
                      sk_h, sk_n, sv_h, sv_n, sk8_h, sk8_n, sv8_h, sv8_n, sks_h, svs_h, skc_h,
                      FROM_DEVICE: tl.constexpr, D: tl.constexpr, BN: tl.constexpr):
        """One program per (block of BN rows, head, keys or values): blocks on the grid's first
        axis, which has room for any context (the others stop at 65,535)."""
        nb, h, which = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        j = nb * BN + tl.arange(0, BN)
        live = j < n
        d = tl.arange(0, D)
        if FROM_DEVICE:
            slot = tl.load(at_ptr).to(tl.int32) + j
        else:
            slot = first + j
        if which == 0:
            src, s_h, s_n, dst, d_h, d_n, sc, sc_h = k_ptr, sk_h, sk_n, k8_ptr, sk8_h, sk8_n, ks_ptr, sks_h
        else:
            src, s_h, s_n, dst, d_h, d_n, sc, sc_h = v_ptr, sv_h, sv_n, v8_ptr, sv8_h, sv8_n, vs_ptr, svs_h
        x = tl.load(src + h * s_h + j[:, None] * s_n + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        # divisions rounded to nearest, as torch's (Triton's `/` may be 2 ulp off on the GPU)
        if which == 0:
            x = tl.div_rn(x, tl.load(kc_ptr + h * skc_h + d)[None, :])
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.where(amax > 0, tl.div_rn(amax, 127.0), 1.0)
        q = tl.div_rn(x, scale[:, None])
        # round half to even, as torch.round (the reference, kv_quant.quantize_rows)
        r = tl.floor(q + 0.5)
        r = tl.where((r - q == 0.5) & (r % 2 != 0), r - 1.0, r)
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(dst + h * d_h + slot[:, None] * d_n + d[None, :], r.to(tl.int8), mask=live[:, None])
        tl.store(sc + h * sc_h + slot, scale, mask=live)
