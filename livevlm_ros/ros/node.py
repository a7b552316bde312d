"""LiveVLMNode: camera topics in; ~/query service, ~/narration topic and /diagnostics out.

Threads, and why:
  executor threads  camera callbacks only remember the newest message per camera (no decoding);
                    a timer at `sample_fps` takes the newest frame of every camera into a bounded
                    queue (full: the oldest frame is dropped and counted); the query service
                    enqueues a question and waits for its answer (reentrant group, so other
                    callbacks keep running meanwhile).
  engine worker     one plain thread owns the engine (it is not thread-safe): it loads the model,
                    then serves, in this order, questions, narration, frames. Decoding, vision tower
                    and prefill all happen here, never in an executor callback.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

from builtin_interfaces.msg import Time as TimeMsg
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

from livevlm_ros.engine import (EngineConfig, EngineInputError, EngineResourceError, LiveVLMEngine,
                                NoFramesError)
from livevlm_ros.msg import Narration
from livevlm_ros.srv import Query

from .image_conversion import ImageConversionError, tile, to_rgb

_ENGINE_DEFAULTS = EngineConfig()

# (parameter, default, description); engine parameters share their names with EngineConfig fields
NODE_PARAMETERS = [
    ("camera_topics", ["/camera/image_raw"],
     "Image topics to watch; a name ending in /compressed is read as sensor_msgs/CompressedImage. "
     "Several cameras are tiled side by side into one view per sample."),
    ("frame_queue_size", 4, "Sampled frames waiting for the engine; when full the oldest is dropped."),
    ("max_pending_queries", 4, "Questions waiting for the engine; more are refused with a 'busy' error."),
    ("query_timeout_s", 120.0, "A question not answered by then gets a 'timed out' error."),
    ("narration_period_s", 5.0, "Seconds between narrations on ~/narration (0 = no narration)."),
    ("status_period_s", 1.0, "Seconds between status reports on /diagnostics."),
    ("model_path", "", "Local folder of a from_pretrained Video LLM checkpoint (LLaVA-OneVision)."),
    ("device", _ENGINE_DEFAULTS.device, "Torch device: cpu, cuda, cuda:1, ..."),
    ("dtype", _ENGINE_DEFAULTS.dtype, "float32 | bfloat16 | float16"),
    ("policy", _ENGINE_DEFAULTS.policy, "Memory policy: livevlm | full | sliding_window | rekv"),
    ("budget_tokens", _ENGINE_DEFAULTS.budget_tokens, "Hard cap on memory tokens on the device (-1 = unbounded)."),
    ("short_term_frames", _ENGINE_DEFAULTS.short_term_frames, "Most recent frames kept whole."),
    ("vision_sinks", _ENGINE_DEFAULTS.vision_sinks, "Vision sink tokens kept per layer for the whole stream."),
    ("bucket_tokens", _ENGINE_DEFAULTS.bucket_tokens, "VSB: capacity of each time bucket."),
    ("saliency_share", _ENGINE_DEFAULTS.saliency_share, "VSB: share of the budget filled by score alone."),
    ("observation_window", _ENGINE_DEFAULTS.observation_window,
     "VSB: last tokens of a clip whose attention scores memory (0 = one frame)."),
    ("span_tokens", _ENGINE_DEFAULTS.span_tokens, "VSB: neighbouring tokens scored and kept together."),
    ("page_tokens", _ENGINE_DEFAULTS.page_tokens, "PaR: long-term tokens per page."),
    ("retrieval_ratio", _ENGINE_DEFAULTS.retrieval_ratio, "PaR: share of long-term pages an answer reads."),
    ("page_scoring", _ENGINE_DEFAULTS.page_scoring, "PaR: how a question scores pages: quest | softmax_mean | softmax_max."),
    ("sample_fps", _ENGINE_DEFAULTS.sample_fps, "Frames per second taken from the cameras (> 0)."),
    ("frames_per_clip", _ENGINE_DEFAULTS.frames_per_clip, "Frames prefilled together."),
    ("max_new_tokens", _ENGINE_DEFAULTS.max_new_tokens, "Longest answer, in tokens."),
    ("max_question_tokens", _ENGINE_DEFAULTS.max_question_tokens, "Longest question, in tokens."),
    ("narration_frames", _ENGINE_DEFAULTS.narration_frames, "Recent frames a narration looks at."),
    ("system_prompt", _ENGINE_DEFAULTS.system_prompt, "Text before the video (model's chat format)."),
    ("question_template", _ENGINE_DEFAULTS.question_template, "Text after the video; {question} is replaced."),
    ("narration_prompt", _ENGINE_DEFAULTS.narration_prompt, "The question a narration asks."),
]
_ENGINE_FIELDS = set(EngineConfig.__dataclass_fields__)


@dataclass
class _QueryJob:
    question: str
    max_new_tokens: int
    received: float
    done: threading.Event = field(default_factory=threading.Event)
    response: Query.Response | None = None


@dataclass
class _Counters:
    frames_received: int = 0
    frames_sampled: int = 0
    frames_dropped: int = 0        # queue overflow: the engine fell behind
    frames_rejected: int = 0       # malformed images, refused by conversion or the engine
    frames_ingested: int = 0
    queries_answered: int = 0
    queries_refused: int = 0
    narrations: int = 0


class LiveVLMNode(Node):
    def __init__(self, **kwargs):
        super().__init__("livevlm", **kwargs)
        for name, default, description in NODE_PARAMETERS:
            self.declare_parameter(name, default, ParameterDescriptor(description=description))
        p = {name: self.get_parameter(name).value for name, _, _ in NODE_PARAMETERS}
        if p["sample_fps"] <= 0:
            raise ValueError("sample_fps must be > 0 for the node (it samples on a timer)")
        self._p = p
        self.count = _Counters()
        self.engine: LiveVLMEngine | None = None
        self.engine_error: str | None = None
        self._stats: dict = {}
        self._last_ingested_stamp: float | None = None

        self._lock = threading.Condition()
        self._latest: dict[str, object] = {}
        self._frames: collections.deque = collections.deque()
        self._queries: collections.deque = collections.deque()
        self._narration_due = False
        self._running = True

        cameras = MutuallyExclusiveCallbackGroup()
        timers = MutuallyExclusiveCallbackGroup()
        services = ReentrantCallbackGroup()
        self._subs = []
        for topic in p["camera_topics"]:
            msg_type = CompressedImage if topic.rstrip("/").endswith("compressed") else Image
            self._subs.append(self.create_subscription(
                msg_type, topic, lambda msg, t=topic: self._on_image(t, msg), qos_profile_sensor_data,
                callback_group=cameras))
        self.create_timer(1.0 / p["sample_fps"], self._sample, callback_group=timers)
        if p["narration_period_s"] > 0:
            self.create_timer(p["narration_period_s"], self._request_narration, callback_group=timers)
        self.create_timer(p["status_period_s"], self._publish_status, callback_group=timers)
        self.narration_pub = self.create_publisher(Narration, "~/narration", 10)
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_service(Query, "~/query", self._on_query, callback_group=services)

        self._worker = threading.Thread(target=self._work, name="livevlm-engine", daemon=True)
        self._worker.start()

    # ---- executor side: cheap, never blocks on the engine ------------------------------------------
    def _on_image(self, topic: str, msg):
        with self._lock:
            self.count.frames_received += 1
            self._latest[topic] = msg

    def _sample(self):
        with self._lock:
            if not self._latest:
                return
            msgs = [self._latest.pop(t) for t in self._p["camera_topics"] if t in self._latest]
            self._latest.clear()
            self.count.frames_sampled += 1
            if len(self._frames) >= self._p["frame_queue_size"]:
                self._frames.popleft()
                self.count.frames_dropped += 1
            self._frames.append(msgs)
            self._lock.notify()

    def _request_narration(self):
        with self._lock:
            self._narration_due = True
            self._lock.notify()

    def _on_query(self, request: Query.Request, response: Query.Response) -> Query.Response:
        job = _QueryJob(request.question, request.max_new_tokens, time.perf_counter())
        with self._lock:
            refusal = None
            if self.engine is None:
                refusal = f"engine not available: {self.engine_error or 'still loading the model'}"
            elif len(self._queries) >= self._p["max_pending_queries"]:
                refusal = f"busy: {len(self._queries)} questions already waiting; try again"
            if refusal:
                self.count.queries_refused += 1
                response.success, response.error_message = False, refusal
                return response
            self._queries.append(job)
            self._lock.notify()
        if not job.done.wait(self._p["query_timeout_s"]):
            with self._lock:
                if job in self._queries:
                    self._queries.remove(job)
            response.success = False
            response.error_message = f"timed out after {self._p['query_timeout_s']} s"
            return response
        return job.response

    # ---- the engine worker ------------------------------------------------------------------------
    def _work(self):
        config = {k: v for k, v in self._p.items() if k in _ENGINE_FIELDS}
        config["budget_tokens"] = None if config["budget_tokens"] < 0 else config["budget_tokens"]
        config["sample_fps"] = 0.0                     # the node already samples at sample_fps
        try:
            engine = LiveVLMEngine(EngineConfig.from_dict(config))
        except Exception as err:                       # noqa: BLE001 - report any load failure, keep serving
            self.engine_error = f"{type(err).__name__}: {err}"
            self.get_logger().error(f"could not start the engine: {self.engine_error}")
            return
        with self._lock:
            self.engine = engine
        self.get_logger().info(f"engine ready: {config['policy']} policy, model {config['model_path']}")
        while True:
            with self._lock:
                while self._running and not (self._queries or self._narration_due or self._frames):
                    self._lock.wait()
                if not self._running:
                    return
                if self._queries:
                    job, kind = self._queries.popleft(), "query"
                elif self._narration_due:
                    job, kind, self._narration_due = None, "narration", False
                else:
                    job, kind = self._frames.popleft(), "frame"
            {"query": self._answer, "narration": self._narrate, "frame": self._ingest}[kind](job)
            self._stats = engine.stats()

    def _ingest(self, msgs):
        try:
            rgb = tile([to_rgb(m) for m in msgs])
            stamp = max(_seconds(m.header.stamp) for m in msgs)
            self.engine.ingest(rgb, stamp)
        except (ImageConversionError, EngineInputError) as err:
            self.count.frames_rejected += 1
            self.get_logger().warn(f"frame dropped: {err}", throttle_duration_sec=5.0)
            return
        except EngineResourceError as err:
            self.count.frames_dropped += 1
            self.get_logger().error(str(err), throttle_duration_sec=5.0)
            return
        self.count.frames_ingested += 1
        self._last_ingested_stamp = stamp

    def _answer(self, job: _QueryJob):
        response = Query.Response()
        try:
            answer = self.engine.ask(job.question, max_new_tokens=job.max_new_tokens or None)
        except (EngineInputError, EngineResourceError) as err:
            response.success, response.error_message = False, str(err)
            self.count.queries_refused += 1
        else:
            response.success, response.answer = True, answer.text
            response.time_to_first_token_s = float(answer.ttft_s)
            if answer.span:
                response.span_start, response.span_end = _time_msg(answer.span[0]), _time_msg(answer.span[1])
            response.pages_used, response.pages_total = answer.pages_used, answer.pages_total
            response.tokens_generated = answer.tokens_generated
            self.count.queries_answered += 1
        response.latency_s = time.perf_counter() - job.received
        job.response = response
        job.done.set()

    def _narrate(self, _):
        try:
            answer = self.engine.describe()
        except NoFramesError:
            return
        except EngineResourceError as err:
            self.get_logger().error(str(err), throttle_duration_sec=5.0)
            return
        msg = Narration(text=answer.text, latency_s=float(answer.latency_s))
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = ",".join(self._p["camera_topics"])
        if answer.span:
            msg.span_start = _time_msg(self._narration_start())
            msg.span_end = _time_msg(answer.span[1])
        self.narration_pub.publish(msg)
        self.count.narrations += 1

    def _narration_start(self) -> float:
        """A narration looks at the last narration_frames frames only."""
        times = self.engine.memory.frame_times
        return times[-min(len(times), self._p["narration_frames"])]

    # ---- status -------------------------------------------------------------------------------------
    def status(self) -> dict:
        s = dict(vars(self.count))
        s.update({k: v for k, v in self._stats.items() if k != "stream_span"})
        s["engine"] = "ready" if self.engine else ("failed" if self.engine_error else "loading")
        now = self.get_clock().now().nanoseconds * 1e-9
        s["lag_s"] = None if self._last_ingested_stamp is None else round(now - self._last_ingested_stamp, 3)
        with self._lock:
            s["frames_queued"], s["queries_queued"] = len(self._frames), len(self._queries)
        return s

    def _publish_status(self):
        s = self.status()
        level = DiagnosticStatus.OK if s["engine"] == "ready" else (
            DiagnosticStatus.ERROR if s["engine"] == "failed" else DiagnosticStatus.WARN)
        status = DiagnosticStatus(level=level, name=f"{self.get_fully_qualified_name()}: engine",
                                  hardware_id=self._p["device"],
                                  message=self.engine_error or s["engine"],
                                  values=[KeyValue(key=k, value=str(v)) for k, v in s.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_pub.publish(array)

    def shutdown(self):
        with self._lock:
            self._running = False
            self._lock.notify_all()
        self._worker.join(timeout=30)


def _seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def _time_msg(seconds: float) -> TimeMsg:
    sec = int(seconds // 1)
    return TimeMsg(sec=sec, nanosec=int(round((seconds - sec) * 1e9)) % 1_000_000_000)

