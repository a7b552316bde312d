"""Conversions between ROS messages and the engine's plain values.

Times travel as integer nanoseconds from the image header to memory and back into evidence,
spans and narration, so an evidence stamp equals its image's header stamp bit for bit (float
seconds cannot hold a ROS stamp's nanoseconds: at 1.7e9 s a double resolves ~0.2 us).
"""

from __future__ import annotations

import math
import struct

from builtin_interfaces.msg import Time
from geometry_msgs.msg import PoseStamped
from sensor_msgs.msg import CompressedImage, Image

from livevlm_ros.action import Ask
from livevlm_ros.msg import Evidence
from livevlm_ros.srv import Query

NS = 1_000_000_000


def stamp_ns(t: Time) -> int:
    return t.sec * NS + t.nanosec


def time_msg(ns: int) -> Time:
    return Time(sec=ns // NS, nanosec=ns % NS)


def seconds_ns(seconds: float) -> int:
    return round(seconds * NS)


def image_type(topic: str):
    """The message type a camera topic carries: sensor_msgs/CompressedImage for a name ending in
    `compressed`, else sensor_msgs/Image."""
    return CompressedImage if topic.rstrip("/").endswith("compressed") else Image


def header_stamp_ns(raw: bytes) -> int:
    """The header stamp of a serialized (CDR) sensor_msgs/Image or CompressedImage, read without
    deserializing the message: after the 4-byte encapsulation header come header.stamp.sec
    (int32) and header.stamp.nanosec (uint32), little- or big-endian as the encapsulation says.
    Raises ValueError on bytes too short to hold them, or in another encoding (XCDR2 has other
    alignment rules: the caller deserializes those)."""
    if len(raw) < 12:
        raise ValueError(f"serialized image of {len(raw)} bytes is too short for a header")
    if raw[0] != 0 or raw[1] not in (0, 1):
        raise ValueError(f"not plain CDR (encapsulation {raw[0]:#04x}{raw[1]:02x})")
    order = "<" if raw[1] else ">"            # CDR_LE = 0x0001, CDR_BE = 0x0000
    sec, nanosec = struct.unpack_from(order + "iI", raw, 4)
    return sec * NS + nanosec


def pose_from_cdr(raw: bytes, skip_child_frame: bool) -> tuple[int, str, tuple]:
    """(header stamp ns, header frame_id, (x, y, z, qx, qy, qz, qw)) of a serialized (plain CDR)
    geometry_msgs/PoseStamped or PoseWithCovarianceStamped, or nav_msgs/Odometry
    (`skip_child_frame`: its child_frame_id string comes before the pose), read without building
    the message (an Odometry is 90 numbers; a robot sends 50 a second). Offsets count from the end
    of the 4-byte encapsulation header; the pose's doubles are 8-aligned. ValueError where the bytes
    are not plain CDR or too short (the caller deserializes those)."""
    if len(raw) < 16 or raw[0] != 0 or raw[1] not in (0, 1):
        raise ValueError("not plain CDR")
    order = "<" if raw[1] else ">"
    data = memoryview(raw)[4:]
    sec, nanosec, n = struct.unpack_from(order + "iII", data, 0)
    frame = bytes(data[12:12 + n]).rstrip(b"\0").decode("utf-8", "replace")
    at = 12 + n
    if skip_child_frame:
        at = -(-at // 4) * 4
        (n,) = struct.unpack_from(order + "I", data, at)
        at += 4 + n
    at = -(-at // 8) * 8
    if len(data) < at + 56:
        raise ValueError("too short for a pose")
    return sec * NS + nanosec, frame, struct.unpack_from(order + "7d", data, at)


def pose_msg(pose, stamp: int, frame: str) -> tuple[bool, PoseStamped]:
    """(known, PoseStamped) of an engine Pose or None (unknown: all zeros)."""
    msg = PoseStamped()
    msg.header.stamp, msg.header.frame_id = time_msg(stamp), frame
    if pose is None:
        return False, msg
    p = msg.pose
    p.position.x, p.position.y, p.position.z = pose.x, pose.y, pose.z
    p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w = pose.qx, pose.qy, pose.qz, pose.qw
    return True, msg


def evidence_msg(e, frame_ids: dict, fixed_frame: str) -> Evidence:
    known, pose = pose_msg(e.pose, e.time, fixed_frame)
    return Evidence(stamp=time_msg(e.time), camera=e.camera, frame_id=frame_ids.get(e.camera, ""),
                    weight=float(e.weight), pose_known=known, pose=pose)


def fill_response(response: Query.Response, answer, frame_ids: dict, fixed_frame: str) -> Query.Response:
    """A Query response from the engine's Answer (success and error are set by the caller);
    frame_ids: each camera topic's image frame_id."""
    response.answer = answer.text
    response.time_to_first_token_s = float(answer.ttft_s)
    if answer.span:
        response.span_start, response.span_end = time_msg(answer.span[0]), time_msg(answer.span[1])
    response.pages_used, response.pages_total = answer.pages_used, answer.pages_total
    response.tokens_generated = answer.tokens_generated
    response.evidence = [evidence_msg(e, frame_ids, fixed_frame) for e in answer.evidence]
    return response


def ask_result(r: Query.Response) -> Ask.Result:
    """The Ask action's result carries the Query response's fields."""
    return Ask.Result(success=r.success, answer=r.answer, error_message=r.error_message, latency_s=r.latency_s,
                      time_to_first_token_s=r.time_to_first_token_s, span_start=r.span_start, span_end=r.span_end,
                      pages_used=r.pages_used, pages_total=r.pages_total, tokens_generated=r.tokens_generated,
                      evidence=r.evidence)


def request_window(request) -> tuple | None:
    """A Query request's or Ask goal's time window, in ns: (start | None, end | None), or
    ("last", ns) for last_seconds (resolved against the newest frame when answered)."""
    if request.last_seconds > 0:
        return ("last", seconds_ns(request.last_seconds))
    start, end = stamp_ns(request.window_start), stamp_ns(request.window_end)
    if start or end:
        return (start or None, end or None)
    return None


def request_place(request, fixed_frame: str) -> tuple | str | None:
    """A Query request's or Ask goal's place: ((x, y[, z]), radius_m), None (radius_m 0: no place),
    or why it cannot be one."""
    r, near = request.radius_m, request.near
    if r == 0:
        return None
    if not math.isfinite(r) or r < 0:
        return f"radius_m must be a finite number > 0 (0 = no place), got {r}"
    frame = near.header.frame_id.lstrip("/")
    if frame and frame != fixed_frame:
        return f"near is in frame {frame!r}, but memory's poses are in fixed_frame {fixed_frame!r}"
    point = (near.point.x, near.point.y, near.point.z) if request.near_in_3d else (near.point.x, near.point.y)
    if not all(math.isfinite(v) for v in point):
        return f"near {point} is not finite"
    return point, r
