"""How close the answers the tests check are to a tie (CPU): the figures behind test/logit_spy.py and
the toolbox check of test/test_behaviour_tree.py. A greedy token whose top-two logit margin is below
the numeric difference between two machines (or two code paths) is a coin flip, not a result.

    source env.sh && python benchmarks/answer_margins.py [--out results.json] [--lost 12]

1. demo: the demo node's answer to "Where did I last see the red toolbox?" after the demo bag
   (demo config, shipped demo model, frames at 2 per second of bag time, poses), and its logit for
   " right" minus " left" at the token that decides it; then again with 3 random bag frames lost,
   `--lost` times (a lost frame moves every later sample by 0.1 s).
2. int8 arena: the tiny model of test_engine_decode_step (stop tokens zeroed) answering with
   kv_dtype int8, eager (float32 buffers) against static (the 8-bit arena): the largest logit
   difference at any step, the smallest top-two margin of the eager path, and whether tokens agree.
3. the same for the tiny Qwen2.5-VL and Qwen3-VL models of test_weights_quantized (int8, int4 weights),
   asked its question.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "test"))

from livevlm_ros.engine import EngineConfig, LiveVLMEngine  # noqa: E402
from logit_spy import spy_on_logits  # noqa: E402

QUESTION = "Where did I last see the red toolbox?"


def margin(row: torch.Tensor) -> float:
    top = row.topk(2).values
    return float(top[0] - top[1])


def demo(lost_runs: int) -> dict:
    from livevlm_ros.tools.make_demo_bag import DEMO_SEED
    from livevlm_ros.tools.synthetic_world import Episode

    p = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())["/**"]["ros__parameters"]
    options = {k: v for k, v in p.items() if k in EngineConfig.__dataclass_fields__}
    engine = LiveVLMEngine(EngineConfig(**{**options, "model_path": str(REPO / "models" / "livevlm-demo")}))
    rows = spy_on_logits(engine)
    tok = engine.model.tokenizer
    right, left = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" right", " left"))
    episode, rendered = Episode.generate(DEMO_SEED, 60.0), {}
    bag = [round(i / 10, 1) for i in range(600)]          # the demo bag: 10 frames per second

    def answer(times):
        engine.reset()
        for t in times:
            if t not in rendered:
                rendered[t] = episode.render(t, 320, 240)
            engine.ingest(rendered[t], 1_700_000_000.0 + t, camera="/camera/image_raw", pose=episode.pose(t))
        rows.clear()
        a = engine.ask(QUESTION, evidence=3)
        at = next(i for i, t in enumerate(a.token_ids) if t in (right, left))
        return {"answer": a.text, "right_minus_left": float(rows[at][right] - rows[at][left])}

    runs = [{"lost": [], **answer(bag)}]
    rng = random.Random(0)
    for _ in range(lost_runs):
        lost = sorted(rng.sample(bag, 3))
        runs.append({"lost": lost, **answer([t for t in bag if t not in lost])})
        print(runs[-1], flush=True)
    return {"runs": runs, "right_minus_left": [min(r["right_minus_left"] for r in runs),
                                               max(r["right_minus_left"] for r in runs)]}


def eager_against_static(make_engine, feed, questions, max_new_tokens) -> dict:
    """Both launches of one model and memory; per answer the worst step."""
    engines = {launch: make_engine(launch) for launch in ("eager", "static")}
    logged = {launch: spy_on_logits(e) for launch, e in engines.items()}
    feed(engines.values())
    out = []
    for question, window in questions:
        for rows in logged.values():
            rows.clear()
        a, b = (e.ask(question, window=window, max_new_tokens=max_new_tokens, evidence=3)
                for e in engines.values())
        steps = list(zip(logged["eager"], logged["static"]))
        out.append({"question": question, "window": window, "same_tokens": a.token_ids == b.token_ids,
                    "max_logit_difference": max(float((x - y).abs().max()) for x, y in steps),
                    "min_eager_margin": min(margin(x) for x, _ in steps),
                    "logit_scale": float(steps[0][0].abs().max())})
    return {"answers": out, "max_logit_difference": max(o["max_logit_difference"] for o in out),
            "min_eager_margin": min(o["min_eager_margin"] for o in out)}


def tiny_llava(tmp: Path) -> dict:
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    from livevlm_ros.tools.make_tiny_model import build

    path = build(tmp / "endless", seed=0)                  # as test/conftest.py's endless_model
    model, tok = LlavaOnevisionForConditionalGeneration.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        for t in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}:
            model.lm_head.weight[t] = 0.0
    model.save_pretrained(path)
    rng = np.random.default_rng(1234)
    video = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(16)]

    def make(launch):
        return LiveVLMEngine(EngineConfig(model_path=str(path), sample_fps=0, launch=launch, policy="livevlm",
                                          budget_tokens=34 + 2 * 16 + 64, page_tokens=4, retrieval_ratio=0.5,
                                          kv_dtype="int8"))

    def feed(engines):
        for e in engines:
            for i, f in enumerate(video):
                e.ingest(f, float(i))
    questions = [(q, w) for q in (QUESTION, "Is the door open?", "What is on the left?") for w in (None, (2.0, 9.0))]
    return eager_against_static(make, feed, questions, 24)


def tiny_qwen(tmp: Path) -> dict:
    from livevlm_ros.tools.make_tiny_qwen import build

    out = {}
    for family in ("qwen2_5_vl", "qwen3_vl"):
        path = str(build(family, tmp / family, seed=3, layers=2))
        for weights in ("int8", "int4"):
            rng = np.random.default_rng(5)
            video = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(10)]

            def make(launch):
                return LiveVLMEngine(EngineConfig(model_path=path, weights=weights, kv_dtype="int8", launch=launch,
                                                  sample_fps=2.0, frame_pixels=112 * 112, short_term_frames=2,
                                                  budget_tokens=200, vision_sinks=4, page_tokens=4))

            def feed(engines):
                for e in engines:
                    for i, f in enumerate(video):
                        e.ingest(f, i / 2.0)
            out[f"{family}_{weights}"] = eager_against_static(make, feed, [("Is the door on the left open?", None)], 4)
            print(family, weights, {k: v for k, v in out[f"{family}_{weights}"].items() if k != "answers"}, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--lost", type=int, default=12, help="demo runs with 3 random bag frames lost")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "demo": demo(args.lost)}
        print("demo", result["demo"]["right_minus_left"], flush=True)
        result["tiny_llava_int8_arena"] = tiny_llava(Path(tmp))
        print("tiny llava", {k: v for k, v in result["tiny_llava_int8_arena"].items() if k != "answers"}, flush=True)
        result["tiny_qwen_int8_arena"] = tiny_qwen(Path(tmp))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
