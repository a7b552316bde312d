"""Pose track: where the robot was at an image's stamp, from a pose topic. No ROS: plain data in,
plain data out, so interpolation, gaps and time jumps are unit-tested without DDS.

Poses arrive as (header stamp in integer nanoseconds, engine Pose) from nav_msgs/Odometry,
geometry_msgs/PoseStamped or PoseWithCovarianceStamped (the node converts). Rules, in pose time
(header stamps), never wall time:
  between     a stamp between two poses at most `max_gap_s` apart: position interpolated linearly,
              orientation by slerp (the shorter way round);
  beyond      a stamp after the newest pose (the image came first) takes the newest pose when it is
              at most `max_gap_s` older: held, never extrapolated. Otherwise, and before the oldest
              pose, and across a larger gap: unknown (None), never guessed;
  out of order a pose older than the newest (within the jump tolerance) is put in its place;
  time jumps  a pose stamped more than `jump_tolerance_s` before the newest (a bag replayed again):
              the track starts over from it, as the camera intake does for images. The track before
              the jump answers one kind of stamp: one the new track does not know, more than both
              `jump_tolerance_s` and `max_gap_s` after its newest pose, which belongs to the time
              before the jump (a frame taken at the end of the bag's last pass, ingested by a worker
              that was busy while the bag looped). It is dropped once the new track reaches its
              time, where it could only guess;
  stamp 0     an unset header stamp: refused and counted.
Poses older than `keep_s` behind the newest are forgotten (images are sampled within seconds).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from livevlm_ros.engine.memory.poses import Pose

NS = 1_000_000_000


@dataclass
class PoseCounts:
    poses_received: int = 0
    poses_unstamped: int = 0
    pose_time_jumps: int = 0
    frames_with_pose: int = 0
    frames_without_pose: int = 0


class PoseTrack:
    def __init__(self, max_gap_s: float = 0.5, jump_tolerance_s: float = 1.0, keep_s: float = 30.0):
        self.keep = int(keep_s * NS)
        self.set_tolerances(max_gap_s, jump_tolerance_s)
        self._stamps: list[int] = []
        self._poses: list[Pose] = []
        self._before_jump: tuple[list[int], list[Pose]] = ([], [])
        self.counts = PoseCounts()

    def set_tolerances(self, max_gap_s: float, jump_tolerance_s: float):
        """The two rules' seconds (parameters a running node may change)."""
        self.max_gap, self.jump_tolerance = int(max_gap_s * NS), int(jump_tolerance_s * NS)

    @property
    def newest(self) -> int | None:
        return self._stamps[-1] if self._stamps else None

    def add(self, stamp: int, pose: Pose) -> str:
        """'kept', 'unstamped' (refused), or 'jump' (the track started over from this pose)."""
        self.counts.poses_received += 1
        if stamp == 0:
            self.counts.poses_unstamped += 1
            return "unstamped"
        outcome = "kept"
        if self._stamps and stamp < self._stamps[-1] - self.jump_tolerance:
            self.counts.pose_time_jumps += 1
            self._before_jump = (self._stamps, self._poses)
            self._stamps, self._poses = [], []
            outcome = "jump"
        at = bisect.bisect_right(self._stamps, stamp)
        if at and self._stamps[at - 1] == stamp:       # the same instant again: the newer message wins
            self._poses[at - 1] = pose
        else:
            self._stamps.insert(at, stamp)
            self._poses.insert(at, pose)
        old = bisect.bisect_left(self._stamps, self._stamps[-1] - self.keep)
        if old:
            del self._stamps[:old], self._poses[:old]
        before = self._before_jump[0]
        if before and self._stamps[-1] >= before[0] - self.jump_tolerance:
            self._before_jump = ([], [])                 # the new pass reached the old one's time
        return outcome

    def at(self, stamp: int) -> Pose | None:
        """The pose at `stamp` by the rules above, or None (unknown); counted."""
        pose = self._lookup(stamp)
        if pose is None:
            self.counts.frames_without_pose += 1
        else:
            self.counts.frames_with_pose += 1
        return pose

    def _lookup(self, stamp: int) -> Pose | None:
        pose = self._lookup_in(self._stamps, self._poses, stamp)
        if (pose is None and self._before_jump[0] and self._stamps
                and stamp > self._stamps[-1] + max(self.jump_tolerance, self.max_gap)):
            pose = self._lookup_in(*self._before_jump, stamp)           # from before the last time jump
        return pose

    def _lookup_in(self, s: list[int], poses: list[Pose], stamp: int) -> Pose | None:
        if not s or stamp < s[0]:
            return None
        i = bisect.bisect_right(s, stamp) - 1          # s[i] <= stamp
        if s[i] == stamp:
            return poses[i]
        if i == len(s) - 1:                            # after the newest: held within the gap
            return poses[i] if stamp - s[i] <= self.max_gap else None
        if s[i + 1] - s[i] > self.max_gap:
            return None
        return interpolate(poses[i], poses[i + 1], (stamp - s[i]) / (s[i + 1] - s[i]))


def interpolate(a: Pose, b: Pose, t: float) -> Pose:
    """The pose a fraction t of the way from a to b: position linearly, orientation by slerp."""
    position = [pa + t * (pb - pa) for pa, pb in zip(a[:3], b[:3])]
    return Pose(*position, *slerp(a[3:], b[3:], t))


def slerp(qa, qb, t: float) -> tuple[float, float, float, float]:
    """Spherical linear interpolation of unit quaternions (x, y, z, w), the shorter way round."""
    dot = sum(x * y for x, y in zip(qa, qb))
    if dot < 0:                                        # q and -q are one rotation: take the nearer
        qb, dot = [-x for x in qb], -dot
    if dot > 0.9995:                                   # nearly equal: linear, then normalised
        q = [x + t * (y - x) for x, y in zip(qa, qb)]
    else:
        theta = math.acos(min(dot, 1.0))
        wa, wb = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
        q = [wa * x + wb * y for x, y in zip(qa, qb)]
    norm = math.sqrt(sum(x * x for x in q))
    return tuple(x / norm for x in q)
