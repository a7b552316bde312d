"""Where the robot was when a frame was taken, from ROS: a pose topic, or tf2.

  topic  nav_msgs/Odometry, geometry_msgs/PoseStamped or PoseWithCovarianceStamped on `pose_topic`,
         in `fixed_frame` (a message in another frame is refused and counted), through PoseTrack
         (pose_track.py: interpolation, gaps, time jumps, unit-tested without DDS). Gives the pose of
         the frame the messages describe (the robot's base, for odometry), for every camera alike.
  tf     the transform from `fixed_frame` to each image's header.frame_id at its stamp (the camera's
         own pose), when tf2_ros is importable. Not exercised here: no tf2_ros wheel exists for these
         machines (README says so).
Either way a frame whose pose cannot be had is unknown (None), never guessed. Poses often arrive
after the image they belong to (odometry has its own latency; a loaded host delays one executor
more than the other), so a frame newer than every pose waits up to `pose_wait_s` for one, as a tf2
lookup waits with a timeout; only while poses are coming (one within `stale_camera_s`), so a
stopped pose topic costs no frame a wait.
"""

from __future__ import annotations

import struct
import threading
import time

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message

from livevlm_ros.engine.memory.poses import Pose, check_pose

from .messages import pose_from_cdr, stamp_ns
from .pose_track import PoseTrack

TOPIC_TYPES = ("odometry", "pose_stamped", "pose_with_covariance_stamped")   # pose_topic_type: _message_type
# Best effort, so it matches every publisher (sensor-data and reliable alike), but a deep queue: a pose
# is small, and each one lost is a hole the frames around it fall into. The sensor-data depth of 5 is
# 50 ms of 100 Hz odometry; a host busy with the engine delayed this thread longer and lost poses
# (the demo bag at 2x on 2 cores: 136-218 of 221 received in 4 of 6 runs, frames in the holes unknown).
POSE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=200, reliability=ReliabilityPolicy.BEST_EFFORT)


def _message_type(kind: str):
    if kind == "odometry":
        from nav_msgs.msg import Odometry
        return Odometry
    from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
    return PoseStamped if kind == "pose_stamped" else PoseWithCovarianceStamped


def _pose_of(msg) -> Pose:
    """geometry_msgs/Pose inside any of the three messages -> engine Pose."""
    p = msg.pose.pose if hasattr(msg.pose, "pose") else msg.pose
    return Pose(p.position.x, p.position.y, p.position.z,
                p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w)


class TopicPoses:
    """Poses from a topic: `pose_at(stamp_ns, frame_id)` for the worker thread, fed by a subscription."""

    def __init__(self, node, params: dict, guard):
        self.p, self.topic, self.fixed_frame = params, params["pose_topic"], params["fixed_frame"]
        self.track = PoseTrack(params["max_pose_gap_s"], params["time_jump_tolerance_s"])
        self.refused_frame = self.refused_invalid = 0
        self.last_wall: float | None = None          # steady-clock seconds of the last pose received
        self._lock = threading.Lock()                # the executor adds, the engine worker reads
        self._arrived = threading.Condition(self._lock)
        # raw: the stamp, frame and pose are read from the bytes (pose_from_cdr), not a built message
        self._type = _message_type(params["pose_topic_type"])
        self._odometry = params["pose_topic_type"] == "odometry"
        # Its own node and executor thread: a robot's odometry comes at 50-100 Hz, and on the node's
        # executor its callbacks delayed the camera callbacks enough to lose images (measured: the
        # demo bag at 2x on 2 cores, one run each: 425 of 600 images received with odometry in the
        # cameras' callback group, 585 in its own group (and read from the bytes), 593 on its own
        # executor, 599 without odometry). Relative names resolve in the node's namespace.
        self._node = rclpy.create_node(f"{node.get_name()}_poses", namespace=node.get_namespace(),
                                       context=node.context)
        self._sub = self._node.create_subscription(self._type, self.topic, guard(self._on_pose),
                                                   POSE_QOS, raw=True)
        self._executor = SingleThreadedExecutor(context=node.context)
        self._executor.add_node(self._node)
        self._thread = threading.Thread(target=self._spin, name="livevlm-poses", daemon=True)
        self._thread.start()

    def _spin(self):
        try:
            self._executor.spin()
        except Exception:                           # noqa: BLE001 - shutdown of the context while spinning
            pass

    def _on_pose(self, raw: bytes):
        try:
            stamp, frame, values = pose_from_cdr(raw, self._odometry)
        except (ValueError, struct.error):          # not plain CDR: build the message
            msg = deserialize_message(raw, self._type)
            stamp, frame, values = stamp_ns(msg.header.stamp), msg.header.frame_id, _pose_of(msg)
        if frame.lstrip("/") != self.fixed_frame:
            self.refused_frame += 1
            return
        try:
            pose = check_pose(values)
        except ValueError:
            self.refused_invalid += 1
            return
        with self._arrived:
            self.track.add(stamp, pose)
            self.last_wall = time.monotonic()
            self._arrived.notify_all()

    def pose_at(self, stamp: int, frame_id: str = "") -> Pose | None:
        """The pose at `stamp` (the engine worker's thread); waits up to pose_wait_s for poses that
        reach it, while the topic is live."""
        deadline = time.monotonic() + self.p["pose_wait_s"]
        with self._arrived:
            self.track.set_tolerances(self.p["max_pose_gap_s"], self.p["time_jump_tolerance_s"])
            while self._ahead_of_poses(stamp) and (left := deadline - time.monotonic()) > 0:
                self._arrived.wait(left)
            return self.track.at(stamp)

    def _ahead_of_poses(self, stamp: int) -> bool:
        """Whether `stamp` is newer than every pose while poses are still coming."""
        newest, last = self.track.newest, self.last_wall
        return (newest is not None and stamp > newest and last is not None
                and time.monotonic() - last < self.p["stale_camera_s"])

    def status(self, stale_s: float) -> tuple[dict, str | None]:
        """Diagnostics values, and a warning when the topic went quiet (or never spoke)."""
        with self._lock:
            c, last = self.track.counts, self.last_wall
            values = dict(pose_source="topic", pose_topic=self.topic, poses_received=c.poses_received,
                          frames_with_pose=c.frames_with_pose, frames_without_pose=c.frames_without_pose,
                          pose_time_jumps=c.pose_time_jumps, poses_unstamped=c.poses_unstamped,
                          poses_refused=self.refused_frame + self.refused_invalid)
        quiet = None if last is None else time.monotonic() - last
        warn = None
        if quiet is None:
            warn = f"pose topic {self.topic}: no pose received yet (frames' poses are unknown)"
        elif quiet > stale_s:
            warn = f"pose topic {self.topic}: no pose for {quiet:.1f} s (frames' poses are unknown)"
        if self.refused_frame:
            warn = (warn + "; " if warn else "") + (f"pose topic {self.topic}: {self.refused_frame} poses not in "
                                                    f"fixed_frame {self.fixed_frame!r} refused")
        return values, warn

    def destroy(self):
        self._executor.shutdown(timeout_sec=1.0)
        self._thread.join(2.0)
        self._node.destroy_node()


class TfPoses:
    """Poses from tf2: the transform fixed_frame <- the image's frame at its stamp."""

    def __init__(self, node, params: dict):
        import tf2_ros                               # noqa: F401 - only where it is installed

        self.p, self.fixed_frame = params, params["fixed_frame"]
        self.buffer = tf2_ros.Buffer()
        self.listener = tf2_ros.TransformListener(self.buffer, node)
        self.known = self.unknown = 0
        self.last_error: str | None = None
        self._last_found = False    # wait only while lookups find transforms (a frame tf never has costs no wait)

    def pose_at(self, stamp: int, frame_id: str = "") -> Pose | None:
        from rclpy.duration import Duration
        from rclpy.time import Time

        wait = Duration(seconds=self.p["pose_wait_s"] if self._last_found else 0.0)
        try:
            t = self.buffer.lookup_transform(self.fixed_frame, frame_id, Time(nanoseconds=stamp),
                                             timeout=wait).transform
        except Exception as err:                    # noqa: BLE001 - tf2's lookup errors: unknown, never guessed
            self.unknown += 1
            self.last_error = f"{type(err).__name__}: {err}"
            self._last_found = False
            return None
        self.known += 1
        self._last_found = True
        return Pose(t.translation.x, t.translation.y, t.translation.z,
                    t.rotation.x, t.rotation.y, t.rotation.z, t.rotation.w)

    def status(self, stale_s: float) -> tuple[dict, str | None]:
        values = dict(pose_source="tf", frames_with_pose=self.known, frames_without_pose=self.unknown)
        warn = None if self.last_error is None or self.unknown == 0 else \
            f"tf {self.fixed_frame}: no transform for {self.unknown} frames (last: {self.last_error})"
        return values, warn

    def destroy(self):
        self.listener = None


def make(node, params: dict, guard):
    """The pose source `pose_source` names (auto: tf where tf2_ros is importable, else the topic
    if one is set), or None."""
    source = params["pose_source"]
    if source == "auto":
        try:
            import tf2_ros  # noqa: F401
            source = "tf"
        except ImportError:
            source = "topic" if params["pose_topic"] else "none"
    if source == "tf":
        return TfPoses(node, params)
    if source == "topic":
        return TopicPoses(node, params, guard)
    return None
