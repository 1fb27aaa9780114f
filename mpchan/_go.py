"""``go``: run a function in its own worker process, now (layer 7).

``go(fn, *args, **kwargs)`` pickles the call in the caller, takes a worker
from the supervisor's warm cache (or starts one: it never waits for a busy
worker to become free, so a blocked goroutine cannot starve another), sends
the task and returns a :class:`GoHandle`. When ``fn`` returns, the worker goes
back to the cache whether or not anyone asks for the result.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Generator
from concurrent.futures import Future
from typing import Any, Generic, ParamSpec, TypeVar

from . import _supervisor
from ._codec import release_unread
from ._worker import RESULT, decode_reply, describe_callable, encode_task

__all__ = ["GoHandle", "go"]

P = ParamSpec("P")
T = TypeVar("T")

_UNSET: Any = object()


def _settle(fut: Any) -> None:
    if not fut.done():
        fut.set_result(None)


class GoHandle(Generic[T]):
    """The handle of one goroutine: its pid, and its outcome once it ends.

    The outcome is decoded (unpickled) once, by the first thread that asks
    for it; later calls return the same value or raise the same exception.
    """

    __slots__ = ("_exc", "_future", "_lock", "_name", "_pid", "_value", "_where")

    def __init__(self, future: Future[bytes], *, pid: int, name: str, where: str) -> None:
        self._future = future
        self._pid = pid
        self._name = name
        self._where = where
        self._lock = threading.Lock()
        # Invariant: both _UNSET until decoded; then exactly one is meaningful.
        self._value: Any = _UNSET
        self._exc: BaseException | None = None

    @property
    def pid(self) -> int:
        """The pid of the worker process running the function. Never blocks."""
        return self._pid

    def done(self) -> bool:
        """True once the function returned or raised, or its worker died. Never blocks."""
        return self._future.done()

    def join(self, timeout: float | None = None) -> None:
        """Wait until the goroutine has ended, without raising its exception.

        Blocks: until the function ends or its worker dies, or ``timeout``
        seconds (``None``: forever).
        Cancellation: on expiry raises the builtin :class:`TimeoutError`; the
        goroutine goes on running and the handle stays usable.
        Process safety: any thread of the process that called ``go``.
        """
        self._wait(timeout)

    def result(self, timeout: float | None = None) -> T:
        """Return the function's return value, or raise what it raised.

        A remote exception keeps its type, with the remote traceback text as
        ``__cause__`` and a note naming the worker, pid and function; one that
        cannot be pickled arrives as :class:`mpchan.RemoteError`. A worker
        that died raises :class:`mpchan.WorkerCrashed`, a shutdown meanwhile
        :class:`mpchan.ShutdownError`, a result that cannot be (un)pickled
        :class:`mpchan.SerializationError`.

        Blocks: until the function ends or its worker dies, or ``timeout``
        seconds (``None``: forever).
        Cancellation: on expiry raises the builtin :class:`TimeoutError`;
        nothing is consumed, so the call can be repeated.
        Process safety: any thread of the process that called ``go``.
        """
        value, exc = self._outcome(timeout)
        if exc is not None:
            raise exc
        return value  # type: ignore[no-any-return]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Return what the function raised (or why it failed), or None if it returned.

        Blocks, Cancellation, Process safety: as :meth:`result`.
        """
        return self._outcome(timeout)[1]

    def add_done_callback(self, fn: Callable[[GoHandle[T]], object]) -> None:
        """Call ``fn(handle)`` once the goroutine has ended (at once if it has).

        ``fn`` runs in the supervisor's thread (or in the caller's, when the
        goroutine had already ended); it must not block for long. An
        exception it raises is logged and ignored, as with
        :meth:`concurrent.futures.Future.add_done_callback`.
        Never blocks. Process safety: any thread of the process that called ``go``.
        """
        self._future.add_done_callback(lambda _f: fn(self))

    def __await__(self) -> Generator[Any, None, T]:
        """``await handle``: the function's result, as :meth:`result`, with
        the event loop running on meanwhile (woken by the goroutine's end,
        through the loop's own thread-safe call: nothing polls).

        Blocks: the awaiting task only.
        Cancellation: cancelling the awaiting task stops the wait only; the
        goroutine runs on and the handle stays usable.
        Process safety: any loop of the process that called ``go``.
        """
        return self._settled().__await__()

    async def _settled(self) -> T:
        import asyncio  # loaded already: an event loop awaits this

        if not self._future.done():
            loop = asyncio.get_running_loop()
            ended: asyncio.Future[None] = loop.create_future()

            def on_end(_f: object) -> None:  # the supervisor's thread
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(_settle, ended)

            self._future.add_done_callback(on_end)
            await ended
        return self.result(0)

    def __del__(self) -> None:
        # A result nobody read may hold handles (a channel the goroutine
        # made and returned): let their segments go with this handle.
        fut = self._future
        unread = self._value is _UNSET and self._exc is None
        if unread and fut.done() and not fut.cancelled() and fut.exception() is None:
            reply = fut.result()
            if reply[:1] == RESULT:
                release_unread(memoryview(reply)[1:])

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"<mpchan GoHandle {self._name} pid={self._pid} {state}>"

    def _wait(self, timeout: float | None) -> None:
        try:
            self._future.exception(timeout)
        except TimeoutError:
            raise TimeoutError(f"{self._where} not done after {timeout} s") from None

    def _outcome(self, timeout: float | None) -> tuple[Any, BaseException | None]:
        self._wait(timeout)
        with self._lock:
            if self._value is _UNSET and self._exc is None:
                failure = self._future.exception()
                if failure is not None:
                    self._exc = failure
                else:
                    try:
                        self._value = decode_reply(self._future.result(), where=self._where)
                    except BaseException as e:
                        self._exc = e
            return self._value, self._exc


def go(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> GoHandle[T]:
    """Run ``fn(*args, **kwargs)`` in its own worker process, now; return its handle.

    The call is pickled (with cloudpickle) here, so an argument that cannot
    be pickled raises :class:`mpchan.SerializationError` at once and nothing
    starts. A worker comes from the warm cache, or a new process is started
    when none is idle; ``go`` never waits for another goroutine to finish.

    Blocks: only while a new process starts when the cache is empty.
    Cancellation: none; raises :class:`mpchan.ShutdownError` if the
    supervisor is shutting down.
    Process safety: any thread; from a worker it starts a nested worker
    owned by that worker.
    """
    request = encode_task(fn, args, kwargs)
    name = describe_callable(fn)
    sup = _supervisor.get_supervisor()
    worker = sup.acquire()
    future = sup.run(worker, request, name=name)
    return GoHandle(future, pid=worker.pid, name=name, where=worker.describe(name))
