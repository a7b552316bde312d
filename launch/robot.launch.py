"""Start the LiveVLM node for a robot.

    ros2 launch livevlm_ros robot.launch.py model_path:=/models/llava-onevision-qwen2-7b-ov-hf \
        camera_topics:=/front/image_raw,/left/image_raw/compressed namespace:=robot1

Arguments left empty fall back to the parameter file (config:=..., default config/robot.yaml).
use_sim_time:=true makes the node follow /clock (a bag replayed with `livevlm_replay --clock`).
managed:=true starts the managed (lifecycle) node and, unless autostart:=false, configures and
activates it (Nav2 style); `ros2 lifecycle set /livevlm deactivate|activate|cleanup` then drive it.
The same node and YAML run without `launch`:  livevlm_node --ros-args --params-file config/robot.yaml

Large images on one host: Fast DDS's default shared-memory segment (512 KiB) cannot hold a 640x480
rgb8 frame, and best-effort frames that do not fit are lost. large_images:=true (the default) gives
the node config/fastdds_large_data.xml (a 32 MiB segment) unless FASTDDS_DEFAULT_PROFILES_FILE is
already set; the processes that PUBLISH the images (camera drivers, `ros2 bag play`) need the same
export, since over shared memory it is the publisher's segment that must fit the frame.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
import launch
from launch.actions import (DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler,
                            SetEnvironmentVariable)
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

OVERRIDABLE = {"model_path": "Local model folder", "device": "Torch device (cuda, cpu, ...)",
               "policy": "livevlm | full | sliding_window | rekv",
               "camera_topics": "Comma-separated image topics",
               "frames_per_clip": "Frames prefilled together", "frame_pixels": "Qwen families: pixels a frame"}
INTEGERS = ("frames_per_clip", "frame_pixels")


def _node(context):
    overrides = {}
    for name in OVERRIDABLE:
        value = LaunchConfiguration(name).perform(context)
        if value:
            if name == "camera_topics":
                value = [t.strip() for t in value.split(",") if t.strip()]
            overrides[name] = int(value) if name in INTEGERS else value
    flag = lambda name: LaunchConfiguration(name).perform(context).lower() == "true"  # noqa: E731
    transport = []
    if flag("large_images") and not os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE"):
        profile = os.path.join(get_package_share_directory("livevlm_ros"), "config", "fastdds_large_data.xml")
        transport = [SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", profile)]
    common = dict(package="livevlm_ros", name="livevlm", namespace=LaunchConfiguration("namespace"),
                  output="screen", emulate_tty=True,
                  parameters=[LaunchConfiguration("config"), overrides,      # later entries win
                              {"use_sim_time": flag("use_sim_time")}])
    if not flag("managed"):
        return transport + [Node(executable="livevlm_node", **common)]
    node = LifecycleNode(executable="livevlm_lifecycle_node", **common)
    if not flag("autostart"):
        return transport + [node]
    is_node = launch.events.matches_action(node)
    return transport + [
        node,
        # configure as soon as it runs, activate once configured
        RegisterEventHandler(OnStateTransition(target_lifecycle_node=node, goal_state="inactive", entities=[
            EmitEvent(event=ChangeState(lifecycle_node_matcher=is_node, transition_id=Transition.TRANSITION_ACTIVATE))],
            handle_once=True)),
        EmitEvent(event=ChangeState(lifecycle_node_matcher=is_node, transition_id=Transition.TRANSITION_CONFIGURE)),
    ]


def generate_launch_description():
    default_config = os.path.join(get_package_share_directory("livevlm_ros"), "config", "robot.yaml")
    args = [DeclareLaunchArgument("config", default_value=default_config, description="Parameter YAML file"),
            DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node"),
            DeclareLaunchArgument("use_sim_time", default_value="false", description="Follow /clock (true|false)"),
            DeclareLaunchArgument("managed", default_value="false", description="Start the lifecycle node (true|false)"),
            DeclareLaunchArgument("large_images", default_value="true",
                                  description="Fast DDS profile with a shared-memory segment large enough for "
                                              "camera frames (true|false)"),
            DeclareLaunchArgument("autostart", default_value="true",
                                  description="Managed node: configure and activate at start (true|false)")]
    args += [DeclareLaunchArgument(name, default_value="", description=f"{text} ('' = from config)")
             for name, text in OVERRIDABLE.items()]
    return LaunchDescription(args + [OpaqueFunction(function=_node)])
