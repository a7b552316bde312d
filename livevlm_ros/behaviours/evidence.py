"""What an answer's evidence is on the blackboard: the frames that drew most of the question's
attention, strongest first, each with when (the image's header stamp), its share and its camera.
A planner turns a stamp into a place (TF at that time, a pose log); the answer's text says what."""

from __future__ import annotations

from dataclasses import dataclass

from builtin_interfaces.msg import Time


@dataclass(frozen=True)
class Evidence:
    stamp: Time          # the header stamp of the camera image, to the nanosecond
    weight: float        # its share of the question's attention (0..1)
    camera: str          # the camera topic that took it

    @property
    def nanoseconds(self) -> int:
        return self.stamp.sec * 1_000_000_000 + self.stamp.nanosec


def evidence_of(result) -> tuple[Evidence, ...]:
    """The evidence of an Ask.Result, strongest first."""
    return tuple(Evidence(t, float(w), c) for t, w, c in
                 zip(result.evidence_times, result.evidence_weights, result.evidence_cameras))
