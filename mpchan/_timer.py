"""Timers: ``after`` and ``tick``, Go's time.After and time.Tick (layer 4).

A timer is a receive-only, channel-like object local to the process that
made it.  It needs no thread and no shared memory: it is a point on the
monotonic clock, and waiting for it (alone or in a select) is a timed park::

    Timer._next (monotonic) --- recv: Parking(timeout).wait(until _next)
                            `-- select: sel_deadline() bounds the select's park

The value received is the unix time at which it fired.

Invariants:
    - ``_next`` only grows; a tick skips the ticks a slow receiver missed
      (the next one is always in the future after it fired).
    - an ``after`` fires once (``_fired``); later it is never ready again.

Ownership: the fields belong to the process that made the timer (it is not
shared); any of its threads may poll it -- the read-then-write of ``_next``
is not locked, so two threads racing on one tick may both fire it.

Lock order: no lock.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from ._clock import monotonic_to_unix, remaining
from ._errors import WouldBlock
from ._park import Parking

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

    # -- select case protocol (see mpchan._select); internal ----------------

    def sel_poll(self) -> tuple[bool, Any, bool]:
        """Fire if due: (True, fire time, True), else (False, None, False).
        Never blocks."""
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

    def sel_peek(self) -> bool:
        """Due now (consumes nothing).  Never blocks."""
        d = self.sel_deadline()
        return d is not None and time.monotonic() >= d

    def sel_cores(self) -> tuple[Any, ...]:
        """None: nothing but the clock makes a timer ready.  Never blocks."""
        return ()

    def sel_deadline(self) -> float | None:
        """When it is next due (monotonic), or None.  Never blocks."""
        if self._fired and self._period is None:
            return None
        return self._next

    def recv(self, *, timeout: float | None = None) -> float:
        """Wait for the timer; return the unix time it fired.

        Blocks: until it fires (an ``after`` that already fired blocks
        forever, like Go's channel).
        Cancellation: TimeoutError after ``timeout``; the timer did not fire
        for this call (a later recv still gets it).
        Process safety: any thread of the owning process.
        """
        ready, value, _ok = self.sel_poll()
        if ready:
            return float(value)
        with Parking(timeout) as p:  # no registrations: a timed park
            while not ready:
                p.wait(remaining(self.sel_deadline()))  # raises once timed out
                ready, value, _ok = self.sel_poll()
        return float(value)

    def recv_nowait(self) -> float:
        """The fire time if the timer is due, else WouldBlock.  Never blocks."""
        ready, value, _ok = self.sel_poll()
        if not ready:
            raise WouldBlock("timer not due")
        return float(value)

    def __iter__(self) -> Iterator[float]:
        """Each fire time, for ever (a ``tick``; an ``after`` yields once, then
        blocks for ever).

        Blocks: as recv.  Cancellation: none (no timeout).
        Process safety: as recv.
        """
        while True:
            yield self.recv()


def after(seconds: float) -> Timer:
    """A timer that fires once, ``seconds`` from now.  Never blocks."""
    return Timer(seconds)


def tick(seconds: float) -> Timer:
    """A timer that fires every ``seconds``.  Never blocks."""
    return Timer(seconds, float(seconds))
