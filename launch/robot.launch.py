"""Start the LiveVLM node for a robot.

    ros2 launch livevlm_ros robot.launch.py model_path:=/models/llava-onevision-qwen2-7b-ov-hf \
        camera_topics:=/front/image_raw,/left/image_raw/compressed namespace:=robot1

Arguments left empty fall back to the parameter file (config:=..., default config/robot.yaml).
use_sim_time:=true makes the node follow /clock (a bag replayed with `livevlm_replay --clock`).
managed:=true starts the managed (lifecycle) node and, unless autostart:=false, configures and
activates it (Nav2 style); `ros2 lifecycle set /livevlm deactivate|activate|cleanup` then drive it.
The same node and YAML run without `launch`:  livevlm_node --ros-args --params-file config/robot.yaml
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
import launch
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

OVERRIDABLE = {"model_path": "Local model folder", "device": "Torch device (cuda, cpu, ...)",
               "policy": "livevlm | full | sliding_window | rekv",
               "camera_topics": "Comma-separated image topics"}


def _node(context):
    overrides = {}
    for name in OVERRIDABLE:
        value = LaunchConfiguration(name).perform(context)
        if value:
            overrides[name] = [t.strip() for t in value.split(",") if t.strip()] if name == "camera_topics" else value
    flag = lambda name: LaunchConfiguration(name).perform(context).lower() == "true"  # noqa: E731
    common = dict(package="livevlm_ros", name="livevlm", namespace=LaunchConfiguration("namespace"),
                  output="screen", emulate_tty=True,
                  parameters=[LaunchConfiguration("config"), overrides,      # later entries win
                              {"use_sim_time": flag("use_sim_time")}])
    if not flag("managed"):
        return [Node(executable="livevlm_node", **common)]
    node = LifecycleNode(executable="livevlm_lifecycle_node", **common)
    if not flag("autostart"):
        return [node]
    is_node = launch.events.matches_action(node)
    return [
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
            DeclareLaunchArgument("autostart", default_value="true",
                                  description="Managed node: configure and activate at start (true|false)")]
    args += [DeclareLaunchArgument(name, default_value="", description=f"{text} ('' = from config)")
             for name, text in OVERRIDABLE.items()]
    return LaunchDescription(args + [OpaqueFunction(function=_node)])
