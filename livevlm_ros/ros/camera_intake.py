"""Camera intake: which camera frames become samples for the engine. No ROS, no engine: plain data
in, plain data out, so sampling, camera sync and time jumps are unit-tested without DDS.

Frames arrive as (camera topic, header stamp in integer nanoseconds, message) where the message is
whatever the caller keeps: the node keeps the serialized bytes and deserializes only what is
sampled, so a frame that is not sampled costs a stamp read and nothing else.

Rules, all in camera time (header stamps), never wall time:
  sampling    a sample is due when a camera's frame is stamped one sampling period after the last
              sample; it takes every camera's frame nearest its stamp (within the sync slop), and a
              camera's frame that arrives later still joins a queued sample it is nearer to.
  the queue   bounded; when full the oldest sample is dropped and counted.
  time jumps  judged per camera against that camera's own last stamp: a stamp more than the
              tolerance older is a jump (a bag replayed again). Two cameras on different clocks
              are therefore not a jump; the one behind simply never makes a sample due (it is
              reported by `clock_offsets`). `reset` clears everything sampled so far (the caller
              clears memory), `refuse` drops that camera's frames until they pass its old stamp.
  stamp 0     an unset header stamp (a driver that does not stamp): refused and counted, never
              guessed from the wall clock.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

NS = 1_000_000_000


@dataclass
class Sample:
    stamp: int                          # ns: the stamp of the frame that made it due
    frames: dict                        # camera topic -> (stamp ns, message): the frames in it
    made: float                         # monotonic seconds, for the sync wait


@dataclass
class IntakeCounts:
    frames_received: int = 0
    frames_sampled: int = 0
    frames_dropped: int = 0             # queue overflow: the engine fell behind
    frames_refused_time: int = 0        # dropped while waiting for the stream to pass a jump (refuse)
    frames_unstamped: int = 0           # header stamp 0
    time_jumps: int = 0


@dataclass
class _Camera:
    recent: collections.deque = field(default_factory=collections.deque)   # (stamp, message), oldest first
    last_stamp: int | None = None       # newest stamp accepted from this camera
    wall: float = 0.0                   # monotonic time of its last frame
    refuse_until: int | None = None     # on_time_jump=refuse: its frames up to this stamp are dropped
    jumped_from: int | None = None      # the last jump: (from) ...
    jumped_to: int | None = None        # ... (to), for the log line
    unstamped: bool = False             # its last frame had header stamp 0


class CameraIntake:
    """Samples frames of one or more cameras. Not thread-safe: the caller holds one lock around
    every call (the node's work queue does)."""

    def __init__(self, topics: list[str], params: dict, clock=time.monotonic):
        """params: the node's parameter dict, read at every call so `ros2 param set` takes effect
        (sample_fps, camera_sync_slop_s, camera_sync_wait_s, stale_camera_s, time_jump_tolerance_s,
        on_time_jump, frame_queue_size)."""
        self.topics, self.p, self.clock = list(topics), params, clock
        self.counts = IntakeCounts()
        self.queue: collections.deque[Sample] = collections.deque()
        self.cameras = {t: _Camera() for t in self.topics}
        self.last_sampled: int | None = None     # stamp of the newest sample
        self.newest: int | None = None           # newest stamp accepted from any camera
        self._started = False

    # ---- frames in --------------------------------------------------------------------------------
    def offer(self, topic: str, stamp: int, msg) -> str:
        """One frame. Returns what became of it: 'sampled' (it made a sample due), 'kept' (kept for
        a sample, or joined a queued one), 'unstamped', 'refused' (time rule), or 'jump' (a time
        jump under on_time_jump=reset: the caller must clear memory; the frame is kept)."""
        now = self.clock()
        cam = self.cameras[topic]
        if not self._started:            # silence is counted from the stream's first frame, not start
            self._started = True
            for c in self.cameras.values():
                c.wall = now
        self.counts.frames_received += 1
        cam.wall = now
        cam.unstamped = stamp == 0
        if cam.unstamped:
            self.counts.frames_unstamped += 1
            return "unstamped"
        outcome = "kept"
        if cam.refuse_until is not None:
            if stamp <= cam.refuse_until:
                self.counts.frames_refused_time += 1
                return "refused"
            cam.refuse_until = None
        elif cam.last_stamp is not None and stamp < cam.last_stamp - self._ns("time_jump_tolerance_s"):
            self.counts.time_jumps += 1
            cam.jumped_from, cam.jumped_to = cam.last_stamp, stamp
            if self.p["on_time_jump"] == "refuse":
                cam.refuse_until = cam.last_stamp
                cam.recent.clear()
                self.counts.frames_refused_time += 1
                return "refused"
            self.clear()
            outcome = "jump"
        cam.last_stamp = stamp if cam.last_stamp is None or outcome == "jump" else max(cam.last_stamp, stamp)
        self.newest = stamp if self.newest is None else max(self.newest, stamp)
        cam.recent.append((stamp, msg))
        for sample in self.queue:        # another camera's frame of a queued instant
            self._offer_to(sample, topic, stamp, msg)
        self._prune()
        last = self.last_sampled
        if last is not None and stamp - last < self._period():
            return outcome               # not due (or a little out of order)
        self.last_sampled = stamp
        self.counts.frames_sampled += 1
        if len(self.queue) >= self.p["frame_queue_size"]:
            self.queue.popleft()
            self.counts.frames_dropped += 1
        self.queue.append(Sample(stamp, self._nearest(stamp), now))
        return "jump" if outcome == "jump" else "sampled"

    def clear(self):
        """Forget everything sampled and kept (a time jump, or memory cleared by the caller)."""
        self.queue.clear()
        for cam in self.cameras.values():
            cam.recent.clear()
            cam.last_stamp = None
        self.last_sampled = self.newest = None

    # ---- samples out ------------------------------------------------------------------------------
    def take(self) -> tuple[str, object] | None:
        """('sample', the oldest sample) if it may go to the engine now; ('wait', seconds) while it
        waits for the cameras not yet in it; None when the queue is empty. A sample waits at most
        camera_sync_wait_s (wall) from when it was made: an idle engine would otherwise take it the
        moment its first camera's frame came, before the others' frames of that instant. It does
        not wait for a camera whose newest frame is already past it (that camera skipped the
        instant) or that is silent (stale_camera_s)."""
        if not self.queue:
            return None
        sample, now, slop = self.queue[0], self.clock(), self._ns("camera_sync_slop_s")

        def may_still_come(topic: str, cam: _Camera) -> bool:
            return (topic not in sample.frames and not (cam.last_stamp is not None and cam.last_stamp > sample.stamp + slop)
                    and now - cam.wall < self.p["stale_camera_s"])
        waits = any(may_still_come(t, c) for t, c in self.cameras.items())
        wait = self.p["camera_sync_wait_s"] - (now - sample.made) if waits else 0.0
        return ("sample", self.queue.popleft()) if wait <= 0 else ("wait", wait)

    def trim(self):
        """Drop the oldest samples beyond frame_queue_size (after the parameter was lowered)."""
        while len(self.queue) > self.p["frame_queue_size"]:
            self.queue.popleft()
            self.counts.frames_dropped += 1

    # ---- what diagnostics report ------------------------------------------------------------------
    def seconds_silent(self) -> dict[str, float]:
        now = self.clock()
        return {t: (now - c.wall if self._started else 0.0) for t, c in self.cameras.items()}

    def clock_offsets(self) -> dict[str, float]:
        """Per camera, seconds its newest stamp lies behind the newest stamp of any camera. A camera
        far behind (beyond the time-jump tolerance) is on another clock: its frames join no sample."""
        if self.newest is None:
            return {}
        return {t: (self.newest - c.last_stamp) / NS for t, c in self.cameras.items() if c.last_stamp is not None}

    def unstamped(self) -> list[str]:
        """Cameras whose last frame had header stamp 0."""
        return [t for t, c in self.cameras.items() if c.unstamped]

    def last_jump(self, topic: str) -> tuple[int, int] | None:
        cam = self.cameras[topic]
        return None if cam.jumped_from is None else (cam.jumped_from, cam.jumped_to)

    # ---- helpers ----------------------------------------------------------------------------------
    def _ns(self, name: str) -> int:
        return round(self.p[name] * NS)

    def _period(self) -> int:
        return round(NS / self.p["sample_fps"]) - 1000     # 1 us short: a camera's jitter is not a skip

    def _nearest(self, stamp: int) -> dict:
        sample: dict = {}
        for topic, cam in self.cameras.items():
            for frame_stamp, msg in cam.recent:
                self._offer_to(Sample(stamp, sample, 0.0), topic, frame_stamp, msg)
        return sample

    def _offer_to(self, sample: Sample, topic: str, frame_stamp: int, msg):
        off = abs(frame_stamp - sample.stamp)
        if off <= self._ns("camera_sync_slop_s") and (topic not in sample.frames
                                                      or off < abs(sample.frames[topic][0] - sample.stamp)):
            sample.frames[topic] = (frame_stamp, msg)

    def _prune(self):
        """Keep only frames a future sample can still take: those within the slop of the newest
        stamp (a future sample is stamped at or after it), and each camera's newest. At 4K and
        30 Hz that is about 4 frames a camera, not a fixed ring of 8."""
        horizon = self.newest - self._ns("camera_sync_slop_s")
        for cam in self.cameras.values():
            while len(cam.recent) > 1 and cam.recent[0][0] < horizon:
                cam.recent.popleft()
