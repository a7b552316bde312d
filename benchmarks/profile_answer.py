"""Where an answer's GPU time goes (issue 13): the question's prefill and the decode step, per
decode path (eager, static, graph), as wall time against the GPU's kernel time, with the kernels
that take it. Memory is LiveVLM's, full (simulated fill, as in gpu_bench.py).

    python3 benchmarks/profile_answer.py --shape 7b --frames 1024 --out results/profile_7b.txt
    python3 benchmarks/profile_answer.py --weights int4 --kv int8 --modes graph --out results/profile_int4.txt

--ingest profiles a clip's way into memory instead (real frames, memory full), per launch mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import gpu_bench as gb
from livevlm_ros.engine.models import quantize


def kernels(fn, rows=12):
    """(total kernel seconds, number of kernels, table of the `rows` top kernels and of the host
    calls that took the most time) of one call of fn."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        gb.sync()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    averages = prof.key_averages()
    table = (averages.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70)
             + averages.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=70))
    return sum(e.device_time for e in events) * 1e-6, len(events), table


def wall(fn, repeats=7):
    times = []
    for _ in range(repeats):
        gb.sync()
        t0 = time.perf_counter()
        fn()
        gb.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--frames", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=17)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ingest", action="store_true", help="profile ingest (1- and 8-frame clips) instead")
    ap.add_argument("--weights", default="bf16", help="bf16 | int8 | int4: the language model's weights")
    ap.add_argument("--kv", default="bf16", help="bf16 | int8: memory's KV")
    ap.add_argument("--modes", default="eager,static,graph", help="decode paths to profile")
    ap.add_argument("--rows", type=int, default=12, help="kernels listed per table")
    args = ap.parse_args()
    adapter = gb.build_adapter(args.shape, "cuda", torch.bfloat16)
    quantize.apply(adapter, args.weights)
    if args.ingest:
        return profile_ingest(adapter, args.out)
    engine = gb.make_engine(adapter, "livevlm", 12288, launch="eager", weights=args.weights, kv_dtype=args.kv)
    gb.simulate_fill(engine, args.frames)
    engine.model.stop_token_ids = ()              # random weights: every answer runs to its length
    report, rows, runs = [], {}, tuple(args.modes.split(","))
    # wall times first, for every path: once the profiler has run, launches stay slower in this process
    for mode in runs:
        engine.reconfigure(launch=mode)
        for _ in range(2):
            engine.ask(gb.QUESTION, max_new_tokens=args.tokens)
        prefill_wall = wall(lambda: engine.ask(gb.QUESTION, max_new_tokens=1))
        answer_wall = wall(lambda: engine.ask(gb.QUESTION, max_new_tokens=args.tokens))
        rows[mode] = dict(prefill_wall_ms=prefill_wall * 1e3,
                          step_wall_ms=(answer_wall - prefill_wall) / (args.tokens - 1) * 1e3)
    for mode in runs:
        engine.reconfigure(launch=mode)
        prefill_k, prefill_n, prefill_table = kernels(lambda: engine.ask(gb.QUESTION, max_new_tokens=1), args.rows)
        answer_k, answer_n, answer_table = kernels(lambda: engine.ask(gb.QUESTION, max_new_tokens=args.tokens),
                                                   args.rows)
        steps = args.tokens - 1
        row = rows[mode]
        row.update(prefill_kernel_ms=prefill_k * 1e3, prefill_kernels=prefill_n,
                   step_kernel_ms=(answer_k - prefill_k) / steps * 1e3, step_kernels=(answer_n - prefill_n) / steps)
        report += [f"==== {mode}: " + json.dumps({k: round(v, 2) for k, v in row.items()}),
                   "-- question prefill (answer of 1 token)", prefill_table,
                   f"-- answer of {args.tokens} tokens", answer_table]
        print(report[-4], flush=True)
    args.out.write_text("\n".join(report))
    summary = dict(shape=args.shape, frames=args.frames, weights=args.weights, kv=args.kv,
                   gpu=torch.cuda.get_device_name(), rows=rows)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))


def profile_ingest(adapter, out: Path, frames: int = 48):
    """Per clip size and launch mode: wall time per frame once memory is full, then the GPU's
    kernel time per frame and the kernels that take it."""
    video = gb.random_frames(frames)
    engines, rows, report = {}, {}, []
    for clip in (1, 8):
        for mode in ("eager", "graph"):
            engine = gb.make_engine(adapter, "livevlm", 12288, frames_per_clip=clip, launch=mode)
            t = gb.warm_up_ingest(engine, video)              # memory full, and the clip's graph recorded
            gb.sync()

            def clips(n_frames, engine=engine, start=[t]):      # noqa: B006 - a counter shared by the calls
                for _ in range(n_frames):
                    engine.ingest(video[start[0] % frames], float(start[0]))
                    start[0] += 1
            rows[(clip, mode)] = dict(clip=clip, launch=mode, wall_ms_per_frame=wall(lambda: clips(8), 5) / 8 * 1e3)
            engines[(clip, mode)] = (engine, clips)
            print(json.dumps(rows[(clip, mode)]), flush=True)
    for key, (engine, clips) in engines.items():        # the profiler last: launches stay slower after it
        k, n, table = kernels(lambda: clips(8))
        rows[key].update(kernel_ms_per_frame=k / 8 * 1e3, kernels_per_frame=n / 8)
        report += [f"==== clip {key[0]}, {key[1]}: " + json.dumps({a: round(b, 2) if isinstance(b, float) else b
                                                                   for a, b in rows[key].items()}), table]
        print(report[-2], flush=True)
    out.write_text("\n".join(report))
    out.with_suffix(".json").write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), rows=list(rows.values())),
                                                   indent=1))


if __name__ == "__main__":
    main()
