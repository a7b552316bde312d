"""Play the image and pose topics of a rosbag2 (sqlite3 or mcap) into ROS, at real or accelerated
rate: images, nav_msgs/Odometry, geometry_msgs/PoseStamped and PoseWithCovarianceStamped, and
/tf + /tf_static where tf2_msgs is installed.

    livevlm_replay BAG [--rate 1.0] [--topics /camera/image_raw ...] [--remap /a:=/b] [--clock]

On a ROS 2 install `ros2 bag play BAG` does the same; this tool exists because rosbag2_py cannot be
installed from PyPI. It reads the bag with `rosbags` and publishes each message's serialized CDR
bytes unchanged (no decode/encode), paced by the bag's receive timestamps. --clock publishes
/clock as well, for nodes running with use_sim_time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import rclpy
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CompressedImage, Image

_TF_STATIC_QOS = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)   # as tf2 publishes it
IMAGE_TYPES = {"sensor_msgs/msg/Image": Image, "sensor_msgs/msg/CompressedImage": CompressedImage}


def _message_types() -> dict:
    from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
    from nav_msgs.msg import Odometry
    types = dict(IMAGE_TYPES, **{"nav_msgs/msg/Odometry": Odometry, "geometry_msgs/msg/PoseStamped": PoseStamped,
                                 "geometry_msgs/msg/PoseWithCovarianceStamped": PoseWithCovarianceStamped})
    try:
        from tf2_msgs.msg import TFMessage
        types["tf2_msgs/msg/TFMessage"] = TFMessage
    except ImportError:                                   # no tf2_msgs wheel on these machines
        pass
    return types


MSG_TYPES = _message_types()


class BagReplayer(Node):
    def __init__(self, bag: Path, rate: float, topics: list[str] | None, remap: dict[str, str], clock: bool,
                 wait_subscribers: float = 5.0):
        super().__init__("livevlm_replay")
        self.bag, self.rate, self.topics, self.remap = bag, rate, topics, remap
        self.wait_subscribers = wait_subscribers
        self.clock_pub = self.create_publisher(Clock, "/clock", 10) if clock else None
        self.published = 0

    def _wait_for_subscribers(self, pubs, timeout: float):
        """Discovery takes a moment: give subscribers that time before the first message."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and not all(p.get_subscription_count() for p in pubs):
            time.sleep(0.05)
        time.sleep(0.2)                                    # matched; let the reverse direction settle

    def play(self) -> int:
        from rosbags.highlevel import AnyReader

        with AnyReader([self.bag]) as reader:
            conns = [c for c in reader.connections if c.msgtype in MSG_TYPES
                     and (not self.topics or c.topic in self.topics)]
            if not any(c.msgtype in IMAGE_TYPES for c in conns):
                raise SystemExit(f"{self.bag}: no image topics to play (have: "
                                 f"{sorted({c.topic for c in reader.connections})})")
            pubs = {c.id: self.create_publisher(MSG_TYPES[c.msgtype], self.remap.get(c.topic, c.topic),
                                                _TF_STATIC_QOS if c.topic == "/tf_static" else 10)
                    for c in conns}
            self.get_logger().info(f"playing {len(conns)} topic(s) from {self.bag} at rate {self.rate or 'max'}")
            # (the image topics: a pose or tf topic nobody listens to is not waited for)
            self._wait_for_subscribers([pubs[c.id] for c in conns if c.msgtype in IMAGE_TYPES], self.wait_subscribers)
            wall0 = bag0 = None
            for conn, stamp, raw in reader.messages(connections=conns):
                if not rclpy.ok():
                    break
                if wall0 is None:
                    wall0, bag0 = time.monotonic(), stamp
                if self.rate > 0:
                    delay = wall0 + (stamp - bag0) * 1e-9 / self.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                if self.clock_pub is not None:
                    clock = Clock()
                    clock.clock.sec, clock.clock.nanosec = divmod(stamp, 1_000_000_000)
                    self.clock_pub.publish(clock)
                pubs[conn.id].publish(bytes(raw))
                self.published += 1
        return self.published


def large_data_profile() -> str:
    """config/fastdds_large_data.xml where ROS installed it (share/), or beside this checkout."""
    try:
        from ament_index_python.packages import get_package_share_directory
        return str(Path(get_package_share_directory("livevlm_ros")) / "config" / "fastdds_large_data.xml")
    except Exception:                               # noqa: BLE001 - not installed: the source tree
        return str(Path(__file__).resolve().parents[2] / "config" / "fastdds_large_data.xml")


def main(argv=None):
    argv = sys.argv if argv is None else argv
    ros_args = rclpy.utilities.remove_ros_args(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bag", type=Path)
    ap.add_argument("--rate", type=float, default=1.0, help="playback speed (0 = as fast as possible)")
    ap.add_argument("--topics", nargs="*", help="topics to play (default: every image and pose topic)")
    ap.add_argument("--remap", nargs="*", default=[], help="FROM:=TO topic renames")
    ap.add_argument("--clock", action="store_true", help="also publish /clock")
    ap.add_argument("--wait-subscribers", type=float, default=5.0,
                    help="seconds to wait for every topic to have a subscriber before playing")
    args = ap.parse_args(ros_args[1:])
    remap = dict(r.split(":=", 1) for r in args.remap)
    # Large frames over shared memory need the publisher's segment to fit them (see
    # config/fastdds_large_data.xml); a user's own profile wins.
    os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", large_data_profile())
    rclpy.init(args=argv)
    node = BagReplayer(args.bag, args.rate, args.topics, remap, args.clock, args.wait_subscribers)
    try:
        n = node.play()
        time.sleep(0.5)                                      # let the last messages leave
        print(f"published {n} messages", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()

