"""The quantized products alone (cuda/kernels/quantized_linear.py), per Linear shape and row count,
against bf16 (cuBLAS) and torchao's own products, with a sweep of tile settings. One GPU call:

    python3 benchmarks/linear_bench.py --out results/            # the GPU machine (~4 min)

Shapes: every Linear of Qwen2-7B (LLaVA-OneVision-7B's language model) and of Qwen2-0.5B. Rows: 1
(an answer token), 16 and 64 (a question), 1,568 (an 8-frame clip's prefill). Each product is
checked against the float32 product with the weight dequantized in torch (the format's definition),
and timed as the engine runs it, replayed from a CUDA graph (triton.testing.do_bench_cudagraph:
no launch overhead on the host; the weights of the 7B shapes do not fit the 50 MB L2). A weight's bytes
over the time give the rate it was read at, compared with the copy bandwidth measured in the same
run. The fastest settings per (bits, rows) are printed as `quantized_linear.config` should pick them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from livevlm_ros.engine.cuda.kernels import quantized_linear as ql  # noqa: E402

SHAPES = {   # name: (N out, K in)
    "7b": {"q/o": (3584, 3584), "k/v": (512, 3584), "q+k+v": (4608, 3584), "gate/up": (18944, 3584),
           "gate+up": (37888, 3584), "down": (3584, 18944), "lm_head": (152064, 3584)},
    "0.5b": {"q/o": (896, 896), "k/v": (128, 896), "q+k+v": (1152, 896), "gate/up": (4864, 896),
             "down": (896, 4864)},
}
ROWS = (1, 16, 64, 1568)


def log(*a):
    print(*a, flush=True)


def do_bench(fn, rep=20):
    import triton.testing as tt
    fn()                                                                       # compiled before the capture
    torch.cuda.synchronize()            # do_bench_cudagraph starts on its own stream without waiting for this one
    return tt.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3      # us


def sweep(M: int, bits: int, small: bool = False) -> list[dict]:
    """Tile settings tried for M rows (small: one row's likeliest, a third of them)."""
    if M > ql.MAX_ROWS:
        return []                                  # dequantized, then cuBLAS
    if M == 1 and small:
        if bits == 4:
            return [dict(BN=bn, GPS=1, SPLIT_K=sk, num_warps=w, num_stages=3, PREFETCH=pf)
                    for bn, sk, w, pf in itertools.product((128, 256), (2, 4, 8), (4, 8), (False, True))]
        return [dict(BN=bn, BW=128, SPLIT_K=sk, num_warps=4, num_stages=3, PREFETCH=pf)
                for bn, sk, pf in itertools.product((32, 64), (1, 2, 4), (False, True))]
    if M == 1 and bits == 4:                       # the word kernel (quantized_linear.gemv_config; the FACTORED
        # tiles lost to it, 12-06; PREFETCH was no faster at the best settings of any shape, 2026-12-07 06:39 H100)
        return [dict(BN=bn, GPS=gps, SPLIT_K=sk, num_warps=w, num_stages=3)
                for bn, gps, sk, w in itertools.product((64, 128, 256), (1, 2), (1, 2, 4, 8, 16), (4, 8))]
    if M == 1:                                     # int8's word kernel (quantized_linear.gemv_int8_config)
        return [dict(BN=bn, BW=bw, SPLIT_K=sk, num_warps=4, num_stages=3, PREFETCH=pf)
                for bn, bw, sk, pf in itertools.product((32, 64), (64, 128), (1, 2, 4, 8), (False, True))]
    factored = [] if bits == 8 else [dict(BM=16 if M <= 16 else 64, BN=bn, BK=64, SPLIT_K=sk, num_warps=w,
                                          num_stages=3, FACTORED=True)
                                     for bn, sk, w in itertools.product((32, 64, 128), (1, 2, 4, 8), (4, 8))]
    if M <= 16:
        return factored + [dict(BM=16, BN=bn, BK=bk, SPLIT_K=sk, num_warps=w, num_stages=3)
                           for bn, bk, sk, w in itertools.product((32, 64), (128, 256), (1, 2, 4, 8), (4, 8))]
    return factored + [dict(BM=64, BN=bn, BK=bk, SPLIT_K=sk, num_warps=4, num_stages=3)
                       for bn, bk, sk in itertools.product((32, 64), (128, 256), (1, 2, 4))]


def load_against(path: Path):
    """Another version of quantized_linear.py (say `git show <commit>:livevlm_ros/engine/cuda/kernels/
    quantized_linear.py`), imported on its own to be timed beside this one."""
    import importlib.util
    import tempfile
    source = path.read_text().replace("from .triton_lang import tl, triton",
                                      "import triton\nimport triton.language as tl")
    copy = Path(tempfile.mkdtemp()) / "quantized_linear_against.py"
    copy.write_text(source)
    spec = importlib.util.spec_from_file_location("quantized_linear_against", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchao_int4_us(x, w):
    """torchao's int4 product (tinygemm) of the same weight, timed; or why it could not run."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(w)
        quantize_(lin, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d",
                                            set_inductor_config=False))
        return do_bench(lambda: torch.nn.functional.linear(x, lin.weight))
    except Exception as err:                       # noqa: BLE001
        return f"{type(err).__name__}: {err}"[:200]


def bench_shape(name, N, K, M, bits, results, copy_gbs, do_sweep, against=None, small=False, others=True):
    """One row of results: this product's default (checked and timed), and with `others` what it is
    compared with (torchao, the tiles, --against); with do_sweep every setting of sweep()."""
    torch.manual_seed(0)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    row = dict(shape=name, N=N, K=K, M=M, bits=bits)
    if bits == 16:
        row["us"] = do_bench(lambda: torch.nn.functional.linear(x, w))
        row["bytes"] = N * K * 2
    elif bits == 8:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
        lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(w)
        quantize_(lin, Int8WeightOnlyConfig(set_inductor_config=False))
        qw = lin.weight
        ref = x.float() @ (qw.qdata.float() * qw.scale.float().reshape(-1, 1)).t()
        row["bytes"] = N * K + N * 2
        if others:
            row["torchao_us"] = do_bench(lambda: torch.nn.functional.linear(x, qw))
        run = lambda cfg: ql.product(x, qw.qdata, qw.scale.reshape(1, -1), None, 0, None, cfg)  # noqa: E731
    else:
        packed, scale, minimum = ql.pack_int4(w, 128)
        ref = x.float() @ ql.dequantize_int4(packed, scale, minimum, 128).t()
        row["bytes"] = N * K // 2 + 2 * (K // 128) * N * 2
        if others:
            row["torchao_us"] = torchao_int4_us(x, w)
        run = lambda cfg: ql.product(x, packed, scale, minimum, 128, None, cfg)  # noqa: E731
    if bits != 16:
        out = run(None)
        row["max_rel_err"] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        group = 128 if bits == 4 else 0
        row["default"] = (ql.gemv_config(N, K, group) if M == 1 and group else ql.gemv_int8_config(N, K)
                          if M == 1 else ql.config(M, N, K, group) if M <= ql.MAX_ROWS else "dequantized + cuBLAS")
        row["us"] = do_bench(lambda: run(None))
        if M == 1 and others:                      # the tensor-core tiles that one row took before the word kernels
            tiles = ql.config(M, N, K, group)
            row["tiles_us"] = do_bench(lambda: run(tiles))
        if against is not None and others:         # the other version's default, same tensors
            qa = packed if bits == 4 else qw.qdata
            sa, za = (scale, minimum) if bits == 4 else (qw.scale.reshape(1, -1), None)
            out_a = against.product(x, qa, sa, za, group, None)
            row["against_max_rel_err"] = ((out_a.float() - ref).abs().max() / ref.abs().max()).item()
            row["against_us"] = do_bench(lambda: against.product(x, qa, sa, za, group, None))
        if do_sweep:                               # every setting's time, so a rule can be read across shapes
            best, row["tried"] = (row["us"], row["default"]), []
            for cfg in sweep(M, bits, small):
                try:
                    us = do_bench(lambda: run(cfg), rep=8)
                except Exception:                  # noqa: BLE001 - out of shared memory etc.
                    continue
                row["tried"].append((cfg, us))
                if us < best[0]:
                    best = (us, cfg)
            row["best_us"], row["best"] = best
    row["GBs"] = row["bytes"] / row["us"] / 1e3
    row["of_copy"] = row["GBs"] / copy_gbs
    results["rows"].append(row)
    extra = f" torchao {row['torchao_us']:.1f}" if isinstance(row.get("torchao_us"), float) else ""
    best = f" best {row['best_us']:.1f} {row['best']}" if "best" in row else ""
    extra += f" tiles {row['tiles_us']:.1f}" if "tiles_us" in row else ""
    extra += f" against {row['against_us']:.1f}" if "against_us" in row else ""
    err = f" err {row['max_rel_err']:.1e}" if "max_rel_err" in row else ""
    log(f"{name:8s} [{N}x{K}] M={M:5d} {bits:2d}-bit: {row['us']:8.1f} us ({row['GBs']:.0f} GB/s, "
        f"{row['of_copy']:.0%} of copy){extra}{best}{err}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--shapes", default="7b,0.5b")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="row counts, e.g. 1,16")
    ap.add_argument("--names", default="", help="only these Linears, e.g. gate+up,down")
    ap.add_argument("--sweep-bits", default="8,4", help="sweep tile settings for these precisions")
    ap.add_argument("--small-sweep", action="store_true", help="one row: the likeliest third of the settings")
    ap.add_argument("--sweep-names", default="", help="sweep only these Linears, in this order (default: --names)")
    ap.add_argument("--against", type=Path, help="another quantized_linear.py, timed beside (its defaults)")
    args = ap.parse_args()
    against = load_against(args.against) if args.against else None
    args.out.mkdir(parents=True, exist_ok=True)
    from precision_bench import ensure_torchao
    torchao_from = ensure_torchao()
    from gpu_bench import bench_matmul_and_copy, run_header
    tflops, copy_gbs = bench_matmul_and_copy("cuda")
    results = run_header("cuda", torchao=torchao_from, bf16_tflops=tflops, copy_gbs=copy_gbs, rows=[],
                         against=str(args.against) if args.against else None)
    log(json.dumps(results))
    # Every default first, then the sweeps in the order --sweep-names gives them: a call that runs out
    # of time still brings every default and the sweeps that matter most.
    names = [n for n in args.names.split(",") if n]
    sweep_names = [n for n in (args.sweep_names or args.names).split(",") if n]
    passes = [(False, names)] + ([] if args.no_sweep else [(True, sweep_names)])
    for swept, wanted in passes:
        for shape in args.shapes.split(","):
            for name in wanted or SHAPES[shape]:
                if name not in SHAPES[shape] or (swept and shape != "7b"):
                    continue
                N, K = SHAPES[shape][name]
                for M in map(int, args.rows.split(",")):
                    for bits in (16, 8, 4):
                        if swept and (M not in (1, 16, 64) or str(bits) not in args.sweep_bits.split(",")):
                            continue
                        try:
                            # a swept row's comparisons were timed in the first pass, if it had the row
                            bench_shape(f"{shape} {name}", N, K, M, bits, results, copy_gbs, swept, against,
                                        args.small_sweep, others=not (swept and name in names))
                        except Exception as err:   # noqa: BLE001 - keep the other rows
                            log(f"!! {shape} {name} M={M} {bits}: {type(err).__name__}: {err}")
                        torch.cuda.empty_cache()
                results["overall"] = overall(results["rows"])
                (args.out / "linear.json").write_text(json.dumps(results, indent=1, default=str))
    log(f"one-row settings best over every swept shape: {json.dumps(results.get('overall', {}))}")


def overall(rows) -> dict:
    """Per precision, the one-row setting whose time over the best of each swept shape is lowest on
    average (over the shapes where every setting ran): what gemv_config / gemv_int8_config should
    take for every shape (precision_bench --gemv-from measures decode with it)."""
    chosen = {}
    for bits in (4, 8):
        swept = [r for r in rows if r["bits"] == bits and r["M"] == 1 and r.get("tried")]
        ratios: dict[str, list[float]] = {}
        for r in swept:
            for cfg, us in r["tried"]:
                ratios.setdefault(json.dumps(cfg, sort_keys=True), []).append(us / r["best_us"])
        full = {c: sum(v) / len(v) for c, v in ratios.items() if len(v) == len(swept)}
        if full:
            chosen[str(bits)] = json.loads(min(full, key=full.get))
    return chosen


if __name__ == "__main__":
    main()
