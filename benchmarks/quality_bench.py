"""Answer quality of the demo model under bounded memory, on held-out synthetic robot streams (CPU).

    source env.sh && python benchmarks/quality_bench.py [--model models/livevlm-demo] [--frames 48,120]
        [--budget-share 0.25] [--seeds 12] [--seed-start 0]
        [--policies full,sliding_window,rekv,livevlm,livevlm_read_all] [--out results.json]
    python benchmarks/quality_bench.py --table a.json [b.json ...]       # tables of saved runs, together

A policy may carry engine options: `livevlm:page_scoring=softmax_mean:saliency_share=0.25`, and
`budget_scale=X` (its budget X times the others': `livevlm:kv_dtype=int8:budget_scale=1.78` is 8-bit
memory in the bytes bf16 memory of the others' budget takes, at the demo model's head_dim 32).
`--weights int8|int4` quantizes the language model (models/quantize.py; int4 dequantizes per product on a CPU).

Each stream is a synthetic episode (`livevlm_ros/tools/synthetic_world.py`, seeds 0..N-1; training
used seeds >= 1,000,000) rendered at 320x240 and fed to the engine at 2 frames per second, as the
node would. Then, from the same memory, the engine is asked about every object ("Where did I last see
the X?", "Did you see the X?"), the present ("What is on the left?", the door, the room) and
narrates the last two frames. LiveVLM and sliding window get the same memory budget (a share of
what full cache holds at the end of the stream), ReKV-style reads as many tokens from its offloaded
uncompressed history, full cache keeps everything. `livevlm` answers from the 40% of its pages that
retrieval ranks highest for the question (the engine's default); `livevlm_read_all` from all of them.
An answer is right if it equals the ground truth (case, spaces and the final full stop aside).
"Where" and "seen" answers are binned by how many frames ago the object was last visible (2 frames =
short-term memory; sliding window at 25% of 120 frames keeps ~28).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from livevlm_ros.engine import EngineConfig, LiveVLMEngine  # noqa: E402
from livevlm_ros.engine.models import load_adapter  # noqa: E402
from livevlm_ros.tools import synthetic_world as world  # noqa: E402

FPS = 2.0
AGE_BINS = [(0, 1, "0-1 (short-term)"), (2, 15, "2-15"), (16, 47, "16-47"), (48, 10**9, "48+")]


def age_bin(age: int) -> str:
    return next(name for lo, hi, name in AGE_BINS if lo <= age <= hi)


def engine_for(adapter, spec: str, budget: int, stream_tokens: int) -> LiveVLMEngine:
    policy, *options = spec.split(":")
    kw = dict(policy=policy, sample_fps=0, max_new_tokens=32, short_term_frames=2, vision_sinks=8, page_tokens=9,
              budget_tokens=None, weights=getattr(adapter, "weights", "bf16"))
    if policy == "livevlm_read_all":      # same memory as livevlm; an answer reads every page, not the top 40%
        policy = kw["policy"] = "livevlm"
        kw["retrieval_ratio"] = 1.0
    if policy in ("livevlm", "sliding_window"):
        kw["budget_tokens"] = budget
    if policy == "rekv":
        kw["retrieval_ratio"] = min(1.0, budget / stream_tokens)
    for option in options:
        key, value = option.split("=")
        if key == "budget_scale":         # e.g. kv_dtype=int8 holding more tokens in the same bytes
            kw["budget_tokens"] = int(kw["budget_tokens"] * float(value))
            continue
        kw[key] = type(getattr(EngineConfig, key))(value)
    return LiveVLMEngine(EngineConfig(model_path="(shared)", **kw), adapter=adapter)


def run_stream(adapter, policy, budget, n_frames, seed) -> list[dict]:
    episode = world.Episode.generate(seed, n_frames / FPS + 1)
    engine = engine_for(adapter, policy, budget, n_frames * adapter.tokens_per_frame)
    rows = []
    try:
        states = []
        for k in range(n_frames):
            t = k / FPS
            engine.ingest(episode.render(t, 320, 240), t)
            states.append(episode.state(t))
        rng = np.random.default_rng(seed)                     # picks the phrasing of door/room questions
        qas = []
        for name in world.OBJECTS:
            seen = world.last_seen(states, name)
            age = None if seen is None else n_frames - 1 - seen[0]
            qas += [world.QA(kind, q, world.ground_truth(states, q), age)
                    for kind in ("where", "seen") for q in [world.PHRASINGS[kind][0].format(name)]]
        qas += [qa for qa in world.questions(states, rng) if qa.kind in ("door", "room")]
        qas += [world.QA("spot", q, world.ground_truth(states, q))
                for q in (world.PHRASINGS["spot"][0].format(world.place(s)) for s in world.SPOTS)]
        for qa in qas:
            answer = engine.ask(qa.question)
            rows.append(dict(kind=qa.kind, question=qa.question, truth=qa.answer, answer=answer.text, age=qa.age,
                             correct=world.answer_correct(qa, answer.text), context_tokens=answer.context_tokens))
        truth = world.narration(states[-2], states[-1])
        text = engine.describe().text
        rows.append(dict(kind="narration", question="(describe)", truth=truth, answer=text, age=None,
                         correct=world.answer_correct(world.QA("narration", "", truth), text), context_tokens=None))
        memory = engine.stats()["device_tokens"]
    finally:
        engine.close()
    for r in rows:
        r.update(policy=policy, frames=n_frames, seed=seed, memory_tokens=memory)
    return rows


def summarise(rows, policies, lengths) -> str:
    """Two tables: the present (last frames) and recall (objects by how long ago they were last seen).
    "Did you see the X?" is split by the true answer: a model that always says yes (or no) scores
    well on one half only."""
    def acc(sel):
        return f"{sum(r['correct'] for r in sel)}/{len(sel)}" if sel else "-"

    def room_right(sel):        # "The X was in the <room>, <spot>.": the room part alone
        room = lambda text: text.split(" in the ")[1].split(",")[0] if " in the " in text else None  # noqa: E731
        return f"{sum(room(r['answer']) == room(r['truth']) for r in sel)}/{len(sel)}" if sel else "-"

    def by_age(sel, name):
        return [r for r in sel if r["age"] is not None and age_bin(r["age"]) == name]

    bins = " / ".join(n for _, _, n in AGE_BINS)
    present = ["| policy | frames | memory tokens | room | door | what is where: occupied spot | empty spot | "
               "narration (exact) |", "|---|---|---|---|---|---|---|---|"]
    recall = [f"| policy | frames | saw it? yes: seen {bins} frames ago | saw it? no: never seen | "
              f"where? seen {bins} frames ago | where? room right (seen) | where? never seen |",
              "|---|---|---|---|---|---|---|"]
    for n in lengths:
        for p in policies:
            sel = [r for r in rows if r["policy"] == p and r["frames"] == n]
            kind = lambda k: [r for r in sel if r["kind"] == k]  # noqa: E731
            spot = kind("spot")
            empty = [r for r in spot if r["truth"].endswith("nothing.")]
            occupied = [r for r in spot if r not in empty]
            present.append(f"| {p} | {n} | {round(np.mean([r['memory_tokens'] for r in sel]))} | {acc(kind('room'))} | "
                           f"{acc(kind('door'))} | {acc(occupied)} | {acc(empty)} | {acc(kind('narration'))} |")
            seen, where = kind("seen"), kind("where")
            recall.append(f"| {p} | {n} | " + " / ".join(acc(by_age(seen, name)) for _, _, name in AGE_BINS) +
                          f" | {acc([r for r in seen if r['age'] is None])} | " +
                          " / ".join(acc(by_age(where, name)) for _, _, name in AGE_BINS) +
                          f" | {room_right([r for r in where if r['age'] is not None])}"
                          f" | {acc([r for r in where if r['age'] is None])} |")
    return "\n".join(present) + "\n\n" + "\n".join(recall)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "models" / "livevlm-demo"))
    ap.add_argument("--frames", default="48,120")
    ap.add_argument("--budget-share", type=float, default=0.25)
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--seed-start", type=int, default=0, help="held-out seeds start..start+seeds-1 (< 1,000,000)")
    ap.add_argument("--policies", default="full,sliding_window,rekv,livevlm,livevlm_read_all")
    ap.add_argument("--weights", default="bf16", help="the language model's weights: bf16 (float32 here) | int8 "
                    "| int4; a policy may add :kv_dtype=int8")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--label", default="", help="prefix for the policy names in tables (e.g. the code version)")
    ap.add_argument("--table", type=Path, nargs="+", default=None, help="only print the tables of saved results")
    args = ap.parse_args()
    if args.table:
        rows = [r for path in args.table for r in json.loads(path.read_text())["rows"]]
        print(summarise(rows, list(dict.fromkeys(r["policy"] for r in rows)), sorted({r["frames"] for r in rows})))
        return
    adapter = load_adapter(args.model, "cpu", "float32", weights=args.weights)
    prefix = len(adapter.tokenize(EngineConfig().system_prompt))
    lengths, policies = [int(n) for n in args.frames.split(",")], args.policies.split(",")
    t0, rows, budgets = time.time(), [], {}
    for n in lengths:
        budgets[n] = int(args.budget_share * (prefix + n * adapter.tokens_per_frame))
        for seed in range(args.seed_start, args.seed_start + args.seeds):
            for policy in policies:
                rows += run_stream(adapter, policy, budgets[n], n, seed)
            print(f"[{time.time() - t0:5.0f}s] frames={n} seed={seed} done", flush=True)
    if args.label:
        for r in rows:
            r["policy"] = f"{args.label} {r['policy']}"
        policies = [f"{args.label} {p}" for p in policies]
    table = summarise(rows, policies, lengths)
    print(f"\nbudget (LiveVLM, sliding window; ReKV reads as many): {budgets}\n{table}")
    if args.out:
        args.out.write_text(json.dumps(dict(
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device="cpu", model=args.model,
            command=" ".join(sys.argv), seeds=list(range(args.seed_start, args.seed_start + args.seeds)), budgets=budgets, wall_s=round(time.time() - t0),
            table=table, rows=rows), indent=1))


if __name__ == "__main__":
    main()
