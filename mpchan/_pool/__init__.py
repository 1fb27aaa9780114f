"""The Pool (SPEC 2.7) as a package of one-way roles (layer 7).

Each module has one job and imports only the modules below it here::

    executor   Pool: the concurrent.futures.Executor facade (argument
               checks, submit/map/shutdown, stats, metrics)
    map        MapRun: a running map -- chunk sizes, the window of chunks
               in flight, result order, progress
    dispatch   Dispatch: the calls that put work in and take it back; owns
               the core, the collector and (through the core) the workers
    collector  the thread that handles replies, worker deaths, timeouts and
               the end; the exit hook (shutdown_all)
    core       PoolCore: queue, slots, lock, lifecycle state; scheduling
               (which worker gets what), withdrawal of queued tasks
    task       PoolFuture, Task, Slot: the parent's records
    workerset  the seam where processes come from: WorkerSet (start, retire,
               kill, join, report deaths); LocalWorkerSet, the supervisor's
    worker     the child side: the loop a pool worker runs, and the wire
               format between the two sides

Where to add what: a new way to get workers (a cluster) is a WorkerSet;
a scheduling rule (priorities, affinity) goes in ``core``; a new kind of
call (another map flavour) in ``map`` over ``Dispatch.submit_chunk``; a
new message on the wire in ``worker`` and its handling in ``collector``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .executor import Pool as Pool

__all__ = ["Pool"]


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): a pool worker imports ``_pool.worker`` only, and must
    # not pay for the parent's side of the package.
    if name == "Pool":
        from .executor import Pool

        return Pool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
