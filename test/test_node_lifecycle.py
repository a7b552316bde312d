"""Every caller hears back in every state: the managed node taken through deactivate, activate,
cleanup, a failed configure, configure and SIGTERM with questions, goals and memory commands in
flight. The node is its own process (livevlm_lifecycle_node), driven over its lifecycle services
as launch or Nav2's lifecycle manager drives it."""

import signal
import time

import pytest
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState
from rclpy.action import ActionClient
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_srvs.srv import Trigger

from ros_harness import client, node_params, ros2, start  # noqa: F401,I100 (domain first; fixtures)
from livevlm_ros.action import Ask
from livevlm_ros.srv import Query

DEEP = QoSProfile(depth=1, history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)


class Managed:
    """The test's handles on one managed node: lifecycle, query, ask, memory commands."""

    def __init__(self, client):  # noqa: F811
        n = client.node
        self.client = client
        self.change = n.create_client(ChangeState, "/livevlm/change_state")
        self.query = n.create_client(Query, "/livevlm/query", qos_profile=DEEP)
        self.save = n.create_client(Trigger, "/livevlm/save_memory", qos_profile=DEEP)
        self.ask = ActionClient(n, Ask, "/livevlm/ask", goal_service_qos_profile=DEEP,
                                result_service_qos_profile=DEEP, cancel_service_qos_profile=DEEP)
        self._results = {}

    def transition(self, transition_id: int) -> bool:
        self.client.wait_for(lambda: self.change.service_is_ready(), 20, "the lifecycle service")
        future = self.change.call_async(ChangeState.Request(transition=Transition(id=transition_id)))
        return self.client.wait_for(lambda: future.done() and future.result(), 60, "the transition").success

    def in_flight(self, queries: int, goals: int, triggers: int):
        """Calls sent now (not waited for): futures of query responses, goal results, trigger replies."""
        q = [self.query.call_async(Query.Request(question=f"Question {i}?", max_new_tokens=4000)) for i in range(queries)]
        g = [self.ask.send_goal_async(Ask.Goal(question=f"Goal {i}?", max_new_tokens=4000)) for i in range(goals)]
        for future in g:                      # as a client does: the result asked for once accepted
            future.add_done_callback(lambda f: f.result().accepted and self._results.setdefault(
                id(f), f.result().get_result_async()))
        t = [self.save.call_async(Trigger.Request()) for _ in range(triggers)]
        return q, g, t

    def outcomes(self, q, g, t, timeout=20.0):
        """What every caller heard: query errors, goal (status, error), trigger messages."""
        w = self.client.wait_for
        w(lambda: all(f.done() for f in q + g + t), timeout, "every query, goal and trigger to hear back")
        results = [self._results[id(f)] for f in g if f.result().accepted]
        w(lambda: all(r.done() for r in results), timeout, "every goal's result")
        return ([f.result().error_message or "answered" for f in q],
                [(r.result().status, r.result().result.error_message) for r in results],
                [f.result().message for f in t])

    def question(self, **fields) -> Query.Response:
        future = self.query.call_async(Query.Request(question="Is the door open?", max_new_tokens=2, **fields))
        return self.client.wait_for(lambda: future.done() and future.result(), 30, "an answer")


@pytest.mark.timeout(300)
def test_every_caller_hears_back_through_deactivate_cleanup_configure_and_sigterm(client, start, endless_model,  # noqa: F811
                                                                                 tmp_path):
    memory_file = tmp_path / "memory.safetensors"
    node = start(node_params(endless_model, max_new_tokens=4000, max_pending_queries=64, narration_period_s=0.0,
                             memory_file=str(memory_file)), program="livevlm_lifecycle_node")
    m = Managed(client)
    status = client.node_status

    # unconfigured: the node is up and says so; nothing to call yet
    client.wait_for(lambda: (s := status()) and s["state"] == "unconfigured", 30, "the unconfigured node")
    assert m.transition(Transition.TRANSITION_CONFIGURE)
    client.wait_for(lambda: m.query.service_is_ready() and m.ask.server_is_ready(), 10, "the servers")
    time.sleep(1.0)
    inactive = m.question()
    assert not inactive.success and inactive.error_message.startswith("inactive"), inactive.error_message
    assert m.transition(Transition.TRANSITION_ACTIVATE)
    client.feed(client.image(1.0))

    # 1. deactivate with 30 questions, 3 goals and 2 saves in flight: all hear back, the node stays
    q, g, t = m.in_flight(30, 3, 2)
    client.wait_for(lambda: int(status()["queries_queued"]) >= 20, 20, "questions queued behind a long answer")
    assert m.transition(Transition.TRANSITION_DEACTIVATE)
    queries, goals, triggers = m.outcomes(q, g, t)
    assert queries == ["deactivated"] * 30, queries          # the one being answered too, at its next token
    assert len(goals) == 3 and all(status_ == 6 and error == "deactivated" for status_, error in goals), goals  # ABORTED
    assert len(triggers) == 2 and all(m_ == "deactivated" or m_.startswith("saved") for m_ in triggers), triggers
    assert node.alive()
    late = m.question()
    assert not late.success and late.error_message == "deactivated"

    # 2. activate again: memory kept, answers again
    assert m.transition(Transition.TRANSITION_ACTIVATE)
    again = m.question()
    assert again.success and again.span_start.sec == 1

    # 3. deactivate + cleanup with calls in flight: all hear back; then refused as unconfigured
    q, g, t = m.in_flight(10, 2, 1)
    client.wait_for(lambda: int(status()["queries_queued"]) >= 5, 20, "questions queued")
    assert m.transition(Transition.TRANSITION_DEACTIVATE)
    assert m.transition(Transition.TRANSITION_CLEANUP)
    queries, goals, triggers = m.outcomes(q, g, t)
    assert queries == ["deactivated"] * 10 and [e for _, e in goals] == ["deactivated"] * 2, (queries, goals)
    assert memory_file.exists()                                       # cleanup saved memory
    refused = m.question()
    assert not refused.success and refused.error_message.startswith("unconfigured"), refused.error_message
    assert node.alive()

    # 4. a configure that fails (a model path that is not there) leaves it unconfigured, saying why
    ros2("param", "set", "/livevlm", "model_path", str(tmp_path / "no_model"), "--no-daemon", "--spin-time", "2")
    assert not m.transition(Transition.TRANSITION_CONFIGURE)
    s = client.wait_for(lambda: (s := status()) and s["state"] == "unconfigured" and s["level"] == 2 and s, 10,
                        "ERROR diagnostics after the failed configure")
    assert "engine failed to start" in s["message"]
    failed = m.question()
    assert not failed.success and "could not be loaded" in failed.error_message, failed.error_message

    # 5. the real model again: configure reads the parameter anew; memory comes back from the file
    ros2("param", "set", "/livevlm", "model_path", endless_model, "--no-daemon", "--spin-time", "2")
    assert m.transition(Transition.TRANSITION_CONFIGURE) and m.transition(Transition.TRANSITION_ACTIVATE)
    restored = m.question()
    assert restored.success and restored.span_start.sec == 1

    # 6. SIGTERM with calls in flight: every caller hears "shutting down", exit within 5 s, memory saved
    memory_file.unlink()
    q, g, t = m.in_flight(10, 2, 0)
    client.wait_for(lambda: int(status()["queries_queued"]) >= 5, 20, "questions queued")
    t0 = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    node.proc.wait(10)
    assert time.monotonic() - t0 < 5.0 and node.proc.returncode == 0, node.output()[-3000:]
    queries, goals, _ = m.outcomes(q, g, t, timeout=5.0)
    assert queries == ["shutting down"] * 10, queries
    assert all(error == "shutting down" for _, error in goals), goals
    assert memory_file.exists()                                       # the managed node saved it too


@pytest.mark.timeout(120)
def test_cancelling_a_queued_goal_ends_it_at_once(client, start, endless_model):  # noqa: F811
    node = start(node_params(endless_model, max_new_tokens=4000, narration_period_s=0.0))
    client.wait_ready(node)
    m = Managed(client)
    client.wait_for(lambda: m.ask.server_is_ready(), 10, "the Ask server")
    client.feed(client.image(1.0))
    _, running, _ = m.in_flight(0, 1, 0)                              # occupies the engine
    _, queued, _ = m.in_flight(0, 1, 0)
    client.wait_for(lambda: all(f.done() for f in running + queued), 10, "the goals accepted")
    client.wait_for(lambda: int(client.node_status()["queries_queued"]) == 1, 10, "the second goal queued")
    t0 = time.monotonic()
    queued[0].result().cancel_goal_async()
    result = queued[0].result().get_result_async()
    client.wait_for(lambda: result.done(), 5, "the cancelled goal's result")
    assert time.monotonic() - t0 < 2.0
    assert result.result().status == 5 and result.result().result.error_message == "cancelled"   # CANCELED
    running[0].result().cancel_goal_async()
    assert node.alive()


@pytest.fixture(scope="module", autouse=True)
def _rclpy_shutdown_at_end():
    yield
    import rclpy
    rclpy.try_shutdown()
