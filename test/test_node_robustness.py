"""What a behaviour tree and a field robot do to the node: bursts of callers, bags replayed again,
a failing engine, bad parameters from the command line, Ctrl-C with questions waiting.
Real processes over real DDS (the node is its own process unless a test injects a fault)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ros_harness import client, executable, in_process_node, node_params, ros2, start  # noqa: I100 (sets ROS_DOMAIN_ID before rclpy loads); client, start: fixtures
from livevlm_ros.tools.make_demo_bag import write_bag

HERE = Path(__file__).parent


def params(model_path, **over):
    return node_params(model_path, **{**dict(narration_period_s=0.0), **over})


def status(client):
    return client.node_status()


@pytest.mark.timeout(150)
def test_fifty_callers_from_three_processes_all_hear_back(client, start, tiny_model_path):
    node = start(params(tiny_model_path, max_pending_queries=4))
    client.wait_ready(node)
    client.feed(client.image(1.0))
    procs = [subprocess.Popen([sys.executable, str(HERE / "burst_client.py"), "/livevlm/query", str(n), "60"],
                              stdout=subprocess.PIPE, text=True) for n in (17, 17, 16)]
    reports = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert sum(r["sent"] for r in reports) == 50
    assert [r["returned"] for r in reports] == [r["sent"] for r in reports], reports      # nobody left waiting
    assert sum(r["answered"] for r in reports) >= 4, reports
    assert {e for r in reports for e in r["errors"]} <= {"busy"}, reports
    assert node.alive()


@pytest.mark.timeout(150)
def test_a_bag_replayed_twice_clears_memory_and_keeps_ingesting(tmp_path, client, start, tiny_model_path):
    """Stamps of a replayed bag start over (here at 0 s, far from the wall clock): the jump back
    clears memory, ingest goes on, and lag is measured in camera time (not wall clock - stamp)."""
    bag = tmp_path / "bag"
    write_bag(bag, seconds=3.0, fps=10.0, size=(64, 48), start_time=0.0)
    node = start(params(tiny_model_path, sample_fps=5.0, frame_queue_size=64))     # 15 frames a pass, none dropped
    client.wait_ready(node)

    def replay():
        subprocess.run([executable("livevlm_replay"), str(bag), "--rate", "2"], check=True, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    replay()
    first = client.settled()                       # counts from the node: best effort may lose frames
    assert int(first["time_jumps"]) == 0 and float(first["lag_s"]) < 2.0
    assert int(first["memory_frames_ingested"]) == int(first["frames_sampled"]) > 0
    replay()
    second = client.settled()
    assert int(second["time_jumps"]) == 1 and int(second["memory_resets"]) == 1
    assert int(second["frames_rejected"]) == 0 and float(second["lag_s"]) < 2.0
    second_pass = int(second["frames_sampled"]) - int(first["frames_sampled"])
    assert int(second["memory_frames_ingested"]) == second_pass > 0   # the second pass alone
    answer = client.query("Is the door open?")
    assert answer.success and answer.span_end.sec <= 3                  # memory holds the second pass only
    assert node.alive()


@pytest.mark.timeout(150)
def test_refuse_on_time_jump_drops_old_stamps_until_the_stream_catches_up(client, start, tiny_model_path):
    node = start(params(tiny_model_path, on_time_jump="refuse", sample_fps=5.0))
    client.wait_ready(node)
    for n, t in enumerate((100.0, 100.4, 100.8)):
        client.feed(client.image(t), at_least=n + 1)
    # a jump back, then the stream passes the last stamp again
    client.feed(client.image(1.0), until=lambda s: int(s["time_jumps"]) == 1)
    client.feed(client.image(1.4), until=lambda s: int(s["frames_refused_time"]) >= 2)
    s = client.feed(client.image(101.2), at_least=4)
    assert int(s["time_jumps"]) == 1 and int(s["frames_refused_time"]) >= 2 and int(s["memory_resets"]) == 0


@pytest.mark.timeout(120)
def test_an_engine_failure_answers_the_job_reports_error_and_the_worker_goes_on(client, tiny_model_path):
    """Fault injected in-process (the node's engine raises what a CUDA failure raises): the caller
    gets the error, /diagnostics turns ERROR with the reason, the next question is answered."""
    with in_process_node(client, params(tiny_model_path)) as node:
        client.feed(client.image(1.0))
        real_ask = node.core.engine.ask
        calls = []

        def failing_ask(*a, **kw):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
            return real_ask(*a, **kw)
        node.core.engine.ask = failing_ask
        failed = client.query("Is the door open?")
        assert not failed.success and "illegal memory access" in failed.error_message
        s = client.wait_for(lambda: (s := client.node_status()) and s["level"] == 2 and s, 5, "ERROR diagnostics")
        assert "query failed" in s["message"] and s["worker_errors"] == "1"
        assert client.query("Is the door open?").success
        client.wait_for(lambda: (s := client.node_status()) and s["level"] == 0, 5, "OK diagnostics again")
        assert node.core.worker.alive()


def ros2_param(*args) -> str:
    return ros2("param", *args, "--no-daemon", "--spin-time", "2")


@pytest.mark.timeout(240)
def test_parameters_set_from_the_command_line_are_checked_and_take_effect(client, start, tiny_model_path):
    node = start(params(tiny_model_path))
    client.wait_ready(node)
    rejected = {("frame_queue_size", "0"): "", ("sample_fps", "-1.0"): "", ("on_time_jump", "maybe"): "must be one of",
                ("narration_frames", "5"): "short_term_frames", ("budget_tokens", "100"): "read-only",
                ("page_scoring", "magic"): "must be one of"}
    for (name, value), reason in rejected.items():
        text = ros2_param("set", "/livevlm", name, value)
        assert "Set parameter successful" not in text and "failed" in text.lower(), (name, text)
        assert reason in text, (name, text)
    assert node.alive()
    assert "Set parameter successful" in ros2_param("set", "/livevlm", "max_pending_queries", "1")
    got = ros2_param("get", "/livevlm", "max_pending_queries")
    assert "1" in got
    # a runtime parameter takes effect at once
    client.feed(client.image(1.0))
    assert "Set parameter successful" in ros2_param("set", "/livevlm", "max_new_tokens", "2")
    answer = client.query("Is the door open?", max_new_tokens=50)
    assert answer.success and answer.tokens_generated <= 2      # the parameter bounds a request


@pytest.mark.timeout(120)
def test_sigint_with_four_questions_waiting_answers_them_and_exits_fast(client, start, endless_model):
    node = start(params(endless_model, max_new_tokens=4000, max_pending_queries=8))
    client.wait_ready(node)
    client.feed(client.image(1.0))
    from livevlm_ros.srv import Query

    futures = [client.query_client.call_async(Query.Request(question=f"Question {i}?", max_new_tokens=4000))
               for i in range(5)]
    client.wait_for(lambda: int(status(client)["queries_queued"]) == 4, 10, "1 answering + 4 waiting")
    t0 = time.monotonic()
    node.proc.send_signal(signal.SIGINT)
    node.proc.wait(10)
    exit_s = time.monotonic() - t0
    client.wait_for(lambda: all(f.done() for f in futures), 5, "every caller to hear back")
    assert exit_s < 5.0, exit_s
    assert [f.result().error_message for f in futures] == ["shutting down"] * 5
    assert node.proc.returncode == 0, node.output()


@pytest.fixture(scope="module", autouse=True)
def _rclpy_shutdown_at_end():
    yield
    import rclpy
    rclpy.try_shutdown()

