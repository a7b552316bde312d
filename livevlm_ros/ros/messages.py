"""Conversions between ROS messages and the engine's plain values.

Times travel as integer nanoseconds from the image header to memory and back into evidence,
spans and narration, so an evidence stamp equals its image's header stamp bit for bit (float
seconds cannot hold a ROS stamp's nanoseconds: at 1.7e9 s a double resolves ~0.2 us).
"""

from __future__ import annotations

import struct

from builtin_interfaces.msg import Time

from livevlm_ros.action import Ask
from livevlm_ros.srv import Query

NS = 1_000_000_000


def stamp_ns(t: Time) -> int:
    return t.sec * NS + t.nanosec


def time_msg(ns: int) -> Time:
    return Time(sec=ns // NS, nanosec=ns % NS)


def seconds_ns(seconds: float) -> int:
    return round(seconds * NS)


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


def fill_response(response: Query.Response, answer) -> Query.Response:
    """A Query response from the engine's Answer (success and error are set by the caller)."""
    response.answer = answer.text
    response.time_to_first_token_s = float(answer.ttft_s)
    if answer.span:
        response.span_start, response.span_end = time_msg(answer.span[0]), time_msg(answer.span[1])
    response.pages_used, response.pages_total = answer.pages_used, answer.pages_total
    response.tokens_generated = answer.tokens_generated
    response.evidence_times = [time_msg(e.time) for e in answer.evidence]
    response.evidence_weights = [float(e.weight) for e in answer.evidence]
    response.evidence_cameras = [e.camera for e in answer.evidence]
    return response


def ask_result(r: Query.Response) -> Ask.Result:
    """The Ask action's result carries the Query response's fields."""
    return Ask.Result(success=r.success, answer=r.answer, error_message=r.error_message, latency_s=r.latency_s,
                      time_to_first_token_s=r.time_to_first_token_s, span_start=r.span_start, span_end=r.span_end,
                      pages_used=r.pages_used, pages_total=r.pages_total, tokens_generated=r.tokens_generated,
                      evidence_times=r.evidence_times, evidence_weights=r.evidence_weights,
                      evidence_cameras=r.evidence_cameras)


def request_window(request) -> tuple | None:
    """A Query request's or Ask goal's time window, in ns: (start | None, end | None), or
    ("last", ns) for last_seconds (resolved against the newest frame when answered)."""
    if request.last_seconds > 0:
        return ("last", seconds_ns(request.last_seconds))
    start, end = stamp_ns(request.window_start), stamp_ns(request.window_end)
    if start or end:
        return (start or None, end or None)
    return None
