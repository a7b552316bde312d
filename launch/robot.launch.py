"""Start the LiveVLM node for a robot.

    ros2 launch livevlm_ros robot.launch.py model_path:=/models/llava-onevision-qwen2-7b-ov-hf \
        camera_topics:=/front/image_raw,/left/image_raw/compressed namespace:=robot1

Arguments left empty fall back to the parameter file (config:=..., default config/robot.yaml).
use_sim_time:=true makes the node follow /clock (a bag replayed with `livevlm_replay --clock`).
The same node and YAML run without `launch`:  livevlm_node --ros-args --params-file config/robot.yaml
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

OVERRIDABLE = {"model_path": "Local model folder", "device": "Torch device (cuda, cpu, ...)",
               "policy": "livevlm | full | sliding_window | rekv",
               "camera_topics": "Comma-separated image topics"}


def _node(context):
    overrides = {}
    for name in OVERRIDABLE:
        value = LaunchConfiguration(name).perform(context)
        if value:
            overrides[name] = [t.strip() for t in value.split(",") if t.strip()] if name == "camera_topics" else value
    return [Node(
        package="livevlm_ros",
        executable="livevlm_node",
        name="livevlm",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        emulate_tty=True,
        parameters=[LaunchConfiguration("config"), overrides,      # later entries win
                    {"use_sim_time": LaunchConfiguration("use_sim_time").perform(context).lower() == "true"}],
    )]


def generate_launch_description():
    default_config = os.path.join(get_package_share_directory("livevlm_ros"), "config", "robot.yaml")
    args = [DeclareLaunchArgument("config", default_value=default_config, description="Parameter YAML file"),
            DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node"),
            DeclareLaunchArgument("use_sim_time", default_value="false", description="Follow /clock (true|false)")]
    args += [DeclareLaunchArgument(name, default_value="", description=f"{text} ('' = from config)")
             for name, text in OVERRIDABLE.items()]
    return LaunchDescription(args + [OpaqueFunction(function=_node)])
