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
from ._select import select
from ._sync import WaitGroup
from ._timer import Timer, after, tick

__version__ = "0.1.0"

__all__ = [
    "CancelFunc",
    "Cancelled",
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
    "select",
    "tick",
    "with_cancel",
    "with_deadline",
    "with_timeout",
    "with_value",
]


def _idle_pids() -> set[int]:
    """Pids of mpchan's own idle infrastructure (for leak checks)."""
    from . import _shm

    pids: set[int] = set()
    rp = _shm.reaper_pid()
    if rp is not None:
        pids.add(rp)
    return pids
