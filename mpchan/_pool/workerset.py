"""The worker-set seam of a Pool: where its worker processes come from (layer 7).

The pool's dispatch decides *what* runs where; a :class:`WorkerSet`
decides nothing and only manages the processes: it starts a worker with
the pool's boot arguments and runs the worker loop in it, kills one, lets
one retire, and reports every worker's end, however it ended. The pool
replaces a worker by starting another.

    Dispatch ----start(request)----> WorkerSet ----> worker process
        ^                               |          (pool_worker_loop, with its
        |                               |           task and result channels)
        +----on_gone(member, exc)-------+   once, from any thread, after the
                                            worker's replies were written

:class:`LocalWorkerSet` is the first implementation: the processes of this
machine, supervised by a :class:`mpchan._supervisor.Supervisor` (death
watch, signals, cleanup). Another (a cluster's workers) implements the same
five calls; the dispatch does not change.

Invariants:
    * ``on_gone`` is called exactly once per started member, after the
      member can no longer write replies (its process is gone, or it was
      never started because ``start`` raised -- then it is not called and
      nothing is left running).
    * A member's ``id`` is unique in its set for the set's life; the worker
      writes it in each of its replies.

Ownership: the set owns its supervisor when it made one (``own``), and shuts
it down in :meth:`LocalWorkerSet.close`; the dispatch owns the channels.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from .._supervisor import Supervisor, Worker, crashed_error

__all__ = ["LocalWorkerSet", "Member", "WorkerSet"]


class Member(Protocol):
    """One worker of a set, as the dispatch sees it."""

    @property
    def id(self) -> int:
        """Unique in its set; the worker writes it in its replies."""
        ...

    @property
    def pid(self) -> int:
        """The worker's process id (for messages and ``stats``)."""
        ...


Request = Callable[[Member], bytes]
"""Makes the encoded worker-loop task for a started member."""
OnGone = Callable[[Member, BaseException | None], None]
"""Told that a member's loop ended: None (it left), or why it did not."""


class WorkerSet(Protocol):
    """Starts, retires, kills and reports the end of a pool's workers."""

    def start(self, request: Request, on_gone: OnGone) -> Member:
        """Start a worker and run ``request(member)`` in it.

        Blocks: while the process starts. Cancellation: none. Process
        safety: any thread of the pool's process.
        """
        ...

    def retire(self, member: Member) -> None:
        """The pool closed the member's task channel: let it leave. Never blocks."""
        ...

    def kill(self, member: Member) -> None:
        """Stop the member at once (its ``on_gone`` follows). Never blocks."""
        ...

    def join(self, member: Member, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the member's end.

        Blocks: up to ``timeout``. Cancellation: none. Process safety: any thread.
        """
        ...

    def crash_error(self, member: Member, exc: BaseException | None, what: str) -> BaseException:
        """The error for ``what`` (a task's name), which ran in ``member`` when it died."""
        ...

    def close(self) -> None:
        """Give back what the set itself holds (every member has ended). Blocks: briefly."""
        ...


class LocalWorkerSet:
    """Workers that are processes of this machine, from a :class:`Supervisor`.

    Each worker is a fresh process (never one of the warm cache: a pool's
    initializer and tasks leave state behind) that exits when its loop
    ends. ``boot()`` gives each new worker's boot arguments (see
    :meth:`Supervisor.start_worker`).

    Process safety: any thread of the process that made it.
    """

    def __init__(self, sup: Supervisor, own: bool, boot: Callable[[], Any]) -> None:
        self.sup = sup
        self._own = own
        self._boot = boot
        self._loops: dict[int, Future[bytes]] = {}

    @property
    def start_method(self) -> str:
        """The start method of the processes. Never blocks."""
        return self.sup.start_method

    def start(self, request: Request, on_gone: OnGone) -> Member:
        """See :meth:`WorkerSet.start`."""
        worker = self.sup.start_worker(self._boot())
        try:
            msg = request(worker)
        except BaseException:
            self._kill_pid(worker.pid)
            self.sup.release(worker)
            raise
        loop = self.sup.run(worker, msg, name="mpchan pool worker", release=False)
        self._loops[worker.id] = loop

        def gone(f: Future[bytes]) -> None:
            self._loops.pop(worker.id, None)
            on_gone(worker, f.exception())

        loop.add_done_callback(gone)
        return worker

    def retire(self, member: Member) -> None:
        """See :meth:`WorkerSet.retire`: the loop ends when its channel is closed and read."""

    def kill(self, member: Member) -> None:
        """See :meth:`WorkerSet.kill`."""
        self._kill_pid(member.pid)

    def join(self, member: Member, timeout: float) -> None:
        """See :meth:`WorkerSet.join`."""
        loop = self._loops.get(member.id)
        if loop is not None:
            with contextlib.suppress(BaseException):
                loop.exception(timeout=timeout)

    def crash_error(self, member: Member, exc: BaseException | None, what: str) -> BaseException:
        """See :meth:`WorkerSet.crash_error`."""
        assert isinstance(member, Worker)
        return crashed_error(member, getattr(exc, "exitcode", None), what)

    def close(self) -> None:
        """See :meth:`WorkerSet.close`."""
        if self._own:
            self.sup.shutdown()

    @staticmethod
    def _kill_pid(pid: int) -> None:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
