"""Entry points of the node, with rclpy alone (no `launch` needed):

    livevlm_node --ros-args --params-file config/robot.yaml [-r __ns:=/robot1] [-p model_path:=...]
    livevlm_lifecycle_node ...     # the same as a managed node: ros2 lifecycle set /livevlm configure

`ros2 launch livevlm_ros robot.launch.py` starts this same executable with the same YAML.

SIGINT / SIGTERM (Ctrl-C, or launch stopping the node): questions still waiting are answered
"shutting down", the answer in progress stops at its next token, and the process exits within a
few seconds. rclpy's own signal handler would shut the context down first, and the waiting callers
would never hear back, so the node installs its own.
"""

import signal
import sys
import threading
import time

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.signals import SignalHandlerOptions

from .lifecycle_node import LiveVLMLifecycleNode
from .node import LiveVLMNode

FLUSH_S = 0.5          # time given to the executor to deliver the last answers


def main(args=None, node_class=LiveVLMNode):
    rclpy.init(args=sys.argv if args is None else args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        node = node_class()
    except Exception as err:                      # noqa: BLE001 - a bad parameter set: say why and exit
        print(f"livevlm_node: {err}", file=sys.stderr)
        rclpy.try_shutdown()
        sys.exit(2)
    # threads: camera callbacks, timers, service coroutines (which never block a thread)
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    spin = threading.Thread(target=_spin, args=(executor, stop, node.get_logger()), daemon=True)
    spin.start()
    stop.wait()
    node.get_logger().info("shutting down")
    node.shutdown()
    time.sleep(FLUSH_S)
    executor.shutdown(timeout_sec=1.0)
    node.destroy_node()
    rclpy.try_shutdown()
    spin.join(timeout=1.0)


def main_lifecycle(args=None):
    main(args, LiveVLMLifecycleNode)


def _spin(executor, stop: threading.Event, log):
    """Spin until the context shuts down. rclpy re-raises an exception from any callback out of
    spin(); the node's own callbacks catch theirs, and this catches whatever else (rclpy's own
    service and action plumbing) so that no single callback ends the process."""
    try:
        while not stop.is_set():
            try:
                executor.spin()
                return
            except ExternalShutdownException:
                return
            except Exception as err:              # noqa: BLE001 - log it and keep spinning
                log.error(f"executor callback failed, node goes on: {type(err).__name__}: {err}")
    finally:
        stop.set()


if __name__ == "__main__":
    main()
