"""What the engine accepts: frames, stamps, poses, questions. Each check raises EngineInputError with
the reason, before anything changes (the engine's state is then as it was)."""

from __future__ import annotations

import math

import numpy as np

from .memory import poses
from .memory.stamps import Stamp, seconds


class EngineInputError(ValueError):
    """A frame or question the engine cannot use; the engine state is unchanged."""


class NoFramesError(EngineInputError):
    """A question arrived before any frame was ingested."""


def check_frame(frame):
    if not isinstance(frame, np.ndarray):
        raise EngineInputError(f"frame must be a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise EngineInputError(f"frame must be uint8 RGB, got dtype {frame.dtype}")
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[0] < 2 or frame.shape[1] < 2:
        raise EngineInputError(f"frame must be HxWx3 (RGB), got shape {frame.shape}")


def check_pose(pose) -> poses.Pose | None:
    try:
        return poses.check_pose(pose)
    except (TypeError, ValueError) as err:
        raise EngineInputError(f"pose: {err}") from None


def check_stamp(t, kind: type | None, what: str = "timestamp") -> Stamp:
    """An int (nanoseconds, as ROS stamps are) or a float (seconds), returned as the Python number
    of the same kind (numpy scalars become one, exactly). Memory holds one kind (`kind`, None before
    the first): comparing or subtracting nanoseconds and seconds would be wrong, so the other kind
    is refused (until reset)."""
    if isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_)):
        t = int(t)
        if not -2 ** 63 <= t < 2 ** 63:
            raise EngineInputError(f"{what} {t} is out of range for int64 nanoseconds")
    elif isinstance(t, (float, np.floating)):
        t = float(t)
        if not math.isfinite(t):
            raise EngineInputError(f"{what} {t} is not a finite number of seconds")
    else:
        raise EngineInputError(f"{what} must be int nanoseconds or float seconds, got {type(t).__name__}")
    if kind is not None and type(t) is not kind:
        unit = {int: "int nanoseconds", float: "float seconds"}
        raise EngineInputError(f"{what} {t!r} is {unit[type(t)]}, but memory's stamps are {unit[kind]} "
                               "(reset() starts a stream of the other kind)")
    return t


def check_order(stamps: list[Stamp], newest: Stamp | None):
    """New frames' stamps (checked by check_stamp) must be in time order and not older than the
    newest the stream has had (sampled, waiting for a clip, or in memory)."""
    for before, t in zip([newest] + stamps, stamps):
        if before is not None and t < before:
            raise EngineInputError(f"timestamp {seconds(t):.3f} is older than the last frame "
                                   f"({seconds(before):.3f}); frames must arrive in time order")


def check_question(question, tokenize, max_tokens: int) -> str:
    if not isinstance(question, str) or not question.strip():
        raise EngineInputError("question is empty")
    question = question.strip()
    n = len(tokenize(question))
    if n > max_tokens:
        raise EngineInputError(f"question is {n} tokens long; the limit is {max_tokens}")
    return question
