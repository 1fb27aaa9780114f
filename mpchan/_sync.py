"""WaitGroup across processes (layer 5).

The counter lives in a small shared segment (the same kind a channel uses),
changed under its robust lock; ``wait`` parks like a channel receive and is
woken by the ``done`` that brings the counter to zero::

    add(n)/done() --- counter_add: counter += n --- reaches 0 --> wake every
                      (segment mutex)                            registered key
    wait() ---------- counter_wait(p.key): 0 -> return; else register p.key
                      (same locked step) -> Parking.wait -> release -> again

Invariants:
    - the counter never goes below zero (an add that would is refused and
      changes nothing).
    - a waiter registers in the locked step that read a non-zero counter,
      so the ``done`` that reaches zero always finds it.

Ownership: any holder writes the counter under the segment mutex; the
segment is freed like a channel's, when no live process holds a handle.

Lock order: only the segment mutex, inside single core calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _shm
from ._codec import note_transit
from ._park import Parking
from ._wake import wake

if TYPE_CHECKING:
    from ._context import Context

__all__ = ["WaitGroup"]

_RING = 64


class WaitGroup:
    """Go's sync.WaitGroup, usable from every process of the program.

    Pickles to a handle by name.  Process safety: every method may be called
    from any thread of any process at once.
    """

    __slots__ = ("__weakref__", "_core", "_seg")

    def __init__(self) -> None:
        self._seg = _shm.create_segment(0, _RING, kind=_shm.WAITGROUP)
        self._core = self._seg.core

    @classmethod
    def _attach(cls, name: str) -> WaitGroup:
        wg = cls.__new__(cls)
        wg._seg = _shm.open_segment(name)
        wg._core = wg._seg.core
        wg._core.transit(-1)
        return wg

    def __reduce__(self) -> tuple[Any, ...]:
        self._core.transit(1)
        note_transit(self._core)
        return (WaitGroup._attach, (self._seg.name,))

    def add(self, n: int) -> None:
        """Add ``n`` (may be negative) to the counter.  Never blocks.

        Raises ValueError, leaving the counter unchanged, if it would go below zero.
        """
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError("WaitGroup.add takes an int")
        _value, wakes = self._core.counter_add(n)
        if wakes:
            wake(wakes)

    def done(self) -> None:
        """``add(-1)``.  Never blocks."""
        self.add(-1)

    @property
    def count(self) -> int:
        """The counter now.  Never blocks."""
        return int(self._core.counter_wait(0))

    def wait(self, timeout: float | None = None, *, ctx: Context | None = None) -> None:
        """Wait until the counter is zero.

        Blocks: until then, using no CPU.
        Cancellation: TimeoutError after ``timeout``; Cancelled when ``ctx``
        is cancelled.  Process safety: any number of waiters anywhere.
        """
        if ctx is not None:
            ctx.check()
        core = self._core
        if core.counter_wait(0) == 0:
            return
        with Parking(timeout, ctx) as p:
            while True:
                p.track(core)
                if core.counter_wait(p.key) == 0:  # registers while not zero
                    return
                p.wait()
                p.release()
