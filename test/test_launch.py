"""`ros2 launch livevlm_ros robot.launch.py` itself, through launch_pytest, driven with the real `ros2`
command line: namespace, a parameter file given as config:=, argument overrides, and use_sim_time
with a bag replayed with --clock.

launch, launch_ros, launch_pytest and ros2cli are not on PyPI; scripts/setup.sh installs them from
../shared/ros-tools (or LIVEVLM_ROS_TOOLS). Without them this module is skipped with that reason.
"""

import os
import subprocess
import time

import pytest
import yaml

from ros_harness import Client, executable, ros2  # noqa: I100 (sets ROS_DOMAIN_ID before rclpy loads)

launch_pytest = pytest.importorskip("launch_pytest", reason="the ROS 2 launch tools are not installed "
                                    "(scripts/setup.sh installs them from ../shared/ros-tools)")

from ament_index_python.packages import get_package_share_directory  # noqa: E402
from launch import LaunchDescription  # noqa: E402
from launch.actions import IncludeLaunchDescription  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402

from livevlm_ros.tools.make_demo_bag import write_bag  # noqa: E402

BAG_START = 1000.0          # bag time, far from the wall clock


@pytest.fixture
def bag(tmp_path):
    path = tmp_path / "bag"
    write_bag(path, seconds=3.0, fps=10.0, size=(64, 48), start_time=BAG_START)
    return path


def robot_launch(tmp_path, parameters: dict, **arguments) -> LaunchDescription:
    """robot.launch.py as a user runs it: a parameter file of their own (config:=) and arguments."""
    config = tmp_path / "robot.yaml"
    config.write_text(yaml.safe_dump({"/**": {"ros__parameters": dict(
        status_period_s=0.2, budget_tokens=34 + 2 * 16 + 64, page_tokens=8, vision_sinks=4, dtype="float32",
        **parameters)}}))
    launch_file = os.path.join(get_package_share_directory("livevlm_ros"), "launch", "robot.launch.py")
    return LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(launch_file),
                                 launch_arguments=dict(config=str(config), device="cpu", **arguments).items()),
        launch_pytest.actions.ReadyToTest(),
    ])


@launch_pytest.fixture
def robot(tiny_model_path, tmp_path):
    return robot_launch(tmp_path, dict(sample_fps=5.0, frame_queue_size=64, narration_period_s=1.0, max_new_tokens=4),
                        model_path=tiny_model_path, namespace="robot1", use_sim_time="true", frame_pixels="12544")


@pytest.mark.launch(fixture=robot)
def test_robot_launch_with_namespace_config_and_sim_time(bag):
    client = Client("/robot1")
    try:
        status = client.wait_ready(_Alive(), timeout=90)
        assert status["engine"] == "ready", status
        # parameters: the config file, then the launch arguments on top
        assert "Boolean value is: True" in ros2("param", "get", "/robot1/livevlm", "use_sim_time", "--no-daemon",
                                                "--spin-time", "3")
        assert "Integer value is: 130" in ros2("param", "get", "/robot1/livevlm", "budget_tokens", "--no-daemon",
                                               "--spin-time", "3")
        assert "Integer value is: 12544" in ros2("param", "get", "/robot1/livevlm", "frame_pixels", "--no-daemon",
                                                 "--spin-time", "3")     # an integer argument (LLaVA ignores it)
        # a bag with its own clock, on the node's relative camera topic under the namespace
        play = subprocess.run([executable("livevlm_replay"), str(bag), "--rate", "2", "--clock",
                               "--remap", "/camera/image_raw:=/robot1/camera/image_raw"],
                              capture_output=True, text=True, timeout=60)
        assert play.returncode == 0, play.stderr
        s = client.settled("/robot1")             # what the node received of the bag, all of it ingested
        assert int(s["frames_ingested"]) == int(s["frames_sampled"]) > 0, s
        answer = ros2("service", "call", "/robot1/livevlm/query", "livevlm_ros/srv/Query",
                      "{question: 'Is the door open?', max_new_tokens: 3}")
        assert "success=True" in answer, answer
        # narration runs on ROS time (the bag's /clock) and is stamped in camera time
        client.wait_for(lambda: client.narrations, 20, "a narration")
        n = client.narrations[-1]
        assert BAG_START <= n.header.stamp.sec <= BAG_START + 3 and n.header.stamp == n.span_end
    finally:
        client.close()


@launch_pytest.fixture
def managed_robot(tiny_model_path, tmp_path):
    """managed:=true: the lifecycle node, configured and activated by launch."""
    return robot_launch(tmp_path, dict(narration_period_s=0.0, max_new_tokens=3, sample_fps=10.0),
                        model_path=tiny_model_path, namespace="robot2", managed="true")


@pytest.mark.launch(fixture=managed_robot)
def test_managed_node_lifecycle_keeps_memory_across_deactivate():
    client = Client("/robot2")
    def lifecycle(verb, *rest):
        return ros2("lifecycle", verb, "/robot2/livevlm", *rest, "--no-daemon", "--spin-time", "2")

    try:
        client.wait_for(lambda: (s := client.node_status("/robot2")) and s["state"] == "active"
                        and s["engine"] == "ready", 90, "launch to configure and activate the node")
        client.wait_for(lambda: client.query_client.service_is_ready(), 10, "the query service")
        time.sleep(1.0)
        for t in (1.0, 1.2):
            client.image_pub.publish(client.image(t))
            time.sleep(0.2)
        memory = client.wait_for(lambda: (s := client.node_status("/robot2")) and int(s["frames_ingested"]) == 2
                                 and s["device_tokens"], 10, "2 frames")
        assert "Transitioning successful" in lifecycle("set", "deactivate")
        s = client.wait_for(lambda: (s := client.node_status("/robot2")) and s["state"] == "inactive" and s, 5,
                            "inactive")
        assert s["level"] == 1
        client.image_pub.publish(client.image(1.4))            # intake is closed: nobody reads this
        time.sleep(1.0)
        s = client.node_status("/robot2")
        assert int(s["frames_received"]) == 2 and s["device_tokens"] == memory      # memory kept
        assert "Transitioning successful" in lifecycle("set", "activate")
        client.wait_for(lambda: client.node_status("/robot2")["state"] == "active", 5, "active again")
        client.wait_for(lambda: client.query_client.service_is_ready(), 10, "the query service again")
        time.sleep(1.0)
        answer = client.query("Is the door open?")
        assert answer.success and answer.span_start.sec == 1        # memory from before deactivate
        assert "Transitioning successful" in lifecycle("set", "deactivate")
        assert "Transitioning successful" in lifecycle("set", "cleanup")
        s = client.wait_for(lambda: (s := client.node_status("/robot2")) and s["state"] == "unconfigured" and s, 5,
                            "unconfigured")
        assert s["engine"] == "unconfigured" and "device_tokens" not in s
        assert "unconfigured" in lifecycle("get")
    finally:
        client.close()


class _Alive:
    """wait_ready() checks that a process it started is alive; launch owns this one."""

    def alive(self):
        return True

    def output(self):
        return ""


@pytest.fixture(scope="module", autouse=True)
def _rclpy_shutdown_at_end():
    yield
    import rclpy
    rclpy.try_shutdown()
