"""LiveVLMLifecycleNode: the same node as a managed (lifecycle) node, the way Nav2 runs its servers.

    unconfigured --configure--> inactive   the model is loaded onto the device (fails: stays unconfigured)
    inactive     --activate-->  active     camera subscriptions and ~/query open; frames flow into memory
    active       --deactivate-> inactive   intake and ~/query close; memory is kept
    inactive     --cleanup-->   unconfigured   the engine and its memory are freed (GPU memory returned)

/diagnostics and ~/narration publishers exist in every state (status reports the state).
"""

from __future__ import annotations

import gc

import torch
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from .node import LiveVLMCore


class LiveVLMLifecycleNode(LiveVLMCore, LifecycleNode):
    def __init__(self, **kwargs):
        LifecycleNode.__init__(self, "livevlm", **kwargs)
        self._setup()
        self.state = "unconfigured"

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            engine = self._load_engine()
        except Exception:                                   # noqa: BLE001 - the reason is in engine_error
            return TransitionCallbackReturn.FAILURE
        self._adopt(engine)
        self._start_worker(load_in_worker=False)
        self.state = "inactive"
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._open_intake()
        self.state = "active"
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._close_intake("deactivated")
        self.state = "inactive"
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._free()
        self.state = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._close_intake("shutting down")
        self._free()
        self.state = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def shutdown(self, timeout: float = 3.0):
        self.begin_shutdown()
        self._stop_worker(timeout)

    def _free(self):
        self._stop_worker()
        self._save_memory_file()
        with self._lock:
            engine, self.engine = self.engine, None
            self._frames.clear()
        if engine is not None:
            engine.close()
            del engine
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self._stats = {}
