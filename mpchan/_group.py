"""Group: run functions in worker processes, fail fast on the first error (layer 7).

Go's ``golang.org/x/sync/errgroup`` across processes::

    with mpchan.Group(ctx, limit=4) as g:    # exit: wait, then raise the first error
        for item in items:
            g.go(work, g.ctx, item)         # blocks while 4 are running
    results = g.results()                   # in go() order

Each function runs in its own worker process (see :func:`mpchan.go`). The
first one to fail cancels ``g.ctx`` (with its exception as the cause), so
the others, when they take ``g.ctx`` and block under it or check it, stop
early. ``wait`` (and leaving the ``with`` block) waits for every function,
cancels ``g.ctx`` and raises the first error; every other error is added to
it as a note, and all of them stay in :attr:`Group.errors`.

Invariants:
    * ``_running`` counts functions started and not yet finished; a limit
      slot is taken before a function starts and given back when it ends,
      before its Future completes, so ``len(running) <= limit`` always.
    * ``_errors`` is in order of completion; ``_errors[0]`` is the first.

Ownership: ``_lock`` guards ``_running``, ``_errors`` and ``_futures``; the
Futures are completed by the supervisor's thread (a done-callback of the
goroutine), never while ``_lock`` is held.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, ParamSpec, TypeVar

from . import _go
from ._context import CancelFunc, Context, background, with_cancel

__all__ = ["Group"]

P = ParamSpec("P")
T = TypeVar("T")


class Group:
    """An errgroup: functions in worker processes, the first error cancels the rest.

    ``ctx`` is the parent of :attr:`ctx` (default: background); ``limit``
    bounds how many functions run at once (``None``: no bound).
    Process safety: a Group lives in the process that made it; any of its
    threads may call ``go``/``try_go``/``wait``. It does not pickle; pass
    ``g.ctx`` to the functions instead.
    """

    def __init__(self, ctx: Context | None = None, *, limit: int | None = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or None, not {limit}")
        self._ctx: Context
        self._cancel: CancelFunc
        self._ctx, self._cancel = with_cancel(background() if ctx is None else ctx)
        self._limit = limit
        self._slots = threading.Semaphore(limit) if limit is not None else None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._futures: list[Future[Any]] = []
        self._errors: list[BaseException] = []
        self._running = 0
        self._reported = False  # notes were added to the first error

    @property
    def ctx(self) -> Context:
        """The group's context: cancelled by the first error and by ``wait``.
        Never blocks."""
        return self._ctx

    @property
    def limit(self) -> int | None:
        """At most this many functions run at once (None: unbounded). Never blocks."""
        return self._limit

    @property
    def errors(self) -> list[BaseException]:
        """Every error so far, the first first. Never blocks."""
        with self._lock:
            return list(self._errors)

    def go(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` in a worker process; return its Future.

        The Future (a :class:`concurrent.futures.Future`) gets the return
        value, or the exception with its remote traceback; the first
        exception of the group also cancels :attr:`ctx`.

        Blocks: while ``limit`` functions are running, until one ends; then
        as :func:`mpchan.go` (only while a process starts).
        Cancellation: none -- like errgroup, a cancelled ``ctx`` does not
        stop ``go``; pass ``g.ctx`` to ``fn`` so it can stop early. An
        argument that cannot be pickled raises
        :class:`mpchan.SerializationError` here; nothing started.
        Process safety: any thread of the process that made the group.
        """
        if self._slots is not None:
            self._slots.acquire()
        return self._start(fn, args, kwargs)

    def try_go(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> bool:
        """Like :meth:`go` when a slot is free; return False (starting
        nothing) when ``limit`` functions are running.

        Blocks: never waits for a slot (only while a process starts).
        Cancellation, Process safety: as :meth:`go`.
        """
        if self._slots is not None and not self._slots.acquire(blocking=False):
            return False
        self._start(fn, args, kwargs)
        return True

    def wait(self, timeout: float | None = None) -> list[Any]:
        """Wait for every function, cancel :attr:`ctx`, then raise the first
        error or return the results in ``go()`` order.

        The first error carries a note for each other error (none dropped);
        all are in :attr:`errors`.

        Blocks: until every function started so far has ended, or
        ``timeout`` seconds (``None``: forever).
        Cancellation: on timeout raises the builtin :class:`TimeoutError`;
        nothing is cancelled and ``wait`` may be called again.
        Process safety: any thread of the process that made the group.
        """
        with self._idle:
            if not self._idle.wait_for(lambda: self._running == 0, timeout):
                raise TimeoutError(f"{self._running} function(s) still running after {timeout} s")
            futures = list(self._futures)
            first = self._first_error_locked()
        self._cancel(None)
        if first is not None:
            raise first
        return [f.result() for f in futures]

    def results(self) -> list[Any]:
        """The results in ``go()`` order, once every function ended (see :meth:`wait`).

        Blocks: as :meth:`wait` without a timeout. Raises the first error.
        Cancellation: none of its own (the functions see :attr:`ctx`).
        Process safety: any thread of the process that made the group.
        """
        return self.wait()

    def __enter__(self) -> Group:
        """The group itself. Never blocks."""
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        """Wait for every function and raise the first error (see :meth:`wait`).

        When the block itself raised, :attr:`ctx` is cancelled first (the
        functions may stop early) and the block's exception propagates, with
        the group's errors added as notes.

        Blocks: until every function started has ended.
        Cancellation: leaving by an exception cancels :attr:`ctx` first.
        Process safety: the thread that entered the block.
        """
        if exc is None:
            self.wait()
            return
        self._cancel(exc)
        with self._idle:
            self._idle.wait_for(lambda: self._running == 0)
            errors = list(self._errors)
        for e in errors:
            exc.add_note(f"mpchan.Group: a function also failed: {_describe(e)}")

    def __repr__(self) -> str:
        return (
            f"<mpchan.Group running={self._running} done={len(self._futures) - self._running} "
            f"errors={len(self._errors)} limit={self._limit}>"
        )

    def __reduce__(self) -> Any:
        raise TypeError("a Group does not cross processes; pass g.ctx to the functions")

    # -- internals ------------------------------------------------------------------

    def _start(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()
        with self._lock:
            self._running += 1
        try:
            handle = _go.go(fn, *args, **kwargs)
        except BaseException:
            self._end()
            raise
        with self._lock:
            self._futures.append(future)
        handle.add_done_callback(lambda h: self._finish(h, future))
        return future

    def _finish(self, handle: _go.GoHandle[Any], future: Future[Any]) -> None:
        # The goroutine ended (the supervisor's thread, or the caller's when
        # it had ended already): decode its outcome, free the slot, then
        # complete the Future.
        value: Any = None
        try:
            exc = handle.exception()
            if exc is None:
                value = handle.result()
        except BaseException as e:  # never leave the group waiting on this one
            exc = e
        if exc is not None:
            with self._lock:
                self._errors.append(exc)
                first = len(self._errors) == 1
            if first:
                with contextlib.suppress(Exception):
                    self._cancel(exc)
        self._end()
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)

    def _end(self) -> None:
        if self._slots is not None:
            self._slots.release()
        with self._idle:
            self._running -= 1
            if self._running == 0:
                self._idle.notify_all()

    def _first_error_locked(self) -> BaseException | None:
        if not self._errors:
            return None
        first = self._errors[0]
        if not self._reported:
            self._reported = True
            for e in self._errors[1:]:
                first.add_note(f"mpchan.Group: another function also failed: {_describe(e)}")
        return first


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        text = "<unprintable>"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
