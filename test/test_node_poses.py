"""Where it was seen, over real DDS: a node fed camera frames and odometry keeps each frame's pose,
answers questions about a place with evidence a planner can drive to, narrates with the pose of its
newest frame, refuses bad places, and says by name when the pose topic stops or jumps back."""

import math
import threading
import time

import pytest
from geometry_msgs.msg import PointStamped
from nav_msgs.msg import Odometry
from rclpy.action import ActionClient
from rclpy.qos import qos_profile_sensor_data

from ros_harness import client, node_params, start  # noqa: F401,I100 (domain first; fixtures)
from livevlm_ros.action import Ask

QUESTION = "Where did I last see the red toolbox?"


def odometry(t: float, frame: str = "map") -> Odometry:
    """The robot drives along x at 1 m/s from x = 0 at t = 100 s, facing +x."""
    msg = Odometry()
    msg.header.stamp.sec, msg.header.stamp.nanosec = int(t), int(round((t % 1) * 1e9))
    msg.header.frame_id, msg.child_frame_id = frame, "base_link"
    msg.pose.pose.position.x = t - 100.0
    msg.pose.pose.orientation.w = 1.0
    return msg


def near(x: float, y: float, frame: str = "map") -> PointStamped:
    p = PointStamped()
    p.header.frame_id, p.point.x, p.point.y = frame, x, y
    return p


@pytest.mark.timeout(180)
def test_poses_in_memory_questions_about_a_place_and_a_pose_topic_that_stops(client, start, tiny_model_path):  # noqa: F811
    node = start(node_params(tiny_model_path, sample_fps=2.0, evidence_frames=4, frame_queue_size=64,
                             budget_tokens=-1, policy="full", pose_source="topic", pose_topic="/odom",
                             max_pose_gap_s=0.6, pose_wait_s=1.0, stale_camera_s=1.0, narration_period_s=0.5))
    client.wait_ready(node)
    odom = client.node.create_publisher(Odometry, "/odom", qos_profile_sensor_data)
    client.wait_for(lambda: odom.get_subscription_count(), 10, "the node's pose subscription")
    for k in range(81):                                   # 99.0 .. 107.0 s at 10 Hz, ahead of the frames
        odom.publish(odometry(99.0 + k / 10))
        time.sleep(0.01)
    client.wait_for(lambda: int((client.node_status() or {}).get("poses_received", 0)) >= 50, 10, "poses")
    for k in range(13):                                   # frames 100.0 .. 106.0 s at 2 Hz
        client.feed(client.image(100.0 + k / 2), until=lambda s, k=k: int(s["frames_ingested"]) >= k + 1)
    s = client.settled()
    assert int(s["frames_with_pose"]) == int(s["frames_ingested"]) >= 12, s

    # a place: frames taken within 1.2 m of x = 3 are those of 101.8 .. 104.2 s
    a = client.query(QUESTION, near=near(3.0, 0.0), radius_m=1.2)
    assert a.success, a.error_message
    assert a.evidence and all(e.pose_known and e.pose.header.frame_id == "map" for e in a.evidence)
    for e in a.evidence:
        t = e.stamp.sec + e.stamp.nanosec * 1e-9
        assert 101.8 <= t <= 104.2 and math.isclose(e.pose.pose.position.x, t - 100.0, abs_tol=1e-6), (t, e.pose)
    whole = client.query(QUESTION)
    assert whole.success and all(e.pose_known for e in whole.evidence)

    # the action takes the same place and returns the same evidence
    action = ActionClient(client.node, Ask, "/livevlm/ask")
    client.wait_for(lambda: action.server_is_ready(), 10, "the Ask action server")
    sent = action.send_goal_async(Ask.Goal(question=QUESTION, near=near(3.0, 0.0), radius_m=1.2))
    handle = client.wait_for(lambda: sent.done() and sent.result(), 20, "the goal response")
    got = handle.get_result_async()
    result = client.wait_for(lambda: got.done() and got.result(), 30, "the result").result
    assert result.success and [(e.stamp, e.pose) for e in result.evidence] == [(e.stamp, e.pose) for e in a.evidence]

    # narration carries the pose of its newest frame
    client.wait_for(lambda: client.narrations and client.narrations[-1].pose_known, 20, "a narration with a pose")
    n = client.narrations[-1]
    end = n.span_end.sec + n.span_end.nanosec * 1e-9
    assert math.isclose(n.pose.pose.position.x, end - 100.0, abs_tol=1e-6)

    # bad places: refused with the reason; memory keeps nothing of a place it never saw
    for request, reason in [(dict(near=near(3.0, 0.0, "odom"), radius_m=1.0), "fixed_frame 'map'"),
                            (dict(near=near(3.0, 0.0), radius_m=-1.0), "radius_m must be"),
                            (dict(near=near(math.nan, 0.0), radius_m=1.0), "not finite"),
                            (dict(near=near(50.0, 0.0), radius_m=1.0), "keeps nothing")]:
        r = client.query(QUESTION, **request)
        assert not r.success and reason in r.error_message, (request, r.error_message)

    # a frame whose poses come after it (odometry's latency, a busy host): it waits for them (pose_wait_s)
    # and takes the pose interpolated at its stamp. Taken at 107.8 s, 0.8 s past the newest pose (107.0),
    # it would be unknown without the wait (past max_pose_gap_s).
    before = int(client.node_status()["frames_with_pose"])
    odom.publish(odometry(107.0))                         # odometry still coming (the same instant again)
    client.wait_for(lambda: "no pose for" not in client.node_status()["message"], 5, "the pose topic live")
    late_poses = threading.Timer(0.3, lambda: [odom.publish(odometry(t)) for t in (107.5, 108.0, 108.5)])
    late_poses.start()
    client.feed(client.image(107.8), until=lambda s: int(s["frames_with_pose"]) > before, timeout=5.0)
    late_poses.join()
    a = client.query(QUESTION, near=near(7.8, 0.0), radius_m=0.05)
    assert a.success and [round(e.pose.pose.position.x, 6) for e in a.evidence] == [7.8], (a.error_message, a.evidence)

    # the pose topic stops: later frames have no pose (past max_pose_gap_s), and diagnostics say so
    for k in range(1, 5):
        client.feed(client.image(109.0 + k / 2))
    s = client.settled()
    assert int(s["frames_without_pose"]) >= 3, s
    client.wait_for(lambda: "pose topic /odom: no pose for" in client.node_status()["message"], 10,
                    "a WARN naming the pose topic")
    late = client.query(QUESTION, near=near(10.5, 0.0), radius_m=0.5)
    assert not late.success and "keeps nothing" in late.error_message          # unknown, never guessed

    # a pose stamped far back (the bag again): the track starts over, counted
    odom.publish(odometry(50.0))
    client.wait_for(lambda: int(client.node_status().get("pose_time_jumps", 0)) == 1, 10, "the pose time jump")
    assert node.alive()
