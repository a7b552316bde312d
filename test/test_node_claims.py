"""What the README says the node does, each claim tried over real DDS: narration preempted by a
question and redone, the last narration kept for a late subscriber, memory saved, reset and loaded
over ROS, sampled frames dropped and counted when the engine is behind, mono16 images, and
`ros2 param describe`."""

import time

import pytest
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from std_srvs.srv import Trigger

from ros_harness import client, node_params, ros2, start  # noqa: F401,I100 (domain first; fixtures)
from livevlm_ros.msg import Narration
from livevlm_ros.srv import Query

NS = 1_000_000_000


def status(client, key):  # noqa: F811
    return int(client.node_status()[key])


def trigger(client, name):  # noqa: F811
    c = client.node.create_client(Trigger, f"/livevlm/{name}")
    client.wait_for(lambda: c.service_is_ready(), 10, f"~/{name}")
    future = c.call_async(Trigger.Request())
    return client.wait_for(lambda: future.done() and future.result(), 30, f"~/{name}'s reply")


@pytest.mark.timeout(180)
def test_narration_yields_to_a_question_is_redone_and_reaches_a_late_subscriber(client, start, endless_model):  # noqa: F811,E501
    node = start(node_params(endless_model, max_new_tokens=300, narration_period_s=1.0))
    client.wait_ready(node)
    client.feed(client.image(1.0))
    # narrations run 300 tokens; a question sent while one runs goes first
    client.wait_for(lambda: status(client, "narrations") >= 1, 60, "a first narration")
    # ask until a question lands while a narration runs (a fixed sleep assumed when the next one
    # starts, and lost that race once in a full run on a loaded machine)
    end = time.monotonic() + 60
    while status(client, "narrations_preempted") < 1:
        assert time.monotonic() < end, "no narration yielded to a question in 60 s"
        answer = client.query("Is the door open?", max_new_tokens=2)
        assert answer.success
        time.sleep(0.5)
    done = status(client, "narrations")
    client.wait_for(lambda: status(client, "narrations") > done, 60, "the narration redone after the question")

    late = []                                               # subscribes after the narrations were sent
    qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    client.node.create_subscription(Narration, "/livevlm/narration", late.append, qos)
    got = client.wait_for(lambda: late and late[0], 10, "the last narration for a late subscriber")
    assert got.text and (got.span_end.sec, got.span_end.nanosec) == (1, 0)


@pytest.mark.timeout(180)
def test_memory_saved_reset_and_loaded_over_ros(client, start, tiny_model_path, tmp_path):  # noqa: F811
    memory_file = tmp_path / "memory.safetensors"
    node = start(node_params(tiny_model_path, memory_file=str(memory_file), narration_period_s=0.0))
    client.wait_ready(node)
    stamps = [100 * NS + k * 123_456_789 for k in range(4)]  # not representable in float seconds
    for stamp in stamps:
        client.image_pub.publish(client.raw_image(stamp))
        time.sleep(0.15)
    ingested = int(client.settled()["frames_ingested"])    # all it received (best effort), not a count sent
    assert ingested >= 1
    before = client.query("Is the door open?")
    assert trigger(client, "save_memory").success and memory_file.exists()
    reset = trigger(client, "reset_memory")
    assert reset.success and reset.message == "memory cleared"
    empty = client.query("Is the door open?")
    assert not empty.success and "no frame" in empty.error_message
    loaded = trigger(client, "load_memory")
    assert loaded.success and loaded.message.startswith(f"loaded {ingested} frames")
    after = client.query("Is the door open?")
    assert after.success and after.answer == before.answer
    # evidence stamps are the images' header stamps, bit for bit, also through the file
    exact = {(s // NS, s % NS) for s in stamps}
    assert {(e.stamp.sec, e.stamp.nanosec) for e in after.evidence} <= exact and after.evidence
    memory_file.write_bytes(memory_file.read_bytes()[:1000])          # a damaged file is refused ...
    refused = trigger(client, "load_memory")
    assert not refused.success and "memory.safetensors" in refused.message
    assert client.query("Is the door open?").answer == before.answer  # ... and memory is as it was


@pytest.mark.timeout(120)
def test_frames_the_engine_cannot_take_are_dropped_and_counted(client, start, endless_model):  # noqa: F811
    node = start(node_params(endless_model, max_new_tokens=4000, frame_queue_size=2, narration_period_s=0.0))
    client.wait_ready(node)
    client.feed(client.image(1.0))
    long = client.query_client.call_async(Query.Request(question="Tell me everything.", max_new_tokens=4000))
    client.wait_for(lambda: int(client.node_status()["queries_queued"]) == 0, 10, "the long answer running")
    for k in range(10):                                     # the engine is busy: samples pile up
        client.image_pub.publish(client.image(2.0 + k))
        time.sleep(0.05)
    s = client.wait_for(lambda: (s := client.node_status()) and int(s["frames_dropped"]) > 0 and s, 10, "drops")
    # every sample is ingested, queued or dropped: none vanish
    assert int(s["frames_sampled"]) == int(s["frames_ingested"]) + int(s["frames_queued"]) + int(s["frames_dropped"])
    assert int(s["frames_queued"]) == 2 and s["level"] == 1 and "dropped" in s["message"], s
    del long


@pytest.mark.timeout(120)
def test_mono16_images_are_ingested_and_parameters_describe_themselves(client, start, tiny_model_path):  # noqa: F811
    node = start(node_params(tiny_model_path, narration_period_s=0.0))
    client.wait_ready(node)
    for k in range(3):
        client.image_pub.publish(client.raw_image(10 * NS + k * NS, encoding="mono16"))
        time.sleep(0.2)
    client.wait_for(lambda: status(client, "frames_ingested") >= 1, 10, "a mono16 frame")
    assert status(client, "frames_rejected") == 0
    described = ros2("param", "describe", "/livevlm", "sample_fps", "--no-daemon", "--spin-time", "2")
    assert "Frames per second of camera time taken into memory" in described and "Min value: 0.01" in described


@pytest.fixture(scope="module", autouse=True)
def _rclpy_shutdown_at_end():
    yield
    import rclpy
    rclpy.try_shutdown()
