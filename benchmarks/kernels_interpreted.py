"""The engine's Triton kernels run on the CPU by Triton's interpreter, against the torch code they
replace: a check for machines without a GPU (the GPU runs the same checks in fused_parts.py and
gpu_bench.py). Prints one line per check and exits 1 if one fails.

    TRITON_INTERPRET=1 python benchmarks/kernels_interpreted.py

Needs triton (3.6 here) and numpy < 2.4 (numpy 2.4 breaks the interpreter). The interpreter rounds
bfloat16 differently from a GPU, so half precision is checked in float16 (where it is exact) and
everything in float32.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from livevlm_ros.engine.cuda.kernels import attention_received, clip_attention, decode_attention  # noqa: E402
from livevlm_ros.engine.cuda.kernels import fused_layers, page_kernels, quantized_linear, quantize_rows, rotate_rows  # noqa: E402,E501
from livevlm_ros.engine.hook import rope  # noqa: E402
from livevlm_ros.engine.hook.attention import causal_tail  # noqa: E402
from livevlm_ros.engine.memory import kv_quant  # noqa: E402

failed = []


def check(name: str, error: float, limit: float):
    ok = error <= limit
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {error:.3g} (limit {limit:g})")
    if not ok:
        failed.append(name)


def rope_tables(n, D, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.arange(n).float()[:, None] * inv[None]
    emb = torch.cat([emb, emb], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def main():
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1")
    torch.manual_seed(0)
    for dt, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        name = str(dt).split(".")[1]
        H, N, D, n = 4, 300, 128, 77
        src = torch.randn(H, N, D).to(dt)
        cos, sin = rope_tables(n, D, dt)
        idx = torch.randperm(N)[:n]
        out = torch.zeros(H, 500, D, dtype=dt)[:, 100:100 + n]
        # the kernel computes in float32 and rounds once: its reference is torch in float32, rounded
        rotated = lambda x: rope.apply_rope(x.float(), cos.float(), sin.float()).to(dt)  # noqa: E731
        rotate_rows.rotate_rows(out, src, idx, cos, sin)
        check(f"rope.rotate_into, gathered rows, {name}", (out.float() - rotated(src[:, idx]).float()).abs().max().item(), tol)
        q = torch.randn(1, n, H * D).to(dt).view(1, n, H, D).transpose(1, 2)     # a projection's layout
        out = torch.empty_like(q)
        rotate_rows.rotate_rows(out[0], q[0], 0, cos, sin)
        check(f"rope.rotate_into, strided queries, {name}", (out.float() - rotated(q).float()).abs().max().item(), tol)

        x, w = torch.randn(3, 5, 1000).to(dt) * 3, (torch.rand(1000) + 0.5).to(dt)
        xf = x.float()
        ref = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dt)
        check(f"fused_layers.rms_norm, {name}", (fused_layers.rms_norm(x, w, 1e-6).float() - ref.float()).abs().max().item(), 4 * tol)
        both = torch.randn(7, 2 * 600).to(dt)
        g, u = both[:, :600], both[:, 600:]
        ref = torch.nn.functional.silu(g) * u
        check(f"fused_layers.silu_mul, halves of one product, {name}",
              (fused_layers.silu_mul(g, u).float() - ref.float()).abs().max().item(), tol)

        L, P, pages = 3, 16, 23
        keys = torch.randn(L, H, 500, D).to(dt)
        order = torch.stack([torch.randperm(400) for _ in range(L)])
        grouped = keys.gather(2, order[:, None, :pages * P, None].expand(L, H, pages * P, D)).view(L, H, pages, P, D)
        mean, low, high = _summarize(keys, order, pages, P)
        check(f"page_kernels.summarize mean, {name}", (mean - grouped.float().mean(3)).abs().max().item(), tol)
        check(f"page_kernels.summarize min/max, {name}",
              max((low - grouped.amin(3)).abs().max().item(), (high - grouped.amax(3)).abs().max().item()), 0.0)
        check_int8_readers(dt, name, tol)
        check_int8_arena(dt, name, tol)

        Hq, Hkv, cap = 28, 4, 700
        q = torch.randn(1, 1, Hq * D).to(dt).view(1, 1, Hq, D).transpose(1, 2)
        k, v = torch.randn(1, Hkv, cap, D).to(dt), torch.randn(1, Hkv, cap, D).to(dt)
        last = torch.tensor([500])
        logits = q.float().reshape(Hkv, Hq // Hkv, D) @ k[0, :, :501].float().transpose(1, 2) * D ** -0.5
        ref = (logits.softmax(-1) @ v[0, :, :501].float()).reshape(1, 1, Hq, D)
        got = decode_attention.launch(q, k, v, last, D ** -0.5)
        check(f"decode_attention, 501 of 700 slots, {name}", (got.float() - ref).abs().max().item(), 5 * tol)
        # 11 splits merged 4 at a time: a block of empty splits (past the last slot) and a partial one
        got = decode_attention.launch(q, k, v, last, D ** -0.5, merge_block=4)
        check(f"decode_attention, splits merged 4 at a time, {name}", (got.float() - ref).abs().max().item(), 5 * tol)

        for n, ctx, block_m, block_n in ((77, 150, 64, 32), (40, 0, 32, 16)):   # a last partial block; no context
            q = torch.randn(1, n, Hq * D).to(dt).view(1, n, Hq, D).transpose(1, 2)
            k, v = torch.randn(1, Hkv, ctx + n, D).to(dt), torch.randn(1, Hkv, ctx + n, D).to(dt)
            got, lse = clip_attention.launch(q, k, v, D ** -0.5, block_m, block_n, 4, 1)
            logits = (q.float() @ k.float().repeat_interleave(Hq // Hkv, 1).transpose(2, 3)) * D ** -0.5
            logits[..., -n:].masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            ref = (logits.softmax(-1) @ v.float().repeat_interleave(Hq // Hkv, 1)).transpose(1, 2)
            check(f"clip_attention, {n} rows after {ctx}, {name}", (got.float() - ref).abs().max().item(), 5 * tol)
            check(f"clip_attention log-sum-exp, {n} rows after {ctx}, {name}",
                  (lse - torch.logsumexp(logits, -1)).abs().max().item(), 1e-4)

    scores = torch.rand(640)
    scores[1] = scores[300]                                          # a tie
    out = torch.empty(640, dtype=torch.bool)
    page_kernels._top_by_rank_kernel[(5,)](scores, out, 640, 256, BI=128, BJ=128)
    ref = torch.zeros(640, dtype=torch.bool).index_fill_(0, scores.topk(256).indices, True)
    check("page_kernels.top_pages equals top-k", float((out != ref).sum()), 0)

    g, r, D, N, scale = 3, 20, 64, 300, 0.37
    q, k = torch.randn(2, g * r, D), torch.randn(2, N, D)
    logits = (q @ k.transpose(1, 2)) * scale
    logits[..., -r:].masked_fill_(causal_tail(g, r, "cpu"), float("-inf"))
    ref = logits.softmax(-1).sum(1)
    got = attention_received.with_row_lse(q * scale, k, r, None)
    check("received, both kernels", ((got - ref).abs().max() / ref.abs().max()).item(), 1e-5)
    got = attention_received.column_sums(q, k, r, torch.logsumexp(logits, -1), None, scale)
    check("received, from a given log-sum-exp", ((got - ref).abs().max() / ref.abs().max()).item(), 1e-5)
    check_quantized_linear()
    sys.exit(1 if failed else 0)


def _summarize(keys, order, pages, P, scale=None, dtype=None, channel=None):
    """page_kernels.summarize's kernel call without its CUDA check."""
    L, H, _, D = keys.shape
    bound = keys.dtype if scale is None else dtype
    mean = torch.empty(L, H, pages, D)
    low, high = torch.empty(L, H, pages, D, dtype=bound), torch.empty(L, H, pages, D, dtype=bound)
    page_kernels._summarize_kernel[(L * H, -(-pages // page_kernels._PAGES_PER_PROGRAM))](
        keys, order, mean, low, high, keys if scale is None else scale, keys if scale is None else channel, pages, H,
        keys.stride(0), keys.stride(1),
        keys.stride(2), order.stride(0), *((0, 0, 0) if scale is None else scale.stride()),
        P=P, D=D, PB=page_kernels._PAGES_PER_PROGRAM, SCALED=scale is not None)
    return mean, low, high


def check_quantized_linear():
    """weights int8 / int4 (quantized_linear.py), every tile shape the engine launches (few rows,
    split along K; many rows), against the product with the weight dequantized in float32 by the
    format's definition, and int8 against torchao's own F.linear."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    ql = quantized_linear
    for rows, N, K, cfg in ((1, 200, 512, dict(BM=16, BN=32, BK=128, SPLIT_K=1)),
                            (1, 200, 512, None),                   # one row, int4: the word kernel (gemv_config)
                            (1, 72, 1024, dict(BN=32, GPS=2, SPLIT_K=3)),
                            (1, 40, 768, dict(BN=16, GPS=1, SPLIT_K=1)),
                            (1, 256, 1024, dict(BN=64, GPS=2, SPLIT_K=2)),      # EVEN: no masks
                            (1, 200, 512, dict(BN=64, BW=16, SPLIT_K=3)),       # int8's word kernel
                            (1, 256, 1024, dict(BN=64, BW=32, SPLIT_K=2)),      # ... EVEN
                            (1, 72, 1024, dict(BN=32, GPS=2, SPLIT_K=3, PREFETCH=True)),   # the next step's
                            (1, 256, 1024, dict(BN=64, GPS=2, SPLIT_K=2, PREFETCH=True)),  # words loaded
                            (1, 200, 512, dict(BN=64, BW=16, SPLIT_K=3, PREFETCH=True)),   # before this
                            (1, 256, 1024, dict(BN=64, BW=32, SPLIT_K=2, PREFETCH=True)),  # step's sums
                            (24, 64, 1024, None),                  # int4: FACTORED tiles
                            (9, 40, 512, dict(BM=16, BN=32, SPLIT_K=2, FACTORED=True)),   # BK: a group's bytes
                            (7, 96, 768, dict(BM=16, BN=16, BK=128, SPLIT_K=4)),
                            (40, 64, 512, dict(BM=32, BN=32, BK=64, SPLIT_K=2)),
                            (70, 48, 384, dict(BM=64, BN=32, BK=64, SPLIT_K=1)),
                            (70, 48, 384, None),                   # more than MAX_ROWS: dequantized, then cuBLAS
                            (70, 600, 384, "bands")):              # ... 256 outputs at a time: 3 bands, one short
        x = torch.randn(rows, K).half()                       # the interpreter's bf16 is not a GPU's (above)
        banded = cfg == "bands"
        cfg = None if banded else cfg
        ql.DEQUANTIZED_ELEMENTS = 256 * K if banded else 1 << 25
        how = (f"split {cfg['SPLIT_K']}{', prefetched' if cfg.get('PREFETCH') else ''}" if cfg
               else "default" if rows <= ql.MAX_ROWS else "dequantized, 256 outputs at a time" if banded
               else "dequantized")
        name = f"{rows} rows x [{N}, {K}], {how}"
        bias = torch.randn(N).half()
        for group in (() if cfg and "BW" in cfg else (128, 64, 32)):
            packed, s, z = ql.pack_int4(torch.randn(N, K).half(), group)
            b = bias if group == 64 else None                     # with a bias, once a shape
            out = ql.product(x, packed, s, z, group, b, dict(cfg, BK=group // 2) if cfg and "FACTORED" in cfg
                             else cfg)
            exact = x.float() @ ql.dequantize_int4(packed, s, z, group).half().float().t()
            if b is not None:
                exact += b.float()
            scale = exact.abs().max().item()
            check(f"int4 product, groups of {group}{', bias' if b is not None else ''}, {name}, vs exact",
                  (out.float() - exact).abs().max().item() / scale, 1e-3)
        if cfg and ("GPS" in cfg or "FACTORED" in cfg):
            continue                                          # int4's kernels only
        lin = torch.nn.Linear(K, N, bias=False)
        quantize_(lin, Int8WeightOnlyConfig(set_inductor_config=False))
        w = lin.weight
        out = ql.product(x, w.qdata, w.scale.reshape(1, -1), None, 0, None, cfg)
        exact = x.float() @ (w.qdata.float() * w.scale.float()).t()
        torchao = torch.nn.functional.linear(x.float(), w).float()       # torchao's product (float32 here)
        scale = exact.abs().max().item()
        check(f"int8 product, {name}, vs exact", (out.float() - exact).abs().max().item() / scale, 1e-3)
        check(f"int8 product, {name}, vs torchao", (out.float() - torchao).abs().max().item() / scale, 1e-3)
        out = ql.product(x, w.qdata, w.scale.reshape(1, -1), None, 0, bias, cfg)
        exact += bias.float()
        check(f"int8 product, bias, {name}, vs exact",
              (out.float() - exact).abs().max().item() / exact.abs().max().item(), 1e-3)
    left = max(int(c.abs().max()) for c in ql._COUNTS.values())
    check("split products leave their counters at 0 (a graph replays them as recorded)", left, 0)


def check_int8_readers(dt, name, tol):
    """kv_dtype int8 (memory/kv_quant.py): the rotation and the page summaries dequantize int8 rows
    as they read them; the reference dequantizes with torch first, in float32."""
    H, N, D, n = 4, 300, 128, 77
    x = torch.randn(H, N, D) * 3
    x[:, :, :2] *= 20                                                  # outlier channels
    channel = kv_quant.channel_factors(x[None])[0]
    q8, scale = kv_quant.quantize_rows(x, channel)
    cos, sin = rope_tables(n, D, dt)
    idx = torch.randperm(N)[:n]
    out = torch.zeros(H, n, D, dtype=dt)
    rotate_rows.rotate_rows(out, q8, idx, cos, sin, scale, channel)
    deq = kv_quant.dequantize_rows(q8[:, idx], scale[:, idx], torch.float32, channel)
    ref = rope.apply_rope(deq, cos.float(), sin.float())
    check(f"rope.rotate_into, int8 rows dequantized, {name}", (out.float() - ref.to(dt).float()).abs().max().item(),
          3 * tol)
    rotate_rows.rotate_rows(out, q8, 7, None, None, scale, torch.ones(H, D))     # values: no rotation, no factors
    ref = kv_quant.dequantize_rows(q8[:, 7:7 + n], scale[:, 7:7 + n], dt)
    check(f"rope.read_rows, int8 rows dequantized, {name}", (out.float() - ref.float()).abs().max().item(), 0.0)
    L, P, pages = 2, 16, 20
    raw = torch.randn(L, H, 400, D)
    raw[..., :2] *= 20
    kchannel = kv_quant.channel_factors(raw)
    keys8, kscale = kv_quant.quantize_rows(raw, kchannel)
    order = torch.stack([torch.randperm(400) for _ in range(L)])
    index = order[:, None, :pages * P, None].expand(L, H, pages * P, D)
    grouped = kv_quant.dequantize_rows(keys8.gather(2, index), kscale.gather(2, index[..., 0]), torch.float32,
                                       kchannel)
    grouped = grouped.view(L, H, pages, P, D)
    mean, low, high = _summarize(keys8, order, pages, P, kscale, dt, kchannel)
    check(f"page_kernels.summarize mean, int8 keys, {name}", (mean - grouped.mean(3)).abs().max().item(), 1e-5)
    check(f"page_kernels.summarize min/max, int8 keys, {name}",
          max((low - grouped.amin(3).to(dt)).abs().max().item(), (high - grouped.amax(3).to(dt)).abs().max().item()), 0.0)


def check_int8_arena(dt, name, tol):
    """The 8-bit answer arena (hook/arena.py): rows stored by quantize_rows.store (keys by channel
    factors), from a slot given and from one read on the device, against kv_quant.quantize_rows; then
    decode_attention over the int8 slots against torch over them dequantized."""
    H, Hq, D, cap, n = 4, 28, 128, 700, 501
    k, v = torch.randn(H, n, D), torch.randn(H, n, D)
    k[:, :, :2] *= 10
    k, v = k.to(dt), v.to(dt)
    channel = kv_quant.channel_factors(k[None, :, :480])[0]
    k8, v8 = torch.zeros(H, cap, D, dtype=torch.int8), torch.zeros(H, cap, D, dtype=torch.int8)
    ks, vs = torch.zeros(H, cap), torch.zeros(H, cap)
    quantize_rows.store(k[:, :480], v[:, :480], k8, v8, ks, vs, channel, 0)
    quantize_rows.store(k[:, 480:], v[:, 480:], k8, v8, ks, vs, channel, 0, at=torch.tensor([480]))
    for got8, got_scale, x, factors, what in ((k8, ks, k, channel, "keys"), (v8, vs, v, None, "values")):
        ref8, ref_scale = kv_quant.quantize_rows(x, factors)
        check(f"quantize_rows.store, {what}, int8 steps off, {name}",
              (got8[:, :n].int() - ref8.int()).abs().max().item(), 0)
        check(f"quantize_rows.store, {what}, scales, {name}",
              ((got_scale[:, :n] - ref_scale).abs() / ref_scale).max().item(), 1e-6)
    q = torch.randn(1, 1, Hq * D).to(dt).view(1, 1, Hq, D).transpose(1, 2)
    kd = kv_quant.dequantize_rows(k8[:, :n], ks[:, :n], torch.float32, channel)
    vd = kv_quant.dequantize_rows(v8[:, :n], vs[:, :n], torch.float32)
    logits = q.float().reshape(H, Hq // H, D) @ kd.transpose(1, 2) * D ** -0.5
    ref = (logits.softmax(-1) @ vd).reshape(1, 1, Hq, D)
    got = decode_attention.launch(q, k8[None], v8[None], torch.tensor([n - 1]), D ** -0.5,
                                  kv_scales=(ks[None], vs[None], channel[None]))
    check(f"decode_attention, int8 slots with scales and channel factors, {name}",
          (got.float() - ref).abs().max().item(), 5 * tol)


if __name__ == "__main__":
    main()
