"""The parent's records of a Pool: tasks, workers, futures (layer 7, ``_pool``).

:class:`PoolFuture` is a ``concurrent.futures.Future`` that makes its
``threading.Condition`` only when somebody waits on it or adds a callback.
A pool completes most futures before anyone waits (a submitting loop, then
``result()`` on finished ones), and a Condition per task is most of the
cost of a tiny task in the parent -- its allocation, and the garbage
collections that tens of thousands of live ones trigger. It also takes
its task back from the pool when cancelled (``cancel``, ``kill``).

Invariants:
    * ``PoolFuture._cond`` goes from None to a Condition once, under
      ``_lazy``; while it is None nobody can wait on the future (waiting
      needs the Condition), so a state change needs no notification.
    * A state change made without the Condition happens under ``_lazy``
      and checks ``_cond`` first; one made with it is the base class's.
    * ``PoolFuture._task`` and ``_pool`` are None once the future is done:
      a finished future keeps neither the task's callable nor its arguments.
    * Nothing here formats a future (``repr``) while holding a lock, and
      ``repr`` takes none.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import (
    _STATE_TO_DESCRIPTION_MAP,
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .._errors import Cancelled, exception_chain
from .._worker import describe_callable

if TYPE_CHECKING:
    from .._channel import Channel
    from .workerset import Member

__all__ = [
    "PoolFuture",
    "Slot",
    "Task",
    "copy_error",
    "drop_local_tracebacks",
]

T = TypeVar("T")

_DONE = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)
_lazy = threading.Lock()  # Lock order: never held while taking a future's Condition
# The logger concurrent.futures reports a failing done-callback on.
_LOGGER = logging.getLogger("concurrent.futures")


class _Canceller(Protocol):
    def cancel_task(self, task: Task) -> bool: ...
    def kill_task(self, task: Task) -> bool: ...


class PoolFuture(Future[T]):
    """A ``concurrent.futures.Future`` of a pool task.

    Behaves as its base class (``wait``, ``as_completed`` and
    ``asyncio.wrap_future`` work), except that :meth:`cancel` also takes
    back a task already queued at a worker, :meth:`kill` stops a running
    one, and a done-callback that raises anything is logged, never
    propagated into the pool.
    """

    def __init__(self) -> None:  # the base __init__ would make the Condition
        self._cond: threading.Condition | None = None
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []
        # Invariant: both None once done (see the module's Invariants).
        self._task: Task | None = None
        self._pool: _Canceller | None = None

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self._cond
        if cond is None:
            with _lazy:
                cond = self._cond
                if cond is None:
                    cond = self._cond = threading.Condition()
        return cond

    def __repr__(self) -> str:
        # Without the Condition: repr may be called while it is held.
        state = self._state
        text = f"<{type(self).__name__} at {id(self):#x} state={_STATE_TO_DESCRIPTION_MAP[state]}"
        if state == FINISHED:
            exc = self._exception
            if exc is not None:
                return f"{text} raised {type(exc).__name__}>"
            return f"{text} returned {type(self._result).__name__}>"
        return text + ">"

    def done(self) -> bool:
        """True once finished or cancelled. Never blocks."""
        return self._state in _DONE

    def running(self) -> bool:
        """True while a worker runs the task. Never blocks."""
        return self._state == RUNNING

    def cancelled(self) -> bool:
        """True if cancelled. Never blocks."""
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)

    def cancel(self) -> bool:
        """Cancel the task unless it has started; return True if it is cancelled.

        A task still queued in the pool, or already queued at a worker but
        not started there, is taken back and never runs; a running or
        finished one is not touched (see :meth:`kill`).

        Blocks: only for the pool's short internal lock. Cancellation: n/a.
        Process safety: any thread of the process that made the pool.
        """
        pool, task = self._pool, self._task
        if pool is None or task is None or self._state != PENDING:
            return super().cancel()
        return pool.cancel_task(task)

    def kill(self) -> bool:
        """Stop the task whatever its state; return True unless it had finished.

        A task that has not started is cancelled as by :meth:`cancel`. A
        running one is stopped by killing its worker process (SIGKILL; the
        pool replaces the worker, the other tasks are not affected) and the
        future is cancelled at once: ``result()`` raises
        ``concurrent.futures.CancelledError``. Whatever the task did before
        it was killed stays done.

        Blocks: only for the pool's short internal lock (the process is
        signalled, not waited for). Cancellation: n/a.
        Process safety: any thread of the process that made the pool.
        """
        pool, task = self._pool, self._task
        if pool is None or task is None:
            return self.cancel()
        return pool.kill_task(task)

    def result(self, timeout: float | None = None) -> T:
        """As ``Future.result``; a finished result is returned without locking."""
        if self._state == FINISHED and self._exception is None:
            return self._result  # type: ignore[no-any-return]
        try:
            return super().result(timeout)
        finally:
            # As the base class: the raised exception's traceback holds this
            # frame, which must not hold the future (a reference cycle).
            self = None  # type: ignore[assignment]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """As ``Future.exception``; a finished outcome is read without locking."""
        if self._state == FINISHED:
            return self._exception
        return super().exception(timeout)

    def add_done_callback(self, fn: Any) -> None:
        """As the base class; a callback that raises anything is logged and ignored."""
        with self._condition:
            if self._state not in _DONE:
                self._done_callbacks.append(fn)
                return
        self._call(fn)

    def _invoke_callbacks(self) -> None:
        for callback in self._done_callbacks:
            self._call(callback)

    def _call(self, callback: Any) -> None:
        # As concurrent.futures does, plus BaseException: a callback raising
        # SystemExit must not end the pool's collector thread. A Ctrl-C
        # arriving in the main thread meanwhile is not swallowed.
        try:
            callback(self)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt) and threading.current_thread() is (
                threading.main_thread()
            ):
                raise
            _LOGGER.exception("exception calling callback for %r", self)

    def set_running_or_notify_cancel(self) -> bool:
        """As the base class (called by the pool when a worker starts the task)."""
        with _lazy:
            if self._cond is None:
                if self._state == PENDING:
                    self._state = RUNNING
                    return True
                if self._state == CANCELLED:
                    self._state = CANCELLED_AND_NOTIFIED
                    return False
                state = self._state
            else:
                state = None
        if state is not None:
            raise RuntimeError(f"Future in unexpected state: {state}")
        return super().set_running_or_notify_cancel()

    def set_result(self, result: T) -> None:
        """As the base class (called by the pool)."""
        if not self._finish_unwatched("_result", result):
            super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        """As the base class (called by the pool)."""
        if not self._finish_unwatched("_exception", exception):
            super().set_exception(exception)

    def _finish_unwatched(self, field: str, value: object) -> bool:
        # Finish a future nobody watches yet (no Condition: no waiter and no
        # callback) without the base class: True. False: the base class must
        # (it raises InvalidStateError itself for a done future).
        with _lazy:
            done = False
            if self._cond is None:
                done = self._state in _DONE
                if not done:
                    setattr(self, field, value)
                    self._state = FINISHED
                    self._task = self._pool = None
                    return True
        if done:  # raised outside the lock: the repr reads the state
            raise InvalidStateError(f"{self._state}: {self!r}")
        self._task = self._pool = None
        return False

    @property
    def state(self) -> str:
        """The state (``concurrent.futures``' PENDING, RUNNING, CANCELLED,
        CANCELLED_AND_NOTIFIED or FINISHED), read without a lock. Never blocks."""
        return self._state

    def bind(self, task: Task, pool: _Canceller) -> None:
        """Called by the pool once: the task this future is of, and who takes
        it back on :meth:`cancel` / :meth:`kill`. Never blocks."""
        self._task = task
        self._pool = pool

    def cancel_now(self) -> bool:
        """Called by the pool when it took the task back (or killed its
        worker): cancel and notify at once, whatever the state but finished.
        True if cancelled. Never blocks (but for the future's own lock)."""
        with self._condition:
            if self._state == FINISHED:
                return False
            if self._state == CANCELLED_AND_NOTIFIED:
                return True
            self._state = CANCELLED_AND_NOTIFIED
            self._task = self._pool = None
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()
        return True


class Task:
    """One task (a call, or a chunk of a map) from submission to its outcome."""

    __slots__ = (
        "blob",
        "fn",
        "future",
        "key",
        "kind",
        "msg",
        "n",
        "owner",
        "pid",
        "retries",
        "slot",
        "started",
        "tid",
    )

    def __init__(
        self,
        tid: int,
        msg: bytes,
        fn: Any,
        retries: int,
        kind: int,
        n: int,
        owner: Any,
        key: int = 0,
        blob: bytes | None = None,
    ) -> None:
        self.tid = tid
        self.msg = msg
        self.fn = fn  # for messages only
        self.retries = retries
        self.kind = kind
        self.n = n  # items (1 for a call)
        self.owner = owner  # a MapRun that learns from the timing, or None
        self.key = key  # the worker's key of the function sent by value, or 0
        self.blob = blob  # that function, pickled (for the workers without it)
        self.future: PoolFuture[Any] = PoolFuture()
        # Invariant: slot and started change only under the pool's lock.
        self.slot: Slot | None = None  # the worker it is queued at, or None
        self.started = False  # the head of its worker's queue (running there)
        self.pid = 0  # the worker process that answered it

    @property
    def name(self) -> str:
        return describe_callable(self.fn)


class Slot:
    """The parent's view of one pool worker."""

    __slots__ = (
        "assigned",
        "ch",
        "done",
        "fns",
        "killed",
        "proc",
        "queue",
        "ready",
        "retiring",
        "started_at",
        "timed_out",
        "wid",
        "worker",
    )

    def __init__(self, worker: Member, ch: Channel) -> None:
        self.wid = worker.id
        self.worker = worker
        self.ch = ch
        # Invariant: the fields below change only under the pool's lock.
        self.queue: deque[Task] = deque()
        self.ready = False
        self.retiring = False  # told to stop, or announced it leaves: nothing runs
        self.started_at = 0.0  # when queue[0] started (monotonic)
        self.timed_out = -1  # tid of the task it was killed for (task_timeout)
        self.killed = -1  # tid of the task it was killed for (Future.kill)
        self.assigned = 0
        self.done = 0
        # Invariant: the keys of the functions by value the worker holds, in
        # the order it got them (the worker's own table, mirrored).
        self.fns: dict[int, None] = {}
        self.proc: Any = None  # psutil.Process, made by stats()


def drop_local_tracebacks(exc: BaseException) -> None:
    """Forget the local frames of ``exc`` and its chain. Never blocks.

    An exception raised here keeps this thread's frames, and through them
    the pool's channels, alive for as long as its Future lives. Its local
    frames say nothing useful (the remote traceback is in ``__cause__``).
    """
    for e in exception_chain(exc):
        e.__traceback__ = None


def copy_error(exc: BaseException) -> BaseException:
    # One exception instance per Future: a shared one would collect tracebacks.
    if isinstance(exc, Cancelled):
        new: BaseException = type(exc)(str(exc), exc.cause)
        new.__cause__ = exc.__cause__
        return new
    return exc
