"""Where a frame was taken: the robot's (camera's) pose in a fixed frame, kept per frame.

A pose is position (x, y, z, metres) and orientation (a unit quaternion x, y, z, w) in one fixed
frame (the node's `fixed_frame`, `map` by default), or None: unknown, never guessed. Questions about
a place read only frames whose position lies within a radius of a point (`frames_near`).
"""

from __future__ import annotations

import math
from typing import NamedTuple


class Pose(NamedTuple):
    x: float
    y: float
    z: float
    qx: float = 0.0
    qy: float = 0.0
    qz: float = 0.0
    qw: float = 1.0


def check_pose(pose) -> Pose | None:
    """A Pose (or 7 numbers, or 3: a position with no rotation), or None; ValueError if not finite
    or the quaternion is not unit length (within 1e-3)."""
    if pose is None:
        return None
    values = tuple(float(v) for v in pose)
    if len(values) not in (3, 7):
        raise ValueError(f"a pose is 3 numbers (x, y, z) or 7 (and qx, qy, qz, qw), got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"pose {values} is not finite")
    pose = Pose(*values)
    norm = math.sqrt(pose.qx ** 2 + pose.qy ** 2 + pose.qz ** 2 + pose.qw ** 2)
    if abs(norm - 1.0) > 1e-3:
        raise ValueError(f"pose orientation ({pose.qx}, {pose.qy}, {pose.qz}, {pose.qw}) is not a unit quaternion")
    return pose


def check_place(near, radius_m) -> tuple[tuple[float, ...], float]:
    """near: 2 numbers (x, y: distance in the plane) or 3 (x, y, z); radius_m > 0. ValueError otherwise."""
    try:
        point = tuple(float(v) for v in near)
        radius = float(radius_m)
    except (TypeError, ValueError):
        raise ValueError(f"a place is near=(x, y[, z]) and radius_m, got near={near!r}, radius_m={radius_m!r}") \
            from None
    if len(point) not in (2, 3):
        raise ValueError(f"near must be (x, y) or (x, y, z), got {len(point)} numbers")
    if not all(math.isfinite(v) for v in point):
        raise ValueError(f"near {point} is not finite")
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius_m must be a finite number > 0, got {radius}")
    return point, radius


def frames_near(poses: list[Pose | None], point: tuple[float, ...], radius: float) -> list[bool]:
    """Per frame: was it taken within `radius` of `point` (in the plane for a 2-D point)? Unknown: no."""
    def near(p: Pose | None) -> bool:
        if p is None:
            return False
        return math.dist((p.x, p.y, p.z)[:len(point)], point) <= radius
    return [near(p) for p in poses]


def region_covered(poses: list[Pose | None]) -> str:
    """Where memory's frames were taken, for messages: the box of their known positions."""
    known = [p for p in poses if p is not None]
    if not known:
        return "no frame with a known pose"
    lo = [min(getattr(p, a) for p in known) for a in "xyz"]
    hi = [max(getattr(p, a) for p in known) for a in "xyz"]
    return ("x {:.2f}..{:.2f}, y {:.2f}..{:.2f}, z {:.2f}..{:.2f} m ({} of {} frames with a pose)"
            .format(lo[0], hi[0], lo[1], hi[1], lo[2], hi[2], len(known), len(poses)))
