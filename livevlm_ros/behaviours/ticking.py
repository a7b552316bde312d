"""Running a tree against the node: tick it from a timer on the tree's rclpy node, and print one line
for each tick that changes a behaviour's status.

Ticking from a timer of the node is what py_trees_ros does (`BehaviourTree.tick_tock`): the ticks and
the leaves' action-client callbacks are then callbacks of one node. In the node's default callback
group (mutually exclusive) they never run at once, under any executor, so the leaves need no locks.
Whoever owns the tree spins the node (`rclpy.spin`, or an executor in a thread).
"""

from __future__ import annotations

import threading

import py_trees

Status = py_trees.common.Status


class TreeTicker:
    """Ticks `tree` (a py_trees BehaviourTree, set up with node=node) every `period_s` on `node`'s
    executor. once=True: stop ticking when the root ends (SUCCESS or FAILURE); `finished` is set."""

    def __init__(self, tree: py_trees.trees.BehaviourTree, node, period_s: float = 0.1, once: bool = True):
        self.tree, self.node, self.once = tree, node, once
        self.finished = threading.Event()
        self._timer = node.create_timer(period_s, self._tick)

    def _tick(self):
        if self.finished.is_set():
            return
        self.tree.tick()
        if self.once and self.tree.root.status in (Status.SUCCESS, Status.FAILURE):
            self.finished.set()
            self._timer.cancel()          # not destroyed inside its own callback: close() does that

    def close(self):
        self._timer.cancel()
        self.node.destroy_timer(self._timer)


class StatusLines:
    """A post-tick handler (tree.add_post_tick_handler): one line per tick that changed the status of
    any behaviour in the tree, with each changed behaviour's feedback message (answer, reason)."""

    def __init__(self, write=print, prefix: str = "[tree]"):
        self.write, self.prefix = write, prefix
        self._last: dict = {}

    def __call__(self, tree: py_trees.trees.BehaviourTree):
        changes = []
        for behaviour in tree.root.iterate():
            status = behaviour.status
            if self._last.get(behaviour.id, Status.INVALID) != status:     # every behaviour starts INVALID
                note = f" ({behaviour.feedback_message})" if behaviour.feedback_message else ""
                changes.append(f"{behaviour.name}: {status.value}{note}")
            self._last[behaviour.id] = status
        if changes:
            self.write(f"{self.prefix} tick {tree.count}: " + "; ".join(changes))
