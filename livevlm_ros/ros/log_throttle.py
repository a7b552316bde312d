"""The node's one logging rule: every warning goes through `logger.warning()` (never the deprecated
`warn()`), and a repeating one is rate-limited by a Throttle, keyed by what it is about, never by
rclpy's `throttle_duration_sec`.

Why not rclpy's throttling: rclpy keys its logging filters by call site, and a call site that is
reached with other filter arguments (or two sites that look alike to it, as every `warn()` does
through its deprecation wrapper) raises "Requested logging filters cannot be changed between
calls" inside the callback that logs, which takes the executor and the process down with it.
"""

from __future__ import annotations

import threading
import time


class Throttle:
    def __init__(self, clock=time.monotonic):
        self._clock, self._last, self._lock = clock, {}, threading.Lock()

    def ok(self, key: str, period_s: float) -> bool:
        """True at most once per `period_s` for each key (the first time always)."""
        now = self._clock()
        with self._lock:
            if now - self._last.get(key, float("-inf")) < period_s:
                return False
            self._last[key] = now
            return True
