"""The Ask action client the leaves of one node share, safe to create while that node spins.

Shared: one ActionClient per (node, action name), however many leaves and trees use it. Each client
is five DDS endpoints the node's server must discover before its replies can reach it; a reply the
server sends to a client it has not matched yet is lost. Twenty trees set up together with a client
each lost some goal replies on this 2-core machine (their leaves timed out "no reply to the goal");
with one client per node, discovery happens once, in the first setup(). An ActionClient serves any
number of goals at once, each with its own feedback callback and result; its replies are kept all
(rclpy's default keeps the last 10: twenty goal replies arriving while the executor was busy with
ticks lost some), as the node's servers keep all requests.

Safe to create while spinning: rclpy (ros-rclpy 9.1.2, Kilted wheels) registers a new ActionClient
with its node before it creates the lock that `get_num_entities()` takes; an executor spinning the
node in another thread can call it in between, and its spin thread dies with "'ActionClient' object
has no attribute '_lock'" (every reply to that node is lost from then on; ros2/rclpy#1589). The lock
is made first here; rclpy replaces it with its own before the client can have a request in flight.
"""

from __future__ import annotations

import threading
import weakref

from rclpy.action import ActionClient
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

_shared: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # node -> {(type, name): client}
_creating = threading.Lock()

# Every goal, cancel and result reply is kept until the executor takes it (a burst of leaves' goals).
REPLY_QOS = QoSProfile(depth=1000, history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)


class SpinSafeActionClient(ActionClient):
    def __init__(self, *args, **kwargs):
        self._lock = threading.Lock()
        super().__init__(*args, **kwargs)


def shared_action_client(node, action_type, name: str) -> ActionClient:
    """The node's one client of `name` (created on first use)."""
    with _creating:
        clients = _shared.setdefault(node, {})
        key = (action_type, name)
        if key not in clients:
            clients[key] = SpinSafeActionClient(node, action_type, name, goal_service_qos_profile=REPLY_QOS,
                                                result_service_qos_profile=REPLY_QOS,
                                                cancel_service_qos_profile=REPLY_QOS)
        return clients[key]
