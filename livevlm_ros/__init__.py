"""livevlm_ros: a ROS 2 node around the LiveVLM streaming video-understanding engine.

`livevlm_ros.engine` is ROS-free; `livevlm_ros.ros` is the rclpy shell around it.
"""
