"""The small kernels of an answer at 7B shapes, each alone: the fused Triton kernels (engine/cuda/kernels/:
rotate_rows.py, fused_layers.py) against the torch code they replace, checked for equality and timed; the
weight products under cuBLAS and cuBLASLt; and the top-k that picks an answer's pages.

    python3 benchmarks/fused_parts.py --out results/fused_parts.json       # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing as tt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from livevlm_ros.engine.cuda.kernels import clip_attention, decode_attention, fused_layers  # noqa: E402
from livevlm_ros.engine.cuda.kernels import merged_products, page_kernels  # noqa: E402
from livevlm_ros.engine.hook import attention, received, rope  # noqa: E402


def us(fn) -> float:
    return tt.do_bench(fn, warmup=50, rep=200, return_mode="median") * 1e3


def graph_us(fn, reps: int = 20) -> float:
    """Per call, `reps` calls replayed from one CUDA graph (what a recorded step pays)."""
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return us(g.replay) / reps


def diff(a, b) -> dict:
    return dict(equal=bool(torch.equal(a, b)), max_abs=float((a.float() - b.float()).abs().max()),
                mismatch_share=float((a != b).float().mean()))


def rope_tables(n, D, dev, dt, start=0):
    inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=dev).float() / D))
    ang = torch.arange(start, start + n, device=dev).float()[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    return emb.cos().to(dt), emb.sin().to(dt)


def clip_attention_sweep(H, Hq, D, dev, dt) -> dict:
    """A clip's prefill attention after 12,288 memory tokens (1 and 8 frames: 196 and 1,568 rows):
    torch's flash kernel (with the transpose to the layout o_proj reads) against clip_attention's
    Triton kernel, for a sweep of its block sizes, warps and stages."""
    clip = {}
    for nq in (196, 1568):
        nk = 12288 + nq
        cq = torch.randn(1, nq, Hq * D, device=dev, dtype=dt).view(1, nq, Hq, D).transpose(1, 2)
        ck, cv = torch.randn(1, H, nk, D, device=dev, dtype=dt), torch.randn(1, H, nk, D, device=dev, dtype=dt)
        ref_out, ref_lse = attention._flash_bottom_right(cq, ck, cv, D ** -0.5, with_lse=True)
        row = dict(flops_floor_us=4 * nq * (nk - nq / 2) * D * Hq / 790e12 * 1e6,   # each row sees memory + its tail
                   flash_us=us(lambda: attention._flash_bottom_right(cq, ck, cv, D ** -0.5)),
                   flash_and_transpose_us=us(lambda: attention._flash_bottom_right(cq, ck, cv, D ** -0.5)
                                             .transpose(1, 2).contiguous()))
        got_out, got_lse = clip_attention.clip_attention(cq, ck, cv, D ** -0.5)
        row["check"] = dict(out_max_abs=float((got_out.float() - ref_out.transpose(1, 2).float()).abs().max()),
                            lse_max_abs=float((got_lse - ref_lse).abs().max()))
        sweep = {}
        for bm, bn, warps, stages in ((128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 2),
                                      (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4)):
            try:
                sweep[f"{bm}x{bn}_w{warps}_s{stages}"] = us(lambda: clip_attention.launch(
                    cq, ck, cv, D ** -0.5, block_m=bm, block_n=bn, warps=warps, stages=stages))
            except Exception as err:              # noqa: BLE001 - out of shared memory, say
                sweep[f"{bm}x{bn}_w{warps}_s{stages}"] = f"{type(err).__name__}: {str(err)[:120]}"
        row["triton_us"] = sweep
        row["triton_default_us"] = us(lambda: clip_attention.clip_attention(cq, ck, cv, D ** -0.5))
        clip[f"rows_{nq}"] = row
        print("clip_attention", nq, json.dumps(row), flush=True)
    return clip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", choices=["clip_attention"], help="only this part")
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    out = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), gpu=torch.cuda.get_device_name(),
               torch=torch.__version__)
    H, Hq, D, hidden, inter = 4, 28, 128, 3584, 18944
    if args.only == "clip_attention":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(out, clip_attention=clip_attention_sweep(H, Hq, D, dev, dt)), indent=1))
        return

    # -- the context's gather + rotate: 12k memory tokens of one layer into the answer buffer
    tier = torch.randn(H, 12288, D, device=dev, dtype=dt)
    n = 10240
    idx = torch.randperm(12288, device=dev)[:n].sort().values
    cos, sin = rope_tables(n, D, dev, dt)
    arena = torch.zeros(H, 13312, D, device=dev, dtype=dt)
    dst = arena[:, 64:64 + n]

    def torch_gather_rotate():
        dst.copy_(tier[:, idx])
        dst.copy_(rope.apply_rope(dst, cos, sin))
    rope.rotate_into(dst, tier, idx, cos, sin)
    fused = dst.clone()
    torch_gather_rotate()
    out["gather_rotate"] = dict(check=diff(fused, dst), torch_us=us(torch_gather_rotate),
                                fused_us=us(lambda: rope.rotate_into(dst, tier, idx, cos, sin)),
                                floor_us=2 * dst.numel() * 2 / 3e12 * 1e6)
    print("gather_rotate", json.dumps(out["gather_rotate"]), flush=True)

    # -- page retrieval over a full tier (28 layers): summaries from the tier, and the top 40% of pages
    L, P, pages = 28, 16, 640
    tier_all = torch.randn(L, H, 12288, D, device=dev, dtype=dt)
    order = torch.stack([torch.randperm(12288, device=dev) for _ in range(L)])

    def torch_summary():
        g = tier_all.gather(2, order[:, None, :pages * P, None].expand(L, H, pages * P, D)).view(L, H, pages, P, D)
        return g.sum(3, dtype=torch.float32) / P, g.amin(3), g.amax(3)
    ref, got = torch_summary(), page_kernels.summarize(tier_all, order, pages, P)
    scores = torch.rand(pages, device=dev)
    top_ref = torch.zeros(pages, dtype=torch.bool, device=dev).index_fill_(0, scores.topk(256).indices, True)
    out["pages"] = dict(
        summary_check=dict(mean_max_abs=float((got[0] - ref[0]).abs().max()), low=diff(got[1], ref[1]),
                           high=diff(got[2], ref[2])),
        summary_torch_us=us(torch_summary), summary_fused_us=us(lambda: page_kernels.summarize(tier_all, order, pages, P)),
        summary_floor_us=tier_all[:, :, :pages * P].numel() * 2 / 3e12 * 1e6,
        top_check=diff(page_kernels.top_pages(scores, 256), top_ref),
        top_torch_us=graph_us(lambda: torch.zeros(pages, dtype=torch.bool, device=dev).index_fill_(
            0, scores.topk(256).indices, True)),
        top_fused_us=graph_us(lambda: page_kernels.top_pages(scores, 256)))
    print("pages", json.dumps(out["pages"]), flush=True)
    tier_all = order = None                 # frees the GPU memory (a del would leave the closures unbound)

    # -- one answer token's attention over a 5,184-token context in a 6,144-slot buffer
    ak, av = torch.randn(1, H, 6144, D, device=dev, dtype=dt), torch.randn(1, H, 6144, D, device=dev, dtype=dt)
    last = torch.tensor([5184], device=dev)
    qd = torch.randn(1, 1, Hq * D, device=dev, dtype=dt).view(1, 1, Hq, D).transpose(1, 2)

    def torch_decode():
        o = attention._small_block_attention(qd.reshape(1, H, Hq // H, D), ak, av, 1, last, D ** -0.5)
        return o.reshape(1, Hq, 1, D).transpose(1, 2)
    out["decode_attention"] = dict(
        check=dict(max_abs=float((decode_attention.decode_attention(qd, ak, av, last, D ** -0.5).float()
                                  - torch_decode().float()).abs().max())),
        torch_us=graph_us(torch_decode), fused_us=graph_us(lambda: decode_attention.decode_attention(qd, ak, av, last, D ** -0.5)),
        floor_us=2 * H * 5185 * D * 2 / 3e12 * 1e6)
    print("decode_attention", json.dumps(out["decode_attention"]), flush=True)
    sweep = {}
    for kps in (64, 128, 256, 512):
        decode_attention._KEYS_PER_SPLIT = kps
        sweep[kps] = graph_us(lambda: decode_attention.decode_attention(qd, ak, av, last, D ** -0.5))
    out["decode_attention"]["keys_per_split_us"] = sweep
    print("decode_attention keys per split", json.dumps(sweep), flush=True)

    clip = clip_attention_sweep(H, Hq, D, dev, dt)
    nq, nk = 1568, 12288 + 1568
    cq = torch.randn(1, Hq, nq, D, device=dev, dtype=dt)
    ck = torch.randn(1, H, nk, D, device=dev, dtype=dt)
    cv = torch.randn(1, H, nk, D, device=dev, dtype=dt)
    # VSB's scores of the clip's last frame (196 rows) from the flash kernel's row log-sum-exp
    r = 196
    flash_out, flash_lse = attention._flash_bottom_right(cq, ck, cv, D ** -0.5, with_lse=True)
    q_last = cq[0, :, nq - r:].reshape(H, -1, D)
    keys3 = ck[0]
    written = received._written_out((q_last * D ** -0.5).to(dt), keys3, r, None)
    from_lse = received.attention_received(q_last, keys3, r, lse=flash_lse[0, :, nq - r:nq].reshape(H, -1), scale=D ** -0.5)
    clip["scores_from_lse"] = dict(
        lse_shape=list(flash_lse.shape), max_rel_diff=float((from_lse - written).abs().max() / written.abs().max()),
        two_kernels_us=us(lambda: received.attention_received((q_last * D ** -0.5).to(dt), keys3, r)),
        from_lse_us=us(lambda: received.attention_received(
            q_last, keys3, r, lse=flash_lse[0, :, nq - r:nq].reshape(H, -1), scale=D ** -0.5)))
    out["clip_attention"] = clip
    print("clip_attention", json.dumps(clip), flush=True)

    # -- the model's layers at a decode step (1 row), a question (32 rows) and a clip (1,568 rows)
    from transformers.models.qwen2 import modeling_qwen2 as mq
    from transformers import Qwen2Config
    cfg = Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_attention_heads=Hq, num_key_value_heads=H,
                      hidden_act="silu")
    norm = mq.Qwen2RMSNorm(hidden, eps=1e-6).to(dev, dt)
    norm.weight.data.uniform_(0.5, 1.5)
    layers = {}
    for rows in (1, 32, 1568):
        x = torch.randn(1, rows, hidden, device=dev, dtype=dt) * 4
        g, u = torch.randn(1, rows, inter, device=dev, dtype=dt) * 3, torch.randn(1, rows, inter, device=dev, dtype=dt)
        q = torch.randn(1, rows, Hq * D, device=dev, dtype=dt).view(1, rows, Hq, D).transpose(1, 2)
        k = torch.randn(1, rows, H * D, device=dev, dtype=dt).view(1, rows, H, D).transpose(1, 2)
        c, s = rope_tables(rows, D, dev, dt, start=12000)
        c, s = c[None], s[None]
        fused_rope = fused_layers._rope_with_fallback(mq.apply_rotary_pos_emb)
        rq, rk = mq.apply_rotary_pos_emb(q, k, c, s)
        fq, fk = fused_rope(q, k, c, s)
        layers[rows] = dict(
            rms_norm=dict(check=diff(fused_layers.rms_norm(x, norm.weight, 1e-6), norm(x)),
                          torch_us=graph_us(lambda: norm(x)),
                          fused_us=graph_us(lambda: fused_layers.rms_norm(x, norm.weight, 1e-6))),
            silu_mul=dict(check=diff(fused_layers.silu_mul(g, u), F.silu(g) * u),
                          torch_us=graph_us(lambda: F.silu(g) * u), fused_us=graph_us(lambda: fused_layers.silu_mul(g, u))),
            rope_qk=dict(check=dict(q=diff(fq, rq), k=diff(fk, rk)),
                         torch_us=graph_us(lambda: mq.apply_rotary_pos_emb(q, k, c, s)),
                         fused_us=graph_us(lambda: fused_rope(q, k, c, s))))
        print("rows", rows, json.dumps(layers[rows]), flush=True)
    out["layers_graph_replayed"] = layers

    # -- the MLP: transformers' forward against the merged gate/up product + fused SiLU gate
    mlp = mq.Qwen2MLP(cfg).to(dev, dt)
    for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        lin.weight.data.normal_(0, 0.02)
    xs = {rows: torch.randn(1, rows, hidden, device=dev, dtype=dt) for rows in (1, 32, 1568)}
    plain = {rows: (mlp(x), graph_us(lambda x=x: mlp(x))) for rows, x in xs.items()}
    gate_up = merged_products.merge([mlp.gate_proj, mlp.up_proj])
    mlps = {}
    for rows, x in xs.items():
        got = fused_layers._silu_mlp(mlp, gate_up, x)
        mlps[rows] = dict(check=diff(got, plain[rows][0]), torch_us=plain[rows][1],
                          still_plain=diff(mlp(x), plain[rows][0]),
                          fused_us=graph_us(lambda x=x: fused_layers._silu_mlp(mlp, gate_up, x)))
        print("mlp rows", rows, json.dumps(mlps[rows]), flush=True)
    out["mlp_graph_replayed"] = mlps

    # -- weight products: cuBLAS (torch's default for mm without bias) against cuBLASLt
    shapes = dict(o_proj=(hidden, hidden), gate_up=(inter, hidden), down=(hidden, inter), k_proj=(H * D, hidden))
    weights = {name: torch.randn(o, i, device=dev, dtype=dt) * 0.02 for name, (o, i) in shapes.items()}
    gemm = {}
    x1 = torch.randn(1, hidden, device=dev, dtype=dt)
    for rows in (1, 32, 196, 1568):
        for name, w in weights.items():
            x = torch.randn(rows, w.shape[1], device=dev, dtype=dt)
            row = {}
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                row[lib + "_us"] = us(lambda: F.linear(x, w))
            torch.backends.cuda.preferred_blas_library("cublas")
            row["floor_us"] = max(w.numel() * 2 / 3e12, 2 * rows * w.numel() / 790e12) * 1e6
            gemm[f"{name}_{rows}"] = row
            print("gemm", name, rows, json.dumps({k2: round(v, 1) for k2, v in row.items()}), flush=True)
        if rows == 1:                                   # gate and up as one product of the two weights
            both = torch.cat([weights["gate_up"], weights["gate_up"]])
            gemm["gate_and_up_concatenated_1"] = dict(cublas_us=us(lambda: F.linear(x1, both)))
    out["gemm"] = gemm
    out["blas_default"] = str(torch.backends.cuda.preferred_blas_library())

    # -- picking an answer's pages: top-k of ~640 page scores
    picks = {}
    for pages, k in ((640, 256), (2560, 1024)):
        scores = torch.rand(pages, device=dev)
        idx_p = torch.arange(pages, device=dev)

        def by_rank():
            beats = (scores[None, :] > scores[:, None]) | ((scores[None, :] == scores[:, None]) & (idx_p[None, :] < idx_p[:, None]))
            return beats.sum(1) < k
        picks[pages] = dict(topk_us=graph_us(lambda: scores.topk(k)), sort_us=graph_us(lambda: scores.sort(descending=True)),
                            rank_us=graph_us(by_rank))
        print("pages", pages, json.dumps(picks[pages]), flush=True)
    out["page_pick"] = picks
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
