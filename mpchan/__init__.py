"""mpchan: Go's concurrency model -- channels, select, contexts, worker pools --
across OS processes, with data in shared memory.

This module is the public facade; everything else is internal.
"""

from __future__ import annotations

from ._channel import Channel
from ._context import (
    CancelFunc,
    Context,
    background,
    with_cancel,
    with_deadline,
    with_timeout,
    with_value,
)
from ._errors import (
    Cancelled,
    ChannelClosed,
    DeadlineExceeded,
    DeadlockError,
    EndOfChannel,
    MpchanError,
    RemoteError,
    SerializationError,
    ShutdownError,
    TaskTimeout,
    WorkerCrashed,
    WouldBlock,
)
from ._go import GoHandle, go
from ._select import select
from ._supervisor import Supervisor
from ._sync import WaitGroup
from ._timer import Timer, after, tick

__version__ = "0.1.0"

__all__ = [
    "CancelFunc",
    "Cancelled",
    "GoHandle",
    "Supervisor",
    "Channel",
    "ChannelClosed",
    "Context",
    "DeadlineExceeded",
    "DeadlockError",
    "EndOfChannel",
    "MpchanError",
    "RemoteError",
    "SerializationError",
    "ShutdownError",
    "TaskTimeout",
    "Timer",
    "WaitGroup",
    "WorkerCrashed",
    "WouldBlock",
    "__version__",
    "after",
    "background",
    "go",
    "select",
    "shutdown",
    "tick",
    "with_cancel",
    "with_deadline",
    "with_timeout",
    "with_value",
]


def shutdown(timeout: float | None = None) -> None:
    """Stop every process of the program that mpchan started (busy ones are
    terminated, then killed after ``timeout``; default grace 5 s) and free
    what they held.  Later calls start afresh.

    Blocks: until every worker has exited.
    """
    from . import _supervisor

    _supervisor.shutdown(timeout)


def _idle_pids() -> set[int]:
    """Pids of mpchan's own idle infrastructure (for leak checks): the reaper
    and the idle processes of the warm cache."""
    from . import _shm, _supervisor

    pids: set[int] = set(_supervisor._idle_pids())
    rp = _shm.reaper_pid()
    if rp is not None:
        pids.add(rp)
    return pids
