"""Monotonic deadlines (layer 0).

Timeouts and deadlines inside mpchan are kept and compared on the monotonic
clock, so a wall-clock jump neither fires nor delays them. Unix time appears
only at the public surface (``with_deadline``, ``ctx.deadline()``) and is
converted here, once, at the boundary.

Every function here never blocks and is safe to call from any thread or process.
"""

from __future__ import annotations

import time

__all__ = ["deadline_after", "monotonic_to_unix", "remaining", "unix_to_monotonic"]


def deadline_after(timeout: float | None) -> float | None:
    """Turn a relative ``timeout`` (seconds, ``None`` = forever) into a monotonic deadline.

    A negative timeout is treated as zero: the deadline is already due.
    Never blocks.
    """
    if timeout is None:
        return None
    return time.monotonic() + max(0.0, float(timeout))


def remaining(deadline: float | None) -> float | None:
    """Return the seconds left until the monotonic ``deadline``, clamped at 0.

    ``None`` (no deadline) gives ``None``. Never blocks.
    """
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def unix_to_monotonic(t: float) -> float:
    """Convert a unix timestamp to the equivalent point on the monotonic clock.

    The offset between the two clocks is sampled now; the result is then fixed
    and immune to later wall-clock jumps. Never blocks.
    """
    return t - time.time() + time.monotonic()


def monotonic_to_unix(t: float) -> float:
    """Convert a point on the monotonic clock to a unix timestamp (for reporting).

    Never blocks.
    """
    return t - time.monotonic() + time.time()
