"""The engine worker: one plain thread that owns the engine (it is not thread-safe) and does all
the heavy work (image decoding, vision tower, prefill, decoding), never an executor callback.

It takes jobs from the work queue in the queue's order and runs each under supervision: an
exception in any job, in applying a parameter change or a reset, or in the loop itself, answers that
job with the error, marks diagnostics ERROR until the next job succeeds, and the loop goes on.
`alive()` lets diagnostics tell a worker that stopped from one that is idle.
"""

from __future__ import annotations

import threading
import time
import traceback

from rclpy.serialization import deserialize_message

from livevlm_ros.engine import (AnswerCancelled, EngineInputError, EngineResourceError, LiveVLMEngine,
                                MemoryFileError, NoFramesError)

from .image_conversion import ImageConversionError, to_rgb
from .messages import image_type
from .work_queue import ControlJob, QueryJob, WorkQueue


class WorkerCounts:
    def __init__(self):
        self.frames_ingested = 0
        self.frames_rejected = 0        # malformed images, refused by conversion or the engine
        self.camera_misses: dict[str, int] = {}   # per camera: samples it had no frame near
        self.queries_answered = 0
        self.queries_refused = 0        # refused by the engine (bad question, empty window, ...)
        self.answers_cancelled = 0      # answers stopped midway: a goal cancelled, a time-out, a shutdown
        self.tokens_after_last_cancel = 0   # tokens the last cancelled answer made after its cancel came: 0 or 1
        self.narrations = 0
        self.narrations_preempted = 0   # a waiting question went first; the narration is redone after it
        self.memory_resets = 0          # time jumps and ~/reset_memory
        self.worker_errors = 0


class EngineWorker:
    """Runs `engine` against `work` until stopped. The callbacks are the node's:
    publish_narration(answer), wake() (an answer is ready: wake the executor), log (a Logger),
    throttle (a Throttle), pose_at(stamp, frame_id) (where a frame was taken, or None)."""

    def __init__(self, engine: LiveVLMEngine, work: WorkQueue, params: dict, topics: list[str],
                 publish_narration, wake, log, throttle, pose_at=lambda stamp, frame_id: None):
        self.engine, self.work, self.p, self.topics = engine, work, params, topics
        self.publish_narration, self.wake, self.log, self.throttle = publish_narration, wake, log, throttle
        self.pose_at = pose_at
        self.frame_ids: dict[str, str] = {}       # camera topic -> its images' header.frame_id
        self.counts = WorkerCounts()
        self.last_error: str | None = None
        self.stats: dict = engine.stats()
        self._running = False
        self._stop_reason = ""
        self._current: QueryJob | None = None     # the question being answered
        self.doing = "idle"                        # the job in hand: sample, query, narration, control or idle
        self._thread: threading.Thread | None = None
        self._types = {t: image_type(t) for t in topics}

    # ---- life ----------------------------------------------------------------------------------
    def start(self):
        self._running = True
        self._thread = threading.Thread(target=self._run, name="livevlm-engine", daemon=True)
        self._thread.start()

    def stop(self, why: str = "shutting down", timeout: float = 3.0):
        """Stop after the current job (an answer stops at its next token and hears `why`) and wait."""
        with self.work.lock:
            self._stop_reason = why
            self._running = False
            self.work.lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def interrupt(self, why: str):
        """The question being answered, if any, hears `why` now and stops at its next token."""
        job = self._current
        if job is not None and job.finish(False, why):
            self.wake()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def answering(self) -> bool:
        """Whether a question is being answered now (the engine is busy with it)."""
        return self._current is not None

    def _run(self):
        handlers = {"control": self._control, "query": self._answer, "narration": self._narrate,
                    "sample": self._ingest, "idle": lambda _: None}
        while self._running:
            kind, job = None, None
            try:
                got = self.work.next_job(lambda: self._running)
                if got is None:
                    return
                kind, job, changes, reset = got
                if changes:
                    self.engine.reconfigure(**changes)
                if reset:
                    self.engine.reset()
                    self.counts.memory_resets += 1
                self.doing = kind
                handlers[kind](job)
                self.last_error = None
            except Exception as err:               # noqa: BLE001 - no silent death: report and go on
                self._failed(kind, job, err)
            finally:
                self.doing = "idle"
            try:
                self.stats = self.engine.stats()
            except Exception:                      # noqa: BLE001 - diagnostics keep the last stats
                pass

    def _failed(self, kind: str | None, job, err: Exception):
        self.counts.worker_errors += 1
        self.last_error = f"{kind or 'worker'} failed: {type(err).__name__}: {err}"
        self.log.error(f"{self.last_error}\n{traceback.format_exc()}")
        try:
            self.engine.hook.reset()               # leave no half-built ingest or answer behind
        except Exception:                          # noqa: BLE001
            pass
        if isinstance(job, QueryJob):
            self._finish(job, False, f"engine error: {type(err).__name__}: {err}")
        elif isinstance(job, ControlJob):
            self._settle(job, False, f"engine error: {type(err).__name__}: {err}")

    def _finish(self, job: QueryJob, success: bool, error: str = ""):
        if job.finish(success, error):
            self.wake()

    def _settle(self, job: ControlJob, success: bool, message: str):
        if job.finish(success, message):
            self.wake()

    # ---- jobs ----------------------------------------------------------------------------------
    def _control(self, job: ControlJob):
        try:
            self._settle(job, True, job.fn(self.engine))
        except (MemoryFileError, OSError) as err:
            self._settle(job, False, str(err))

    def _ingest(self, sample):
        """Every camera's frame in the sample goes into memory as its own frame, marked by camera.
        Only here is a message deserialized and decoded (the executor kept its bytes)."""
        ingested = False
        for topic in self.topics:
            if topic not in sample.frames:
                self.counts.camera_misses[topic] = self.counts.camera_misses.get(topic, 0) + 1
                continue
            stamp, raw = sample.frames[topic]
            try:
                msg = deserialize_message(raw, self._types[topic]) if isinstance(raw, bytes) else raw
                self.frame_ids[topic] = msg.header.frame_id
                pose = self.pose_at(stamp, msg.header.frame_id)      # at the frame's own stamp
                self.engine.ingest(to_rgb(msg), sample.stamp, camera=topic, pose=pose)
            except (ImageConversionError, EngineInputError) as err:
                self.counts.frames_rejected += 1
                if self.throttle.ok(f"rejected {topic}", 5.0):
                    self.log.warning(f"frame from {topic} dropped: {err}")
                continue
            except EngineResourceError as err:
                self.counts.frames_rejected += 1
                if self.throttle.ok("resource", 5.0):
                    self.log.error(str(err))
                continue
            except Exception as err:               # noqa: BLE001 - a message rclpy cannot read, a codec crash
                if isinstance(err, MemoryError):
                    raise
                self.counts.frames_rejected += 1
                if self.throttle.ok(f"unreadable {topic}", 5.0):
                    self.log.warning(f"frame from {topic} dropped: {type(err).__name__}: {err}")
                continue
            self.counts.frames_ingested += 1
            ingested = True
        if ingested:                               # a frame refused for its stamp moves nothing
            self.work.ingested(sample.stamp)

    def _answer(self, job: QueryJob):
        if job.done.done():                        # timed out or cancelled while waiting
            return
        self._current = job
        after_cancel = 0                           # tokens made after the cancel came: how fast it took effect

        def on_token(ids, ttft):
            nonlocal after_cancel
            after_cancel += job.cancelled.is_set() or job.done.done()
            if job.on_token is not None:
                job.on_token(ids, ttft)
        try:
            job.answer = self.engine.ask(
                job.question, max_new_tokens=job.max_new_tokens, on_token=on_token,
                cancel=lambda: not self._running or job.done.done() or job.cancelled.is_set(),
                window=self._window(job), evidence=self.p["evidence_frames"],
                near=job.place[0] if job.place else None, radius_m=job.place[1] if job.place else None)
        except (EngineInputError, EngineResourceError) as err:
            self.counts.queries_refused += 1
            self._finish(job, False, str(err))
            return
        except AnswerCancelled:
            self.counts.answers_cancelled += 1
            self.counts.tokens_after_last_cancel = after_cancel
            self._finish(job, False, self._stop_reason if not self._running else "cancelled")
            return
        finally:
            self._current = None
        self.counts.queries_answered += 1
        self._finish(job, True)

    def _window(self, job: QueryJob) -> tuple | None:
        if job.window is None or job.window[0] != "last":
            return job.window
        times = self.engine.memory.frame_times          # the last N seconds before the newest frame
        return (times[-1] - job.window[1], None) if times else None

    def _narrate(self, _):
        # a question waiting preempts the narration, which is periodic and is redone after it
        started = time.perf_counter()
        try:
            answer = self.engine.describe(cancel=lambda: not self._running or bool(self.work.queries))
        except NoFramesError:
            return
        except AnswerCancelled:
            self.counts.narrations_preempted += 1
            self.work.request(narration=self._running)
            return
        except EngineResourceError as err:
            if self.throttle.ok("resource", 5.0):
                self.log.error(str(err))
            return
        times = self.engine.memory.frame_times           # a narration looks at the last narration_frames
        start = times[-min(len(times), self.engine.config.narration_frames)] if times else None
        self.publish_narration(answer, start, time.perf_counter() - started)
        self.counts.narrations += 1
