"""Parking: the one way a thread of mpchan waits (layer 1).

Every blocking call -- a channel send or receive, select, ``Context.wait``,
a timer, ``WaitGroup.wait`` -- waits through a :class:`Parking`, which owns
the four steps of a wait that must not be got wrong one call at a time::

    blocking call                 Parking p                    segment(s)
    -------------                 ---------                    ----------
    p = Parking(timeout, ctx)     this thread's Waiter (key)
    p.add(core, kind) ------------------------------------->  waiters[] += key
      or p.track(core), then a core operation that
      registers p.key in the locked step that found
      the channel full/empty
    re-check the condition                                    (under its lock)
    p.wait() ------------------>  ctx's cores += key (once)
                                  ctx.check(), deadline: raise
                                  poll the waiter's socket  <-- wake(key): one
                                  (at most one slice)           datagram, any
    p.release() ------------------------------------------->  waiters[] -= key
    ... re-check, register again, wait again ...
    p.close() / end of ``with`` -> every registration removed, however it ends

Why registration comes before the re-check: a waker reads the waiter table
under the segment lock right after it changes the state, so a change made
before the registration is seen by the re-check and one made after it
finds the key; no wake-up is lost either way.  A wake-up is only a hint:
after ``wait`` returns the caller always re-checks.

The descriptor (:meth:`Parking.fileno`) is the waiter's socket: it becomes
readable when any process wakes the key, so an event loop can wait on the
same registrations (``loop.add_reader``, or :meth:`Parking.wait_async`).

One blocking call, two ways to wait.  A call's slow path is written once,
as *steps* (a generator, :data:`Steps`): it does every locked step itself
and yields ``(parking, limit)`` each time it must park.  A driver parks::

    steps (channel send/recv, select, Context.wait)
        | yield (p, limit)               ^ send(woken) / throw(exc)
        v                                |
    block(steps):        p.wait(limit)             -- the thread parks
    await_steps(steps):  await p.wait_async(limit) -- the task parks; the loop
                                                      runs on (a dedicated p)

What a park raises (Cancelled, TimeoutError, KeyboardInterrupt, asyncio's
CancelledError) is thrown into the steps, which undo what they did and
re-raise -- or, when it can no longer be undone (an unbuffered value taken
in that instant), finish: the call returned, so it happened.  So the
blocking and the awaited call have one set of rules, not two copies.

Invariants:
    - when ``close`` returns (or the ``with`` block is left, by a return or
      any exception, KeyboardInterrupt included) no segment holds this
      parking's key on its behalf: every core it added or tracked, and the
      context's cores, were unregistered.  (Only a second interrupt landing
      inside ``close`` itself can cut that short.)
    - a core is put on the list to unregister *before* the call that may
      register the key there, so an interrupt between the two leaks nothing.
    - ``wait`` raises (Cancelled, DeadlineExceeded, TimeoutError) only
      before it parks; after parking it returns, and the caller re-checks
      its condition first -- so what became possible at the last moment is
      still done, and a raise always means nothing was done.
    - ``wait()`` parks at most ``SLICE`` seconds: the safety net for a
      wake-up that cannot come (a full waiter table registers nothing),
      never the wake-up path.

Ownership:
    - a Parking belongs to the thread that made it and lives for one
      blocking call; it is never shared or kept.  It uses that thread's
      :func:`current_waiter` unless made ``dedicated`` (its own Waiter,
      given back with it: for an event loop, where several waits share one
      thread; ``_wake`` keeps given-back waiters for the next such wait).
    - wakers in any process only send datagrams to the key; they never see
      the Parking.

Lock order: a Parking holds no lock.  Each register/unregister takes one
segment's mutex alone and releases it before the next; none is held while
parked.
"""

from __future__ import annotations

import sys
from collections.abc import Generator
from os import sched_yield
from time import monotonic
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar

from ._clock import deadline_after
from ._core import W_RECV
from ._wake import current_waiter, lend_waiter, take_back, wake

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "SLICE",
    "TURN",
    "CancelScope",
    "Parking",
    "Steps",
    "await_steps",
    "block",
    "deadline_for",
    "task_cancel",
]

SLICE = 0.25  # longest single park without a timeout of its own

T = TypeVar("T")

# A blocking call written once for both ways of waiting: a generator that does
# every locked step itself and, each time it must park, yields the Parking
# and the longest wait (``wait``'s timeout).  The driver parks -- ``block``
# the thread, ``await_steps`` the awaiting task -- and sends back whether it
# was woken, or throws in what the wait raised (Cancelled, TimeoutError, a
# KeyboardInterrupt, asyncio's CancelledError), which the steps undo and
# re-raise, or absorb when what they did cannot be undone (an unbuffered
# value already taken: the send happened).
Steps = Generator[tuple["Parking | None", float | None], bool, T]

# What steps yield to spin: no park, only a turn for others -- the thread
# yields its CPU (sched_yield), an awaited call lets the loop run its other
# tasks once (``asyncio.sleep(0)``) -- then the steps re-check.
TURN: tuple[None, None] = (None, None)


class CancelScope(Protocol):
    """What a blocking call needs of a context (``mpchan.Context``)."""

    def check(self) -> None:
        """Raise Cancelled / DeadlineExceeded if done."""

    def wait_cores(self) -> tuple[Any, ...]:
        """The segments whose close (or flag) wakes a waiter of this context."""

    def monotonic_deadline(self) -> float | None:
        """The context's deadline on the monotonic clock, or None."""


def deadline_for(timeout: float | None, ctx: CancelScope | None) -> float | None:
    """The monotonic deadline of a call: the earlier of ``timeout`` from
    now and the context's deadline (None: neither).  Never blocks."""
    deadline = deadline_after(timeout)
    if ctx is not None:
        cd = ctx.monotonic_deadline()
        if cd is not None and (deadline is None or cd < deadline):
            deadline = cd
    return deadline


class Parking:
    """This thread's registrations for one blocking call, and its park.

    ``Parking(timeout, ctx)``: ``wait`` raises TimeoutError once ``timeout``
    seconds (from now) passed, and Cancelled / DeadlineExceeded once ``ctx``
    is done; a precomputed monotonic ``deadline`` may be given instead of
    ``timeout`` (the message still names ``timeout``).  Without either,
    ``wait`` never raises: the caller keeps its own time.

    Use it as ``with Parking(...) as p:``; leaving the block (however)
    unregisters everything.

    Process safety: one thread, one blocking call.  Wakers anywhere only
    need ``key``.
    """

    __slots__ = (
        "_ctx",
        "_ctx_cores",
        "_deadline",
        "_more",
        "_one",
        "_own",
        "_timeout",
        "key",
        "waiter",
    )

    def __init__(
        self,
        timeout: float | None = None,
        ctx: CancelScope | None = None,
        *,
        deadline: float | None = None,
        dedicated: bool = False,
    ) -> None:
        w = lend_waiter() if dedicated else current_waiter()
        self.waiter = w
        # Invariant: key is the waiter's key, the one every core holds for us
        self.key = w.key
        self._own = dedicated
        self._timeout = timeout
        self._ctx = ctx
        if deadline is None and (timeout is not None or ctx is not None):
            deadline = deadline_for(timeout, ctx)
        self._deadline = deadline
        # Invariant: every core that may hold key through this parking
        # (context cores excepted) is _one or in _more, each once.  One
        # core is the common case (a channel call), kept without a list.
        self._one: Any = None
        self._more: list[Any] | None = None
        # None: the context's cores are not registered yet (first wait does)
        self._ctx_cores: tuple[Any, ...] | None = None

    # -- registrations --------------------------------------------------------

    def add(self, core: Any, kind: int, token: int = 0, ticket: int = 0) -> Any:
        """Register the key on ``core`` for ``kind`` wake-ups (W_RECV, W_SEND,
        with W_SELECT for a select's).  Returns the keys the registration
        asks to wake (or None); the caller delivers them.  Adding the same
        core twice, with other kinds, is allowed (one select sending and
        receiving on one channel).  Never blocks (beyond the segment lock).
        """
        self.track(core)
        return core.register(self.key, kind, token, ticket)

    def track(self, core: Any) -> None:
        """Note that ``core`` may hold the key from now on: the caller is
        about to run a core operation that registers ``key`` in its own
        locked step (a send finding the channel full, a receive finding it
        empty, a WaitGroup wait).  Never blocks."""
        one = self._one
        if one is None:
            self._one = core
        elif one is not core:
            more = self._more
            if more is None:
                self._more = [core]
            elif core not in more:
                more.append(core)

    def release(self) -> None:
        """Unregister from every core added or tracked, so the caller can
        re-check and register afresh (a fresh entry is not marked woken).
        The context's registrations stay until ``close``.  Never blocks
        (beyond the segment locks)."""
        one = self._one
        if one is not None:
            one.unregister(self.key)
            self._one = None
        more = self._more
        if more:
            key = self.key
            while more:
                more[-1].unregister(key)
                more.pop()

    def close(self) -> None:
        """Release every registration, the context's too (and the waiter of
        a dedicated parking).  Idempotent.  Never blocks."""
        self.__exit__(None, None, None)

    def __enter__(self) -> Parking:
        return self

    def __exit__(self, typ: object, value: object, tb: object) -> None:
        # close(), written out here: every blocking call that parks ends here
        one = self._one
        if one is not None:
            one.unregister(self.key)
            self._one = None
        if self._more:
            self.release()
        cores = self._ctx_cores
        if cores:
            self._ctx_cores = ()
            for c in cores:
                c.unregister(self.key)
        if self._own:
            self._own = False
            take_back(self.waiter)

    # -- parking --------------------------------------------------------------

    def fileno(self) -> int:
        """The descriptor that is readable once any process woke the key
        (the waiter's socket).  After it was readable, ``wait(0)`` (or
        ``wait_async``) consumes the wake-up.  Never blocks."""
        return self.waiter.fileno()

    def wait(self, timeout: float | None = SLICE) -> bool:
        """Park until woken, ``timeout`` seconds passed (None: no limit but
        the parking's deadline) or the deadline came; True when woken.

        Blocks: up to ``timeout`` (default ``SLICE``), using no CPU.
        Cancellation: raises Cancelled / DeadlineExceeded (a done context)
        or TimeoutError (the deadline passed) *before* parking, never after:
        a wait that ends at the deadline returns, the caller re-checks, and
        its next ``wait`` raises.  What the caller does between is its own
        (a raise here leaves its registrations to ``close``).
        Process safety: only the thread that made the parking.
        """
        if self._ctx is None and self._deadline is None:
            return self.waiter.wait(timeout)  # nothing to check or to cap
        return self.waiter.wait(self._limit(timeout))

    async def wait_async(self, timeout: float | None = SLICE) -> bool:
        """As :meth:`wait`, but awaits the descriptor on the running event
        loop (``loop.add_reader``; no polling) instead of blocking it.

        Blocks: the awaiting task only, up to ``timeout``.
        Cancellation: as ``wait``; cancelling the task removes the reader.
        Process safety: a ``dedicated`` parking only (RuntimeError
        otherwise): tasks of one loop share a thread, hence its waiter.
        """
        if not self._own:
            raise RuntimeError("wait_async needs a Parking(dedicated=True)")
        import asyncio  # here: most programs never need it, and it is slow to import

        limit = self._limit(timeout)
        w = self.waiter
        if w.wait(0):
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = w.fileno()
        loop.add_reader(fd, _settle, fut)
        timer = None if limit is None else loop.call_later(limit, _settle, fut)
        try:
            await fut
        finally:
            loop.remove_reader(fd)
            if timer is not None:
                timer.cancel()
        return w.wait(0)

    def _limit(self, timeout: float | None) -> float | None:
        # Register on the context first, then check it: a cancel between the
        # two wakes the key, one before it is seen by the check.
        ctx = self._ctx
        if ctx is not None:
            if self._ctx_cores is None:
                self._ctx_cores = cores = ctx.wait_cores()
                for c in cores:
                    wakes = c.register(self.key, W_RECV, 0, 0)
                    if wakes:
                        wake(wakes)
            ctx.check()
        d = self._deadline
        if d is not None:
            left = d - monotonic()
            if left <= 0:
                self._timed_out()
            if timeout is None or left < timeout:
                timeout = left
        return timeout

    def _timed_out(self) -> NoReturn:
        if self._ctx is not None:
            self._ctx.check()  # the context's deadline passed: DeadlineExceeded
        raise TimeoutError(f"timed out after {self._timeout} s")


def block(steps: Steps[T]) -> T:
    """Run ``steps`` to their end, parking this thread whenever they ask.

    Blocks: as the steps ask (each park up to the limit they yield).
    Cancellation: what a park raises is thrown into the steps, which undo
    their work and re-raise it (it propagates from here).
    Process safety: the thread whose Parking the steps use.
    """
    try:
        p, limit = next(steps)
        while True:
            if p is None:  # TURN
                sched_yield()
                p, limit = steps.send(False)
                continue
            try:
                woken = p.wait(limit)
            except BaseException as exc:
                p, limit = steps.throw(exc)
            else:
                p, limit = steps.send(woken)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def await_steps(steps: Steps[T]) -> T:
    """As :func:`block`, but each park awaits the parking's descriptor on the
    running event loop (:meth:`Parking.wait_async`): the loop runs on.

    Blocks: the awaiting task only.
    Cancellation: cancelling the task throws CancelledError into the
    steps: they withdraw (and re-raise it), or -- when what they did can
    no longer be undone -- finish, and then this returns their result and
    the task's cancellation request is withdrawn (``Task.uncancel``): an
    awaited call either raised and did nothing, or returned and did it.
    Process safety: the steps' Parkings must be ``dedicated`` (one event
    loop thread runs many waits at once).
    """
    import asyncio  # loaded already: an event loop runs this

    absorbed = False
    try:
        p, limit = next(steps)
        while True:
            try:
                if p is None:  # TURN: the loop runs its other tasks once
                    await asyncio.sleep(0)
                    woken = False
                else:
                    woken = await p.wait_async(limit)
            except BaseException as exc:
                absorbed = isinstance(exc, asyncio.CancelledError)
                p, limit = steps.throw(exc)
            else:
                p, limit = steps.send(woken)
    except StopIteration as stop:
        if absorbed:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        return stop.value  # type: ignore[no-any-return]


def task_cancel(exc: BaseException) -> bool:
    """True when ``exc`` is asyncio's CancelledError: an awaited wait's task
    was cancelled (a cancel that an operation already done may absorb, see
    :func:`await_steps`).  Never blocks."""
    aio = sys.modules.get("asyncio")
    return aio is not None and isinstance(exc, aio.CancelledError)


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
