"""Timers: ``after`` and ``tick``, Go's time.After and time.Tick (layer 4).

A timer is a receive-only, channel-like object local to the process that
made it.  It needs no thread and no shared memory: it is a point on the
monotonic clock, and waiting for it (alone or in a select) is a timed park.
The value received is the unix time at which it fired.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from ._clock import deadline_after, monotonic_to_unix, remaining
from ._errors import WouldBlock
from ._wake import current_waiter

__all__ = ["Timer", "after", "tick"]


class Timer:
    """Receive-only: ready once ``seconds`` passed (``after``), or every
    ``period`` seconds (``tick``; late ticks are dropped, as in Go).

    Process safety: owned by the process that made it; any of its threads.
    """

    __slots__ = ("_fired", "_next", "_period")

    def __init__(self, seconds: float, period: float | None = None) -> None:
        seconds = float(seconds)
        if seconds < 0 or (period is not None and period <= 0):
            raise ValueError("timer delay must be >= 0 and a tick period > 0")
        self._next = time.monotonic() + seconds
        self._period = period
        self._fired = False

    def _sel_poll(self) -> tuple[bool, Any, bool]:
        if self._fired and self._period is None:
            return (False, None, False)
        now = time.monotonic()
        if now < self._next:
            return (False, None, False)
        fired_at = monotonic_to_unix(self._next)
        if self._period is None:
            self._fired = True
        else:
            # drop ticks for a slow receiver: the next one is in the future
            missed = int((now - self._next) // self._period) + 1
            self._next += missed * self._period
        return (True, fired_at, True)

    def _sel_cores(self) -> tuple[Any, ...]:
        return ()

    def _sel_deadline(self) -> float | None:
        if self._fired and self._period is None:
            return None
        return self._next

    def recv(self, *, timeout: float | None = None) -> float:
        """Wait for the timer; return the unix time it fired.

        Blocks: until it fires (an ``after`` that already fired blocks
        forever, like Go's channel); TimeoutError after ``timeout``.
        Process safety: any thread of the owning process.
        """
        end = deadline_after(timeout)
        w = current_waiter()
        while True:
            ready, value, _ok = self._sel_poll()
            if ready:
                return float(value)
            waits = [t for t in (remaining(end), remaining(self._sel_deadline())) if t is not None]
            if end is not None and remaining(end) == 0:
                raise TimeoutError(f"timed out after {timeout} s")
            w.wait(min(waits) if waits else None)

    def recv_nowait(self) -> float:
        """The fire time if the timer is due, else WouldBlock.  Never blocks."""
        ready, value, _ok = self._sel_poll()
        if not ready:
            raise WouldBlock("timer not due")
        return float(value)

    def __iter__(self) -> Iterator[float]:
        while True:
            yield self.recv()


def after(seconds: float) -> Timer:
    """A timer that fires once, ``seconds`` from now.  Never blocks."""
    return Timer(seconds)


def tick(seconds: float) -> Timer:
    """A timer that fires every ``seconds``.  Never blocks."""
    return Timer(seconds, float(seconds))
