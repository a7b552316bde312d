"""Entry point of the node, with rclpy alone (no `launch` needed):

    livevlm_node --ros-args --params-file config/robot.yaml [-r __ns:=/robot1] [-p model_path:=...]

`ros2 launch livevlm_ros robot.launch.py` starts this same executable with the same YAML.
"""

import sys

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

from .node import LiveVLMNode


def main(args=None):
    rclpy.init(args=sys.argv if args is None else args)
    node = LiveVLMNode()
    # threads: camera callbacks, timers, and up to max_pending_queries waiting service calls
    executor = MultiThreadedExecutor(num_threads=4 + node.get_parameter("max_pending_queries").value)
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.shutdown()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
