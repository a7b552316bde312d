"""LiveVLMLifecycleNode: the same node as a managed (lifecycle) node, the way Nav2 runs its servers.

    unconfigured --configure--> inactive    parameters are read, the servers made, the model loaded
                                            (fails: back to unconfigured, with the reason)
    inactive     --activate-->  active      camera subscriptions open; questions are served
    active       --deactivate-> inactive    subscriptions close; waiting callers hear "deactivated";
                                            memory and the worker stay
    inactive     --cleanup-->   unconfigured   worker stopped, memory saved to memory_file, the
                                            engine and its memory freed
    any          --shutdown-->  finalized   as cleanup; SIGINT/SIGTERM do the same
    on_error                                frees what configure made, back to unconfigured

The servers exist from the first configure on and answer in every state (refusing with the state
while not active), so no caller is left waiting on a service that went away. Parameters that shape
the model or memory can be set while unconfigured and are read on configure. ~/narration is a
lifecycle publisher (silent unless active); /diagnostics reports in every state.
"""

from __future__ import annotations

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from .core import LiveVLMCore

SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


class LiveVLMLifecycleNode(LifecycleNode):
    def __init__(self, node_name: str = "livevlm", **kwargs):
        super().__init__(node_name, **kwargs)
        self.core = LiveVLMCore(self, managed=True)

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        if not self.core.configure(load_in_background=False):
            self.core.cleanup(f"unconfigured: the model could not be loaded: {self.core.engine_error}")
            return FAILURE
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.core.activate()
        return super().on_activate(state)          # activates the narration publisher

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.core.deactivate("deactivated")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.core.cleanup()
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.core.shutdown()
        return SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.core.cleanup("unconfigured after an error: configure the node again")
        return SUCCESS

    def shutdown(self):
        self.core.shutdown()

    def destroy_node(self):
        self.core.destroy()                        # stops the worker first if still running
        super().destroy_node()
