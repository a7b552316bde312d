"""The work queue between the executor threads and the one engine worker: questions, memory
commands, narration, camera samples, and the order the worker takes them in. No ROS.

Executor callbacks only put work here (cheap, never waiting on the engine); the worker takes the
next job with `next_job`. One lock (a Condition) guards all of it and the camera intake.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from .camera_intake import CameraIntake


@dataclass
class QueryJob:
    """A question from ~/query or ~/ask. `done` completes once, with (success, error); the caller's
    response is filled in `answer` by the worker."""
    question: str
    max_new_tokens: int
    window: tuple | None = None         # (start ns | None, end ns | None), or ("last", ns)
    not_before: int | None = None       # wait (bounded) for a frame stamped at or after this (ns)
    place: tuple | None = None          # ((x, y[, z]), radius_m): only frames taken there
    received: float = field(default_factory=time.perf_counter)
    fresh_after: int | None = None      # stamp of the newest sample when it arrived: answered after it
    answer: object = None               # the engine's Answer, once answered
    on_token: object = None             # on_token(ids, ttft) while it is answered (Ask feedback)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: Future = field(default_factory=Future)

    def finish(self, success: bool, error: str = "") -> bool:
        """Complete the job once (the worker, a time-out, a cancel and a shutdown may race)."""
        try:
            self.done.set_result((success, error))
            return True
        except Exception:                 # noqa: BLE001 - InvalidStateError: someone finished it first
            return False


@dataclass
class ControlJob:
    """A memory command (~/reset_memory, ~/save_memory, ~/load_memory): fn(engine) -> message."""
    fn: object
    done: Future = field(default_factory=Future)

    def finish(self, success: bool, message: str) -> bool:
        """Complete the job once (the worker and a time-out may race)."""
        try:
            self.done.set_result((success, message))
            return True
        except Exception:                 # noqa: BLE001 - InvalidStateError: someone finished it first
            return False


class WorkQueue:
    def __init__(self, intake: CameraIntake, params: dict):
        self.intake, self.p = intake, params
        self.lock = threading.Condition()
        self.queries: collections.deque[QueryJob] = collections.deque()
        self.control: collections.deque[ControlJob] = collections.deque()
        self.narration_due = False
        self.narrated_last = False         # the last job picked was a narration (samples go next)
        self.reset_due = False
        self.engine_changes: dict = {}
        self.open = False                  # accepting questions and memory commands
        self.refusal = "not started"       # what a caller hears while not open
        self.last_ingested: int | None = None   # stamp of the last sample the worker ingested

    # ---- producers (executor threads) ----------------------------------------------------------
    def offer_frame(self, topic: str, stamp: int, msg) -> str:
        with self.lock:
            outcome = self.intake.offer(topic, stamp, msg)
            if outcome == "jump":          # the intake has forgotten the old stream already
                self._forget_stream(clear_intake=False)
            if self.intake.queue:
                self.lock.notify()         # a new sample, or a frame that completes a waiting one
            return outcome

    def room(self) -> str | None:
        """Why a question would be refused now, or None."""
        with self.lock:
            if not self.open:
                return self.refusal
            if len(self.queries) >= self.p["max_pending_queries"]:
                return f"busy: {len(self.queries)} questions already waiting; try again"
            return None

    def add_query(self, job: QueryJob) -> str | None:
        """Queue a question, or return why not."""
        with self.lock:
            reason = self.room()
            if reason is not None:
                return reason
            job.fresh_after = self.intake.last_sampled
            self.queries.append(job)
            self.lock.notify()
            return None

    def add_control(self, job: ControlJob) -> str | None:
        with self.lock:
            if not self.open:
                return self.refusal
            self.control.append(job)
            self.lock.notify()
            return None

    def withdraw(self, job: QueryJob | ControlJob) -> bool:
        """Take a job out of its queue (cancelled, timed out); False if the worker has it."""
        queue = self.control if isinstance(job, ControlJob) else self.queries
        with self.lock:
            if job in queue:
                queue.remove(job)
                return True
            return False

    def request(self, narration: bool = False, changes: dict | None = None):
        with self.lock:
            self.narration_due |= narration
            self.engine_changes.update(changes or {})
            self.intake.trim()
            self.lock.notify()

    def close(self, why: str) -> tuple[list[QueryJob], list[ControlJob]]:
        """Refuse from now on with `why`; returns the waiting jobs, for the caller to answer."""
        with self.lock:
            self.open, self.refusal = False, why
            queries, self.queries = list(self.queries), collections.deque()
            control, self.control = list(self.control), collections.deque()
            self.lock.notify_all()
            return queries, control

    def reopen(self):
        with self.lock:
            self.open, self.refusal = True, ""

    def _forget_stream(self, clear_intake: bool = True):
        """A time jump or a memory reset: the old stream's samples are gone and memory will be
        cleared before the next job; waiting questions no longer wait for the old frames."""
        if clear_intake:
            self.intake.clear()
        self.reset_due = True
        self.last_ingested = None
        for job in self.queries:
            job.fresh_after = None

    # ---- the consumer (the engine worker) ------------------------------------------------------
    def next_job(self, running) -> tuple[str, object, dict, bool] | None:
        """Block until there is work; returns (kind, job, engine changes, reset first) or None when
        `running()` turns false. kind: 'control' | 'query' | 'narration' | 'sample' | 'idle' (only
        changes or a reset to apply). Order: memory commands, questions (after the frames sampled
        before they came: fresh answers), narration, samples; but never two narrations in a row
        while a sample waits (a narration slower than its period would starve ingest)."""
        with self.lock:
            while True:
                if not running():
                    return None
                kind, job = self._pick()
                if kind != "wait" and (kind or self.engine_changes or self.reset_due):
                    changes, self.engine_changes = self.engine_changes, {}
                    reset, self.reset_due = self.reset_due, False
                    return kind or "idle", job, changes, reset
                self.lock.wait(timeout=job if kind == "wait" else None)

    def _pick(self) -> tuple[str | None, object]:
        if self.control:
            return "control", self.control.popleft()
        if self.queries:
            first = self.queries[0]
            queue = self.intake.queue
            if queue and first.fresh_after is not None and queue[0].stamp <= first.fresh_after:
                return self._sample()
            wait = self._fresh_wait_left(first)
            if wait <= 0:
                return "query", self.queries.popleft()
            if queue:
                kind, job = self._sample()
                return (kind, min(job, wait)) if kind == "wait" else (kind, job)
            return "wait", wait
        if self.narration_due and not (self.narrated_last and self.intake.queue):
            self.narration_due, self.narrated_last = False, True
            return "narration", None
        if self.intake.queue:
            kind, job = self._sample()
            self.narrated_last &= kind != "sample"
            return kind, job
        return None, None

    def _sample(self):
        kind, job = self.intake.take()
        return ("sample", job) if kind == "sample" else ("wait", job)

    def _fresh_wait_left(self, job: QueryJob) -> float:
        """Seconds a question still waits for a frame stamped at or after its not_before."""
        if job.not_before is None or (self.last_ingested is not None and self.last_ingested >= job.not_before):
            return 0.0
        return self.p["fresh_wait_s"] - (time.perf_counter() - job.received)

    def ingested(self, stamp: int):
        with self.lock:
            self.last_ingested = stamp if self.last_ingested is None else max(self.last_ingested, stamp)
            self.lock.notify_all()
