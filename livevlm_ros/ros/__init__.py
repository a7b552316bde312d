"""The rclpy shell around the engine: the node, image conversion, bag replay."""
