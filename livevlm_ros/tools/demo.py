"""The main job, end to end, on one machine: a rosbag of a robot camera is replayed into the node
(separate processes over DDS, as on a robot); narration is printed as it arrives; then the query
service is asked a few questions. Next to every narration and answer the demo prints the ground
truth of the synthetic episode the bag was drawn from.

    python -m livevlm_ros.tools.demo [--model DIR] [--bag DIR] [--rate 2] [--plot demo_evidence.png] [--no-tree]

Each answer's evidence says when and where (the robot's pose from the bag's /odom). For "Where did
I last see the red toolbox?" the demo draws the floor plan, the robot's path, the evidence poses
and the true last sighting into a PNG. After the questions it ticks the example behaviour tree
(livevlm_ros/behaviours/example_tree.py: door open? -> where did I last see the red toolbox? -> go
there) at 10 Hz, one line per tick that changes a status; skipped when py_trees is not installed.

The default model is models/livevlm-demo, a small LLaVA-OneVision trained on this synthetic world
by `train_demo_model.py` (see QUALITY.md for what it can and cannot answer).
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

QUESTIONS = ["Which room am I in?", "Is the door on the left open?", "What is on the left?",
             "What is on the right?", "Did you see the red toolbox?", "Where did I last see the red toolbox?"]


SECONDS = 60.0
BAG_START = 1_700_000_000.0


def truth(episode, question: str, t_end: float) -> str:
    """The ground-truth answer, from the frames the node sampled (2 per second up to t_end)."""
    from livevlm_ros.tools import synthetic_world as world
    answer = world.ground_truth([episode.state(k / 2.0) for k in range(int(t_end * 2.0) + 1)], question)
    return answer or "(no ground truth for this question)"


PLOTTED = "Where did I last see the red toolbox?"


def plotted(episode, question: str, r, stamp, out: Path):
    """The evidence picture of one answer (demo_plot.py), with the true last sighting."""
    from livevlm_ros.tools import synthetic_world as world
    from livevlm_ros.tools.demo_plot import plot_evidence

    t_end = stamp(r.span_end)
    states = [episode.state(k / 2.0) for k in range(int(t_end * 2.0) + 1)]
    last = world.last_seen(states, question.rsplit("the ", 1)[1].rstrip("?"))
    truth_pose = None if last is None else (last[0] / 2.0, episode.pose(last[0] / 2.0))
    evidence = [(stamp(e.stamp), (e.pose.pose.position.x, e.pose.pose.position.y) if e.pose_known else None,
                 e.weight) for e in r.evidence]
    print(f"        picture: {plot_evidence(episode, t_end, question, evidence, truth_pose, out)}")


def main():
    repo = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=repo / "models" / "livevlm-demo")
    ap.add_argument("--bag", type=Path, default=None, help="a bag to replay instead of the demo bag "
                    "(then no ground truth is printed)")
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--config", type=Path, default=repo / "config" / "demo.yaml")
    ap.add_argument("--plot", type=Path, default=Path("demo_evidence.png"), help="the evidence picture (PNG)")
    ap.add_argument("--no-tree", action="store_true", help="do not run the example behaviour tree")
    args = ap.parse_args()

    from livevlm_ros.tools import make_demo_bag, synthetic_world
    model = args.model
    print(f"[demo] model: {model}")
    episode, scratch = None, tempfile.TemporaryDirectory()
    if args.bag is None:
        args.bag = Path(scratch.name) / "demo_bag"
        episode = make_demo_bag.write_bag(args.bag, seconds=SECONDS, fps=10, seed=make_demo_bag.DEMO_SEED,
                                          start_time=BAG_START)
        print(f"[demo] bag {args.bag}: {SECONDS:.0f} s, 10 fps, what happens in it:")
        print(make_demo_bag.describe(episode))
    origin = BAG_START if episode else 0.0
    stamp = lambda t: t.sec + t.nanosec * 1e-9 - origin  # noqa: E731   (seconds into the demo bag)

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
    def on_narration(m):
        t0, t1 = stamp(m.span_start), stamp(m.span_end)
        print(f"[narration {t0:4.1f}-{t1:4.1f}s] {m.text}")
        if episode:
            truth = synthetic_world.narration(episode.state(t0) if t1 > t0 else None, episode.state(t1))
            print(f"{'':>24}truth: {truth}")
    client.create_subscription(Narration, "/livevlm/narration", on_narration, 10)
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
            print(f"[query] {q}\n        -> {r.answer if r.success else 'ERROR: ' + r.error_message!r} "
                  f"(latency {r.latency_s * 1000:.0f} ms, memory {stamp(r.span_start):.1f}-{stamp(r.span_end):.1f}s, "
                  f"pages {r.pages_used}/{r.pages_total})")
            if r.success:
                print("        evidence: " + ", ".join(
                    f"{stamp(e.stamp):.1f}s ({e.weight:.0%}) at "
                    + (f"x {e.pose.pose.position.x:.1f}, y {e.pose.pose.position.y:.1f} m" if e.pose_known
                       else "an unknown pose") for e in r.evidence))
            if episode:
                print(f"        truth: {truth(episode, q, stamp(r.span_end))}")
            if episode and r.success and q == PLOTTED:
                plotted(episode, q, r, stamp, args.plot)
        if not args.no_tree:
            run_example_tree(client, stamp)
    finally:
        executor.shutdown()
        client.destroy_node()
        rclpy.try_shutdown()
        node.terminate()
        node.wait(15)
        scratch.cleanup()


def run_example_tree(node, stamp, timeout_s: float = 60.0):
    """Tick the example tree at 10 Hz from a timer on `node` (spun by the demo's executor thread)."""
    try:
        import py_trees
    except ImportError:
        print("[tree] py_trees is not installed: no behaviour-tree example (pip install py_trees)")
        return
    from livevlm_ros.behaviours import StatusLines, TreeTicker
    from livevlm_ros.behaviours.example_tree import find_the_toolbox

    tree = py_trees.trees.BehaviourTree(find_the_toolbox())
    tree.setup(node=node)
    time.sleep(1.0)                 # new action client: let discovery match the replies' reader
    tree.add_post_tick_handler(StatusLines())
    ticker = TreeTicker(tree, node, period_s=0.1)
    ticker.finished.wait(timeout_s)
    ticker.close()
    target = py_trees.blackboard.Blackboard.storage.get("/go_there/target")
    if target is not None:
        where = ("an unknown pose" if target.pose is None else
                 f"x {target.pose.pose.position.x:.1f}, y {target.pose.pose.position.y:.1f} m")
        print(f"[tree] go there: {target.answer!r}, seen last by {target.camera} at {stamp(target.stamp):.1f}s, "
              f"from {where}")


if __name__ == "__main__":
    main()
