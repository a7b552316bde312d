"""LiveVLMCore: the node's parts put together, and their life. The plain node (node.py) and the
managed node (lifecycle_node.py) are thin shells that drive it through the same steps:

    configure   read the parameters, make the intake, work queue and servers, load the model
                (plain node: in the background), adopt memory_file, start the engine worker
    activate    open the camera subscriptions; questions and memory commands are served
    deactivate  close the subscriptions; waiting callers hear "deactivated", new ones are refused
                with it; memory and the worker stay
    cleanup     the worker stops, memory is saved to memory_file, the engine and its memory go
    shutdown    as cleanup, with "shutting down" (SIGINT/SIGTERM, or the lifecycle transition)

Threads: executor threads run the camera callbacks (a stamp read from the serialized message and
a queue push, nothing else), timers and the servers' coroutines; the engine worker thread does all
heavy work. No exception from a callback or timer leaves it (`_guarded`): it is logged, counted
(`callback_errors`) and the node goes on.
"""

from __future__ import annotations

import functools
import gc
import os
import threading

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rcl_interfaces.msg import SetParametersResult
from rclpy.serialization import deserialize_message

from livevlm_ros.engine import RUNTIME_OPTIONS, LiveVLMEngine, MemoryFileError
from livevlm_ros.msg import Narration

from . import diagnostics, parameters, robot_poses
from .camera_intake import CameraIntake
from .engine_worker import EngineWorker
from .log_throttle import Throttle
from .messages import header_stamp_ns, image_type, pose_msg, stamp_ns, time_msg
from .servers import CallerServers
from .work_queue import WorkQueue

# Narration: reliable, and the latest one kept for a planner that subscribes late.
NARRATION_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


class LiveVLMCore:
    def __init__(self, node, managed: bool):
        self.node, self.managed = node, managed
        self.log = node.get_logger()
        self.throttle = Throttle()
        parameters.declare(node, managed)
        self.p = parameters.read(node)               # raises ValueError: a bad parameter set
        self.state = "unconfigured"
        self.serving = False                         # the worker should be running
        self.loading = False
        self.engine_error: str | None = None         # the engine could not start
        self.memory_file_error: str | None = None    # memory_file refused at start (until a save or load works)
        self.callback_errors = 0
        self.dropped_reported = 0
        self.engine: LiveVLMEngine | None = None
        self.work: WorkQueue | None = None
        self.worker: EngineWorker | None = None
        self.servers: CallerServers | None = None
        self._subs: list = []
        self.poses = None                            # robot_poses: where each frame was taken (or None)
        self._life = threading.Lock()                # one transition at a time (a SIGTERM mid-configure)

        self._camera_group = MutuallyExclusiveCallbackGroup()
        self._timers_group = MutuallyExclusiveCallbackGroup()
        self._service_group = ReentrantCallbackGroup()
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        # The servers' coroutines await futures the worker thread completes; rclpy resumes a waiting
        # coroutine only when its executor wakes up, so the worker wakes it with this guard condition
        # (else an answer waits for the next camera frame or timer).
        self._wake = node.create_guard_condition(lambda: None)
        make_pub = node.create_lifecycle_publisher if managed else node.create_publisher
        self.narration_pub = make_pub(Narration, "~/narration", NARRATION_QOS)
        self.diagnostics_pub = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._narration_timer = self._status_timer = None
        self._make_timers()
        node.add_on_set_parameters_callback(self._check_parameters)
        node.add_post_set_parameters_callback(self._apply_parameters)

    # ---- life ----------------------------------------------------------------------------------
    def configure(self, load_in_background: bool) -> bool:
        """Returns False if the model could not be loaded (the reason is in engine_error)."""
        with self._life:
            self.p.update(parameters.read(self.node))          # set while unconfigured: take them now
            self.work = WorkQueue(CameraIntake(self.p["camera_topics"], self.p), self.p)
            self.work.close("engine not available: still loading the model")
            if self.servers is None:                           # made once, kept to answer in every state
                self.servers = CallerServers(self.node, self.work, self.p, self._service_group, self._timers_group,
                                             self._steady, self._wake.trigger, self.throttle, self._detokenize)
                self.servers.memory_commands = {"reset": self._reset_memory, "save": self._save_memory,
                                                "load": self._load_memory}
            self.servers.work = self.work
            self.state = "inactive"
        if load_in_background:
            self.loading = True
            threading.Thread(target=self._load, name="livevlm-load", daemon=True).start()
            return True
        return self._load()

    def activate(self):
        with self._life:
            self._types = {t: image_type(t) for t in self.p["camera_topics"]}
            for topic, msg_type in self._types.items():
                # raw: the callback gets the serialized bytes; only sampled frames are deserialized
                self._subs.append(self.node.create_subscription(
                    msg_type, topic, self._guarded(functools.partial(self._on_image, topic)),
                    qos_profile_sensor_data, callback_group=self._camera_group, raw=True))
            self.poses = robot_poses.make(self.node, self.p, self._guarded)
            self.state = "active"
            if self.worker is not None:
                self.work.reopen()

    def deactivate(self, why: str = "deactivated"):
        with self._life:
            for sub in self._subs:
                self.node.destroy_subscription(sub)
            self._subs = []
            if self.poses is not None:
                self.poses.destroy()
                self.poses = None
            if self.state == "active":
                self.state = "inactive"
            if self.work is not None:
                self._answer_waiting(why)

    def cleanup(self, why: str = "unconfigured: configure the node first"):
        self.deactivate(why)
        with self._life:
            self.serving = False
            if self.worker is not None:
                self.worker.stop(why)
            self._save_memory_file()
            engine, self.engine, self.worker = self.engine, None, None
            if engine is not None:
                engine.close()
                del engine
                gc.collect()
                _empty_device_cache()
            self.state = "unconfigured"

    def shutdown(self):
        """SIGINT/SIGTERM or the shutdown transition: waiting callers hear "shutting down", the
        answer in progress stops at its next token, memory is saved to memory_file."""
        self.cleanup("shutting down")
        self.state = "finalized"

    def destroy(self):
        """The node is being destroyed: shut down if not yet, then the servers go."""
        if self.state != "finalized":
            self.shutdown()
        if self.servers is not None:
            self.servers.destroy()
            self.servers = None

    def _answer_waiting(self, why: str):
        """Every caller waiting hears `why`, the one being answered too (it stops at its next token)."""
        queries, control = self.work.close(why)
        if self.worker is not None:
            self.worker.interrupt(why)
        for job in queries:
            job.finish(False, why)
        for job in control:
            job.finish(False, why)
        self._wake.trigger()

    def _load(self) -> bool:
        try:
            engine = LiveVLMEngine(parameters.engine_config(self.p))
        except Exception as err:                           # noqa: BLE001 - reported in diagnostics and answers
            self.engine_error = f"{type(err).__name__}: {err}"
            self.log.error(f"could not start the engine: {self.engine_error}")
            with self._life:
                self.loading = False
                self.work.close(f"engine not available: {self.engine_error}")
            return False
        with self._life:
            self.loading = False
            if self.state == "unconfigured" or self.state == "finalized":   # shut down while loading
                engine.close()
                return False
            self.engine_error = None
            self._load_memory_file(engine)
            self.engine = engine
            self.worker = EngineWorker(engine, self.work, self.p, self.p["camera_topics"], self._publish_narration,
                                       self._wake.trigger, self.log, self.throttle, self._pose_at)
            self.servers.frame_ids = self.worker.frame_ids
            self.serving = True
            self.worker.start()
            if self.state == "active":
                self.work.reopen()
            else:
                self.work.close("inactive: activate the node to serve it")
        m, stats = self.engine.model, self.engine.stats()
        h, w = m.frame_size
        self.log.info(f"engine ready: {self.p['policy']} policy, {m.model_type} model {self.p['model_path']}: "
                      f"{h}x{w} px and {m.tokens_per_frame} tokens a frame, budget {stats['budget_tokens']} tokens "
                      f"({stats['prefix_tokens']} of them the prompt)")
        return True

    def _pose_at(self, stamp: int, frame_id: str):
        """Where the robot was at `stamp` (the engine worker asks, per frame), or None."""
        poses = self.poses
        return None if poses is None else poses.pose_at(stamp, frame_id)

    # ---- camera callbacks (executor): a stamp read and a queue push --------------------------------
    def _on_image(self, topic: str, raw: bytes):
        try:
            stamp = self._stamp(topic, raw)
        except Exception as err:                   # noqa: BLE001 - unreadable bytes: counted, node goes on
            with self.work.lock:
                self.work.intake.counts.frames_received += 1
            if self.throttle.ok(f"unreadable {topic}", 5.0):
                self.log.warning(f"frame from {topic} dropped: {type(err).__name__}: {err}")
            return
        outcome = self.work.offer_frame(topic, stamp, raw)
        jump = self.work.intake.last_jump(topic)
        if outcome == "jump" or (outcome == "refused" and jump and jump[1] == stamp):    # once per jump
            self.log.warning(f"camera {topic} time jumped back from {jump[0] / 1e9:.3f} s to {jump[1] / 1e9:.3f} s: "
                             + ("clearing memory" if outcome == "jump" else
                                "refusing its frames until they pass the old stamps"))
        elif outcome == "unstamped" and self.throttle.ok(f"unstamped {topic}", 5.0):
            self.log.warning(f"frame from {topic} refused: header stamp is 0 (the driver does not stamp images)")

    def _stamp(self, topic: str, raw: bytes) -> int:
        """The header stamp, read from the serialized bytes; a message in another encoding than
        plain CDR (rare) is deserialized for it."""
        try:
            return header_stamp_ns(raw)
        except ValueError:
            return stamp_ns(deserialize_message(raw, self._types[topic]).header.stamp)

    def _guarded(self, fn):
        """No exception from an executor callback ends the process: log it, count it, go on."""
        @functools.wraps(fn)
        def run(*args):
            try:
                return fn(*args)
            except Exception as err:                        # noqa: BLE001
                self.callback_errors += 1
                if self.throttle.ok(f"callback {getattr(fn, '__name__', fn)}", 5.0):
                    self.log.error(f"callback failed, node goes on: {type(err).__name__}: {err}")
        return run

    # ---- timers ----------------------------------------------------------------------------------
    def _make_timers(self):
        for timer in (self._narration_timer, self._status_timer):
            if timer is not None:
                self.node.destroy_timer(timer)
        period = self.p["narration_period_s"]
        self._narration_timer = (self.node.create_timer(period, self._guarded(self._request_narration),
                                                        callback_group=self._timers_group) if period > 0 else None)
        # status runs on the steady clock: under use_sim_time a paused or finished bag stops ROS
        # time, and health reports must go on regardless
        self._status_timer = self.node.create_timer(self.p["status_period_s"], self._guarded(self._publish_status),
                                                    callback_group=self._timers_group, clock=self._steady)

    def _request_narration(self):
        if self.work is not None and self.state == "active":
            self.work.request(narration=True)

    def _publish_status(self):
        self.diagnostics_pub.publish(diagnostics.message(self))

    def _publish_narration(self, answer, start, latency_s: float):
        msg = Narration(text=answer.text, latency_s=float(latency_s))
        msg.header.frame_id = ",".join(self.p["camera_topics"])
        if answer.span and start is not None:
            # stamped in camera time, like the frames it describes
            msg.span_start = time_msg(start)
            msg.header.stamp = msg.span_end = time_msg(answer.span[1])
            poses = self.engine.memory.frame_poses                 # (the worker thread calls this)
            msg.pose_known, msg.pose = pose_msg(poses[-1] if poses else None, answer.span[1], self.p["fixed_frame"])
        self.narration_pub.publish(msg)

    def _detokenize(self, ids) -> str:
        return self.engine.model.detokenize(ids) if self.engine is not None else ""

    # ---- parameters ------------------------------------------------------------------------------
    def _check_parameters(self, params) -> SetParametersResult:
        """Ranges and read-only are enforced by rclpy from the descriptors; this adds the rules that
        span several values, and (managed node) that restart parameters wait for configure."""
        names = {p.name for p in params} & set(self.p)
        late = sorted(names & parameters.RESTART_NAMES) if self.state != "unconfigured" else []
        reason = (f"{', '.join(late)} shape the model or memory: set them while unconfigured (cleanup first)"
                  if late else parameters.invalid(dict(self.p, **{p.name: p.value for p in params if p.name in self.p})))
        return SetParametersResult(successful=reason is None, reason=reason or "")

    def _apply_parameters(self, params):
        changes = {}
        for p in params:
            if p.name in self.p and p.name not in parameters.RESTART_NAMES:
                self.p[p.name] = p.value
                if p.name in RUNTIME_OPTIONS:
                    changes[p.name] = p.value           # the worker applies it between jobs
            self.log.info(f"parameter {p.name} = {p.value!r}")
        if self.work is not None:
            self.work.request(changes=changes)
        if {p.name for p in params} & {"narration_period_s", "status_period_s"}:
            self._make_timers()

    # ---- memory commands and memory_file (run by the worker, between jobs) ---------------------------
    def _reset_memory(self, engine) -> str:
        engine.reset()
        self.worker.counts.memory_resets += 1
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
        if not self.p["memory_file"]:
            raise MemoryFileError("the memory_file parameter is empty")
        return os.path.expanduser(self.p["memory_file"])

    def _load_memory_file(self, engine):
        """At start: memory from memory_file if there is one; a refused file leaves memory empty."""
        if not self.p["memory_file"] or not os.path.exists(self._memory_path()):
            return
        try:
            self.log.info(self._load_memory(engine))
        except Exception as err:                       # noqa: BLE001 - any failure: start on empty memory
            self.memory_file_error = f"memory file refused, running on empty memory: {err}"
            self.log.error(self.memory_file_error)

    def _save_memory_file(self):
        """When the worker has stopped (cleanup, shutdown): memory to memory_file, if set."""
        if self.engine is None or not self.p["memory_file"]:
            return
        if self.memory_file_error:          # keep the file we refused for whoever wants to look at it
            self.log.warning("not saving over the memory file that was refused at start")
            return
        try:
            self.log.info(self._save_memory(self.engine))
        except Exception as err:                       # noqa: BLE001 - never lose the shutdown over it
            self.log.error(f"could not save memory: {err}")


def _empty_device_cache():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()

