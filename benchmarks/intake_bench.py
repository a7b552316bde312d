"""Camera intake: how many frames the node receives against a bare rclpy subscriber on the same
topics in the same run (the transport's own ceiling on this host), and the node's CPU per received
frame. A benchmark, not a timed test: run it by hand and read the table.

    source env.sh && python benchmarks/intake_bench.py [--seconds 10] [--rows 720p-rgb8-30,1080p-rgb8-15]
        [--transport default --transport large_data] [--out benchmarks/results/intake.json]

    --transport   default | profile | large_data | large_data_localhost (see TRANSPORTS), a Fast DDS XML
                  profile file (*.xml), or VAR=VALUE[;VAR=VALUE] (e.g. 'FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA');
                  repeat it to compare. Every process of a row (node, bare subscriber, publisher) gets it,
                  unless --publisher-transport gives the publisher another: over shared memory it is the
                  publisher's setting that decides (see config/fastdds_large_data.xml), so
                  '--transport profile --publisher-transport default' is a launch file that sets the profile
                  for the node and a camera driver started without it.
    --bare-only   no node: the publisher and the bare subscriber alone (the transport by itself)
    --bare-executor   single (default) | multi | events: the bare subscriber's executor (the node's is a
                  MultiThreadedExecutor of 4 threads)
    --self-test   check the raw-CDR stamp reader (header_stamp_ns) against rclpy's deserializer
    --deserialize-cost   what rclpy's deserialize_message costs per frame size, against the stamp read

Each row (size, encoding, rate, cameras) and transport runs in fresh processes on a private domain,
LOCALHOST discovery (as the tests): the node (`livevlm_node`, config/robot.yaml with a tiny random
model on the CPU), a bare subscriber (raw=True: it takes the serialized bytes and reads the stamp,
the cheapest rclpy consumer there is) and a driver that publishes (sensor-data QoS, like a camera
driver) and reads the node's /diagnostics. The driver publishes a 1 s warm-up (TCP connections and
shared-memory segments are set up on the first frames), then N seconds that are counted: the node's
count is the change in its `frames_received` across the window, the bare subscriber's is how many of
the window's stamps it got. CPU is the node process's utime+stime over the window (and the drain
after it), per frame it received; "net" subtracts what the idle node burns (timers, diagnostics),
measured for 2 s before the warm-up. Samples taken into memory (sample_fps of robot.yaml: 1/s) are
deserialized and ingested by the tiny model, so that work is in the node's CPU too.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NS = 1_000_000_000
TINY_MODEL = Path(tempfile.gettempdir()) / "livevlm_intake_bench_tiny"

WARMUP_S = 1.0          # frames before the window: connections set up, first sample ingested
SETTLE_S = 1.0          # after the warm-up, before the node's count is read
DRAIN_S = 1.5           # after the window: frames still in flight arrive
IDLE_S = 2.0            # the idle node's CPU, measured before anything is published
STATUS_PERIOD_S = 0.25  # the node's /diagnostics period during the run


# ---- the stamp of a serialized image, without deserializing it -----------------------------------
def header_stamp_ns(raw: bytes) -> int:
    """header.stamp of a serialized (CDR) sensor_msgs/Image or CompressedImage, in integer ns.

    Layout (XCDR1, what rmw_fastrtps writes): bytes 0-1 the encapsulation id (0x0000 CDR_BE,
    0x0001 CDR_LE), 2-3 options; then the message, aligned from byte 4: header.stamp.sec (int32)
    at 4, header.stamp.nanosec (uint32) at 8, then header.frame_id (uint32 length + chars + NUL).
    Both messages start with std_msgs/Header, so the offsets hold for both. Any other
    encapsulation (XCDR2 would add a DHEADER for appendable types) is refused rather than misread:
    the caller can fall back to deserialize_message."""
    if len(raw) < 12:
        raise ValueError(f"serialized image of {len(raw)} bytes is too short for a header")
    if raw[0] != 0 or raw[1] not in (0, 1):
        raise ValueError(f"not plain CDR (encapsulation 0x{raw[0]:02x}{raw[1]:02x})")
    sec, nanosec = struct.unpack_from("<iI" if raw[1] else ">iI", raw, 4)
    return sec * NS + nanosec


def set_header_stamp(buf: bytearray, stamp_ns: int) -> None:
    """Write header.stamp into a serialized image in place (the publisher re-stamps one buffer)."""
    struct.pack_into("<iI" if buf[1] else ">iI", buf, 4, stamp_ns // NS, stamp_ns % NS)


# ---- rows and transports --------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    width: int
    height: int
    encoding: str       # rgb8 | jpeg (sensor_msgs/CompressedImage on a topic ending /compressed)
    hz: float
    cameras: int

    def topics(self) -> list[str]:
        suffix = "/compressed" if self.encoding == "jpeg" else ""
        return [f"/intake_bench/cam{i}/image_raw{suffix}" for i in range(self.cameras)]


ROWS = {
    "480p-rgb8-15": Row(640, 480, "rgb8", 15, 1),
    "480p-rgb8-30": Row(640, 480, "rgb8", 30, 1),
    "720p-rgb8-15": Row(1280, 720, "rgb8", 15, 1),
    "720p-rgb8-30": Row(1280, 720, "rgb8", 30, 1),
    "1080p-rgb8-15": Row(1920, 1080, "rgb8", 15, 1),
    "720p-jpeg-30": Row(1280, 720, "jpeg", 30, 1),
    "480p-rgb8-30-x2": Row(640, 480, "rgb8", 30, 2),
    "720p-rgb8-15-x2": Row(1280, 720, "rgb8", 15, 2),
    "720p-rgb8-30-x2": Row(1280, 720, "rgb8", 30, 2),
}

# Environment for every process of a row (Fast DDS reads it when a participant is made).
#   default      Fast DDS as rmw_fastrtps sets it up: UDPv4 + shared memory with a 512 KiB segment
#   profile      config/fastdds_large_data.xml: the same, with a large shared-memory segment
#   large_data   FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA (SHM segment 8.5 MB, TCP, UDP for discovery
#                only). Under ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST rmw_fastrtps replaces the builtin
#                transports with its own (SHM 512 KiB + UDPv4) and the variable does nothing, so this one
#                runs with SUBNET discovery (the private domain still isolates it);
#                large_data_localhost shows it doing nothing.
TRANSPORTS = {
    "default": {},
    "profile": {"FASTDDS_DEFAULT_PROFILES_FILE": str(REPO / "config/fastdds_large_data.xml")},
    "large_data": {"FASTDDS_BUILTIN_TRANSPORTS": "LARGE_DATA", "ROS_AUTOMATIC_DISCOVERY_RANGE": "SUBNET"},
    "large_data_localhost": {"FASTDDS_BUILTIN_TRANSPORTS": "LARGE_DATA"},
}


def transport_env(name: str) -> dict:
    if name in TRANSPORTS:
        return dict(TRANSPORTS[name])
    if name.endswith(".xml"):
        return {"FASTDDS_DEFAULT_PROFILES_FILE": str(Path(name).resolve())}
    if "=" in name:
        return dict(item.split("=", 1) for item in name.split(";"))
    raise SystemExit(f"unknown transport {name!r}: one of {', '.join(TRANSPORTS)}, a *.xml profile, or VAR=VALUE")


def child_env(transport: str, domain: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FASTDDS_BUILTIN_TRANSPORTS", "FASTDDS_DEFAULT_PROFILES_FILE",
                        "FASTRTPS_DEFAULT_PROFILES_FILE", "RMW_FASTRTPS_USE_QOS_FROM_XML",
                        "ROS_LOCALHOST_ONLY", "ROS_STATIC_PEERS")}
    env.update(ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               RMW_IMPLEMENTATION="rmw_fastrtps_cpp")
    env.update(transport_env(transport))              # may widen the discovery range (large_data)
    return env


# ---- helpers shared by the roles ------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads), from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()      # the name may hold spaces: split after it
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(predicate, timeout: float, what: str, step: float = 0.05):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def serialized_frames(row: Row, count: int = 4) -> list[bytearray]:
    """`count` different frames of the synthetic world as serialized messages, made once: the
    publisher re-stamps and sends these, so its own cost per frame is a copy, not a conversion."""
    import cv2
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import CompressedImage, Image

    from livevlm_ros.tools import synthetic_world as world

    episode = world.Episode.generate(seed=7, seconds=60)
    frames = []
    for k in range(count):
        rgb = episode.render(k * 0.5, row.width, row.height)
        if row.encoding == "jpeg":
            ok, jpeg = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
            msg = CompressedImage(format="jpeg", data=jpeg.tobytes())
        else:
            msg = Image(height=row.height, width=row.width, encoding="rgb8", step=row.width * 3,
                        data=rgb.tobytes())
        msg.header.stamp.sec = 1                       # any non-zero: set_header_stamp overwrites it
        msg.header.frame_id = "camera"
        frames.append(bytearray(serialize_message(msg)))
    return frames


def msg_type(topic: str):
    from sensor_msgs.msg import CompressedImage, Image
    return CompressedImage if topic.endswith("/compressed") else Image


# ---- role: the bare subscriber --------------------------------------------------------------------
def run_bare(spec: dict):
    """Subscribe to every topic with sensor-data QoS, note each frame's stamp, and print them as
    JSON when told to stop (SIGTERM). raw=True unless spec['deserialize'], a SingleThreadedExecutor
    unless spec['executor'] says otherwise: the transport's ceiling for an rclpy process, with nothing
    else taking its time."""
    import rclpy
    from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
    from rclpy.experimental import EventsExecutor
    from rclpy.qos import qos_profile_sensor_data
    from rclpy.signals import SignalHandlerOptions

    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node("intake_bench_bare")
    stamps: dict[str, list[int]] = {t: [] for t in spec["topics"]}
    for topic in spec["topics"]:
        if spec["deserialize"]:
            def on_msg(msg, seen=stamps[topic]):
                seen.append(msg.header.stamp.sec * NS + msg.header.stamp.nanosec)
        else:
            def on_msg(raw, seen=stamps[topic]):
                seen.append(header_stamp_ns(raw))
        node.create_subscription(msg_type(topic), topic, on_msg, qos_profile_sensor_data, raw=not spec["deserialize"])
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    executor = {"single": SingleThreadedExecutor, "multi": lambda: MultiThreadedExecutor(num_threads=4),
                "events": EventsExecutor}[spec["executor"]]()
    executor.add_node(node)
    while not stop:
        executor.spin_once(timeout_sec=0.1)
    print(json.dumps(stamps), flush=True)
    node.destroy_node()
    rclpy.try_shutdown()


# ---- role: the driver (publisher + diagnostics reader) ---------------------------------------------
class NodeStatus:
    """The node's latest engine status on /diagnostics (key -> value strings), and when it came."""

    def __init__(self, ros_node):
        from diagnostic_msgs.msg import DiagnosticArray
        self.values, self.at = {}, 0.0
        ros_node.create_subscription(DiagnosticArray, "/diagnostics", self._on_array, 10)

    def _on_array(self, array):
        for status in array.status:
            if status.name.endswith(": engine"):
                self.values, self.at = {kv.key: kv.value for kv in status.values}, time.monotonic()

    def fresh(self) -> dict:
        """A status published after now: the node's count up to now, not an older one."""
        asked = time.monotonic()
        wait_until(lambda: self.at > asked + 0.05, 10, "the node's /diagnostics")
        return self.values


class Camera:
    """Publishes pre-serialized frames on every topic of a row at its rate, stamped by a camera
    clock that advances one period a frame (the same stamp on every camera: synced cameras)."""

    def __init__(self, ros_node, row: Row):
        from rclpy.qos import qos_profile_sensor_data
        self.row, self.frames = row, serialized_frames(row)
        self.pubs = [ros_node.create_publisher(msg_type(t), t, qos_profile_sensor_data) for t in row.topics()]
        self.stamp = time.time_ns()

    def subscribers(self) -> int:
        return min(p.get_subscription_count() for p in self.pubs)

    def publish(self, seconds: float) -> tuple[list[int], float]:
        """Publish for `seconds`. Deadlines are absolute, so a late frame does not slow the rest.
        Returns the stamps sent (one per tick) and the seconds it took."""
        period, sent, start = 1.0 / self.row.hz, [], time.monotonic()
        for k in range(round(seconds * self.row.hz)):
            time.sleep(max(0.0, start + k * period - time.monotonic()))
            self.stamp += round(NS * period)
            for i, pub in enumerate(self.pubs):
                buf = self.frames[(k + i) % len(self.frames)]
                set_header_stamp(buf, self.stamp)
                pub.publish(bytes(buf))
            sent.append(self.stamp)
        return sent, time.monotonic() - start


def drive(camera: Camera, status: NodeStatus, spec: dict) -> dict:
    """Wait for the subscribers (and the node's engine), measure the idle node, warm up, then the
    counted window and the drain. Returns what the driver saw, for run_row."""
    node_pid, bare_pid = spec["node_pid"], spec["bare_pid"]
    has_node = node_pid is not None

    def node_cpu() -> float:
        return cpu_seconds(node_pid) if has_node else 0.0
    wanted = 2 if has_node else 1
    wait_until(lambda: camera.subscribers() >= wanted, 60, f"{wanted} subscribers on every camera topic")
    idle_cpu_per_s = 0.0
    if has_node:
        wait_until(lambda: status.values.get("engine") == "ready", 180, "the node's engine to be ready")
        idle0 = node_cpu()
        time.sleep(IDLE_S)
        idle_cpu_per_s = (node_cpu() - idle0) / IDLE_S

    camera.publish(WARMUP_S)
    time.sleep(SETTLE_S)
    before = status.fresh() if has_node else {}
    node0, bare0 = node_cpu(), cpu_seconds(bare_pid)
    sent, took = camera.publish(spec["seconds"])
    time.sleep(DRAIN_S)
    node_used, bare_used = node_cpu() - node0, cpu_seconds(bare_pid) - bare0
    after = status.fresh() if has_node else {}

    def delta(key):
        return int(after[key]) - int(before[key]) if key in after and key in before else None
    return dict(stamps=sent, publish_s=took, window_s=took + DRAIN_S, cpu_node_s=node_used, cpu_bare_s=bare_used,
                idle_cpu_per_s=idle_cpu_per_s, node_received=delta("frames_received"),
                node_sampled=delta("frames_sampled"), node_dropped=delta("frames_dropped"),
                node_callback_errors=delta("callback_errors"), node_status=after)


def run_driver(spec: dict):
    import threading

    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    rclpy.init()
    ros_node = rclpy.create_node("intake_bench_driver")
    camera, status = Camera(ros_node, Row(**spec["row"])), NodeStatus(ros_node)
    executor = SingleThreadedExecutor()
    executor.add_node(ros_node)
    done = threading.Event()

    def spin():                                        # stopped and joined before shutdown, else a C++ abort
        while not done.is_set():
            executor.spin_once(timeout_sec=0.1)
    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        print(json.dumps(drive(camera, status, spec)), flush=True)
    finally:
        done.set()
        spinner.join()
        executor.shutdown(timeout_sec=1.0)
        ros_node.destroy_node()
        rclpy.try_shutdown()


# ---- one row: start the processes, run the driver, collect -----------------------------------------
def tiny_model() -> Path:
    if not (TINY_MODEL / "config.json").exists():
        subprocess.run([sys.executable, "-c", f"from livevlm_ros.tools.make_tiny_model import build; "
                        f"from pathlib import Path; build(Path({str(TINY_MODEL)!r}), seed=0)"], check=True)
    return TINY_MODEL


def node_params(row: Row, model: Path, sample_fps: float | None) -> dict:
    """config/robot.yaml (what the launch file ships) with the tiny model on the CPU."""
    import yaml
    params = yaml.safe_load((REPO / "config/robot.yaml").read_text())["/**"]["ros__parameters"]
    params.update(model_path=str(model), device="cpu", dtype="float32", camera_topics=row.topics(),
                  status_period_s=STATUS_PERIOD_S, narration_period_s=0.0)  # no narration: intake only
    if sample_fps is not None:
        params["sample_fps"] = sample_fps
    return params


def livevlm_node() -> str:
    from ament_index_python.packages import get_package_prefix
    return str(Path(get_package_prefix("livevlm_ros")) / "lib" / "livevlm_ros" / "livevlm_node")


def start_node(name: str, row: Row, args, env: dict, tmp: Path) -> subprocess.Popen:
    import yaml
    params_file = tmp / f"params_{name}.yaml"
    params = node_params(row, args.model, args.sample_fps)
    params_file.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
    return subprocess.Popen([livevlm_node(), "--ros-args", "--params-file", str(params_file)], env=env,
                            stdout=open(tmp / f"node_{name}.log", "w"), stderr=subprocess.STDOUT)


def role(name: str, spec: dict, env: dict, **popen) -> subprocess.Popen:
    """This file again, as one of its roles (bare, driver), in its own process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", name, "--spec", json.dumps(spec)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, **popen)


def last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def stop(procs: list[subprocess.Popen]):
    """SIGINT (the node saves nothing here and exits cleanly), then kill what does not exit."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()


def run_row(name: str, row: Row, transport: str, args, domain: int, tmp: Path) -> dict:
    env = child_env(transport, domain)
    publisher_env = child_env(args.publisher_transport or transport, domain)
    procs = []
    try:
        node = None if args.bare_only else start_node(name, row, args, env, tmp)
        procs += [node] if node else []
        bare = role("bare", dict(topics=row.topics(), deserialize=args.bare_deserialize, executor=args.bare_executor),
                    env)
        procs.append(bare)
        driver = role("driver", dict(row=asdict(row), seconds=args.seconds, node_pid=node.pid if node else None,
                                     bare_pid=bare.pid), publisher_env, stderr=subprocess.PIPE)
        procs.append(driver)
        out, err = driver.communicate(timeout=args.seconds + 300)
        if driver.returncode != 0:
            raise RuntimeError(f"driver failed:\n{err[-3000:]}")
        seen = last_json_line(out)
        bare.send_signal(signal.SIGTERM)               # it prints the stamps it got, and exits
        got = last_json_line(bare.communicate(timeout=30)[0])
    finally:
        stop(procs)
    return summarize(name, row, transport, args, seen, got)


def summarize(name: str, row: Row, transport: str, args, seen: dict, got: dict) -> dict:
    """One row of the table from what the driver saw and the stamps the bare subscriber got."""
    window = set(seen["stamps"])
    published = len(seen["stamps"]) * row.cameras
    bare = sum(sum(1 for s in stamps if s in window) for stamps in got.values())
    if args.publisher_transport:
        transport += f"/pub:{args.publisher_transport}"
    out = dict(row=name, transport=transport, **asdict(row), seconds=args.seconds, published=published,
               publish_hz=round(len(seen["stamps"]) / seen["publish_s"], 2),
               bare_received=bare, bare_pct=round(100 * bare / published, 1),
               bare_cpu_ms_per_frame=round(1000 * seen["cpu_bare_s"] / max(bare, 1), 2), load_avg=os.getloadavg()[0])
    if args.bare_only:
        return out
    received, cpu = seen["node_received"], seen["cpu_node_s"]
    idle = seen["idle_cpu_per_s"] * seen["window_s"]
    out.update(node_received=received, node_pct_of_bare=round(100 * received / max(bare, 1), 1),
               node_cpu_ms_per_frame=round(1000 * cpu / max(received, 1), 2),
               node_cpu_ms_per_frame_net=round(1000 * (cpu - idle) / max(received, 1), 2),
               node_idle_cpu_pct=round(100 * seen["idle_cpu_per_s"], 1), node_sampled=seen["node_sampled"],
               node_dropped=seen["node_dropped"], node_callback_errors=seen["node_callback_errors"])
    return out


def print_table(results: list[dict], bare_only: bool):
    cols = ["row", "transport", "published", "bare_received", "bare_pct", "bare_cpu_ms_per_frame"]
    if not bare_only:
        cols[4:4] = ["node_received", "node_pct_of_bare"]
        cols += ["node_cpu_ms_per_frame", "node_cpu_ms_per_frame_net"]
    widths = [max([len(c)] + [len(str(r.get(c))) for r in results]) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in results:
        print("  ".join(str(r.get(c)).rjust(w) for c, w in zip(cols, widths)))


# ---- the other modes --------------------------------------------------------------------------------
def self_test():
    """header_stamp_ns against rclpy's own deserializer, both messages, odd frame_ids, both byte orders."""
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import CompressedImage, Image

    for cls in (Image, CompressedImage):
        for sec, nanosec in ((1, 0), (1_700_000_000, 999_999_999), (2**31 - 1, 123), (-5, 7)):
            for frame_id in ("", "c", "camera_optical_frame_with_a_long_name"):
                msg = cls()
                msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id = sec, nanosec, frame_id
                raw = serialize_message(msg)
                back = deserialize_message(raw, cls)
                expected = back.header.stamp.sec * NS + back.header.stamp.nanosec
                assert header_stamp_ns(raw) == expected, (cls, sec, frame_id)
                buf = bytearray(raw)
                set_header_stamp(buf, 42 * NS + 17)
                assert deserialize_message(bytes(buf), cls).header.stamp.nanosec == 17
    big_endian = bytes([0, 0, 0, 0]) + struct.pack(">iI", 7, 8) + bytes(8)
    assert header_stamp_ns(big_endian) == 7 * NS + 8
    for bad in (b"\x00\x01\x00\x00", bytes([0, 7, 0, 0]) + bytes(12)):
        try:
            header_stamp_ns(bad)
            raise AssertionError(f"accepted {bad!r}")
        except ValueError:
            pass
    print("header_stamp_ns: ok (Image, CompressedImage, LE and BE, refuses short and non-CDR bytes)")


def deserialize_cost():
    """Milliseconds per frame to deserialize, against reading the stamp from the bytes."""
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import CompressedImage, Image

    def per_call_ms(fn, min_s=0.5):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_s or n < 5:
            fn()
            n += 1
        return 1000 * (time.perf_counter() - start) / n

    print(f"{'frame':>14} {'bytes':>10} {'deserialize ms':>15} {'stamp read us':>14} {'serialize ms':>13}")
    for name in ("480p-rgb8-30", "720p-rgb8-30", "1080p-rgb8-15", "720p-jpeg-30"):
        row = ROWS[name]
        raw = bytes(serialized_frames(row, count=1)[0])
        cls = CompressedImage if row.encoding == "jpeg" else Image
        msg = deserialize_message(raw, cls)
        d = per_call_ms(lambda: deserialize_message(raw, cls))
        s = per_call_ms(lambda: header_stamp_ns(raw), min_s=0.1) * 1000
        z = per_call_ms(lambda: serialize_message(msg))
        label = f"{row.width}x{row.height} {row.encoding}"
        print(f"{label:>14} {len(raw):>10} {d:>15.2f} {s:>14.2f} {z:>13.2f}")


# ---- main ------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="counted window per row")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    ap.add_argument("--transport", action="append", help="repeatable; default: default")
    ap.add_argument("--publisher-transport", default=None, help="the publisher's, if not the others'")
    ap.add_argument("--bare-only", action="store_true", help="no node: the transport alone")
    ap.add_argument("--bare-deserialize", action="store_true", help="the bare subscriber deserializes (raw=False)")
    ap.add_argument("--bare-executor", choices=["single", "multi", "events"], default="single",
                    help="the bare subscriber's executor (the node uses a MultiThreadedExecutor of 4 threads)")
    ap.add_argument("--sample-fps", type=float, default=None, help="the node's sample_fps (default: robot.yaml)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--self-test", action="store_true")
    ap.add_argument("--deserialize-cost", action="store_true")
    ap.add_argument("--role", choices=["bare", "driver"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.role:
        return (run_bare if args.role == "bare" else run_driver)(json.loads(args.spec))
    if args.self_test or args.deserialize_cost:
        self_test() if args.self_test else deserialize_cost()
        return
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; rows: {', '.join(ROWS)}")
    transports = args.transport or ["default"]
    for t in transports + [args.publisher_transport or "default"]:
        transport_env(t)                               # refuse a bad name before anything starts
    args.model = None if args.bare_only else tiny_model()
    domain = 60 + os.getpid() % 40                     # private: the tests use 150-229, node_overhead 100-149
    results = []
    with tempfile.TemporaryDirectory(prefix="intake_bench_") as tmp:
        for transport in transports:
            for name in names:
                print(f"-- {name} over {transport} ({args.seconds:g} s)", file=sys.stderr, flush=True)
                try:
                    results.append(run_row(name, ROWS[name], transport, args, domain, Path(tmp)))
                except Exception as err:               # noqa: BLE001 - one failed row does not end the run
                    log = Path(tmp) / f"node_{name}.log"
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    print(f"   failed: {err}\n{tail}", file=sys.stderr)
                    results.append(dict(row=name, transport=transport, error=str(err)))
    print_table([r for r in results if "error" not in r], args.bare_only)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        report = dict(host_cpus=os.cpu_count(), seconds=args.seconds, rows=results)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
