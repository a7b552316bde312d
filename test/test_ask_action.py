"""The Ask action a behaviour tree uses: the answer streamed as feedback, cancel that frees the
engine within a token, a burst of goals that all end, and ~/reset_memory. Node in its own process,
real DDS, rclpy's ActionClient."""

import time

import pytest
from action_msgs.msg import GoalStatus
from rclpy.action import ActionClient
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

from ros_harness import client, node_params, ros2, start  # noqa: F401,I100 (domain first; fixtures)
from livevlm_ros.action import Ask


@pytest.fixture
def ask(client):  # noqa: F811 - the fixture from ros_harness
    # every reply kept: rclpy's default keeps the last 10, and a burst of 30 goals lost replies
    keep_all = QoSProfile(depth=1000, history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)
    return ActionClient(client.node, Ask, "/livevlm/ask", goal_service_qos_profile=keep_all,
                        result_service_qos_profile=keep_all, cancel_service_qos_profile=keep_all)


def wait_ready_with_a_frame(client, node, ask):  # noqa: F811
    client.wait_ready(node)
    client.wait_for(lambda: ask.server_is_ready(), 10, "the Ask action server")
    client.feed(client.image(1.0))


def send(client, ask, question, max_new_tokens=0, feedback=None):  # noqa: F811
    future = ask.send_goal_async(Ask.Goal(question=question, max_new_tokens=max_new_tokens),
                                 feedback_callback=feedback)
    return client.wait_for(lambda: future.done() and future.result(), 20, "the goal response")


def stream(client, ask, question):  # noqa: F811
    """Send a goal; returns its handle and the list its feedback messages land in."""
    feedback = []
    return send(client, ask, question, feedback=lambda m: feedback.append(m.feedback)), feedback


def result_of(client, handle, timeout=30):  # noqa: F811
    future = handle.get_result_async()
    return client.wait_for(lambda: future.done() and future.result(), timeout, "the result")


@pytest.mark.timeout(120)
def test_the_answer_streams_as_feedback_and_matches_the_service(client, start, ask, tiny_model_path):  # noqa: F811
    node = start(node_params(tiny_model_path, max_new_tokens=8))
    wait_ready_with_a_frame(client, node, ask)
    handle, feedback = stream(client, ask, "Is the door open?")
    assert handle.accepted
    done = result_of(client, handle)
    assert done.status == GoalStatus.STATUS_SUCCEEDED and done.result.success
    r = done.result
    assert r.tokens_generated >= 1 and r.time_to_first_token_s > 0 and r.pages_total >= r.pages_used
    client.wait_for(lambda: len(feedback) == r.tokens_generated, 5, "one feedback per token")
    assert [f.tokens_generated for f in feedback] == list(range(1, r.tokens_generated + 1))
    assert feedback[-1].partial_answer == r.answer
    # the same question through the service gives the same answer (same memory, greedy decoding)
    assert client.query("Is the door open?", max_new_tokens=8).answer == r.answer


@pytest.mark.timeout(120)
def test_cancel_mid_answer_frees_the_engine_for_the_next_question(client, start, ask, endless_model):  # noqa: F811
    node = start(node_params(endless_model, max_new_tokens=4000))
    wait_ready_with_a_frame(client, node, ask)
    handle, feedback = stream(client, ask, "Tell me everything.")
    client.wait_for(lambda: len(feedback) >= 5, 20, "the answer to start streaming")
    t0 = time.monotonic()
    handle.cancel_goal_async()
    done = result_of(client, handle)
    assert done.status == GoalStatus.STATUS_CANCELED and done.result.error_message == "cancelled"
    assert 5 <= len(feedback) < 4000
    # the engine is free: a short question is answered at once, not after 4000 tokens
    answer = client.query("Is the door open?", max_new_tokens=2)
    assert answer.success and time.monotonic() - t0 < 5.0


@pytest.mark.timeout(120)
def test_a_question_sees_the_frames_sampled_before_it_arrived(client, start, ask, endless_model):  # noqa: F811
    """Frames queue up while a long answer runs; a question sent after them must be answered from
    memory that holds them (questions otherwise go before frames)."""
    node = start(node_params(endless_model, max_new_tokens=4000, sample_fps=100.0, frame_queue_size=16))
    wait_ready_with_a_frame(client, node, ask)
    long, feedback = stream(client, ask, "Tell me everything.")
    client.wait_for(lambda: len(feedback) >= 3, 20, "the long answer to run")
    for t in (2.0, 3.0, 4.0):
        client.image_pub.publish(client.image(t))
    client.wait_for(lambda: int(client.node_status()["frames_queued"]) == 3, 5, "3 frames queued behind it")
    from livevlm_ros.srv import Query
    question = client.query_client.call_async(Query.Request(question="What now?", max_new_tokens=2))
    client.wait_for(lambda: int(client.node_status()["queries_queued"]) == 1, 5, "the question queued")
    long.cancel_goal_async()
    answer = client.wait_for(lambda: question.done() and question.result(), 20, "the answer")
    assert answer.success and (answer.span_end.sec, answer.span_end.nanosec) == (4, 0)


@pytest.mark.timeout(180)
def test_thirty_goals_at_once_all_end(client, start, ask, tiny_model_path):  # noqa: F811
    node = start(node_params(tiny_model_path, max_pending_queries=4, max_new_tokens=4))
    wait_ready_with_a_frame(client, node, ask)
    futures = [ask.send_goal_async(Ask.Goal(question=f"Question {i}?")) for i in range(30)]
    client.wait_for(lambda: all(f.done() for f in futures), 30, "all 30 goal responses")
    handles = [f.result() for f in futures]
    accepted = [h for h in handles if h.accepted]
    assert 4 <= len(accepted) < 30                                   # the queue's limit, then rejections
    ends = [result_of(client, h) for h in accepted]
    # goals accepted together may fill the queue between admission and queueing: those end aborted
    # "busy" (servers.py); the first four always find room
    assert all((e.status == GoalStatus.STATUS_SUCCEEDED and e.result.success)
               or (e.status == GoalStatus.STATUS_ABORTED and "busy" in e.result.error_message) for e in ends), \
        [(e.status, e.result.error_message) for e in ends]
    assert sum(e.result.success for e in ends) >= 4
    assert node.alive()


@pytest.mark.timeout(120)
def test_reset_memory_empties_memory(client, start, ask, tiny_model_path):  # noqa: F811
    node = start(node_params(tiny_model_path))
    wait_ready_with_a_frame(client, node, ask)
    assert client.query("Is the door open?").success
    out = ros2("service", "call", "/livevlm/reset_memory", "std_srvs/srv/Trigger")
    assert "success=True" in out and "memory cleared" in out, out
    after = client.query("Is the door open?")
    assert not after.success and "no frame" in after.error_message
    assert int(client.node_status()["memory_resets"]) == 1


@pytest.fixture(scope="module", autouse=True)
def _rclpy_shutdown_at_end():
    yield
    import rclpy
    rclpy.try_shutdown()
