"""Do an answer's evidence frames show what the question asked about? The demo model on held-out
synthetic episodes (the demo's memory settings): for every object an episode shows, ask "Where did I
last see the X?" and count the top-3 evidence frames whose ground-truth state shows X. The chance
level (a frame drawn at random from the stream showing X) is printed beside it. And where: how far
the strongest evidence frame's pose (the robot's, from the world's trajectory) lies from the robot's
pose at the last frame that showed X (median, p90, share within 1 m), beside the same for a frame
drawn at random from the stream.

    python benchmarks/evidence_bench.py --seeds 100-105 [--window-last-s 20]
"""

import argparse
import json
import math
import statistics
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
    rows, distances, chance_within, chance_median = [], [], [], []
    t0 = time.time()
    for seed in range(lo, hi + 1):
        episode = world.Episode.generate(seed, args.frames / 2)
        engine = LiveVLMEngine(EngineConfig(
            model_path=DEMO, policy=params["policy"], budget_tokens=params["budget_tokens"],
            short_term_frames=params["short_term_frames"], page_tokens=params["page_tokens"],
            retrieval_ratio=params["retrieval_ratio"], sample_fps=0), adapter=adapter)
        states = []
        for k in range(args.frames):
            engine.ingest(episode.render(k / 2, 320, 240), k / 2, pose=episode.pose(k / 2))
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
            last = world.last_seen(states, name)[0]
            truth = episode.pose(last / 2)
            d = math.dist(answer.evidence[0].pose[:2], truth[:2]) if answer.evidence else None
            if d is not None:
                distances.append(d)
            stream = [math.dist(episode.pose(k / 2)[:2], truth[:2]) for k in range(args.frames)]
            chance_within.append(sum(x <= 1.0 for x in stream) / len(stream))
            chance_median.append(statistics.median(stream))
            rows.append(dict(seed=seed, object=name, seen=sorted(seen), evidence=frames, last_seen=last,
                             distance_m=None if d is None else round(d, 3),
                             weights=[round(e.weight, 4) for e in answer.evidence], answer=answer.text))
        engine.close()
    ranked = sorted(distances)
    summary = dict(evidence_frames=asked, showing_object=showing, chance=round(chance, 1), seeds=args.seeds,
                   questions=len(rows),
                   strongest_pose_m=dict(median=round(statistics.median(ranked), 2),
                                         p90=round(ranked[int(0.9 * (len(ranked) - 1))], 2),
                                         within_1m=round(sum(d <= 1.0 for d in ranked) / len(ranked), 3)),
                   random_frame_m=dict(median=round(statistics.median(chance_median), 2),
                                       within_1m=round(statistics.mean(chance_within), 3)),
                   seconds=round(time.time() - t0, 1))
    print(json.dumps(summary))
    if args.out:
        json.dump(dict(summary=summary, rows=rows), open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
