"""The node's own cost on the CPU: ROS image -> model input tensor, and DDS intake rate.

    source env.sh && python benchmarks/node_overhead.py [--seconds 5]

1. conversion: sensor_msgs Image (rgb8, bgr8) / CompressedImage (JPEG) -> RGB -> 384x384
   normalised tensor (what the engine feeds the vision tower), at 640x480 and 1920x1080;
2. intake: a publisher process sends 640x480 rgb8 frames as fast as it can for N seconds to a
   real livevlm node process (tiny model, engine idle at 1 fps); frames/s the node's camera
   callback took in, from its /diagnostics counters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

os.environ.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 50))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")


def conversion(repeats: int) -> dict:
    from sensor_msgs.msg import CompressedImage, Image

    from livevlm_ros.engine import EngineConfig, LiveVLMEngine
    from livevlm_ros.ros.image_conversion import to_rgb
    from livevlm_ros.tools.make_tiny_model import build

    model = build(Path(tempfile.mkdtemp()) / "tiny384", image_size=384)
    engine = LiveVLMEngine(EngineConfig(model_path=str(model)))
    out = {}
    for w, h in ((640, 480), (1920, 1080)):
        rgb = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
        ok, jpg = cv2.imencode(".jpg", rgb)
        msgs = {"rgb8": Image(height=h, width=w, encoding="rgb8", step=w * 3, data=rgb.tobytes()),
                "bgr8": Image(height=h, width=w, encoding="bgr8", step=w * 3, data=rgb.tobytes()),
                "jpeg": CompressedImage(format="jpeg", data=jpg.tobytes())}
        for name, msg in msgs.items():
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                engine.model.preprocess([to_rgb(msg)])
                times.append(time.perf_counter() - t0)
            out[f"{w}x{h}_{name}_ms"] = round(float(np.median(times)) * 1e3, 2)
    return out


def intake(seconds: float, model_dir: Path) -> dict:
    import rclpy
    import yaml
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.node import Node
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    params = Path(tempfile.mkdtemp()) / "p.yaml"
    params.write_text(yaml.safe_dump({"/**": {"ros__parameters": dict(
        model_path=str(model_dir), device="cpu", dtype="float32", sample_fps=1.0, status_period_s=0.5,
        narration_period_s=0.0)}}))
    node = subprocess.Popen(["livevlm_node", "--ros-args", "--params-file", str(params)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rclpy.init()
    pub_node = Node("intake_bench")
    pub = pub_node.create_publisher(Image, "/camera/image_raw", qos_profile_sensor_data)
    status = {}
    pub_node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: status.update(
        {kv.key: kv.value for s in m.status for kv in s.values}), 10)
    try:
        end = time.monotonic() + 60
        while status.get("engine") != "ready" and time.monotonic() < end:
            rclpy.spin_once(pub_node, timeout_sec=0.1)
        rgb = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8).tobytes()
        msg = Image(height=480, width=640, encoding="rgb8", step=640 * 3, data=rgb)
        before = int(status.get("frames_received", 0))
        sent, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < seconds:
            msg.header.stamp = pub_node.get_clock().now().to_msg()
            pub.publish(msg)
            sent += 1
            rclpy.spin_once(pub_node, timeout_sec=0)
        elapsed = time.monotonic() - t0
        end = time.monotonic() + 2
        while time.monotonic() < end:
            rclpy.spin_once(pub_node, timeout_sec=0.1)
        got = int(status.get("frames_received", 0)) - before
        return dict(seconds=round(elapsed, 2), sent_per_s=round(sent / elapsed, 1), received_per_s=round(got / elapsed, 1),
                    sampled=int(status.get("frames_sampled", 0)), dropped=int(status.get("frames_dropped", 0)))
    finally:
        pub_node.destroy_node()
        rclpy.try_shutdown()
        node.terminate()
        node.wait(10)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    from livevlm_ros.tools.make_tiny_model import build
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{os.cpu_count()} CPU cores",
           "command": " ".join(sys.argv)}
    res["conversion"] = conversion(args.repeats)
    res["intake_640x480_rgb8"] = intake(args.seconds, build(Path(tempfile.mkdtemp()) / "tiny"))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
