"""Write a synthetic robot-camera rosbag2 (sqlite3 or mcap): a room seen by a slowly panning camera,
with objects that appear, move and disappear at known times. Test fixtures and the demo use it.

    python -m livevlm_ros.tools.make_demo_bag out_bag [--seconds 30] [--fps 10] [--storage mcap]
                                              [--compressed] [--size 640x480] [--seed 0]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}


@dataclass
class Event:
    name: str          # e.g. "red toolbox"
    colour: str
    shape: str         # "box" | "ball"
    start: float       # seconds into the stream
    stop: float
    x0: float          # start/end x position (0..1 of the width)
    x1: float


def scenario(seconds: float, seed: int) -> list[Event]:
    rng = np.random.default_rng(seed)
    names = [("red", "box", "red toolbox"), ("blue", "ball", "blue ball"),
             ("green", "box", "green crate"), ("yellow", "ball", "yellow ball")]
    events = []
    for i, (colour, shape, name) in enumerate(names):
        start = seconds * (0.05 + 0.2 * i) + rng.uniform(0, 1)
        stop = min(seconds, start + seconds * rng.uniform(0.15, 0.3))
        events.append(Event(name, colour, shape, start, stop, rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9)))
    return events


def render(t: float, events: list[Event], width: int, height: int) -> np.ndarray:
    """RGB frame at time t: floor, wall, a door, and the objects visible at t."""
    img = np.zeros((height, width, 3), np.uint8)
    horizon = height // 2
    img[:horizon] = (180, 175, 165)                       # wall
    img[horizon:] = (110, 95, 80)                         # floor
    pan = int(0.1 * width * np.sin(t / 5.0))
    door_x = width // 6 + pan
    cv2.rectangle(img, (door_x, horizon // 3), (door_x + width // 8, horizon), (90, 60, 30), -1)
    door_open = int(t // 10) % 2 == 1                      # the door opens and closes every 10 s
    if door_open:
        cv2.rectangle(img, (door_x + 4, horizon // 3 + 4), (door_x + width // 8 - 4, horizon), (20, 20, 20), -1)
    for e in events:
        if e.start <= t < e.stop:
            a = (t - e.start) / max(e.stop - e.start, 1e-6)
            x = int((e.x0 + (e.x1 - e.x0) * a) * width) + pan
            y = horizon + height // 4
            r = max(4, height // 12)
            if e.shape == "box":
                cv2.rectangle(img, (x - r, y - r), (x + r, y + r), COLOURS[e.colour], -1)
            else:
                cv2.circle(img, (x, y), r, COLOURS[e.colour], -1)
    return img


def write_bag(out: Path, seconds: float = 30.0, fps: float = 10.0, storage: str = "sqlite3",
              compressed: bool = False, size: tuple[int, int] = (640, 480), seed: int = 0,
              topic: str | None = None, start_time: float = 1_700_000_000.0) -> list[Event]:
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    Image = store.types["sensor_msgs/msg/Image"]
    CompressedImage = store.types["sensor_msgs/msg/CompressedImage"]
    Header = store.types["std_msgs/msg/Header"]
    Time = store.types["builtin_interfaces/msg/Time"]
    events = scenario(seconds, seed)
    width, height = size
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    topic = topic or ("/camera/image_raw/compressed" if compressed else "/camera/image_raw")
    msgtype = CompressedImage.__msgtype__ if compressed else Image.__msgtype__
    with Writer(out, version=9, storage_plugin=plugin) as writer:
        conn = writer.add_connection(topic, msgtype, typestore=store)
        for i in range(int(seconds * fps)):
            t = i / fps
            stamp = start_time + t
            sec = int(stamp)
            header = Header(stamp=Time(sec=sec, nanosec=int(round((stamp - sec) * 1e9))), frame_id="camera")
            rgb = render(t, events, width, height)
            if compressed:
                ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
                msg = CompressedImage(header=header, format="jpeg", data=jpg.reshape(-1))
            else:
                msg = Image(header=header, height=height, width=width, encoding="rgb8", is_bigendian=0,
                            step=width * 3, data=rgb.reshape(-1))
            writer.write(conn, int(stamp * 1e9), store.serialize_cdr(msg, msgtype))
    return events


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--storage", choices=["sqlite3", "mcap"], default="sqlite3")
    ap.add_argument("--compressed", action="store_true")
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    for e in write_bag(args.out, args.seconds, args.fps, args.storage, args.compressed, (w, h), args.seed):
        print(f"{e.start:6.1f}s - {e.stop:6.1f}s  {e.name}")


if __name__ == "__main__":
    main()
