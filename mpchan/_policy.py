"""The knobs that Pool, stream stages and ``mpchan run`` share: one check
and one documented meaning each (layer 0).

    workers     processes of a pool or a stage: an int >= 1
    capacity    a channel's buffer, in messages: an int >= 0 (0: unbuffered)
    chunksize   items sent to a worker together: an int >= 1, or None for
                automatic (a pool's map sizes chunks from the measured time
                per item; a stream stage from how full its input channel is)
    retries     extra runs of a task (a pool call, a map or stream item) that
                failed -- its call raised, it ran past its timeout, or its
                worker died running it -- then the last failure stands; an
                int >= 0. What cannot be pickled is not run again.
    timeout     seconds one call may take, a number > 0 or None: past it the
                task fails with TaskTimeout (a pool kills and replaces the
                worker: ``task_timeout``; a stage interrupts the call)

Every check raises ``TypeError`` for the wrong type (a bool is not an int)
and ``ValueError`` for a value out of range, naming the argument, in one
line. Nothing here blocks or has state.
"""

from __future__ import annotations

__all__ = ["count", "positive"]


def count(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an int >= ``minimum`` (not a bool); else raise. Never blocks."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def positive(name: str, value: object) -> float | None:
    """``value`` if it is None or a number > 0 (not a bool); else raise. Never blocks."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or None, not {type(value).__name__}")
    if not value > 0:  # also refuses NaN
        raise ValueError(f"{name} must be > 0 or None, got {value}")
    return value
