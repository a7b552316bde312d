"""Do an answer's evidence frames show what the question asked about? The demo model on held-out
synthetic episodes (the demo's memory settings): for every object an episode shows, ask "Where did I
last see the X?" and count the top-3 evidence frames whose ground-truth state shows X. The chance
level (a frame drawn at random from the stream showing X) is printed beside it.

    python benchmarks/evidence_bench.py --seeds 100-105 [--window-last-s 20]
"""

import argparse
import json
import time

import yaml

from livevlm_ros.engine import EngineConfig, LiveVLMEngine
from livevlm_ros.engine.models import load_adapter
from livevlm_ros.tools import synthetic_world as world

DEMO = "models/livevlm-demo"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="100-105")
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lo, hi = map(int, args.seeds.split("-"))
    params = yaml.safe_load(open("config/demo.yaml"))["/**"]["ros__parameters"]
    adapter = load_adapter(DEMO, "cpu", "float32")
    showing = chance = asked = 0
    rows = []
    t0 = time.time()
    for seed in range(lo, hi + 1):
        episode = world.Episode.generate(seed, args.frames / 2)
        engine = LiveVLMEngine(EngineConfig(
            model_path=DEMO, policy=params["policy"], budget_tokens=params["budget_tokens"],
            short_term_frames=params["short_term_frames"], page_tokens=params["page_tokens"],
            retrieval_ratio=params["retrieval_ratio"], sample_fps=0), adapter=adapter)
        states = []
        for k in range(args.frames):
            engine.ingest(episode.render(k / 2, 320, 240), k / 2)
            states.append(episode.state(k / 2))
        for name in world.OBJECTS:
            seen = {k for k, s in enumerate(states) if any(o == name for _, o in s.spots)}
            if not seen:
                continue
            answer = engine.ask(f"Where did I last see the {name}?", evidence=args.top)
            frames = [round(e.time * 2) for e in answer.evidence]
            hits = sum(f in seen for f in frames)
            showing, asked = showing + hits, asked + len(frames)
            chance += len(seen) / args.frames * len(frames)
            rows.append(dict(seed=seed, object=name, seen=sorted(seen), evidence=frames,
                             weights=[round(e.weight, 4) for e in answer.evidence], answer=answer.text))
        engine.close()
    summary = dict(evidence_frames=asked, showing_object=showing, chance=round(chance, 1), seeds=args.seeds,
                   seconds=round(time.time() - t0, 1))
    print(json.dumps(summary))
    if args.out:
        json.dump(dict(summary=summary, rows=rows), open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
