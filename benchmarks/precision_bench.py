"""Issue 22: weights bf16 / int8 / int4 x KV bf16 / int8, side by side in one run, memory full.

    python3 benchmarks/precision_bench.py --out results/                 # the GPU machine (~6 min)
    python3 benchmarks/precision_bench.py --tiny --out /tmp/p            # smoke test on a CPU

Random-weight LLaVA-OneVision at 7B and 0.5B shapes (gpu_bench.build_adapter), bf16 activations.
Each row (shape x weights x kv_dtype) in its own process, so that its memory is its own: a freshly
built model (quantization is in place and one way), quantized by the engine's own path
(models/quantize.py), then: resident device memory with 12,288 memory tokens full
(torch's allocator, and the device's used memory, CUDA context included), time to first token and
decode tokens/s (the node's launch mode: CUDA graphs), ingest ms per frame (1-frame clips, real
frames through vision tower and prefill), and a self-check that the graph replay answers the same
tokens as the same steps launched one by one (`static`). A precision the engine refuses is a row
with the reason. Then 7B int4 sized by `gpu_memory_budget_gb` 7.0: the budget_tokens it chose and
the memory it took.

The products alone, per Linear shape: benchmarks/linear_bench.py.

torchao (int8) is not installed on the GPU machine: the wheel lies in .bench/wheels (git-excluded; fetch it
with `pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux_2_28_x86_64 -d .bench/wheels torchao==0.18.0`) and is installed from there
into .bench/site when the import fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def ensure_torchao():
    try:
        import torchao  # noqa: F401
        return "installed"
    except ImportError:
        pass
    wheels = sorted((ROOT / ".bench" / "wheels").glob("torchao-*.whl"))
    if not wheels:
        return "missing: no wheel in .bench/wheels"
    site = ROOT / ".bench" / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(site), str(wheels[-1])], check=True)
    sys.path.insert(0, str(site))
    import torchao  # noqa: F401
    return f"from {wheels[-1].name}"


from gpu_bench import (build_adapter, free, gpu_mem, log, random_frames, reset_peak, run_header, sync,  # noqa: E402
                       time_answer, warm_up_ingest)

from livevlm_ros.engine import EngineConfig, LiveVLMEngine  # noqa: E402
from livevlm_ros.engine.memory.sizing import module_bytes  # noqa: E402
from livevlm_ros.engine.models import ModelLoadError, quantize  # noqa: E402

BUDGET = 12288


def device_used_bytes() -> int:
    if not torch.cuda.is_available():
        return 0
    free_b, total = torch.cuda.mem_get_info()
    return total - free_b


def engine_for(adapter, weights, kv_dtype, budget, launch="auto", **kw):
    cfg = EngineConfig(budget_tokens=budget, sample_fps=0, device=str(adapter.kv.device), weights=weights,
                       kv_dtype=kv_dtype, dtype="bfloat16" if adapter.kv.device.type == "cuda" else "float32",
                       max_new_tokens=16, launch=launch, **kw)
    return LiveVLMEngine(cfg, adapter=adapter)


def quantized_adapter(shape, device, dtype, weights, placed: bool):
    """The adapter at `weights`. placed: built on the CPU (tiled, gpu_bench.build_model) and moved
    through quantize.place, each language-model Linear quantized as it arrives (the engine's load
    path, so the device's memory is what a robot's would be); else built on the device at `dtype`
    and quantized there. Raises ModelLoadError where `weights` cannot run."""
    from gpu_bench import build_model
    from livevlm_ros.engine.models.llava_onevision import LlavaOnevisionAdapter

    if not placed:
        adapter = build_adapter(shape, device, dtype)
    else:
        model, tok = build_model(shape, "cpu", dtype, tiled=True)
        adapter = LlavaOnevisionAdapter(quantize.place(model, device, weights), tok, [0.5] * 3, [0.5] * 3)
    try:
        return adapter, quantize.apply(adapter, weights)
    except ModelLoadError:
        free(adapter)
        raise


def bench_one(shape, device, dtype, weights, kv_dtypes, budget, frames, ingest_frames, firsts_dir: Path,
              placed: bool = False) -> dict:
    """One freshly built model at `weights` (the same random weights for every precision: seed 0);
    a row per kv_dtype. Each row's first logits are kept in `firsts_dir`, where other rows (other
    processes) compare with them: quantized weights with bf16 weights at the same kv_dtype, int8
    KV with bf16 KV at the same weights (random weights: numerics, not answer quality)."""
    rows = {}
    t0 = time.time()
    try:
        adapter, quantized = quantized_adapter(shape, device, dtype, weights, placed)
    except ModelLoadError as err:
        return {kv: {"refused": str(err)} for kv in kv_dtypes}
    sync()
    base = dict(placed=placed, weights_bytes=module_bytes(adapter.model), lm_bytes=module_bytes(adapter._lm),
                linears_quantized=quantized, build_s=round(time.time() - t0, 1),
                allocated_after_load=gpu_mem()[0], device_used_after_load=device_used_bytes(),
                reserved_after_load=torch.cuda.memory_reserved() if torch.cuda.is_available() else 0)
    for kv_dtype in kv_dtypes:
        try:
            engine = engine_for(adapter, weights, kv_dtype, budget)
        except Exception as err:                   # noqa: BLE001 - a refusal is a result
            rows[kv_dtype] = dict(base, refused=f"{type(err).__name__}: {err}")
            continue
        try:
            reset_peak()
            warm = warm_up_ingest(engine, frames)
            sync()
            t = time.perf_counter()
            for i in range(warm, warm + ingest_frames):
                engine.ingest(frames[i % len(frames)], float(i))
            engine.flush()
            sync()
            ingest_ms = (time.perf_counter() - t) / ingest_frames * 1e3
            ttft, total, tps, answer = time_answer(engine, repeats=5, max_new_tokens=32)
            engine.reconfigure(launch="static")                  # self-check: replay == one by one
            static = engine.ask("Where did I last see the red toolbox, and was the door on the left open?",
                                max_new_tokens=8)
            engine.reconfigure(launch="auto")
            replayed = engine.ask("Where did I last see the red toolbox, and was the door on the left open?",
                                  max_new_tokens=8)
            first = engine.ask("Where did I last see the red toolbox?", max_new_tokens=1,
                               return_logits=True).first_logits.float()
            sync()
            allocated, peak = gpu_mem()
            stats = engine.stats()
            rows[kv_dtype] = dict(base, ttft_ms=ttft * 1e3, decode_tok_s=tps, answer_ms=total * 1e3,
                                  ingest_ms_per_frame=ingest_ms, memory_tokens=stats["device_tokens"],
                                  memory_bytes=stats["device_bytes"], allocated_bytes=allocated,
                                  peak_bytes=peak, device_used_bytes=device_used_bytes(),
                                  reserved_bytes=torch.cuda.memory_reserved() if torch.cuda.is_available() else 0,
                                  launch=engine.config.launch,
                                  decode_graph=engine.decode_step is not None and engine.decode_step.graph is not None,
                                  replay_equals_static=static.token_ids == replayed.token_ids)
            torch.save(first.cpu(), firsts_dir / f"{shape}_{weights}_{kv_dtype}.pt")
            if weights != "bf16" and (firsts_dir / f"{shape}_bf16_{kv_dtype}.pt").exists():
                ref = torch.load(firsts_dir / f"{shape}_bf16_{kv_dtype}.pt").to(first.device)
                rows[kv_dtype].update(first_logits_max_rel_diff_vs_bf16_weights=((first - ref).abs().max()
                                                                                  / ref.abs().max()).item(),
                                      same_first_token_as_bf16_weights=bool(first.argmax() == ref.argmax()))
            if kv_dtype != "bf16" and (firsts_dir / f"{shape}_{weights}_bf16.pt").exists():
                ref = torch.load(firsts_dir / f"{shape}_{weights}_bf16.pt").to(first.device)   # what 8-bit KV changes
                rows[kv_dtype].update(first_logits_max_rel_diff_vs_kv_bf16=((first - ref).abs().max()
                                                                            / ref.abs().max()).item(),
                                      same_first_token_as_kv_bf16=bool(first.argmax() == ref.argmax()))
            log(f"{shape} weights={weights} kv={kv_dtype}: ttft {ttft * 1e3:.1f} ms, decode {tps:.0f} tok/s, ingest "
                f"{ingest_ms:.1f} ms/frame, allocated {allocated / 1e9:.2f} GB (peak {peak / 1e9:.2f}), device used "
                f"{device_used_bytes() / 1e9:.2f} GB (torch reserved {rows[kv_dtype]['reserved_bytes'] / 1e9:.2f}), "
                f"replay==static {static.token_ids == replayed.token_ids}")
        except Exception as err:                   # noqa: BLE001 - keep the other rows
            rows[kv_dtype] = dict(base, error=f"{type(err).__name__}: {err}"[:400])
            log(f"!! {shape} {weights} {kv_dtype}: {traceback.format_exc()}")
        finally:
            free(engine)
    free(adapter)
    return rows


def bench_sized(shape, device, dtype, weights, budget_gb, frames, placed: bool = False, kv_dtype="bf16") -> dict:
    """`gpu_memory_budget_gb`: what budget_tokens the engine chose, and what it then took, full."""
    adapter, _ = quantized_adapter(shape, device, dtype, weights, placed)
    cfg = EngineConfig(gpu_memory_budget_gb=budget_gb, budget_tokens=None, sample_fps=0, device=str(adapter.kv.device),
                       dtype="bfloat16" if device == "cuda" else "float32", weights=weights, max_new_tokens=16,
                       kv_dtype=kv_dtype)
    try:
        engine = LiveVLMEngine(cfg, adapter=adapter)
    except Exception as err:                       # noqa: BLE001
        free(adapter)
        return {"refused": f"{type(err).__name__}: {err}"}
    reset_peak()
    warm_up_ingest(engine, frames)
    time_answer(engine, repeats=2, max_new_tokens=16)
    sync()
    allocated, peak = gpu_mem()
    out = dict(engine.sizing.report(), placed=placed, kv_dtype=kv_dtype, allocated_bytes=allocated, peak_bytes=peak,
               reserved_bytes=torch.cuda.memory_reserved() if torch.cuda.is_available() else 0,
               device_used_bytes=device_used_bytes(), memory_tokens=engine.stats()["device_tokens"])
    log(f"{shape} {weights} sized by {budget_gb} GB: budget_tokens {engine.config.budget_tokens}; allocated "
        f"{allocated / 1e9:.2f} GB, peak {peak / 1e9:.2f} GB, torch reserved {out['reserved_bytes'] / 1e9:.2f} GB, "
        f"device used {out['device_used_bytes'] / 1e9:.2f} GB; {out['memory_sizing']}")
    free(engine, adapter)
    return out


def bench_load(shape, device, dtype, weights, placed: bool) -> dict:
    """What loading takes on the device (quantized_adapter: placed from the CPU, or built on the device)."""
    reset_peak()
    t = time.time()
    adapter, _ = quantized_adapter(shape, device, dtype, weights, placed)
    sync()
    allocated, peak = gpu_mem()
    out = dict(placed=placed, seconds=round(time.time() - t, 1), load_peak_bytes=peak, allocated_bytes=allocated,
               device_used_bytes=device_used_bytes(), reserved_bytes=torch.cuda.memory_reserved())
    log(f"{shape} {weights} {'placed from the CPU' if placed else 'built on the device'}: peak "
        f"{peak / 1e9:.2f} GB while loading, then allocated {allocated / 1e9:.2f} GB, device used "
        f"{out['device_used_bytes'] / 1e9:.2f} GB (torch reserved {out['reserved_bytes'] / 1e9:.2f}), "
        f"{out['seconds']} s")
    free(adapter)
    return out


def use_gemv_settings(path: Path):
    """One-row settings that a linear_bench sweep chose, for every shape, in place of the defaults:
    decode measured with them in the call that chose them, before they become the defaults."""
    from livevlm_ros.engine.cuda.kernels import quantized_linear as ql
    overall = json.loads(path.read_text())["overall"]
    int4, int8 = overall.get("4"), overall.get("8")
    if int4:
        ql.gemv_config = lambda N, K, group: dict(int4)
    if int8:
        ql.gemv_int8_config = lambda N, K: dict(int8)
    log(f"one-row settings from {path}: int4 {int4}, int8 {int8}")


def table(results) -> str:
    lines = ["shape weights kv | resident GB (device used) | TTFT ms | decode tok/s (x bf16) | ingest ms/frame"]
    for shape, by_w in results["rows"].items():
        ref = by_w.get("bf16", {}).get("bf16", {}).get("decode_tok_s")
        for w, by_kv in by_w.items():
            for kv, r in by_kv.items():
                if "ttft_ms" not in r:
                    lines.append(f"{shape} {w} {kv} | {r.get('refused') or r.get('error')}")
                    continue
                x = f" ({r['decode_tok_s'] / ref:.2f}x)" if ref else ""
                lines.append(f"{shape} {w} {kv} | {r['peak_bytes'] / 1e9:.2f} ({r['device_used_bytes'] / 1e9:.2f}) | "
                             f"{r['ttft_ms']:.1f} | {r['decode_tok_s']:.0f}{x} | {r['ingest_ms_per_frame']:.1f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    ap.add_argument("--shapes", default="7b,0.5b")
    ap.add_argument("--weights", default="bf16,int8,int4")
    ap.add_argument("--kv", default="bf16,int8")
    ap.add_argument("--sized-gb", type=float, default=7.0, help="7B int4 sized by this gpu_memory_budget_gb")
    ap.add_argument("--row", default="", help="shape:weights:kv_dtype: one row only (what each child process runs)")
    ap.add_argument("--sized-only", action="store_true", help="only the gpu_memory_budget_gb run")
    ap.add_argument("--no-sized", action="store_true", help="skip the gpu_memory_budget_gb run")
    ap.add_argument("--load", action="store_true", help="only what loading takes: placed from the CPU or not")
    ap.add_argument("--load-row", default="", help="shape:weights:placed|device: one load (a child process)")
    ap.add_argument("--placed", action="store_true", help="each row's model built on the CPU and placed through "
                    "quantize.place, as the engine loads one (else built on the device and quantized there)")
    ap.add_argument("--gemv-from", type=Path, help="a linear_bench linear.json: its one-row settings chosen over "
                    "every shape ('overall') replace gemv_config / gemv_int8_config in every row")
    args = ap.parse_args()
    if args.gemv_from:
        use_gemv_settings(args.gemv_from)
    args.out.mkdir(parents=True, exist_ok=True)
    torchao_from = ensure_torchao()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    results = run_header(device, torchao=torchao_from, rows={})
    if not (args.row or args.sized_only or args.load_row):
        log(json.dumps(results))
    frames = random_frames(16)
    firsts_dir = args.out / "first_logits"
    firsts_dir.mkdir(exist_ok=True)
    kvs = args.kv.split(",")
    if args.row:                                   # one row, in this (child) process
        shape, weights, kv = args.row.split(":")
        budget = BUDGET if shape != "tiny" else 34 + 2 * 16 + 256
        rows = bench_one(shape, device, dtype, weights, [kv], budget, frames, 8 if args.tiny else 32, firsts_dir,
                         args.placed)
        (args.out / f"row_{shape}_{weights}_{kv}.json").write_text(json.dumps(rows[kv], default=str))
        return
    if args.load_row:
        shape, weights, how = args.load_row.split(":")
        row = bench_load(shape, device, dtype, weights, how == "placed")
        (args.out / f"load_{shape}_{weights}_{how}.json").write_text(json.dumps(row))
        return
    if args.load:
        results["load"] = {}
        for shape in shapes:
            for weights in args.weights.split(","):
                for how in ("device", "placed"):
                    child = [sys.executable, __file__, "--out", str(args.out), "--load-row", f"{shape}:{weights}:{how}"]
                    subprocess.run(child + (["--tiny"] if args.tiny else []), check=False)
                    part = args.out / f"load_{shape}_{weights}_{how}.json"
                    results["load"][f"{shape}:{weights}:{how}"] = json.loads(part.read_text()) if part.exists() else {}
        (args.out / "load.json").write_text(json.dumps(results, indent=1, default=str))
        return
    if args.sized_only:
        results["sized_7b_int4"] = bench_sized("7b", device, dtype, "int4", args.sized_gb, frames, args.placed,
                                               kvs[0])
        (args.out / "sized.json").write_text(json.dumps(results["sized_7b_int4"], default=str))
        return
    for shape in shapes:
        results["rows"][shape] = {}
        for weights in args.weights.split(","):
            results["rows"][shape][weights] = {}
            for kv in kvs:                         # each row in a fresh process: its memory is its own
                child = [sys.executable, __file__, "--out", str(args.out), "--row", f"{shape}:{weights}:{kv}"]
                child += ["--gemv-from", str(args.gemv_from)] if args.gemv_from else []
                child += ["--placed"] if args.placed else []
                subprocess.run(child + (["--tiny"] if args.tiny else []), check=False)
                part = args.out / f"row_{shape}_{weights}_{kv}.json"
                results["rows"][shape][weights][kv] = (json.loads(part.read_text()) if part.exists()
                                                       else {"error": "the row's process wrote no result"})
                (args.out / "precision.json").write_text(json.dumps(results, indent=1, default=str))
    if not args.tiny and not args.no_sized:
        subprocess.run([sys.executable, __file__, "--out", str(args.out), "--sized-only",
                        "--sized-gb", str(args.sized_gb), "--kv", kvs[0]] + (["--placed"] if args.placed else []),
                       check=False)
        part = args.out / "sized.json"
        results["sized_7b_int4"] = json.loads(part.read_text()) if part.exists() else {"error": "no result"}
    else:
        results["sized_tiny_int8"] = bench_sized("tiny", device, dtype, "int8", 0.01, frames)
    (args.out / "precision.json").write_text(json.dumps(results, indent=1, default=str))
    log(table(results))


if __name__ == "__main__":
    main()
