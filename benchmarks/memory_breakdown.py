"""Where a running engine's device memory goes (issue 22: 7B int4, a 12,288-token memory, <= 7 GB).

One engine as a robot would run it: the model placed from the CPU (quantize.place), memory filled
with frames, a question answered. torch's allocator records every allocation's Python stack from
the start, and the snapshot taken at the end is summed by where in livevlm_ros each block still
held was allocated, and by where each segment holding free (cached) bytes was created. Beside it,
after each stage, what torch has allocated and reserved and what the device reports used; the
difference from reserved is outside torch (CUDA context, loaded kernels), measured first on its own.

    python benchmarks/memory_breakdown.py [--shape 7b] [--weights int4] [--kv int8] --out DIR

CUDA only. Writes DIR/memory_breakdown.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from precision_bench import BUDGET, device_used_bytes, engine_for, ensure_torchao, quantized_adapter  # noqa: E402
from gpu_bench import log, random_frames, run_header, time_answer, warm_up_ingest  # noqa: E402

PACKAGE = "livevlm_ros/"


def where(frames: list[dict]) -> str:
    """The innermost frame in livevlm_ros (file:line function), else the innermost Python frame."""
    python = [f for f in frames if f.get("filename", "").endswith(".py")]
    ours = [f for f in python if PACKAGE in f["filename"]]
    f = (ours or python or [{"filename": "?", "line": 0, "name": "?"}])[0]
    name = f["filename"].split(PACKAGE)[-1] if PACKAGE in f["filename"] else f["filename"].split("/")[-1]
    return f"{name}:{f['line']} {f['name']}"


def summarize(snapshot: dict, top: int = 25) -> dict:
    """Bytes of blocks in use by where they were allocated; free bytes inside segments by where the
    segment was created; each by pool (graph pools are not the default (0, 0))."""
    held, cached, pools = defaultdict(int), defaultdict(int), defaultdict(lambda: [0, 0])
    for seg in snapshot["segments"]:
        pool = str(tuple(seg.get("segment_pool_id", (0, 0))))
        pools[pool][0] += seg["total_size"]
        for block in seg["blocks"]:
            if block["state"] == "active_allocated":
                held[where(block.get("frames", []))] += block["size"]
                pools[pool][1] += block["size"]
            elif block["state"] == "inactive":
                cached[where(seg.get("frames", []))] += block["size"]

    def ranked(d):
        return [(k, v) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]
    return dict(held=ranked(held), held_total=sum(held.values()), cached=ranked(cached),
                cached_total=sum(cached.values()), pools={k: dict(reserved=v[0], held=v[1]) for k, v in pools.items()})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--weights", default="int4")
    ap.add_argument("--kv", default="int8")
    ap.add_argument("--out", type=Path, default=Path("results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("memory_breakdown.py measures CUDA memory: no CUDA device here")
    args.out.mkdir(parents=True, exist_ok=True)
    results = run_header("cuda", torchao=ensure_torchao(), shape=args.shape, weights=args.weights, kv=args.kv,
                         budget_tokens=BUDGET, stages={})

    def stage(name):
        torch.cuda.synchronize()
        row = dict(allocated=torch.cuda.memory_allocated(), reserved=torch.cuda.memory_reserved(),
                   peak=torch.cuda.max_memory_allocated(), device_used=device_used_bytes())
        results["stages"][name] = row
        log(f"{name}: allocated {row['allocated'] / 1e9:.3f} GB (peak {row['peak'] / 1e9:.3f}), reserved "
            f"{row['reserved'] / 1e9:.3f}, device used {row['device_used'] / 1e9:.3f}")

    torch.zeros(1, device="cuda")
    stage("CUDA context only")
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=1_000_000)
    adapter, _ = quantized_adapter(args.shape, "cuda", torch.bfloat16, args.weights, placed=True)
    stage("model placed")
    engine = engine_for(adapter, args.weights, args.kv, BUDGET)
    stage("engine built")
    frames = random_frames(16)
    warm_up_ingest(engine, frames)
    stage("memory full")
    time_answer(engine, repeats=2, max_new_tokens=16)
    stage("answered")
    results["memory_tokens"] = engine.stats()["device_tokens"]
    results["snapshot"] = summarize(torch.cuda.memory._snapshot())
    torch.cuda.memory._record_memory_history(enabled=None)
    torch.cuda.empty_cache()
    stage("after empty_cache")
    (args.out / "memory_breakdown.json").write_text(json.dumps(results, indent=1, default=str))
    s = results["snapshot"]
    lines = [f"held {s['held_total'] / 1e9:.3f} GB, by where allocated:"]
    lines += [f"  {b / 1e6:9.1f} MB  {k}" for k, b in s["held"]]
    lines += [f"cached (free in segments) {s['cached_total'] / 1e9:.3f} GB, by where the segment was made:"]
    lines += [f"  {b / 1e6:9.1f} MB  {k}" for k, b in s["cached"]]
    lines += [f"pool {k}: reserved {v['reserved'] / 1e6:.1f} MB, held {v['held'] / 1e6:.1f} MB"
              for k, v in s["pools"].items()]
    log("\n".join(lines))


if __name__ == "__main__":
    main()
