"""LiveVLMNode: camera topics in; ~/query and ~/ask (action), ~/narration, /diagnostics and the
memory services (~/reset_memory, ~/save_memory, ~/load_memory) out.

Threads, and why:
  executor threads  camera callbacks keep each camera's last few messages and, when a frame's header
                    stamp is a sampling period past the last sample, queue a sample: every camera's
                    frame nearest that stamp (bounded queue; full: the oldest is dropped and
                    counted). No decoding here. The query service and action callbacks are
                    coroutines: they queue the question and await its answer without holding an
                    executor thread (the worker wakes the executor when it is done), so a burst of
                    callers is answered or refused, never left waiting in a full request queue.
  engine worker     one plain thread owns the engine (it is not thread-safe): it loads the model,
                    then serves, in this order, questions, narration, frames. Decoding, vision tower
                    and prefill all happen here, never in an executor callback. Any exception in a
                    job answers that job with the error and marks diagnostics ERROR; the worker goes on.

Time: sampling, lag and the spans in answers and narrations all use the cameras' header stamps (ROS
time under use_sim_time, bag time when a bag is replayed). A stamp that goes back by more than
`time_jump_tolerance_s` (a bag replayed again, a switch from a bag to live cameras) either clears
memory (`on_time_jump: reset`, like tf2 buffers on a jump) or is refused until the stream catches up
(`refuse`); both are counted and logged once per jump.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import traceback
from dataclasses import dataclass, field

from builtin_interfaces.msg import Time as TimeMsg
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data)
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.task import Future
from sensor_msgs.msg import CompressedImage, Image
from std_srvs.srv import Trigger

from livevlm_ros.engine import (RUNTIME_OPTIONS, AnswerCancelled, EngineConfig, EngineInputError,
                                EngineResourceError, LiveVLMEngine, MemoryFileError, NoFramesError)
from livevlm_ros.engine.config import LAUNCH_MODES, PAGE_SCORINGS, POLICIES
from livevlm_ros.action import Ask
from livevlm_ros.msg import Narration
from livevlm_ros.srv import Query

from .image_conversion import ImageConversionError, to_rgb

_ENGINE_DEFAULTS = EngineConfig()
_BIG = 1_000_000


def _int(lo, hi=_BIG):
    return dict(integer_range=[IntegerRange(from_value=lo, to_value=hi, step=1)])


def _float(lo, hi=1e9):
    return dict(floating_point_range=[FloatingPointRange(from_value=lo, to_value=hi, step=0.0)])


# (name, default, description, descriptor extras). `restart` = read-only: it shapes the model or the
# memory and takes a restart (or cleanup + configure); the others take effect when set.
RESTART = dict(read_only=True)
NODE_PARAMETERS = [
    ("camera_topics", ["camera/image_raw"],
     "Image topics to watch (relative to the node's namespace unless they start with /); a name ending "
     "in /compressed is read as sensor_msgs/CompressedImage. Several cameras: each camera's frames are "
     "its own frames in memory, marked by camera; a sample takes every camera's frame nearest its stamp.", RESTART),
    ("camera_sync_slop_s", 0.1, "Several cameras: a camera's frame joins a sample if stamped within this of it "
     "(set it to at least the slowest camera's frame period); otherwise that camera misses the sample.",
     _float(0.0, 10.0)),
    ("camera_sync_wait_s", 0.5, "Several cameras: longest a sample waits (wall time) for the other cameras' frames "
     "of its instant before it goes to the engine without them. A camera that already sent a later frame, or "
     "none for stale_camera_s, is not waited for.", _float(0.0, 10.0)),
    ("sample_fps", _ENGINE_DEFAULTS.sample_fps, "Frames per second of camera time taken into memory.", _float(0.01, 1000)),
    ("frame_queue_size", 4, "Sampled frames waiting for the engine; when full the oldest is dropped.", _int(1, 1000)),
    ("max_pending_queries", 4, "Questions waiting for the engine; more are refused with a 'busy' error.", _int(1, 1000)),
    ("query_timeout_s", 120.0, "A question not answered by then gets a 'timed out' error.", _float(0.1)),
    ("fresh_wait_s", 1.0, "Longest a question with a not_before stamp waits for a frame that new.", _float(0.0)),
    ("evidence_frames", 3, "Frames named in an answer's evidence (when and which camera; 0 = none).", _int(0, 100)),
    ("narration_period_s", 5.0, "Seconds between narrations on ~/narration (0 = no narration).", _float(0.0)),
    ("status_period_s", 1.0, "Seconds between status reports on /diagnostics.", _float(0.05)),
    ("time_jump_tolerance_s", 1.0, "A header stamp this much older than the last sampled frame is a time jump.",
     _float(0.0)),
    ("on_time_jump", "reset", "What a time jump does: reset (clear memory, go on) | refuse (drop frames until "
     "the stamps pass the last sampled frame again)."),
    ("stale_camera_s", 5.0, "Diagnostics WARN when a camera sent no frame for this long.", _float(0.1)),
    ("max_lag_s", 5.0, "Diagnostics WARN when the engine is this far (camera time) behind the newest frame.",
     _float(0.0)),
    ("memory_file", "", "safetensors file memory is loaded from at start (if it exists) and saved to on a clean "
     "shutdown and by ~/save_memory; '' = none. A file made for another model or memory setting is refused."),
    ("model_path", "", "Local folder of a from_pretrained Video LLM checkpoint (LLaVA-OneVision).", RESTART),
    ("device", _ENGINE_DEFAULTS.device, "Torch device: cpu, cuda, cuda:1, ...", RESTART),
    ("dtype", _ENGINE_DEFAULTS.dtype, "float32 | bfloat16 | float16", RESTART),
    ("launch", _ENGINE_DEFAULTS.launch, "How clips, questions and answer tokens launch their kernels: graph "
     "(replayed from CUDA graphs once memory is full) | static (the same fixed shapes, one by one) | eager | auto "
     "(graph on a GPU with bounded memory).", RESTART),
    ("policy", _ENGINE_DEFAULTS.policy, f"Memory policy: {' | '.join(POLICIES)}", RESTART),
    ("budget_tokens", _ENGINE_DEFAULTS.budget_tokens, "Hard cap on memory tokens on the device (-1 = unbounded).",
     RESTART),
    ("short_term_frames", _ENGINE_DEFAULTS.short_term_frames, "Most recent frames kept whole.", RESTART),
    ("vision_sinks", _ENGINE_DEFAULTS.vision_sinks, "Vision sink tokens kept per layer.", RESTART),
    ("bucket_tokens", _ENGINE_DEFAULTS.bucket_tokens, "VSB: capacity of each time bucket.", RESTART),
    ("saliency_share", _ENGINE_DEFAULTS.saliency_share, "VSB: share of the budget filled by score alone.", RESTART),
    ("observation_window", _ENGINE_DEFAULTS.observation_window,
     "VSB: last tokens of a clip whose attention scores memory (0 = one frame).", RESTART),
    ("span_tokens", _ENGINE_DEFAULTS.span_tokens, "VSB: neighbouring tokens scored and kept together.", RESTART),
    ("page_tokens", _ENGINE_DEFAULTS.page_tokens, "PaR: long-term tokens per page.", RESTART),
    ("frames_per_clip", _ENGINE_DEFAULTS.frames_per_clip, "Frames prefilled together.", RESTART),
    ("system_prompt", _ENGINE_DEFAULTS.system_prompt, "Text before the video (model's chat format).", RESTART),
    ("question_template", _ENGINE_DEFAULTS.question_template, "Text after the video; {question} is replaced.",
     RESTART),
    ("retrieval_ratio", _ENGINE_DEFAULTS.retrieval_ratio, "PaR: share of long-term pages an answer reads.",
     _float(0.001, 1.0)),
    ("page_scoring", _ENGINE_DEFAULTS.page_scoring, f"PaR: how a question scores pages: {' | '.join(PAGE_SCORINGS)}."),
    ("max_new_tokens", _ENGINE_DEFAULTS.max_new_tokens, "Longest answer, in tokens (a request may ask for fewer).",
     _int(1, 4096)),
    ("max_question_tokens", _ENGINE_DEFAULTS.max_question_tokens, "Longest question, in tokens.", _int(1, 65536)),
    ("narration_frames", _ENGINE_DEFAULTS.narration_frames, "Recent frames a narration looks at (<= short_term_frames).",
     _int(1, 1000)),
    ("narration_prompt", _ENGINE_DEFAULTS.narration_prompt, "The question a narration asks."),
]
_ENGINE_FIELDS = set(EngineConfig.__dataclass_fields__)
_CHOICES = {"on_time_jump": ("reset", "refuse"), "page_scoring": PAGE_SCORINGS, "launch": LAUNCH_MODES}

# The service takes every request off the wire at once (its callback only queues), so the request
# queue needs room for one burst of callers, not for the backlog: a few hundred covers any fleet
# of behaviour trees; refusals beyond max_pending_queries come back as answers.
SERVICE_QOS = QoSProfile(depth=256, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
# Narration: reliable, and the latest one kept for a planner that subscribes late.
NARRATION_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


@dataclass
class _QueryJob:
    """A question from ~/query or ~/ask; `future` completes with its Query.Response either way."""
    question: str
    max_new_tokens: int
    received: float
    future: Future
    response: Query.Response = field(default_factory=Query.Response)
    goal: object | None = None          # the action's goal handle: feedback and cancel
    fresh_after: float = float("-inf")  # stamp of the newest frame sampled when it arrived
    window: tuple | None = None         # (start | None, end | None) camera time, or ("last", seconds)
    not_before: float | None = None     # wait (bounded) for a frame stamped at or after this

    def cancel_requested(self) -> bool:
        return self.goal is not None and self.goal.is_cancel_requested


@dataclass
class _Counters:
    frames_received: int = 0
    frames_sampled: int = 0
    frames_dropped: int = 0        # queue overflow: the engine fell behind
    frames_rejected: int = 0       # malformed images, refused by conversion or the engine
    camera_misses: dict = field(default_factory=dict)   # per camera: samples it had no frame near
    frames_ingested: int = 0
    time_jumps: int = 0            # header stamps that went back beyond the tolerance
    frames_refused_time: int = 0   # dropped while waiting for the stream to pass a jump (refuse)
    memory_resets: int = 0
    queries_answered: int = 0
    queries_refused: int = 0
    narrations: int = 0
    worker_errors: int = 0


class LiveVLMCore:
    """What the node does, for a plain node (LiveVLMNode, below: up and serving at once) or a
    managed one (lifecycle_node.py: configure loads the model, activate opens intake and the
    service, deactivate closes them and keeps memory, cleanup frees the model)."""

    def _setup(self):
        for name, default, description, *extra in NODE_PARAMETERS:
            self.declare_parameter(name, default, ParameterDescriptor(description=description, **(extra or [{}])[0]))
        self._p = {name: self.get_parameter(name).value for name, *_ in NODE_PARAMETERS}
        bad = self._invalid(self._p)
        if bad:
            raise ValueError(bad)
        self.count = _Counters()
        self.engine: LiveVLMEngine | None = None
        self.engine_error: str | None = None       # the engine could not start
        self.last_error: str | None = None         # the last job that failed (cleared by a success)
        self.memory_file_error: str | None = None  # memory_file refused at start (until a save or load works)
        self.state: str | None = None              # lifecycle state, for a managed node
        self._stats: dict = {}

        self._lock = threading.Condition()
        self._finish_lock = threading.Lock()
        # per camera: its last few (stamp, message), to pick the one nearest a sample's stamp
        self._recent = {t: collections.deque(maxlen=8) for t in self._p["camera_topics"]}
        self._camera_wall = {t: time.monotonic() for t in self._p["camera_topics"]}   # last frame (steady)
        self._frames: collections.deque = collections.deque()
        self._queries: collections.deque = collections.deque()
        self._narration_due = False
        self._reset_due = False
        self._engine_changes: dict = {}
        self._running = False
        self._worker: threading.Thread | None = None
        self._last_sampled_stamp: float | None = None
        self._newest_stamp: float | None = None
        self._last_ingested_stamp: float | None = None
        self._waiting_for_stamp: float | None = None   # on_time_jump=refuse: frames before this are dropped
        self._dropped_reported = 0

        self._camera_group = MutuallyExclusiveCallbackGroup()
        self._timers_group = MutuallyExclusiveCallbackGroup()
        self._service_group = ReentrantCallbackGroup()
        self._subs, self._query_service = [], None
        self._accepted_goals: dict[int, _QueryJob] = {}      # goal request id -> its queued job
        self._control: collections.deque = collections.deque()   # (fn(engine) -> message, Future)
        self._narration_timer = self._status_timer = None
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        # The service and action callbacks are coroutines awaiting futures the worker thread completes;
        # rclpy resumes a waiting coroutine only when its executor wakes up, so the worker wakes it with
        # this guard condition (else an answer waits for the next camera frame or timer: up to
        # status_period_s when no camera is publishing)
        self._worker_done = self.create_guard_condition(lambda: None)
        self.narration_pub = self.create_publisher(Narration, "~/narration", NARRATION_QOS)
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._make_timers()
        self.add_on_set_parameters_callback(self._check_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)

    # ---- life: load, serve, open and close intake, stop -----------------------------------------------
    def _load_engine(self) -> LiveVLMEngine:
        config = {k: v for k, v in self._p.items() if k in _ENGINE_FIELDS}
        config["budget_tokens"] = None if config["budget_tokens"] < 0 else config["budget_tokens"]
        config["sample_fps"] = 0.0                     # the node already samples by header stamp
        try:
            engine = LiveVLMEngine(EngineConfig.from_dict(config))
        except Exception as err:                       # noqa: BLE001 - report any load failure, keep serving
            self.engine_error = f"{type(err).__name__}: {err}"
            self.get_logger().error(f"could not start the engine: {self.engine_error}")
            raise
        self.engine_error = None
        self.get_logger().info(f"engine ready: {config['policy']} policy, model {config['model_path']}")
        return engine

    def _start_worker(self, load_in_worker: bool):
        """The engine worker thread; it loads the model itself (the plain node: its executor is up
        and reports "loading" meanwhile) or serves an engine already loaded (configure)."""
        self._running = True
        target = self._load_and_serve if load_in_worker else self._serve
        self._worker = threading.Thread(target=target, name="livevlm-engine", daemon=True)
        self._worker.start()

    def _load_and_serve(self):
        try:
            engine = self._load_engine()
        except Exception:                              # noqa: BLE001 - reported in diagnostics and answers
            return
        self._adopt(engine)
        self._serve()

    def _adopt(self, engine: LiveVLMEngine):
        """A loaded engine starts serving, with memory from memory_file if there is one."""
        self._load_memory_file(engine)
        with self._lock:
            self.engine = engine

    def _open_intake(self):
        for topic in self._p["camera_topics"]:
            msg_type = CompressedImage if topic.rstrip("/").endswith("compressed") else Image
            self._subs.append(self.create_subscription(
                msg_type, topic, lambda msg, t=topic: self._on_image(t, msg), qos_profile_sensor_data,
                callback_group=self._camera_group))
        self._query_service = self.create_service(Query, "~/query", self._on_query, qos_profile=SERVICE_QOS,
                                                  callback_group=self._service_group)
        self._memory_services = [
            self.create_service(Trigger, f"~/{name}", callback, callback_group=self._service_group)
            for name, callback in (("reset_memory", self._on_reset_memory), ("save_memory", self._on_save_memory),
                                   ("load_memory", self._on_load_memory))]
        self._ask_server = ActionServer(
            self, Ask, "~/ask", execute_callback=self._execute_ask, goal_callback=self._on_ask_goal,
            cancel_callback=self._on_ask_cancel, callback_group=self._service_group,
            goal_service_qos_profile=SERVICE_QOS, result_service_qos_profile=SERVICE_QOS,
            cancel_service_qos_profile=SERVICE_QOS)

    def _close_intake(self, why: str):
        """No more frames or questions; memory and queued frames stay. Waiting questions hear `why`."""
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []
        if self._query_service is not None:
            self.destroy_service(self._query_service)
            for service in self._memory_services:
                self.destroy_service(service)
            self._ask_server.destroy()
            self._query_service = self._ask_server = None
        with self._lock:
            waiting, self._queries = list(self._queries), collections.deque()
        for job in waiting:
            self._finish(job, False, why)

    def _stop_worker(self, timeout: float = 3.0):
        """Stop the worker (the answer in progress ends at its next token) and wait for it."""
        with self._lock:
            self._running = False
            self._lock.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=timeout)
            self._worker = None


    # ---- parameters -------------------------------------------------------------------------------
    def _invalid(self, p: dict) -> str | None:
        """The reason a set of parameter values cannot work together, or None."""
        for name, choices in _CHOICES.items():
            if p[name] not in choices:
                return f"{name} must be one of {', '.join(choices)}, got {p[name]!r}"
        if not p["camera_topics"]:
            return "camera_topics is empty"
        if p["narration_frames"] > p["short_term_frames"]:
            return f"narration_frames ({p['narration_frames']}) must be <= short_term_frames ({p['short_term_frames']})"
        return None

    def _check_parameters(self, params) -> SetParametersResult:
        """ros2 param set: ranges and read-only are enforced by rclpy from the descriptors; this
        adds the rules that span several values. Nothing changes unless all pass."""
        proposed = dict(self._p, **{p.name: p.value for p in params if p.name in self._p})
        reason = self._invalid(proposed)
        return SetParametersResult(successful=reason is None, reason=reason or "")

    def _apply_parameters(self, params):
        with self._lock:
            for p in params:
                if p.name not in self._p:
                    continue
                self._p[p.name] = p.value
                if p.name in RUNTIME_OPTIONS:
                    self._engine_changes[p.name] = p.value          # the worker applies it between jobs
            while len(self._frames) > self._p["frame_queue_size"]:
                self._frames.popleft()
                self.count.frames_dropped += 1
        if {p.name for p in params} & {"narration_period_s", "status_period_s"}:
            self._make_timers()
        for p in params:
            self.get_logger().info(f"parameter {p.name} = {p.value!r}")

    def _make_timers(self):
        for timer in (self._narration_timer, self._status_timer):
            if timer is not None:
                self.destroy_timer(timer)
        period = self._p["narration_period_s"]
        self._narration_timer = (self.create_timer(period, self._request_narration, callback_group=self._timers_group)
                                 if period > 0 else None)
        # status and question time-outs run on the steady clock: under use_sim_time a paused or
        # finished bag stops ROS time, and health reports and time-outs must go on regardless
        self._status_timer = self.create_timer(self._p["status_period_s"], self._publish_status,
                                               callback_group=self._timers_group, clock=self._steady)

    # ---- executor side: cheap, never blocks on the engine ------------------------------------------
    def _on_image(self, topic: str, msg):
        stamp = _seconds(msg.header.stamp)
        with self._lock:
            if not self.count.frames_received:       # cameras are timed from the stream's first frame:
                self._camera_wall = dict.fromkeys(self._camera_wall, time.monotonic())  # not from node start
            self.count.frames_received += 1
            self._camera_wall[topic] = time.monotonic()
            last = self._last_sampled_stamp
            if self._waiting_for_stamp is not None:      # refusing since a jump: one jump, many frames
                if stamp <= self._waiting_for_stamp:
                    self.count.frames_refused_time += 1
                    return
                self._waiting_for_stamp = None
            elif last is not None and stamp < last - self._p["time_jump_tolerance_s"]:
                self._on_time_jump(last, stamp)
                if self._waiting_for_stamp is not None:
                    self.count.frames_refused_time += 1
                    return
                last = self._last_sampled_stamp
            # (after the time-jump rules: a jump clears what the cameras sent before it)
            self._recent[topic].append((stamp, msg))
            for queued_stamp, sample, _ in self._frames:    # another camera's frame of a queued instant
                self._offer(topic, stamp, msg, queued_stamp, sample)
            if self._frames:
                self._lock.notify()                          # it may complete the sample the worker waits on
            self._newest_stamp = stamp if self._newest_stamp is None else max(self._newest_stamp, stamp)
            if last is not None and stamp - last < 1.0 / self._p["sample_fps"] - 1e-6:
                return                                       # not due yet (or slightly out of order)
            self._last_sampled_stamp = stamp
            self.count.frames_sampled += 1
            if len(self._frames) >= self._p["frame_queue_size"]:
                self._frames.popleft()
                self.count.frames_dropped += 1
            self._frames.append((stamp, self._sample(stamp), time.monotonic()))
            self._lock.notify()

    def _sample(self, stamp: float) -> dict:
        """A sample at `stamp`: {camera: (stamp, message)} of each camera's nearest frame within
        camera_sync_slop_s (the frame that made the sample is one of them). Called with the lock held."""
        sample = {}
        for topic, recent in self._recent.items():
            for frame_stamp, msg in recent:
                self._offer(topic, frame_stamp, msg, stamp, sample)
        return sample

    def _offer(self, topic: str, frame_stamp: float, msg, stamp: float, sample: dict):
        """A camera's frame joins a sample still in the queue if it is nearer the sample's stamp than
        the one it has: another camera's frame of the same instant usually arrives just after the
        frame that made the sample. Called with the lock held."""
        off = abs(frame_stamp - stamp)
        if off <= self._p["camera_sync_slop_s"] and (topic not in sample or off < abs(sample[topic][0] - stamp)):
            sample[topic] = (frame_stamp, msg)

    def _on_time_jump(self, last: float, stamp: float):
        """Called with the lock held."""
        self.count.time_jumps += 1
        action = self._p["on_time_jump"]
        self.get_logger().warn(f"camera time jumped back from {last:.3f} s to {stamp:.3f} s: "
                               + ("clearing memory" if action == "reset" else
                                  "refusing frames until the stream passes the last sampled stamp"))
        for recent in self._recent.values():     # the old stream's frames are no one's nearest any more
            recent.clear()
        if action == "reset":
            self._frames.clear()                 # frames of the old stream would land in the new memory
            for job in self._queries:            # and waiting questions no longer wait for them
                job.fresh_after = float("-inf")
            self._reset_due = True
            self._last_sampled_stamp = self._newest_stamp = self._last_ingested_stamp = None
            self._lock.notify()
        else:
            self._waiting_for_stamp = last

    def _request_narration(self):
        with self._lock:
            self._narration_due = True
            self._lock.notify()

    def _admit(self, request) -> _QueryJob | str:
        """Queue a question (a Query request or an Ask goal), or say why not (every caller hears
        back: nothing is dropped)."""
        limit = self._p["max_new_tokens"]
        job = _QueryJob(request.question, min(request.max_new_tokens or limit, limit), time.perf_counter(), Future())
        if request.last_seconds > 0:
            job.window = ("last", request.last_seconds)
        elif _seconds(request.window_start) or _seconds(request.window_end):
            job.window = (_seconds(request.window_start) or None, _seconds(request.window_end) or None)
        job.not_before = _seconds(request.not_before) or None
        with self._lock:
            if not self._running:
                refusal = "shutting down"
            elif self.engine is None:
                refusal = f"engine not available: {self.engine_error or 'still loading the model'}"
            elif len(self._queries) >= self._p["max_pending_queries"]:
                refusal = f"busy: {len(self._queries)} questions already waiting; try again"
            else:
                if self._last_sampled_stamp is not None:
                    job.fresh_after = self._last_sampled_stamp
                self._queries.append(job)
                self._lock.notify()
                return job
            self.count.queries_refused += 1
            return refusal

    async def _answered(self, job: _QueryJob) -> Query.Response:
        """Wait for a queued question's answer without holding an executor thread."""
        timeout = self._p["query_timeout_s"]
        timer = self.create_timer(timeout, lambda: self._expire(job, timeout), callback_group=self._timers_group,
                                  clock=self._steady)
        try:
            return await job.future
        finally:
            self.destroy_timer(timer)

    async def _on_query(self, request: Query.Request, response: Query.Response) -> Query.Response:
        job = self._admit(request)
        if isinstance(job, str):
            response.success, response.error_message = False, job
            return response
        return await self._answered(job)

    # ---- the Ask action: a question with streamed tokens and cancel ------------------------------------
    def _on_ask_goal(self, request) -> GoalResponse:
        job = self._admit(request)
        if isinstance(job, str):
            self.get_logger().info(f"Ask goal rejected: {job}", throttle_duration_sec=1.0)
            return GoalResponse.REJECT
        self._accepted_goals[id(request)] = job
        return GoalResponse.ACCEPT

    def _on_ask_cancel(self, goal) -> CancelResponse:
        # a queued question leaves the queue now; one being answered stops at its next token
        with self._lock:
            job = next((j for j in self._queries if j.goal is goal), None)
            if job is not None:
                self._queries.remove(job)
        if job is not None:
            self._finish(job, False, "cancelled")
        return CancelResponse.ACCEPT

    async def _execute_ask(self, goal):
        job = self._accepted_goals.pop(id(goal.request))
        job.goal = goal
        r = await self._answered(job)
        result = Ask.Result(success=r.success, answer=r.answer, error_message=r.error_message, latency_s=r.latency_s,
                            time_to_first_token_s=r.time_to_first_token_s, span_start=r.span_start,
                            span_end=r.span_end, pages_used=r.pages_used, pages_total=r.pages_total,
                            tokens_generated=r.tokens_generated, evidence_times=r.evidence_times,
                            evidence_weights=r.evidence_weights, evidence_cameras=r.evidence_cameras)
        if r.success:
            goal.succeed()
        elif goal.is_cancel_requested:
            goal.canceled()
        else:
            goal.abort()
        return result

    def _feedback(self, job: _QueryJob, ids: list[int], ttft: float):
        if job.goal is not None:
            job.goal.publish_feedback(Ask.Feedback(partial_answer=self.engine.model.detokenize(ids).strip(),
                                                   tokens_generated=len(ids), time_to_first_token_s=float(ttft)))

    # ---- memory services (std_srvs/Trigger), run by the worker between jobs --------------------------
    async def _control_call(self, fn, response):
        done = Future()
        with self._lock:
            if self.engine is None:
                response.success, response.message = False, "engine not available"
                return response
            self._control.append((fn, done))
            self._lock.notify()
        response.success, response.message = await done
        return response

    async def _on_reset_memory(self, request, response):
        return await self._control_call(self._reset_memory, response)

    async def _on_save_memory(self, request, response):
        return await self._control_call(self._save_memory, response)

    async def _on_load_memory(self, request, response):
        return await self._control_call(self._load_memory, response)

    def _reset_memory(self, engine) -> str:
        engine.reset()
        self.count.memory_resets += 1
        return "memory cleared"

    def _save_memory(self, engine) -> str:
        path = self._memory_path()
        engine.save_memory(path)
        self.memory_file_error = None
        return f"saved {engine.memory.frames_ingested} frames to {path}"

    def _load_memory(self, engine) -> str:
        path = self._memory_path()
        engine.load_memory(path)
        self.memory_file_error = None
        return f"loaded {engine.memory.frames_ingested} frames from {path}"

    def _memory_path(self) -> str:
        if not self._p["memory_file"]:
            raise MemoryFileError("the memory_file parameter is empty")
        return os.path.expanduser(self._p["memory_file"])

    def _load_memory_file(self, engine):
        """At start: memory from memory_file if there is one; a refused file leaves memory empty."""
        if not self._p["memory_file"] or not os.path.exists(self._memory_path()):
            return
        try:
            self.get_logger().info(self._load_memory(engine))
        except Exception as err:                       # noqa: BLE001 - any failure: start on empty memory
            self.memory_file_error = f"memory file refused, running on empty memory: {err}"
            self.get_logger().error(self.memory_file_error)

    def _save_memory_file(self):
        """On a clean shutdown (the worker has stopped): memory to memory_file, if set."""
        if self.engine is None or not self._p["memory_file"]:
            return
        if self.memory_file_error:          # keep the file we refused for whoever wants to look at it
            self.get_logger().warn("not saving over the memory file that was refused at start")
            return
        try:
            self.get_logger().info(self._save_memory(self.engine))
        except (MemoryFileError, OSError) as err:
            self.get_logger().error(f"could not save memory: {err}")

    def _expire(self, job: _QueryJob, timeout: float):
        with self._lock:
            if job in self._queries:
                self._queries.remove(job)
        self._finish(job, False, f"timed out after {timeout} s")

    def _finish(self, job: _QueryJob, success: bool, error: str = ""):
        """Complete a question's future once (the worker and the time-out timer may race); the
        service coroutine returns it."""
        with self._finish_lock:
            if job.future.done():
                return
            job.response.success, job.response.error_message = success, error
            job.response.latency_s = time.perf_counter() - job.received
            job.future.set_result(job.response)
        self._worker_done.trigger()

    # ---- the engine worker ------------------------------------------------------------------------
    def _serve(self):
        engine = self.engine
        handlers = {"query": self._answer, "narration": self._narrate, "frame": self._ingest,
                    "control": self._run_control}
        while True:
            with self._lock:
                while True:
                    if not self._running:
                        return
                    kind, job = self._next_job()
                    if kind not in (None, "wait") or self._engine_changes or self._reset_due:
                        break
                    self._lock.wait(timeout=job)          # "wait": a fresh-frame or camera-sync wait ends then
                changes, self._engine_changes = self._engine_changes, {}
                reset, self._reset_due = self._reset_due, False
                if kind == "wait":
                    kind, job = None, None
            try:
                if changes:
                    engine.reconfigure(**changes)
                if reset:
                    self._reset_memory(engine)
                if kind:
                    handlers[kind](job)
                self.last_error = None
            except Exception as err:                   # noqa: BLE001 - no silent death: report and go on
                self._job_failed(kind, job, err)
            self._stats = engine.stats()

    def _next_job(self) -> tuple[str | None, object]:
        """What the worker does next: (kind, job); ("wait", seconds) while the first question waits
        for a newer frame or the oldest sample for its other cameras; (None, None) when idle. Called
        with the lock held.
        Order: memory services, questions (after the frames sampled before them: fresh answers),
        narration, frames."""
        if self._control:
            return "control", self._control.popleft()
        if self._queries:
            first = self._queries[0]
            if self._frames and self._frames[0][0] <= first.fresh_after:
                return self._take_frame()
            wait = self._fresh_wait_left(first)
            if wait <= 0:
                return "query", self._queries.popleft()
            if self._frames:
                return self._take_frame(wait_limit=wait)
            return "wait", wait
        if self._narration_due:
            self._narration_due = False
            return "narration", None
        if self._frames:
            return self._take_frame()
        return None, None

    def _take_frame(self, wait_limit: float = float("inf")) -> tuple[str, object]:
        """("frame", the oldest sample) if it may go to the engine now, else ("wait", seconds).
        A sample waits for the cameras not yet in it, at most camera_sync_wait_s of wall time from
        when it was made: an idle worker would otherwise take it the moment its first camera's
        frame came, before the others' frames of the same instant. It does not wait for a camera
        whose newest frame is already past it (that camera skipped the instant) or that is silent
        (stale_camera_s). Called with the lock held."""
        stamp, sample, made = self._frames[0]
        now, slop = time.monotonic(), self._p["camera_sync_slop_s"]

        def may_still_come(topic, recent) -> bool:
            return (topic not in sample and not (recent and recent[-1][0] > stamp + slop)
                    and now - self._camera_wall[topic] < self._p["stale_camera_s"])
        waits = any(may_still_come(topic, recent) for topic, recent in self._recent.items())
        wait = self._p["camera_sync_wait_s"] - (now - made) if waits else 0.0
        return ("frame", self._frames.popleft()) if wait <= 0 else ("wait", min(wait, wait_limit))

    def _fresh_wait_left(self, job: _QueryJob) -> float:
        """Seconds a question still waits for a frame stamped at or after its not_before."""
        if job.not_before is None or (self._last_ingested_stamp or float("-inf")) >= job.not_before:
            return 0.0
        return self._p["fresh_wait_s"] - (time.perf_counter() - job.received)

    def _run_control(self, job):
        fn, done = job
        try:
            done.set_result((True, fn(self.engine)))
        except (MemoryFileError, OSError) as err:
            done.set_result((False, str(err)))
        self._worker_done.trigger()

    def _job_failed(self, kind: str | None, job, err: Exception):
        self.count.worker_errors += 1
        self.last_error = f"{kind or 'reconfigure'} failed: {type(err).__name__}: {err}"
        self.get_logger().error(f"{self.last_error}\n{traceback.format_exc()}")
        self.engine.hook.reset()                       # leave no half-built ingest or answer behind
        if kind == "query":
            self._finish(job, False, f"engine error: {type(err).__name__}: {err}")
        elif kind == "control" and not job[1].done():
            job[1].set_result((False, f"engine error: {type(err).__name__}: {err}"))
            self._worker_done.trigger()

    def _ingest(self, sample):
        """One sample: every camera's frame in it goes into memory as its own frame, marked by camera."""
        stamp, frames, _ = sample
        for topic in self._p["camera_topics"]:
            if topic not in frames:
                self.count.camera_misses[topic] = self.count.camera_misses.get(topic, 0) + 1
                continue
            msg = frames[topic][1]
            try:
                self.engine.ingest(to_rgb(msg), stamp, camera=topic)
            except (ImageConversionError, EngineInputError) as err:
                self.count.frames_rejected += 1
                self.get_logger().warn(f"frame from {topic} dropped: {err}", throttle_duration_sec=5.0)
                continue
            except EngineResourceError as err:
                self.count.frames_dropped += 1
                self.get_logger().error(str(err), throttle_duration_sec=5.0)
                continue
            self.count.frames_ingested += 1
        with self._lock:
            self._last_ingested_stamp = stamp

    def _answer(self, job: _QueryJob):
        if job.future.done():                          # timed out while waiting
            return
        try:
            answer = self.engine.ask(job.question, max_new_tokens=job.max_new_tokens,
                                     cancel=lambda: not self._running or job.future.done() or job.cancel_requested(),
                                     on_token=lambda ids, ttft: self._feedback(job, ids, ttft),
                                     window=self._window(job), evidence=self._p["evidence_frames"])
        except (EngineInputError, EngineResourceError) as err:
            self.count.queries_refused += 1
            self._finish(job, False, str(err))
            return
        except AnswerCancelled:
            self._finish(job, False, "shutting down" if not self._running else "cancelled")
            return
        r = job.response
        r.answer = answer.text
        r.time_to_first_token_s = float(answer.ttft_s)
        if answer.span:
            r.span_start, r.span_end = _time_msg(answer.span[0]), _time_msg(answer.span[1])
        r.pages_used, r.pages_total = answer.pages_used, answer.pages_total
        r.tokens_generated = answer.tokens_generated
        r.evidence_times = [_time_msg(e.time) for e in answer.evidence]
        r.evidence_weights = [float(e.weight) for e in answer.evidence]
        r.evidence_cameras = [e.camera for e in answer.evidence]
        self.count.queries_answered += 1
        self._finish(job, True)

    def _window(self, job: _QueryJob) -> tuple | None:
        if job.window is None or job.window[0] != "last":
            return job.window
        times = self.engine.memory.frame_times          # the last N seconds before the newest frame
        return (times[-1] - job.window[1], None) if times else None

    def _narrate(self, _):
        # a question waiting preempts the narration, which is periodic and is redone after it
        try:
            answer = self.engine.describe(cancel=lambda: not self._running or bool(self._queries))
        except NoFramesError:
            return
        except AnswerCancelled:
            with self._lock:
                self._narration_due = self._running
            return
        except EngineResourceError as err:
            self.get_logger().error(str(err), throttle_duration_sec=5.0)
            return
        msg = Narration(text=answer.text, latency_s=float(answer.latency_s))
        msg.header.frame_id = ",".join(self._p["camera_topics"])
        if answer.span:
            # stamped in camera time, like the frames it describes
            msg.span_start = _time_msg(self._narration_start())
            msg.header.stamp = msg.span_end = _time_msg(answer.span[1])
        self.narration_pub.publish(msg)
        self.count.narrations += 1

    def _narration_start(self) -> float:
        """A narration looks at the last narration_frames frames only."""
        times = self.engine.memory.frame_times
        return times[-min(len(times), self.engine.config.narration_frames)]

    # ---- status -------------------------------------------------------------------------------------
    def status(self) -> tuple[int, str, dict]:
        """(diagnostic level, message, values)."""
        s = dict(vars(self.count))
        # the engine's own counts start again after a memory reset; the node's are cumulative
        s.update({(f"memory_{k}" if k in s else k): v for k, v in self._stats.items() if k != "stream_span"})
        s["engine"] = "ready" if self.engine else ("failed" if self.engine_error else
                                                   "unconfigured" if self.state else "loading")
        s["state"] = self.state or "active"
        with self._lock:
            s["frames_queued"], s["queries_queued"] = len(self._frames), len(self._queries)
            newest, ingested = self._newest_stamp, self._last_ingested_stamp
            now = time.monotonic()
            silent = {topic: now - wall for topic, wall in self._camera_wall.items()}
        # both in camera time: how far the engine is behind the newest frame it was offered
        s["lag_s"] = None if newest is None or ingested is None else round(max(0.0, newest - ingested), 3)
        s.pop("camera_misses")
        for topic, seconds in silent.items():           # per camera: one that stops is named
            s[f"seconds_since_frame[{topic}]"] = round(seconds, 1)
            s[f"samples_missed[{topic}]"] = self.count.camera_misses.get(topic, 0)
        if self.engine_error:
            return DiagnosticStatus.ERROR, f"engine failed to start: {self.engine_error}", s
        if self.last_error:
            return DiagnosticStatus.ERROR, self.last_error, s
        if self.memory_file_error:
            return DiagnosticStatus.WARN, self.memory_file_error, s
        if self.state not in (None, "active"):
            return DiagnosticStatus.WARN, f"{self.state} (managed node)", s
        if self.engine is None:
            return DiagnosticStatus.WARN, "loading the model", s
        stale = [f"{topic} ({seconds:.1f} s)" for topic, seconds in silent.items() if seconds > self._p["stale_camera_s"]]
        if stale:
            return DiagnosticStatus.WARN, f"no frame from camera {', '.join(stale)}", s
        if s["lag_s"] is not None and s["lag_s"] > self._p["max_lag_s"]:
            return DiagnosticStatus.WARN, f"engine {s['lag_s']:.1f} s behind the camera", s
        dropped, self._dropped_reported = s["frames_dropped"] - self._dropped_reported, s["frames_dropped"]
        if dropped:
            return DiagnosticStatus.WARN, f"engine behind: {dropped} sampled frames dropped since the last report", s
        return DiagnosticStatus.OK, "ready", s

    def _publish_status(self):
        level, message, values = self.status()
        status = DiagnosticStatus(level=level, name=f"{self.get_fully_qualified_name()}: engine",
                                  hardware_id=self._p["device"], message=message,
                                  values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_pub.publish(array)

    # ---- shutdown -----------------------------------------------------------------------------------
    def begin_shutdown(self):
        """Refuse new questions, answer the waiting ones "shutting down", stop the answer in
        progress at its next token and let the worker end. The executor must keep spinning for a
        moment afterwards, so that the answers reach their callers."""
        with self._lock:
            self._running = False
            waiting, self._queries = list(self._queries), collections.deque()
            self._lock.notify_all()
        for job in waiting:
            self._finish(job, False, "shutting down")


class LiveVLMNode(LiveVLMCore, Node):
    """The node, up and serving as soon as it starts (the model loads in the background)."""

    def __init__(self, **kwargs):
        Node.__init__(self, "livevlm", **kwargs)
        self._setup()
        self._open_intake()
        self._start_worker(load_in_worker=True)

    def shutdown(self, timeout: float = 3.0):
        self.begin_shutdown()
        self._stop_worker(timeout)
        self._save_memory_file()


def _seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def _time_msg(seconds: float) -> TimeMsg:
    sec = int(seconds // 1)
    return TimeMsg(sec=sec, nanosec=int(round((seconds - sec) * 1e9)) % 1_000_000_000)
