"""Answer latency under load: the node on the demo model, a live camera at 20 Hz, a question every
10 s, narration every 3 s (config/demo.yaml), for N minutes on this CPU.

    source env.sh && python benchmarks/soak.py [--minutes 10] [--out benchmarks/results/cpu_soak.json]

The node runs as its own process over real DDS, started from the demo's parameter file; this process
publishes the synthetic world's frames (rgb8, 640x480 unless --size, stamped with the wall clock,
looping a 60 s episode) and calls /livevlm/query. Latency is what the caller sees: call -> response. Reports
median, p90 and max, and p90 / median (the issue's target: <= 2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))
from ros_harness import Client, NodeProcess  # noqa: E402 (isolates the DDS domain before rclpy loads)

from livevlm_ros.tools import synthetic_world as world  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["Where did I last see the red toolbox?", "Is the door open?", "Which room am I in?",
             "What is on the left?", "Did you see the blue ball?", "Where was the yellow cone?"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--camera-hz", type=float, default=20.0)
    ap.add_argument("--question-every-s", type=float, default=10.0)
    ap.add_argument("--size", default="640x480", help="camera frame size, WxH (rgb8)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    params = yaml.safe_load((REPO / "config/demo.yaml").read_text())["/**"]["ros__parameters"]
    params.update(model_path=str(REPO / "models/livevlm-demo"), camera_topics=["/camera/image_raw"])
    episode = world.Episode.generate(seed=7, seconds=60)
    width, height = (int(x) for x in args.size.split("x"))
    loop = [episode.render(k / args.camera_hz, width, height) for k in range(int(60 * args.camera_hz))]

    tmp = Path(tempfile.mkdtemp())
    node = NodeProcess(tmp, params)
    client = Client()
    stop = threading.Event()
    try:
        client.wait_ready(node, timeout=120)

        published = [0]

        def camera():
            k, period = 0, 1.0 / args.camera_hz
            next_t = time.monotonic()
            while not stop.is_set():
                client.image_pub.publish(client.image(time.time(), loop[k % len(loop)]))
                k += 1
                published[0] = k
                next_t += period
                time.sleep(max(0.0, next_t - time.monotonic()))

        streamer = threading.Thread(target=camera, daemon=True)
        streamer.start()
        time.sleep(5.0)                                    # some memory before the first question
        rows, end, i = [], time.monotonic() + args.minutes * 60, 0
        while time.monotonic() < end:
            question = QUESTIONS[i % len(QUESTIONS)]
            t0 = time.monotonic()
            r = client.query(question, max_new_tokens=0)          # 0: the node's max_new_tokens
            seen = time.monotonic() - t0
            rows.append(dict(question=question, success=r.success, caller_s=round(seen, 4),
                             node_s=round(r.latency_s, 4), ttft_s=round(r.time_to_first_token_s, 4),
                             tokens=r.tokens_generated, answer=r.answer, error=r.error_message))
            i += 1
            time.sleep(max(0.0, t0 + args.question_every_s - time.monotonic()))
        status = client.node_status()
    finally:
        stop.set()
        client.close()
        node.stop()
    lat = sorted(r["caller_s"] for r in rows if r["success"])
    p90 = lat[min(len(lat) - 1, int(round(0.9 * (len(lat) - 1))))]
    median = statistics.median(lat)
    summary = dict(date=time.strftime("%Y-%m-%d"), minutes=args.minutes, camera_hz=args.camera_hz, size=args.size,
                   questions=len(rows), answered=len(lat), median_s=round(median, 4), p90_s=round(p90, 4),
                   max_s=round(lat[-1], 4), p90_over_median=round(p90 / median, 2),
                   narrations=status.get("narrations"), frames_published=published[0],
                   frames_received=status.get("frames_received"), frames_sampled=status.get("frames_sampled"),
                   frames_ingested=status.get("frames_ingested"), frames_dropped=status.get("frames_dropped"),
                   node_median_s=round(statistics.median(r["node_s"] for r in rows if r["success"]), 4),
                   node_p90_s=sorted(r["node_s"] for r in rows if r["success"])[int(round(0.9 * (len(lat) - 1)))])
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(summary=summary, rows=rows), indent=1))


if __name__ == "__main__":
    main()
