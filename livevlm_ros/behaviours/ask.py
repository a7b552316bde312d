"""Ask: a py_trees leaf that asks the node a question through its `~/ask` action.

    Ask("where is the toolbox?", "Where did I last see the red toolbox?", key="/toolbox", last_seconds=300)

First tick: the goal is sent (asynchronously). Later ticks: RUNNING while it waits and while tokens
stream (`<key>/partial_answer`, `<key>/tokens` on the blackboard); SUCCESS with `<key>/answer`,
`<key>/evidence` (livevlm_ros/msg/Evidence: stamp, camera, share, the robot's pose; strongest
first) and `<key>/result` (the whole Ask.Result: span, pages, latency); FAILURE with the reason in `<key>/error`: the node's error ("no frame yet", "busy ...", an
engine error), a rejected goal, or the leaf's own time-out (then the goal is cancelled). Halted or
preempted (`terminate(INVALID)`, e.g. a parallel branch or a higher-priority branch wins), it cancels
the goal: the node stops the answer at its next token and the engine is free.

Never blocks a tick: the leaf only sends requests and looks at futures. Like py_trees_ros leaves it
takes the tree's rclpy node in `setup(node=...)`, and whoever owns the tree spins that node; the
goal, feedback and result arrive through that node's executor. Tick the tree from a timer on that
node, as py_trees_ros and `ticking.TreeTicker` do: ticks and the action client's callbacks then never
run at once. Ticking from another thread while an executor spins the node is not safe with this
rclpy: `send_goal_async` registers its future partly outside its lock, and a reply handled in
between is lost (the leaf then fails "timed out ... (no reply to the goal)"; ros2/rclpy#1123).
Feedback callbacks only store the latest message; the blackboard is written in `update()`.
"""

from __future__ import annotations

import time

import py_trees
from action_msgs.msg import GoalStatus

from livevlm_ros.action import Ask as AskAction

from .action_client import shared_action_client
from .goal import ask_goal, check_window, nanoseconds

Status = py_trees.common.Status

# What the leaf writes under its key.
OUTPUT_KEYS = ("partial_answer", "tokens", "answer", "evidence", "result", "error")

REJECTED = ("goal rejected by {action}: the node is busy (max_pending_queries questions waiting) "
            "or the question is longer than its max_question_tokens")

STATUS_NAMES = {v: k[len("STATUS_"):].lower() for k, v in vars(GoalStatus).items() if k.startswith("STATUS_")}


def action_name(namespace: str) -> str:
    """The node's Ask action under a robot namespace ("" -> /livevlm/ask, "robot1" -> /robot1/livevlm/ask)."""
    ns = namespace.strip("/")
    return f"/{ns}/livevlm/ask" if ns else "/livevlm/ask"


class Ask(py_trees.behaviour.Behaviour):
    """Ask the node one question per run of the leaf (see the module's docstring).

    question / question_key   the question, or the blackboard key that holds it when the leaf starts
    key                       blackboard namespace of what the leaf writes (OUTPUT_KEYS)
    window_start, window_end  camera-time window (rclpy / builtin Time or float seconds; None: open)
    last_seconds              > 0: the last N seconds before the newest frame instead
    fresh                     the answer must see a frame stamped after the leaf started (FreshView)
    timeout_s                 wall-clock seconds from the first tick to the result (then: cancel, FAILURE)
    namespace                 the node's namespace (robot1 -> /robot1/livevlm/ask)
    max_new_tokens            0: the node's max_new_tokens
    wait_for_server_s         setup() waits this long for the action server (0: not at all)
    """

    def __init__(self, name: str, question: str | None = None, *, question_key: str | None = None,
                 key: str = "/livevlm", window_start=None, window_end=None, last_seconds: float = 0.0,
                 fresh: bool = False, timeout_s: float = 30.0, namespace: str = "", max_new_tokens: int = 0,
                 wait_for_server_s: float = 10.0):
        super().__init__(name)
        if (question is None) == (question_key is None):
            raise ValueError("give a question or a question_key, not both")
        check_window(window_start, window_end, last_seconds)
        self.question, self.question_key = question, question_key
        self.window_start, self.window_end, self.last_seconds = window_start, window_end, last_seconds
        self.fresh, self.timeout_s, self.max_new_tokens = fresh, timeout_s, max_new_tokens
        self.action_name, self.wait_for_server_s = action_name(namespace), wait_for_server_s
        self.key = key
        self.blackboard = self.attach_blackboard_client(name=name, namespace=key)
        for k in OUTPUT_KEYS:
            self.blackboard.register_key(key=k, access=py_trees.common.Access.WRITE)
        if question_key is not None:
            self.blackboard.register_key(key=question_key, access=py_trees.common.Access.READ)
        self.node = None
        self._client = None           # the node's shared Ask client (action_client.py)
        self._run = 0                 # which run of the leaf a late callback belongs to
        self._reset()

    def _reset(self):
        self._sent = None             # Future of the goal handle
        self._result = None           # Future of the result
        self._feedback = None         # latest feedback message (set by the executor thread)
        self._error = None            # a reason to fail found before the goal was sent
        self.not_before = None        # builtin Time the answer must see a frame after (fresh)
        self._started = time.monotonic()

    # ---- py_trees life -------------------------------------------------------------------------
    def setup(self, **kwargs):
        """kwargs['node']: the rclpy node the tree's owner spins (py_trees_ros passes it the same way)."""
        try:
            self.node = kwargs["node"]
        except KeyError as err:
            raise KeyError(f"{self.name}: setup() needs node=<rclpy node> (tree.setup(node=node))") from err
        self._client = shared_action_client(self.node, AskAction, self.action_name)
        if self.wait_for_server_s > 0 and not self._client.wait_for_server(timeout_sec=self.wait_for_server_s):
            raise TimeoutError(f"{self.name}: no Ask action server at {self.action_name} "
                               f"after {self.wait_for_server_s} s")

    def initialise(self):
        self._run += 1
        self._reset()
        self._write(partial_answer="", tokens=0, answer="", evidence=(), result=None, error="")
        question = self.question if self.question_key is None else self._question_on_the_blackboard()
        if not isinstance(question, str) or not question.strip():
            where = "" if self.question_key is None else f" at blackboard key {self.question_key}"
            self._error = f"no question{where}: {question!r}"
            return
        if self._client is None:
            self._error = "setup(node=...) was not called"
            return
        if not self._client.server_is_ready():
            self._error = f"no Ask action server at {self.action_name}"
            return
        if self.fresh:                                  # the decision point, on the cameras' clock
            self.not_before = self.node.get_clock().now().to_msg()
        goal = ask_goal(question, self.max_new_tokens, self.window_start, self.window_end, self.last_seconds,
                        self.not_before)
        run = self._run
        self._sent = self._client.send_goal_async(goal, feedback_callback=lambda m: self._on_feedback(run, m))

    def _question_on_the_blackboard(self):
        try:
            return self.blackboard.get(self.question_key)
        except KeyError:                                # nothing written there yet
            return None

    def update(self) -> Status:
        if self._error is not None:
            return self._fail(self._error)
        if time.monotonic() - self._started > self.timeout_s:
            waiting_for = self._waiting_for()
            self._cancel()
            return self._fail(f"timed out after {self.timeout_s} s ({waiting_for})")
        if not self._sent.done():
            self.feedback_message = "goal sent"
            return Status.RUNNING
        handle = self._sent.result()
        if not handle.accepted:
            return self._fail(REJECTED.format(action=self.action_name))
        if self._result is None:
            self._result = handle.get_result_async()
        if not self._result.done():
            feedback = self._feedback
            if feedback is not None:
                self._write(partial_answer=feedback.partial_answer, tokens=feedback.tokens_generated)
            self.feedback_message = feedback.partial_answer if feedback else "waiting for the first token"
            return Status.RUNNING
        wrapped = self._result.result()
        return self.ended(wrapped.status, wrapped.result)

    def terminate(self, new_status: Status):
        if new_status == Status.INVALID:               # halted or preempted: free the engine
            self._cancel()

    # ---- the outcome ---------------------------------------------------------------------------
    def ended(self, status: int, result) -> Status:
        """SUCCESS or FAILURE for the goal's end; subclasses (Check) judge the answer further."""
        self._write(result=result, tokens=result.tokens_generated)
        if status != GoalStatus.STATUS_SUCCEEDED or not result.success:
            return self._fail(result.error_message or f"goal {STATUS_NAMES.get(status, status)}")
        if self.fresh and nanoseconds(result.span_end) < nanoseconds(self.not_before):
            behind = (nanoseconds(self.not_before) - nanoseconds(result.span_end)) / 1e9
            return self._fail(f"no fresh view: the newest frame in memory is {behind:.2f} s older than the "
                              "decision point (no newer frame within the node's fresh_wait_s)")
        self._write(partial_answer=result.answer, answer=result.answer, evidence=tuple(result.evidence))
        self.feedback_message = result.answer
        return Status.SUCCESS

    def _waiting_for(self) -> str:
        if not self._sent.done():
            return "no reply to the goal"
        if self._feedback is None:
            return "accepted, no token yet"
        return f"{self._feedback.tokens_generated} tokens so far"

    def _fail(self, reason: str) -> Status:
        self._write(error=reason)
        self.feedback_message = reason
        return Status.FAILURE

    def _write(self, **values):
        for k, v in values.items():
            self.blackboard.set(k, v)

    # ---- executor-thread side --------------------------------------------------------------------
    def _on_feedback(self, run: int, message):
        if run == self._run:                           # not a goal of an earlier, halted run
            self._feedback = message.feedback

    def _cancel(self):
        """Cancel the goal of this run if it may still be going; a goal not yet accepted is cancelled
        as soon as it is (from the executor, through the future's callback)."""
        sent, result = self._sent, self._result
        self._sent = self._result = None
        if sent is None or (result is not None and result.done()):
            return
        sent.add_done_callback(_cancel_when_accepted)


def _cancel_when_accepted(sent):
    handle = sent.result()
    if handle is not None and handle.accepted:
        handle.cancel_goal_async()
