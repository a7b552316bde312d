"""Python distribution of livevlm_ros: the ROS-free engine, the rclpy node and its tools.

On a ROS 2 install the package is built by colcon through CMakeLists.txt (which also generates the
msg/srv interfaces); this file is what `pip install .` uses, and it declares the same entry points.
"""

from setuptools import find_packages, setup

setup(
    name="livevlm_ros",
    version="0.1.0",
    description="Onboard streaming video understanding for ROS 2 (LiveVLM: bounded KV memory + retrieval)",
    license="Apache-2.0",
    packages=find_packages(include=["livevlm_ros", "livevlm_ros.*"]),
    python_requires=">=3.10",
    # torch is deliberately not listed: scripts/setup.sh installs the right build only when missing.
    install_requires=["transformers>=5.17,<5.40", "numpy", "opencv-python-headless", "pyyaml"],
    # py_trees: only for livevlm_ros.behaviours (behaviour-tree leaves); the node runs without it
    extras_require={"ros": ["rosbags", "rosbags-image"], "bt": ["py_trees>=2.2,<3"], "test": ["pytest", "py_trees>=2.2,<3"]},
    entry_points={
        "console_scripts": [
            "livevlm_node = livevlm_ros.ros.main:main",
            "livevlm_lifecycle_node = livevlm_ros.ros.main:main_lifecycle",
            "livevlm_replay = livevlm_ros.ros.replay:main",
            "livevlm_make_tiny_model = livevlm_ros.tools.make_tiny_model:main",
        ],
    },
)
