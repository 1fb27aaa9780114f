"""The parent's records of a Pool: tasks, workers, futures, encoding (layer 7).

:class:`PoolFuture` is a ``concurrent.futures.Future`` that makes its
``threading.Condition`` only when somebody waits on it or adds a callback.
A pool completes most futures before anyone waits (a submitting loop, then
``result()`` on finished ones), and a Condition per task is most of the
cost of a tiny task in the parent -- its allocation, and the garbage
collections that tens of thousands of live ones trigger.

Invariants:
    * ``PoolFuture._cond`` goes from None to a Condition once, under
      ``_lazy``; while it is None nobody can wait on the future (waiting
      needs the Condition), so a state change needs no notification.
    * A state change made without the Condition happens under ``_lazy``
      and checks ``_cond`` first; one made with it is the base class's.
"""

from __future__ import annotations

import contextlib
import pickle
import threading
from collections import deque
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from typing import TYPE_CHECKING, Any, TypeVar

import cloudpickle

from ._errors import Cancelled
from ._worker import describe_callable

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._channel import Channel
    from ._supervisor import Worker

__all__ = [
    "PoolFuture",
    "Slot",
    "Task",
    "copy_error",
    "drop_local_tracebacks",
    "dump",
    "encode_call",
]

T = TypeVar("T")

_dumps = pickle.dumps
_HIGHEST = pickle.HIGHEST_PROTOCOL
_DONE = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)
_lazy = threading.Lock()  # Lock order: never held while taking a future's Condition


class PoolFuture(Future[T]):
    """A ``concurrent.futures.Future`` whose Condition is made on first wait.

    Behaves exactly as its base class (``wait``, ``as_completed`` and
    ``asyncio.wrap_future`` use the Condition, and so create it).
    """

    def __init__(self) -> None:  # the base __init__ would make the Condition
        self._cond: threading.Condition | None = None
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self._cond
        if cond is None:
            with _lazy:
                cond = self._cond
                if cond is None:
                    cond = self._cond = threading.Condition()
        return cond

    def done(self) -> bool:
        """True once finished or cancelled. Never blocks."""
        return self._state in _DONE

    def running(self) -> bool:
        """True while a worker was given the task. Never blocks."""
        return self._state == RUNNING

    def cancelled(self) -> bool:
        """True if cancelled. Never blocks."""
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)

    def result(self, timeout: float | None = None) -> T:
        """As ``Future.result``; a finished result is returned without locking."""
        if self._state == FINISHED and self._exception is None:
            return self._result  # type: ignore[no-any-return]
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """As ``Future.exception``; a finished outcome is read without locking."""
        if self._state == FINISHED:
            return self._exception
        return super().exception(timeout)

    def set_running_or_notify_cancel(self) -> bool:
        """As the base class (called by the pool when a worker is given the task)."""
        with _lazy:
            if self._cond is None:
                if self._state == PENDING:
                    self._state = RUNNING
                    return True
                if self._state == CANCELLED:
                    self._state = CANCELLED_AND_NOTIFIED
                    return False
                raise RuntimeError(f"Future in unexpected state: {self._state}")
        return super().set_running_or_notify_cancel()

    def set_result(self, result: T) -> None:
        """As the base class (called by the pool)."""
        with _lazy:
            if self._cond is None:
                if self._state in _DONE:
                    raise InvalidStateError(f"{self._state}: {self!r}")
                self._result = result
                self._state = FINISHED
                return  # no Condition: no waiter and no callback
        super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        """As the base class (called by the pool)."""
        with _lazy:
            if self._cond is None:
                if self._state in _DONE:
                    raise InvalidStateError(f"{self._state}: {self!r}")
                self._exception = exception
                self._state = FINISHED
                return
        super().set_exception(exception)


class Task:
    """One task (a call, or a chunk of a map) from submission to its outcome."""

    __slots__ = ("fn", "future", "kind", "msg", "n", "owner", "retries", "running", "tid")

    def __init__(
        self, tid: int, msg: bytes, fn: Any, retries: int, kind: int, n: int, owner: Any
    ) -> None:
        self.tid = tid
        self.msg = msg
        self.fn = fn  # for messages only
        self.retries = retries
        self.kind = kind
        self.n = n  # items (1 for a call)
        self.owner = owner  # a MapRun that learns from the timing, or None
        self.future: PoolFuture[Any] = PoolFuture()
        self.running = False

    @property
    def name(self) -> str:
        return describe_callable(self.fn)


class Slot:
    """The parent's view of one pool worker."""

    __slots__ = (
        "assigned",
        "ch",
        "done",
        "loop",
        "proc",
        "queue",
        "ready",
        "retiring",
        "started_at",
        "timed_out",
        "wid",
        "worker",
    )

    def __init__(self, worker: Worker, ch: Channel) -> None:
        self.wid = worker.id
        self.worker = worker
        self.ch = ch
        self.loop: Future[bytes] | None = None
        # Invariant: the fields below change only under Pool._lock.
        self.queue: deque[Task] = deque()
        self.ready = False
        self.retiring = False  # told to stop, or announced it leaves: nothing runs
        self.started_at = 0.0  # when queue[0] started (monotonic)
        self.timed_out = -1  # tid of the task it was killed for
        self.assigned = 0
        self.done = 0
        self.proc: Any = None  # psutil.Process, made by stats()


def encode_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    return b"T" + dump((fn, args, kwargs), fn)


def dump(obj: Any, fn: Any) -> bytes:
    # The C pickler is several times faster than cloudpickle, but it pickles
    # every function by reference; functions of __main__, lambdas, closures
    # and modules registered with cloudpickle.register_pickle_by_value need
    # cloudpickle (by value).
    if _by_reference(fn):
        try:
            return _dumps(obj, _HIGHEST)
        except Exception:
            pass
    data: bytes = cloudpickle.dumps(obj, protocol=_HIGHEST)
    return data


_byref_cache: dict[Any, bool] = {}


def _by_reference(fn: Any) -> bool:
    try:
        return _byref_cache[fn]
    except (KeyError, TypeError):
        pass
    check = getattr(cloudpickle.cloudpickle, "_should_pickle_by_reference", None)
    if check is None:
        answer = getattr(fn, "__module__", None) != "__main__"
    else:
        try:
            answer = bool(check(fn))
        except Exception:
            answer = False
    with contextlib.suppress(TypeError):
        if len(_byref_cache) > 1024:
            _byref_cache.clear()
        _byref_cache[fn] = answer
    return answer


def drop_local_tracebacks(exc: BaseException) -> None:
    # An exception raised here keeps this thread's frames, and through them
    # the pool's channels, alive for as long as its Future lives. Its local
    # frames say nothing useful (the remote traceback is in __cause__).
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += [e.__cause__, e.__context__]


def copy_error(exc: BaseException) -> BaseException:
    # One exception instance per Future: a shared one would collect tracebacks.
    if isinstance(exc, Cancelled):
        new: BaseException = type(exc)(str(exc), exc.cause)
        new.__cause__ = exc.__cause__
        return new
    return exc
