"""The exception hierarchy of mpchan (layer 0).

Every error mpchan raises on purpose derives from :class:`MpchanError`.
"Closed" (your code closed the channel) is kept apart from "broken"
(something outside failed: a worker died, a deadline passed).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from typing import Any

__all__ = [
    "Cancelled",
    "ChannelClosed",
    "DeadlineExceeded",
    "DeadlockError",
    "EndOfChannel",
    "MpchanError",
    "PicklingError",
    "RemoteError",
    "SerializationError",
    "ShutdownError",
    "TaskTimeout",
    "UnpicklingError",
    "WorkerCrashed",
    "WouldBlock",
]


class MpchanError(Exception):
    """Base class of every error raised by mpchan."""


class ChannelClosed(MpchanError):
    """A send (plain, nowait or as a select case) on a closed channel."""


class EndOfChannel(ChannelClosed):
    """A receive on a channel that is closed and drained; iteration ends on it."""


class WouldBlock(MpchanError):
    """A ``*_nowait`` call could not proceed without waiting."""


class SerializationError(MpchanError):
    """A value could not be pickled or unpickled; ``__cause__`` is the pickle error.

    What mpchan raises is one of its two subclasses, which say on which side
    it failed: :class:`PicklingError` (also a :class:`pickle.PicklingError`,
    so code written for ``ProcessPoolExecutor`` catches it) or
    :class:`UnpicklingError` (also a :class:`pickle.UnpicklingError`).
    """


class PicklingError(SerializationError, pickle.PicklingError):
    """A value could not be pickled (raised where it was being pickled: the
    sender, a task's caller, or the worker pickling a task's result)."""


class UnpicklingError(SerializationError, pickle.UnpicklingError):
    """A value could not be unpickled (raised where it was being unpickled)."""


class Cancelled(MpchanError):
    """The context of the call was cancelled.

    ``cause`` holds what was given to ``cancel(cause)``, if anything.
    """

    def __init__(self, message: str = "context cancelled", cause: Any = None) -> None:
        super().__init__(message)
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.cause))


class DeadlineExceeded(Cancelled, TimeoutError):
    """The context's deadline passed."""

    def __init__(self, message: str = "context deadline exceeded", cause: Any = None) -> None:
        super().__init__(message, cause)


class WorkerCrashed(MpchanError, BrokenProcessPool):
    """The process running a task died.

    Attributes: ``pid``, ``exitcode``, ``signal`` (a name such as ``"SIGKILL"``
    or None), ``task`` (a short description of the task) and ``cause`` (a
    probable cause such as ``"segmentation fault"`` or ``"killed (possibly
    out of memory)"``).
    """

    def __init__(
        self,
        message: str,
        *,
        pid: int | None = None,
        exitcode: int | None = None,
        signal: str | None = None,
        task: Any = None,
        cause: str | None = None,
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal
        self.task = task
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:
        task = (
            self.task
            if isinstance(self.task, (str, int, float, tuple, type(None)))
            else repr(self.task)
        )
        return (
            _rebuild_crashed,
            (str(self), self.pid, self.exitcode, self.signal, self.cause, task),
        )


def _rebuild_crashed(
    message: str,
    pid: int | None,
    exitcode: int | None,
    signal: str | None,
    cause: str | None,
    task: Any = None,
) -> WorkerCrashed:
    return WorkerCrashed(message, pid=pid, exitcode=exitcode, signal=signal, cause=cause, task=task)


class TaskTimeout(MpchanError):
    """A task ran past its time limit; its worker was replaced.

    Deliberately not a :class:`TimeoutError`, so waiting too long on a future
    and the task itself overrunning can be told apart.
    """


class ShutdownError(MpchanError, RuntimeError):
    """Submit or send after shutdown or drain began."""


class DeadlockError(MpchanError):
    """Every process of the program is blocked on mpchan operations nothing can complete."""


class RemoteError(MpchanError):
    """An exception raised in another process that could not itself be pickled.

    Carries ``type_name``, ``message`` and ``traceback`` (text).
    """

    def __init__(self, type_name: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type_name, self.message, self.traceback))


def remote_traceback(text: str) -> BaseException:
    """The carrier of a remote traceback's text, to set as an exception's
    ``__cause__`` (the remote frames then print above the local ones):
    ``concurrent.futures``' own class, so code written for
    ``ProcessPoolExecutor`` that looks for it finds it. Never blocks."""
    return _RemoteTraceback(text)  # type: ignore[arg-type]  # a str at run time


def rebuild_remote(
    pickled: bytes | None, type_name: str, message: str, traceback: str, note: str
) -> BaseException:
    """An exception raised in another process, rebuilt here: the original
    (unpickled from ``pickled``) or, when it cannot be, a
    :class:`RemoteError`; the remote ``traceback`` text as ``__cause__``
    (when there is one) and ``note`` added. Never blocks."""
    exc: BaseException | None = None
    if pickled is not None:
        try:
            loaded = pickle.loads(pickled)
        except BaseException:
            loaded = None
        if isinstance(loaded, BaseException):
            exc = loaded
    if exc is None:
        exc = RemoteError(type_name, message, traceback)
    if traceback:
        exc.__cause__ = remote_traceback(f'\n"""\n{traceback}"""')
    exc.add_note(note)
    return exc


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception its ``__cause__`` / ``__context__`` chain
    reaches, each once (a chain may loop). Never blocks."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
