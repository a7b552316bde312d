"""Stamps: when a frame was taken, kept exactly as it was ingested."""

from __future__ import annotations

# A frame's stamp, kept exactly as it was ingested: an int is integer nanoseconds (the ROS
# convention), a float is seconds. One memory holds one kind (the engine refuses the other).
Stamp = int | float


def seconds(t: Stamp) -> float:
    """A stamp (or a difference of two) in seconds: for arithmetic in seconds and for messages."""
    return t / 1_000_000_000 if isinstance(t, int) else t
