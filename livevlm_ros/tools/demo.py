"""The main job, end to end, on one machine: a rosbag of a robot camera is replayed into the node
(separate processes over DDS, as on a robot); narration is printed as it arrives; then the query
service is asked a few questions.

    python -m livevlm_ros.tools.demo [--model DIR] [--bag DIR] [--rate 2]

Without --model it builds and uses the tiny random LLaVA-OneVision (models/tiny): the pipeline is
the real one, but with random weights the words it produces mean nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

QUESTIONS = ["Where did I last see the red toolbox?", "Is the door on the left open?",
             "What happened in the last minute?"]


def main():
    repo = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: build models/tiny)")
    ap.add_argument("--bag", type=Path, default=repo / "artifacts" / "demo_bag")
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--config", type=Path, default=repo / "config" / "demo.yaml")
    args = ap.parse_args()

    from livevlm_ros.tools import make_demo_bag, make_tiny_model
    model = args.model
    if model is None:
        model = repo / "models" / "tiny"
        if not (model / "config.json").exists():
            make_tiny_model.build(model)
        print("[demo] model: tiny random LLaVA-OneVision (random weights: the text is meaningless)")
    if not (args.bag / "metadata.yaml").exists():
        events = make_demo_bag.write_bag(args.bag, seconds=30, fps=10, size=(640, 480))
        print("[demo] wrote", args.bag, "with events:", ", ".join(f"{e.name} {e.start:.0f}-{e.stop:.0f}s" for e in events))

    os.environ.setdefault("ROS_DOMAIN_ID", str(120 + os.getpid() % 50))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    params = yaml.safe_load(args.config.read_text())
    params["/**"]["ros__parameters"]["model_path"] = str(model)
    cfg = Path(tempfile.mkdtemp()) / "params.yaml"
    cfg.write_text(yaml.safe_dump(params))
    node = subprocess.Popen(["livevlm_node", "--ros-args", "--params-file", str(cfg)])

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    from livevlm_ros.msg import Narration
    from livevlm_ros.srv import Query

    rclpy.init()
    client = Node("livevlm_demo")
    client.create_subscription(Narration, "/livevlm/narration", lambda m: print(
        f"[narration {m.span_start.sec % 1000:>3}-{m.span_end.sec % 1000:>3}s] {m.text!r}"), 10)
    query = client.create_client(Query, "/livevlm/query")
    executor = SingleThreadedExecutor()
    executor.add_node(client)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        if not query.wait_for_service(timeout_sec=120):
            sys.exit("[demo] the node did not come up")
        time.sleep(1.0)
        subprocess.run(["livevlm_replay", str(args.bag), "--rate", str(args.rate)], check=True)
        time.sleep(2.0)
        for q in QUESTIONS:
            future = query.call_async(Query.Request(question=q))
            while not future.done():
                time.sleep(0.05)
            r = future.result()
            span = f"{r.span_start.sec % 1000}-{r.span_end.sec % 1000}s"
            print(f"[query] {q}\n        -> {r.answer if r.success else 'ERROR: ' + r.error_message!r} "
                  f"(latency {r.latency_s * 1000:.0f} ms, memory span {span}, pages {r.pages_used}/{r.pages_total})")
    finally:
        executor.shutdown()
        client.destroy_node()
        rclpy.try_shutdown()
        node.terminate()
        node.wait(15)


if __name__ == "__main__":
    main()
