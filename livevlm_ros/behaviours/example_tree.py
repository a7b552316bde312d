"""The example tree: "door open? -> where did I last see the red toolbox? -> go there", on the demo
world (livevlm_ros/tools/synthetic_world.py: rooms with a door on the left, objects that come and go).
The demo runs it after its bag, the tests tick it against the node, the README shows it.

"Go there" is a stand-in for a navigation leaf: it reads the answer and its evidence from the
blackboard and writes the target a planner would use (when and by which camera the toolbox was seen
last; the pose at that stamp comes from TF or a pose log, which the demo world has none of).
"""

from __future__ import annotations

from dataclasses import dataclass

import py_trees
from builtin_interfaces.msg import Time
from geometry_msgs.msg import PoseStamped

from .ask import Ask
from .check import Check

Status = py_trees.common.Status

DOOR_QUESTION = "Is the door on the left open?"
TOOLBOX_QUESTION = "Where did I last see the red toolbox?"


@dataclass(frozen=True)
class Target:
    """Where 'go there' would drive: the answer in words, and the strongest evidence frame: when,
    which camera, and where the robot was (None: its pose is unknown)."""
    answer: str
    stamp: Time
    camera: str
    pose: PoseStamped | None


class GoThereStandIn(py_trees.behaviour.Behaviour):
    """Reads `<key>/answer` and `<key>/evidence`; writes a Target to `target_key`. SUCCESS when the
    answer has evidence to go by, FAILURE when it has none."""

    def __init__(self, name: str, key: str, target_key: str):
        super().__init__(name)
        self.blackboard = self.attach_blackboard_client(name=name)
        self.answer_key, self.evidence_key, self.target_key = f"{key}/answer", f"{key}/evidence", target_key
        for k in (self.answer_key, self.evidence_key):
            self.blackboard.register_key(key=k, access=py_trees.common.Access.READ)
        self.blackboard.register_key(key=target_key, access=py_trees.common.Access.WRITE)

    def update(self) -> Status:
        evidence = self.blackboard.get(self.evidence_key)
        if not evidence:
            self.feedback_message = "the answer has no evidence frame to go by"
            return Status.FAILURE
        strongest = evidence[0]
        pose = strongest.pose if strongest.pose_known else None
        self.blackboard.set(self.target_key, Target(self.blackboard.get(self.answer_key), strongest.stamp,
                                                    strongest.camera, pose))
        where = ("an unknown pose" if pose is None else
                 f"x {pose.pose.position.x:.2f}, y {pose.pose.position.y:.2f} m in {pose.header.frame_id}")
        self.feedback_message = (f"to where {strongest.camera} saw it at "
                                 f"{strongest.stamp.sec}.{strongest.stamp.nanosec:09d}: {where}")
        return Status.SUCCESS


def find_the_toolbox(prefix: str = "", namespace: str = "", door_open: bool = True,
                     timeout_s: float = 30.0) -> py_trees.composites.Sequence:
    """The example tree's root. Blackboard keys under `prefix` (several trees in one process need
    their own): <prefix>/door/..., <prefix>/toolbox/..., <prefix>/go_there/target. `door_open`:
    the answer the guard needs (True: go on only if the door is open)."""
    common = dict(namespace=namespace, timeout_s=timeout_s)
    return py_trees.composites.Sequence("find the red toolbox", memory=True, children=[
        Check("door open?" if door_open else "door closed?", DOOR_QUESTION, expect=door_open,
              key=f"{prefix}/door", **common),
        Ask("where is the toolbox?", TOOLBOX_QUESTION, key=f"{prefix}/toolbox", **common),
        GoThereStandIn("go there (stand-in)", key=f"{prefix}/toolbox", target_key=f"{prefix}/go_there/target"),
    ])
