"""The caller-facing servers: ~/query (service), ~/ask (action), ~/reset_memory, ~/save_memory,
~/load_memory (std_srvs/Trigger). Every caller hears back, in every state.

Callbacks only admit and queue: a question is checked (size, window) and queued, or refused at
once with the reason; the service and action callbacks are coroutines that await the job without
holding an executor thread, so a burst of callers is answered or refused, never left in a full
request queue. Each wait has a time-out (query_timeout_s): a caller whose job is not done by then
hears "timed out". When the node stops serving (deactivate, cleanup, shutdown) the work queue is
closed: waiting jobs are answered with the reason and new ones refused with it, while the servers
themselves stay up to say so.
"""

from __future__ import annotations

import math
import time

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.task import Future
from std_srvs.srv import Trigger

from livevlm_ros.action import Ask
from livevlm_ros.srv import Query

from . import parameters
from .messages import ask_result, fill_response, request_place, request_window, stamp_ns
from .work_queue import ControlJob, QueryJob

# Every request is taken off the wire at once (the callbacks only queue), so the request queue
# needs room for one burst of callers, not for a backlog; keep-all so that a burst beyond any
# depth (1,000 goals at once) is delivered rather than overwritten. Refusals come back as answers.
SERVICE_QOS = QoSProfile(depth=1000, history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)

# How long an ended goal's result waits for its client to ask (rclpy keeps it 10 s by default: a
# client still busy sending a burst of goals would find its first results gone).
RESULT_KEPT_S = 300


class CallerServers:
    """Created once (configure, or a plain node's start) and kept until the node is destroyed."""

    def __init__(self, node, work, params: dict, group, timers_group, steady_clock, wake, throttle, detokenize):
        self.node, self.work, self.p = node, work, params
        self._timers_group, self._steady, self._wake, self._throttle = timers_group, steady_clock, wake, throttle
        self.detokenize = detokenize                # ids -> text, for the Ask feedback
        self.refused = 0                            # questions refused at admission
        self.frame_ids: dict[str, str] = {}         # camera topic -> image frame_id (the worker's, for evidence)
        self.cancels = 0
        self.timeouts = 0
        self._goals: dict[int, QueryJob] = {}       # id(goal request) -> its queued job
        self.query = node.create_service(Query, "~/query", self._on_query, qos_profile=SERVICE_QOS,
                                         callback_group=group)
        self.triggers = [node.create_service(Trigger, f"~/{name}", cb, qos_profile=SERVICE_QOS, callback_group=group)
                         for name, cb in (("reset_memory", self._on_reset), ("save_memory", self._on_save),
                                          ("load_memory", self._on_load))]
        self.ask = ActionServer(node, Ask, "~/ask", execute_callback=self._execute_ask,
                                goal_callback=self._on_goal, handle_accepted_callback=self._on_accepted,
                                cancel_callback=self._on_cancel, callback_group=group,
                                goal_service_qos_profile=SERVICE_QOS, result_service_qos_profile=SERVICE_QOS,
                                cancel_service_qos_profile=SERVICE_QOS, result_timeout=RESULT_KEPT_S)
        self.memory_commands = None                 # set by the node: {'reset'|'save'|'load': fn(engine)}

    def destroy(self):
        self.ask.destroy()
        for service in [self.query, *self.triggers]:
            self.node.destroy_service(service)

    # ---- admission -----------------------------------------------------------------------------
    def admit(self, request) -> QueryJob | str:
        """A queued job, or the reason it is refused."""
        job = self._job(request)
        if isinstance(job, QueryJob):
            reason = self.work.add_query(job)
            if reason is None:
                return job
            job = reason
        self.refused += 1
        return job

    def _job(self, request) -> QueryJob | str:
        """The job a request asks for, or why it cannot be one (checked before anything is tokenized)."""
        question = request.question
        limit = parameters.max_question_bytes(self.p)
        size = len(question.encode("utf-8", "replace"))
        if size > limit:
            return f"question is {size} bytes long; the limit is {limit} (max_question_tokens x 16)"
        if not question.strip():
            return "question is empty"
        if not math.isfinite(request.last_seconds) or request.last_seconds < 0:
            return f"last_seconds must be a finite number >= 0, got {request.last_seconds}"
        place = request_place(request, self.p["fixed_frame"])
        if isinstance(place, str):
            return place
        cap = self.p["max_new_tokens"]
        return QueryJob(question, min(request.max_new_tokens or cap, cap), window=request_window(request),
                        not_before=stamp_ns(request.not_before) or None, place=place)

    async def _answered(self, job: QueryJob) -> tuple[bool, str]:
        """Await a queued job without holding an executor thread; a time-out answers it."""
        timeout = self.p["query_timeout_s"]
        timer = self.node.create_timer(timeout, lambda: self._expire(job, timeout), callback_group=self._timers_group,
                                       clock=self._steady)
        try:
            return await _awaitable(job.done, self._wake)
        finally:
            self.node.destroy_timer(timer)

    def _expire(self, job: QueryJob, timeout: float):
        self.work.withdraw(job)
        if job.finish(False, f"timed out after {timeout} s"):
            self.timeouts += 1
            self._wake()

    # ---- ~/query -------------------------------------------------------------------------------
    async def _on_query(self, request: Query.Request, response: Query.Response) -> Query.Response:
        job = self.admit(request)
        if isinstance(job, str):
            response.success, response.error_message = False, job
            return response
        return await self._respond(job, response)

    async def _respond(self, job: QueryJob, response: Query.Response) -> Query.Response:
        response.success, response.error_message = await self._answered(job)
        if response.success:
            try:
                fill_response(response, job.answer, self.frame_ids, self.p["fixed_frame"])
            except Exception as err:               # noqa: BLE001 - the caller hears why, the node goes on
                response = Query.Response(success=False, error_message=f"internal error: {type(err).__name__}: {err}")
        response.latency_s = time.perf_counter() - job.received
        return response

    # ---- ~/ask: a question with streamed tokens and cancel --------------------------------------
    def _on_goal(self, request) -> GoalResponse:
        """Checked and refused here (a rejected goal); queued once accepted (`_on_accepted`)."""
        job = self._job(request)
        if isinstance(job, QueryJob) and (reason := self.work.room()) is not None:
            job = reason
        if isinstance(job, str):
            self.refused += 1
            if self._throttle.ok("goal rejected", 1.0):
                self.node.get_logger().info(f"Ask goal rejected: {job}")
            return GoalResponse.REJECT
        self._goals[id(request)] = job
        return GoalResponse.ACCEPT

    def _on_accepted(self, goal):
        """Queued once accepted, with its feedback wired, so every token reaches the caller. Goals
        accepted together may fill the queue between the check and this: the later ones end
        aborted with the reason ("busy ...")."""
        job = self._goals[id(goal.request)]
        job.on_token = lambda ids, ttft: goal.publish_feedback(Ask.Feedback(
            partial_answer=self.detokenize(ids).strip(), tokens_generated=len(ids), time_to_first_token_s=float(ttft)))
        reason = self.work.add_query(job)
        if reason is not None:
            self.refused += 1
            job.finish(False, reason)
        goal.execute()

    def _on_cancel(self, goal) -> CancelResponse:
        # A queued question leaves the queue and its goal ends now, even before its execute
        # callback ran; one being answered stops at its next token.
        job = self._goals.get(id(goal.request))
        if job is not None:
            job.cancelled.set()
            self.cancels += 1
            if self.work.withdraw(job) and job.finish(False, "cancelled"):
                self._wake()
        return CancelResponse.ACCEPT

    async def _execute_ask(self, goal):
        job = self._goals[id(goal.request)]
        try:
            response = await self._respond(job, Query.Response())
        finally:
            del self._goals[id(goal.request)]          # cancellable until it has ended
        if response.success:
            goal.succeed()
        elif goal.is_cancel_requested:
            goal.canceled()
        else:
            goal.abort()
        return ask_result(response)

    # ---- memory commands, run by the worker between jobs ----------------------------------------
    async def _control(self, name: str, response):
        job = ControlJob(self.memory_commands[name])
        reason = self.work.add_control(job)
        if reason is not None:
            response.success, response.message = False, reason
            return response
        timeout = self.p["query_timeout_s"]

        def expire():
            self.work.withdraw(job)
            if job.finish(False, f"timed out after {timeout} s"):
                self._wake()
        timer = self.node.create_timer(timeout, expire, callback_group=self._timers_group, clock=self._steady)
        try:
            response.success, response.message = await _awaitable(job.done, self._wake)
        finally:
            self.node.destroy_timer(timer)
        return response

    async def _on_reset(self, request, response):
        return await self._control("reset", response)

    async def _on_save(self, request, response):
        return await self._control("save", response)

    async def _on_load(self, request, response):
        return await self._control("load", response)


def _awaitable(done, wake) -> Future:
    """An rclpy Future completed with a concurrent Future's result (set by the worker thread). The
    executor resumes the awaiting coroutine when it wakes: `wake` triggers its guard condition."""
    future = Future()

    def forward(d):
        try:
            future.set_result(d.result())
        except Exception:                     # noqa: BLE001 - set twice (cannot happen), never raise here
            pass
        wake()
    done.add_done_callback(forward)
    return future
