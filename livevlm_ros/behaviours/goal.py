"""An Ask goal from a leaf's parameters. No py_trees.

Times may be given as rclpy Time, builtin_interfaces Time or float seconds (camera time); a
missing side of a window stays open (a zero stamp, as the action defines)."""

from __future__ import annotations

import math

from builtin_interfaces.msg import Time

from livevlm_ros.action import Ask


def to_stamp(t) -> Time:
    """builtin_interfaces Time for rclpy Time, builtin Time, float seconds or None (zero: unset)."""
    if t is None:
        return Time()
    if isinstance(t, Time):
        return t
    if hasattr(t, "to_msg"):                         # rclpy.time.Time
        return t.to_msg()
    sec, nanosec = divmod(int(round(float(t) * 1e9)), 1_000_000_000)
    return Time(sec=sec, nanosec=nanosec)


def nanoseconds(stamp: Time) -> int:
    return stamp.sec * 1_000_000_000 + stamp.nanosec


def check_window(window_start, window_end, last_seconds: float):
    """Raise ValueError for a window the node would refuse, at construction (not at a tick)."""
    if not math.isfinite(last_seconds) or last_seconds < 0:
        raise ValueError(f"last_seconds must be a finite number >= 0, got {last_seconds}")
    if last_seconds > 0 and (window_start is not None or window_end is not None):
        raise ValueError("give a window (window_start/window_end) or last_seconds, not both")


def ask_goal(question: str, max_new_tokens: int = 0, window_start=None, window_end=None,
             last_seconds: float = 0.0, not_before=None) -> Ask.Goal:
    return Ask.Goal(question=question, max_new_tokens=max_new_tokens, window_start=to_stamp(window_start),
                    window_end=to_stamp(window_end), last_seconds=float(last_seconds),
                    not_before=to_stamp(not_before))
