"""The knobs that Pool, stream stages and ``mpchan run`` share: one check
and one documented meaning each (layer 0).

    workers     processes of a pool or a stage: an int >= 1
    capacity    a channel's buffer, in messages: an int >= 0 (0: unbuffered)
    chunksize   items sent to a worker together: an int >= 1, or None for
                automatic (``Chunker``: one rule for a pool's map and a
                stream's feeder, each giving it the signal it has)
    retries     extra runs of a task (a pool call, a map or stream item) that
                failed -- its call raised (an exception or sys.exit(); a
                KeyboardInterrupt is a stop, not run again), it ran past its
                timeout, or its worker died running it -- then the last
                failure stands; an int >= 0. What cannot be pickled is not
                run again. Items run through one runner, _worker.call_again.
    timeout     seconds one call may take, a number > 0 or None: past it the
                task fails with TaskTimeout (a pool kills and replaces the
                worker: ``task_timeout``; a stage interrupts the call)

Every check raises ``TypeError`` for the wrong type (a bool is not an int)
and ``ValueError`` for a value out of range, naming the argument, in one
line. Nothing here blocks; only a ``Chunker`` has state, owned by one map
or one stream.

Automatic chunks (``Chunker``), one rule::

    size = min(cap, base * factor)
    base    1 until a time per item is known (a probe: a long task must not
            take others with it), then TARGET_S / time per item
    factor  1, doubled each time the workers are behind (items would wait
            anyway), halved when they wait for work; 1 <= factor <= cap

A pool's map measures the time per item from its finished chunks and, when
its input has a length, is behind at every chunk (a one-item probe
overstates a tiny task's time: its first call is cold), with ``cap`` a
quarter of the input per worker. A stream's feeder measures no time (its
stages differ); it is behind when the first stage's channel is full and
waited on when it is empty, with ``cap`` 16 (a stream keeps latency low).
"""

from __future__ import annotations

__all__ = ["TARGET_S", "Chunker", "count", "positive"]

TARGET_S = 0.005  # seconds of calls an automatic chunk holds, once timed


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


class Chunker:
    """The size of the next automatic chunk (see the module's rule).

    ``fixed``: a chunksize the user gave (an int >= 1, always used) or None.
    ``timed`` may be called from another thread than ``size``: each is a few
    float updates, and a stale estimate only sizes one chunk differently.
    Never blocks.
    """

    __slots__ = ("_items", "_secs", "cap", "factor", "fixed", "per_item")

    def __init__(self, fixed: int | None, cap: int) -> None:
        """A sizer for one map or stream; never blocks."""
        self.fixed = fixed
        self.cap = max(1, cap)
        self.factor = 1
        self.per_item: float | None = None  # seconds per call, once timed
        self._secs = 0.0
        self._items = 0.0

    def timed(self, secs: float, n: int) -> None:
        """``n`` calls took ``secs``: recent chunks count more (tasks may change),
        big ones more than small ones. Never blocks."""
        self._secs = 0.5 * self._secs + secs
        self._items = 0.5 * self._items + n
        self.per_item = self._secs / max(self._items, 1e-9)

    def size(self) -> int:
        """Items of the next chunk. Never blocks."""
        if self.fixed is not None:
            return self.fixed
        per_item = self.per_item
        base = 1 if per_item is None else max(1, int(TARGET_S / max(per_item, 1e-8)))
        return min(self.cap, base * self.factor)

    def behind(self) -> None:
        """The workers have more than they can take: double the factor. Never blocks."""
        self.factor = min(self.factor * 2, self.cap)

    def idle(self) -> None:
        """The workers wait for work: halve the factor. Never blocks."""
        self.factor = max(self.factor // 2, 1)
