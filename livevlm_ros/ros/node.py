"""LiveVLMNode: the plain node, up and serving as soon as it starts (the model loads in the
background; meanwhile questions hear "still loading" and diagnostics say "loading").

Camera topics in; ~/query, ~/ask, ~/narration, /diagnostics and the memory services out. The parts
and their threads are described in core.py; the managed form is lifecycle_node.py.
"""

from __future__ import annotations

from rclpy.node import Node

from .core import LiveVLMCore


class LiveVLMNode(Node):
    def __init__(self, node_name: str = "livevlm", **kwargs):
        super().__init__(node_name, **kwargs)
        self.core = LiveVLMCore(self, managed=False)
        self.core.configure(load_in_background=True)
        self.core.activate()

    def shutdown(self):
        """SIGINT/SIGTERM: waiting callers hear "shutting down", memory is saved to memory_file."""
        self.core.shutdown()

    def destroy_node(self):
        self.core.destroy()                        # stops the worker first if still running
        super().destroy_node()
