"""Real processes over real DDS for the node tests: the node runs as its own process (as on a robot),
the test is a second process with an rclpy client node. Traffic stays on this machine and on a
domain of its own."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

# isolate before rclpy is imported anywhere in this process
os.environ["ROS_DOMAIN_ID"] = str(150 + os.getpid() % 80)
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
# the transport the launch file ships for large images, for the test's publishers and the nodes it starts
os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE",
                      str(Path(__file__).resolve().parents[1] / "config" / "fastdds_large_data.xml"))

import rclpy  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from livevlm_ros.msg import Narration  # noqa: E402
from livevlm_ros.srv import Query  # noqa: E402


def executable(name: str) -> str:
    """A program of this package where ROS installs it (<prefix>/lib/livevlm_ros/), found through
    the ament index as `ros2 run` does: the tests need no PATH set-up (colcon test, a workspace)."""
    from ament_index_python.packages import get_package_prefix

    return str(Path(get_package_prefix("livevlm_ros")) / "lib" / "livevlm_ros" / name)


def ros2(*args, timeout: float = 60) -> str:
    """The real `ros2` command line (stdout + stderr). Without a daemon, discovery can miss a node in
    its short spin: a "Node not found" is retried."""
    for _ in range(4):
        out = subprocess.run(["ros2", *args], capture_output=True, text=True, timeout=timeout)
        text = out.stdout + out.stderr
        if "Node not found" not in text and "not available" not in text:
            return text
        time.sleep(0.5)
    return text


class NodeProcess:
    """`livevlm_node --ros-args --params-file X.yaml`, exactly as a user starts it without launch."""

    def __init__(self, tmp: Path, params: dict, namespace: str | None = None, extra_args=(),
                 program: str = "livevlm_node"):
        self.params_file = tmp / f"params_{(namespace or 'root').strip('/')}_{time.monotonic_ns()}.yaml"
        self.params_file.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
        cmd = [executable(program), "--ros-args", "--params-file", str(self.params_file)] + list(extra_args)
        if namespace:
            cmd += ["-r", f"__ns:={namespace}"]
        self.log = tmp / f"{self.params_file.stem}.log"
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text()

    def stop(self):
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Client:
    """An rclpy node that plays the robot: publishes camera frames, calls the service, listens."""

    def __init__(self, namespace: str = ""):
        if not rclpy.ok():
            rclpy.init()
        self.ns = namespace.rstrip("/")
        self.node = Node(f"test_client_{time.monotonic_ns()}")
        self.narrations: list[Narration] = []
        self.status: dict[str, dict] = {}
        self.node.create_subscription(Narration, f"{self.ns}/livevlm/narration", self.narrations.append, 10)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        # the node's default camera topic is relative: under a namespace it is <ns>/camera/image_raw
        self.image_pub = self.node.create_publisher(Image, f"{self.ns}/camera/image_raw", qos_profile_sensor_data)
        self.jpeg_pub = self.node.create_publisher(CompressedImage, f"{self.ns}/camera/image_raw/compressed",
                                                   qos_profile_sensor_data)
        self.query_client = self.node.create_client(Query, f"{self.ns}/livevlm/query")
        self.executor = MultiThreadedExecutor(num_threads=2)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _on_diag(self, msg: DiagnosticArray):
        for s in msg.status:
            level = ord(s.level) if isinstance(s.level, bytes) else s.level     # a ROS byte
            self.status[s.name] = {"level": level, "message": s.message, **{kv.key: kv.value for kv in s.values}}

    def node_status(self, namespace: str = "") -> dict | None:
        return self.status.get(f"{namespace.rstrip('/')}/livevlm: engine")

    def wait_for(self, predicate, timeout: float, what: str):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"waited {timeout} s for {what}")

    def feed(self, msg, at_least: int = 1, namespace: str = "", publisher=None, timeout: float = 10.0,
             until=None) -> dict:
        """Publish a frame, again every 0.25 s (best effort may lose it; a repeat of its stamp is
        not sampled twice), until the node has ingested at least `at_least` frames, or until
        `until(status)` holds."""
        publisher = publisher or self.image_pub
        until = until or (lambda s: int(s.get("frames_ingested", 0)) >= at_least)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            publisher.publish(msg)
            deadline = time.monotonic() + 0.25
            while time.monotonic() < deadline:
                s = self.node_status(namespace)
                if s and until(s):
                    return s
                time.sleep(0.02)
        raise TimeoutError(f"waited {timeout} s for the frame to take effect: {self.node_status(namespace)}")

    def settled(self, namespace: str = "", quiet_s: float = 1.0, timeout: float = 30.0) -> dict:
        """The node's status once it has dealt with every frame it received: nothing queued, no
        sample in the worker's hands (one taken off the queue is ingested after it) and
        frames_received unchanged for quiet_s. Best-effort delivery may lose frames, so tests
        count what the node received (its own counters), never what was sent."""
        last, since = None, time.monotonic()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s = self.node_status(namespace)
            key = s and (s.get("frames_received"), s.get("frames_ingested"), s.get("frames_queued"))
            if key != last:
                last, since = key, time.monotonic()
            elif (s and s.get("frames_queued") == "0" and s.get("worker_doing") != "sample"
                  and time.monotonic() - since >= quiet_s):
                return s
            time.sleep(0.05)
        raise TimeoutError(f"waited {timeout} s for the node to settle: {self.node_status(namespace)}")

    def wait_ready(self, node: NodeProcess, timeout: float = 60.0):
        def ready():
            assert node.alive(), node.output()
            s = self.node_status(self.ns)
            return s if s and s["engine"] in ("ready", "failed") else None
        status = self.wait_for(ready, timeout, "the node's engine to load")
        self.wait_for(lambda: self.query_client.service_is_ready(), 10, "the query service")
        # service_is_ready() sees the server's request reader; the server may not have matched our
        # response reader yet (a DDS discovery race that loses the reply): give discovery a moment.
        time.sleep(1.0)
        return status

    def raw_image(self, stamp_ns: int, encoding: str = "rgb8", height: int = 48, width: int = 64) -> Image:
        """A well-formed image of any encoding the node reads, stamped with exact nanoseconds."""
        channels, dtype = {"rgb8": (3, np.uint8), "bgr8": (3, np.uint8), "bgra8": (4, np.uint8),
                           "rgba8": (4, np.uint8), "mono8": (1, np.uint8), "mono16": (1, np.uint16)}[encoding]
        pixels = np.random.default_rng(stamp_ns % 2**32).integers(0, np.iinfo(dtype).max, (height, width, channels),
                                                                    dtype=dtype)
        msg = Image(height=height, width=width, encoding=encoding, step=width * channels * pixels.itemsize)
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
        msg.data = pixels.tobytes()
        return msg

    def image(self, stamp: float, rgb: np.ndarray | None = None, encoding: str = "rgb8",
              truncate: int = 0) -> Image:
        rgb = rgb if rgb is not None else np.random.default_rng(int(stamp * 10)).integers(
            0, 256, (48, 64, 3), dtype=np.uint8)
        msg = Image(height=rgb.shape[0], width=rgb.shape[1], encoding=encoding, step=rgb.shape[1] * 3)
        msg.header.stamp.sec, msg.header.stamp.nanosec = int(stamp), int((stamp % 1) * 1e9)
        data = rgb.tobytes()
        msg.data = data[: len(data) - truncate]
        return msg

    def query(self, question: str, max_new_tokens: int = 4, timeout: float = 60.0, **fields) -> Query.Response:
        """Call ~/query and wait; `fields`: the request's other fields (window_start, last_seconds, ...)."""
        future = self.query_client.call_async(Query.Request(question=question, max_new_tokens=max_new_tokens, **fields))
        return self.wait_for(lambda: future.done() and future.result(), timeout, f"an answer to {question!r}")

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()
        self.thread.join(5)


@contextlib.contextmanager
def in_process_node(client, params: dict):
    """A LiveVLMNode in this process, spun by its own executor, for tests that inject a fault into
    its parts; yields it once its engine is ready and the query service is matched."""
    from rclpy.parameter import Parameter

    from livevlm_ros.ros.node import LiveVLMNode

    node = LiveVLMNode(parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    try:
        client.wait_for(lambda: node.core.worker is not None, 30, "the engine")
        client.wait_for(lambda: client.query_client.service_is_ready(), 10, "the service")
        time.sleep(1.0)
        yield node
    finally:
        node.shutdown()
        executor.shutdown()
        node.destroy_node()


def node_params(model_path: str, **over) -> dict:
    """Parameters for a node on the tiny test model: CPU, a small memory, fast status reports."""
    p = dict(model_path=model_path, device="cpu", dtype="float32", sample_fps=10.0, status_period_s=0.2,
             budget_tokens=34 + 2 * 16 + 64, page_tokens=8, vision_sinks=4, max_new_tokens=4,
             max_question_tokens=32, camera_topics=["/camera/image_raw"])
    p.update(over)
    return p


@pytest.fixture
def client():
    c = Client()
    yield c
    c.close()


@pytest.fixture
def start(tmp_path):
    """start(params, namespace=None, extra_args=()) -> a NodeProcess, stopped after the test."""
    nodes = []

    def _start(params, namespace=None, extra_args=(), program="livevlm_node"):
        nodes.append(NodeProcess(tmp_path, params, namespace, extra_args, program))
        return nodes[-1]
    yield _start
    for n in nodes:
        n.stop()
