"""mpchan: Go's concurrency model -- channels, select, contexts, worker pools --
across OS processes, with data in shared memory.

This module is the public facade; everything else is internal.  Names are
imported lazily (PEP 562), so ``import mpchan`` -- done by every worker
process at start -- stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> internal module that defines it
_EXPORTS: dict[str, str] = {
    # errors
    "MpchanError": "_errors",
    "ChannelClosed": "_errors",
    "EndOfChannel": "_errors",
    "WouldBlock": "_errors",
    "SerializationError": "_errors",
    "PicklingError": "_errors",
    "UnpicklingError": "_errors",
    "Cancelled": "_errors",
    "DeadlineExceeded": "_errors",
    "WorkerCrashed": "_errors",
    "TaskTimeout": "_errors",
    "ShutdownError": "_errors",
    "DeadlockError": "_errors",
    "RemoteError": "_errors",
    # channels, select, timers, sync
    "Channel": "_channel",
    "select": "_select",
    "aselect": "_select",
    "after": "_timer",
    "tick": "_timer",
    "Timer": "_timer",
    "WaitGroup": "_sync",
    # contexts
    "Context": "_context",
    "CancelFunc": "_context",
    "background": "_context",
    "with_cancel": "_context",
    "with_timeout": "_context",
    "with_deadline": "_context",
    "with_value": "_context",
    # processes
    "Supervisor": "_supervisor",
    "go": "_go",
    "GoHandle": "_go",
    "Pool": "_pool",
    "Group": "_group",
    # pipelines and program entry
    "stream": "_stream",
    "Stream": "_stream",
    "merge": "_fan",
    "fan_out": "_fan",
    "tee": "_fan",
    "main": "_main",
    # observability
    "stats": "_metrics",
}

if TYPE_CHECKING:
    from ._channel import Channel as Channel
    from ._context import CancelFunc as CancelFunc
    from ._context import Context as Context
    from ._context import background as background
    from ._context import with_cancel as with_cancel
    from ._context import with_deadline as with_deadline
    from ._context import with_timeout as with_timeout
    from ._context import with_value as with_value
    from ._errors import Cancelled as Cancelled
    from ._errors import ChannelClosed as ChannelClosed
    from ._errors import DeadlineExceeded as DeadlineExceeded
    from ._errors import DeadlockError as DeadlockError
    from ._errors import EndOfChannel as EndOfChannel
    from ._errors import MpchanError as MpchanError
    from ._errors import PicklingError as PicklingError
    from ._errors import RemoteError as RemoteError
    from ._errors import SerializationError as SerializationError
    from ._errors import ShutdownError as ShutdownError
    from ._errors import TaskTimeout as TaskTimeout
    from ._errors import UnpicklingError as UnpicklingError
    from ._errors import WorkerCrashed as WorkerCrashed
    from ._errors import WouldBlock as WouldBlock
    from ._fan import fan_out as fan_out
    from ._fan import merge as merge
    from ._fan import tee as tee
    from ._go import GoHandle as GoHandle
    from ._go import go as go
    from ._group import Group as Group
    from ._main import main as main
    from ._metrics import stats as stats
    from ._pool import Pool as Pool
    from ._select import aselect as aselect
    from ._select import select as select
    from ._stream import Stream as Stream
    from ._stream import stream as stream
    from ._supervisor import Supervisor as Supervisor
    from ._sync import WaitGroup as WaitGroup
    from ._timer import Timer as Timer
    from ._timer import after as after
    from ._timer import tick as tick

__all__ = [
    "CancelFunc",
    "Cancelled",
    "Channel",
    "ChannelClosed",
    "Context",
    "DeadlineExceeded",
    "DeadlockError",
    "EndOfChannel",
    "GoHandle",
    "Group",
    "MpchanError",
    "PicklingError",
    "Pool",
    "RemoteError",
    "SerializationError",
    "ShutdownError",
    "Stream",
    "Supervisor",
    "TaskTimeout",
    "Timer",
    "UnpicklingError",
    "WaitGroup",
    "WorkerCrashed",
    "WouldBlock",
    "__version__",
    "after",
    "aselect",
    "background",
    "fan_out",
    "go",
    "main",
    "merge",
    "select",
    "shutdown",
    "stats",
    "stream",
    "tee",
    "tick",
    "with_cancel",
    "with_deadline",
    "with_timeout",
    "with_value",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mpchan' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


def shutdown(timeout: float | None = None) -> None:
    """Stop every process of the program that mpchan started (busy ones are
    terminated, then killed after ``timeout``; default grace 5 s).  Later
    calls start afresh.

    Blocks: until every worker has exited (at most about ``timeout``
    seconds, then killed).
    Cancellation: none; it is meant for the end of a program or a test.
    Process safety: any thread of the process that started the workers;
    what other threads submit meanwhile fails with ShutdownError.
    """
    from . import _supervisor

    _supervisor.shutdown(timeout)


def _idle_pids() -> set[int]:
    """Pids of mpchan's own idle infrastructure (for leak checks): the reaper
    and the idle processes of the warm cache."""
    import sys

    pids: set[int] = set()
    sup = sys.modules.get(f"{__name__}._supervisor")
    if sup is not None:
        pids |= sup.idle_pids()
    shm = sys.modules.get(f"{__name__}._shm")
    if shm is not None:
        rp = shm.reaper_pid()
        if rp is not None:
            pids.add(rp)
    return pids


# "mpchan" as a joblib backend name, without importing joblib (see _joblib_hook).
from . import _joblib_hook  # noqa: E402

_joblib_hook.install()
