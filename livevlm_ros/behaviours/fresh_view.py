"""FreshView: Ask about what the cameras show now, after the decision point.

The goal carries `not_before` = the tree node's clock when the leaf starts (its first tick): the
node waits (at most its `fresh_wait_s`) until a frame stamped at or after it is in memory. The leaf
fails, "no fresh view", if the answer came from older frames only (no newer frame arrived in time).
The tree's node must run on the cameras' clock: `use_sim_time` when replaying a bag or simulating.
For a fresh yes/no guard use `Check(..., fresh=True)`.
"""

from __future__ import annotations

from .ask import Ask


class FreshView(Ask):
    """Ask's parameters (see ask.Ask), with `fresh` always on."""

    def __init__(self, name: str, question: str | None = None, **ask):
        super().__init__(name, question, fresh=True, **ask)
