"""A separate client process for burst tests: N calls at once to a query service, then one line
of JSON with what came back.   python burst_client.py SERVICE N TIMEOUT_S"""

import json
import sys
import time

import rclpy
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

from livevlm_ros.srv import Query


def main():
    service, n, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    rclpy.init()
    node = Node(f"burst_client_{time.monotonic_ns()}")
    # room for every response: the default client queue keeps the last 10, and a burst of refusals
    # ("busy", sent at once) can arrive faster than spin_once takes them
    qos = QoSProfile(depth=max(n, 10), history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
    client = node.create_client(Query, service, qos_profile=qos)
    if not client.wait_for_service(timeout_sec=20):
        print(json.dumps({"error": "service not found"}))
        return
    # The server must have matched our response reader before the burst, or the responses it sends
    # at once (refusals) are lost: the service being found says only that we matched its request
    # reader. One call answered says both ways are matched (a sleep of 1 s was too short on a
    # loaded 2-core machine: 14 refusals of 17 never came back). Its answer is not counted.
    probe = client.call_async(Query.Request(question="Is the door open?"))
    end = time.monotonic() + timeout
    while time.monotonic() < end and not probe.done():
        rclpy.spin_once(node, timeout_sec=0.1)
    futures = [client.call_async(Query.Request(question=f"Question {i}: is the door open?")) for i in range(n)]
    end = time.monotonic() + timeout
    while time.monotonic() < end and not all(f.done() for f in futures):
        rclpy.spin_once(node, timeout_sec=0.1)
    results = [f.result() for f in futures if f.done()]
    print(json.dumps({"sent": n, "returned": len(results), "answered": sum(r.success for r in results),
                      "errors": sorted({r.error_message.split(":")[0] for r in results if not r.success})}))
    node.destroy_node()
    rclpy.try_shutdown()


if __name__ == "__main__":
    main()
