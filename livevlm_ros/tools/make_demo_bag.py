"""Write a synthetic robot-camera rosbag2 (sqlite3 or mcap) of the world in `synthetic_world.py`:
rooms, a door that opens and closes, objects that appear, move and disappear at known times, and
where the robot is: /odom (nav_msgs/Odometry, map -> base_link, 20 Hz) and /tf (the same transform)
with /tf_static (base_link -> camera). The demo, the tests and the demo model's training all draw
from the same world; the episode returned is the ground truth.

    python -m livevlm_ros.tools.make_demo_bag out_bag [--seconds 60] [--fps 10] [--storage mcap]
                                              [--compressed] [--size 320x240] [--seed 7]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from livevlm_ros.tools.synthetic_world import Episode

DEMO_SEED = 7        # a held-out episode (training used seeds >= 1,000,000)


POSE_HZ = 20.0


def write_bag(out: Path, seconds: float = 60.0, fps: float = 10.0, storage: str = "sqlite3",
              compressed: bool = False, size: tuple[int, int] = (320, 240), seed: int = DEMO_SEED,
              topic: str | None = None, start_time: float = 1_700_000_000.0, poses: bool = True) -> Episode:
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    Image = store.types["sensor_msgs/msg/Image"]
    CompressedImage = store.types["sensor_msgs/msg/CompressedImage"]
    Header = store.types["std_msgs/msg/Header"]
    Time = store.types["builtin_interfaces/msg/Time"]

    def header(stamp: float, frame: str):
        sec = int(stamp)
        return Header(stamp=Time(sec=sec, nanosec=int(round((stamp - sec) * 1e9))), frame_id=frame)

    episode = Episode.generate(seed, seconds)
    width, height = size
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    topic = topic or ("/camera/image_raw/compressed" if compressed else "/camera/image_raw")
    msgtype = CompressedImage.__msgtype__ if compressed else Image.__msgtype__
    with Writer(out, version=9, storage_plugin=plugin) as writer:
        conn = writer.add_connection(topic, msgtype, typestore=store)
        if poses:
            _write_poses(writer, store, header, episode, seconds, start_time)
        for i in range(int(seconds * fps)):
            t = i / fps
            stamp = start_time + t
            rgb = episode.render(t, width, height)
            if compressed:
                ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
                msg = CompressedImage(header=header(stamp, "camera"), format="jpeg", data=jpg.reshape(-1))
            else:
                msg = Image(header=header(stamp, "camera"), height=height, width=width, encoding="rgb8",
                            is_bigendian=0, step=width * 3, data=rgb.reshape(-1))
            writer.write(conn, int(stamp * 1e9), store.serialize_cdr(msg, msgtype))
    return episode


def _write_poses(writer, store, header, episode: Episode, seconds: float, start_time: float):
    """/odom and /tf (map -> base_link) at POSE_HZ, /tf_static (base_link -> camera, 1 m up)."""
    T = store.types
    Odometry, TFMessage = T["nav_msgs/msg/Odometry"], T["tf2_msgs/msg/TFMessage"]
    Pose, Point, Quaternion = T["geometry_msgs/msg/Pose"], T["geometry_msgs/msg/Point"], T["geometry_msgs/msg/Quaternion"]
    Transform, Vector3 = T["geometry_msgs/msg/Transform"], T["geometry_msgs/msg/Vector3"]
    Stamped = T["geometry_msgs/msg/TransformStamped"]
    PoseCov, TwistCov = T["geometry_msgs/msg/PoseWithCovariance"], T["geometry_msgs/msg/TwistWithCovariance"]
    Twist = T["geometry_msgs/msg/Twist"]
    odom = writer.add_connection("/odom", Odometry.__msgtype__, typestore=store)
    tf = writer.add_connection("/tf", TFMessage.__msgtype__, typestore=store)
    static = writer.add_connection("/tf_static", TFMessage.__msgtype__, typestore=store)
    zeros = np.zeros(36, dtype=np.float64)
    mount = Stamped(header=header(start_time, "base_link"), child_frame_id="camera",
                    transform=Transform(translation=Vector3(x=0.0, y=0.0, z=1.0),
                                        rotation=Quaternion(x=0.0, y=0.0, z=0.0, w=1.0)))
    writer.write(static, int(start_time * 1e9), store.serialize_cdr(TFMessage(transforms=[mount]),
                                                                     TFMessage.__msgtype__))
    for i in range(int(seconds * POSE_HZ) + 1):
        t = i / POSE_HZ
        stamp = start_time + t
        x, y, z, qx, qy, qz, qw = episode.pose(min(t, seconds - 1e-6))
        q = Quaternion(x=qx, y=qy, z=qz, w=qw)
        msg = Odometry(header=header(stamp, "map"), child_frame_id="base_link",
                       pose=PoseCov(pose=Pose(position=Point(x=x, y=y, z=z), orientation=q), covariance=zeros),
                       twist=TwistCov(twist=Twist(linear=Vector3(x=0.0, y=0.0, z=0.0),
                                                  angular=Vector3(x=0.0, y=0.0, z=0.0)), covariance=zeros))
        writer.write(odom, int(stamp * 1e9), store.serialize_cdr(msg, Odometry.__msgtype__))
        moved = Stamped(header=header(stamp, "map"), child_frame_id="base_link",
                        transform=Transform(translation=Vector3(x=x, y=y, z=z), rotation=q))
        writer.write(tf, int(stamp * 1e9), store.serialize_cdr(TFMessage(transforms=[moved]), TFMessage.__msgtype__))


def describe(episode: Episode) -> str:
    lines = []
    for v in episode.visits:
        door = "open" if v.door_open else "closed"
        if v.door_toggle is not None:
            door += f", {'closes' if v.door_open else 'opens'} at {v.door_toggle:.1f}s"
        x0, x1 = episode.pose(v.start)[0], episode.pose(v.stop - 1e-6)[0]
        lines.append(f"{v.start:5.1f}-{v.stop:5.1f}s  {v.room} (door {door}; robot x {x0:.1f} -> {x1:.1f} m, "
                     f"y {episode.pose(v.start)[1]:.1f} m)")
        for s in v.sightings:
            move = f", moves {s.spot2} at {s.move_at:.1f}s" if s.move_at is not None else ""
            lines.append(f"    {s.appear:5.1f}-{s.disappear:5.1f}s  {s.name} {s.spot}{move}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--storage", choices=["sqlite3", "mcap"], default="sqlite3")
    ap.add_argument("--compressed", action="store_true")
    ap.add_argument("--size", default="320x240")
    ap.add_argument("--seed", type=int, default=DEMO_SEED)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    print(describe(write_bag(args.out, args.seconds, args.fps, args.storage, args.compressed, (w, h), args.seed)))


if __name__ == "__main__":
    main()
