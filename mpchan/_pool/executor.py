"""Pool: a supervised worker pool that is a ``concurrent.futures.Executor`` (layer 7, ``_pool``).

The facade: argument checks, the Executor API, ``stats`` and metrics. The
work is done by a :class:`~mpchan._pool.dispatch.Dispatch` (the queue, the
workers, the collector thread; see ``dispatch.py``, ``core.py`` and
``collector.py`` for the data flow, the invariants and the lock order)
and, for ``map``, by a :class:`~mpchan._pool.map.MapRun`.

Ownership:
    * The facade holds its Dispatch; nothing the Dispatch runs (threads,
      callbacks) refers to the facade, so a pool dropped without
      ``shutdown()`` is collected, and its finalizer shuts it down
      (``shutdown(wait=False)``: what was submitted still finishes).
    * A ``map`` iterator holds the Dispatch, not the facade (as a
      ``concurrent.futures`` map does not hold its executor): when the pool
      is collected meanwhile, its shutdown submits the rest of the map's
      input (``MapRun.feed_all``), and every result is still yielded.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from .. import _lifecycle, _metrics, _policy, _supervisor
from .._context import Context
from .collector import shutdown_all
from .core import Settings
from .dispatch import Dispatch
from .map import MapRun

__all__ = ["Pool"]

T = TypeVar("T")


class Pool(Executor):
    """A pool of supervised worker processes; a real :class:`concurrent.futures.Executor`.

    ``workers`` (default: the CPU count) processes run tasks; a worker that
    dies fails only the task it was running (:class:`mpchan.WorkerCrashed`,
    or the task runs again while ``retries`` allows) and is replaced.
    ``task_timeout`` (seconds) kills and replaces a worker whose task
    overruns and fails the task with :class:`mpchan.TaskTimeout`.
    ``retries``, as in a stream stage and ``mpchan run``: a task that
    failed -- its call raised, it ran past ``task_timeout``, or its worker
    died running it -- runs again, up to ``retries`` more times, and the
    last failure is its result (a map item is called again in its worker;
    a task that cannot be pickled is not run again).
    ``max_tasks_per_worker`` / ``max_memory_per_worker`` (bytes of RSS)
    recycle a worker between tasks. ``initializer(*initargs)`` runs once in
    each worker; if it raises, the pool is broken (pending tasks and later
    submits fail with :class:`mpchan.WorkerCrashed`). ``ctx``: cancelling it
    fails pending tasks with :class:`mpchan.Cancelled` and stops the
    workers; a drain request stops intake and finishes what is in flight.

    Process safety: every method may be called from any thread of the
    process that made the pool; the pool does not pickle.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        start_method: str | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_worker: int | None = None,
        max_memory_per_worker: int | None = None,
        task_timeout: float | None = None,
        retries: int = 0,
        ctx: Context | None = None,
    ) -> None:
        if workers is None:
            workers = os.cpu_count() or 1
        _policy.count("workers", workers, 1)
        for name, value in (
            ("max_tasks_per_worker", max_tasks_per_worker),
            ("max_memory_per_worker", max_memory_per_worker),
            ("task_timeout", task_timeout),
        ):
            _policy.positive(name, value)
        _policy.count("retries", retries, 0)
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be callable")
        if ctx is not None:
            ctx.check()
        self._nworkers = workers
        own_sup: _supervisor.Supervisor | None = None
        sup = _supervisor.get_supervisor()
        if start_method is not None and start_method != sup.start_method:
            sup = own_sup = _supervisor.Supervisor(start_method, max_idle=0)
        # Before the pool exists: at exit, pools finish before the supervisor
        # stops the processes (the order is _lifecycle's).
        _lifecycle.on_exit("pool", shutdown_all)
        try:
            self._d = Dispatch(
                Settings(
                    workers,
                    initializer=initializer,
                    initargs=tuple(initargs),
                    max_tasks=max_tasks_per_worker,
                    max_memory=max_memory_per_worker,
                    task_timeout=task_timeout,
                    retries=retries,
                    ctx=ctx,
                ),
                sup=sup,
                own_sup=own_sup is not None,
            )
        except BaseException:
            if own_sup is not None:
                own_sup.shutdown()
            raise
        self._metrics_id = str(next(_pool_ids))
        # Dropped without shutdown(): shut down (the exit hook sees to pools
        # still alive at exit).
        self._finalizer = weakref.finalize(self, self._d.close)
        self._finalizer.atexit = False
        _metrics.register(self, Pool._metric_families)

    # -- public API -------------------------------------------------------------

    @property
    def workers(self) -> int:
        """The number of worker processes the pool keeps. Never blocks."""
        return self._nworkers

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` in a worker; return its Future.

        The call is pickled here: if it cannot be, the returned Future holds
        :class:`mpchan.PicklingError` (a :class:`mpchan.SerializationError`
        and a :class:`pickle.PicklingError`) and nothing was sent. A remote
        exception keeps its type (remote traceback as ``__cause__``). A
        function the workers can import goes by reference (functions of
        the program's own script included); one they cannot (a lambda, a
        closure) by value, pickled once and sent once to each worker.
        The returned Future also has ``kill()``: stop the task even while
        it runs (its worker is killed and replaced).

        Blocks: never (tasks queue in the parent when every worker is busy).
        Cancellation: raises :class:`mpchan.ShutdownError` after shutdown or
        drain began, :class:`mpchan.Cancelled` once the pool's ``ctx`` is
        cancelled; ``future.cancel()`` works until a worker starts the task.
        Process safety: any thread.
        """
        return self._d.submit(fn, args, kwargs)

    def map(  # type: ignore[override]
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        ordered: bool = True,
        buffersize: int | None = None,
        progress: bool = False,
    ) -> Iterator[T]:
        """Return an iterator of ``fn(*args)`` for the items of ``iterables`` zipped.

        The input is read lazily: at most ``buffersize`` items (default: a
        few chunks per worker) are submitted and not yet yielded, so an
        endless iterator runs in flat memory. ``chunksize=None`` picks chunk
        sizes from the measured task time (about 5 ms of work per chunk,
        and enough chunks to keep every worker busy). Results come in input
        order (``ordered=False``: as they finish); a task's exception is
        raised when iteration reaches it. Each result is let go as it is
        yielded. ``progress=True`` shows a tqdm progress bar on stderr.

        Blocks: the call submits the first window and returns; iteration
        blocks until the next result is ready.
        Cancellation: ``timeout`` counts from this call; when it passes,
        iteration raises the builtin :class:`TimeoutError` and cancels what
        was not started. A drain (``pool.drain()`` or a draining ``ctx``)
        stops reading the input and yields what was in flight; a cancelled
        ``ctx`` raises :class:`mpchan.Cancelled`.
        Process safety: any thread; one thread iterates a given iterator.
        """
        if chunksize is not None:
            _policy.count("chunksize", chunksize, 1)
        if buffersize is not None:
            _policy.count("buffersize", buffersize, 1)
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        self._d.check_open()
        run = MapRun(self._d, fn, iterables, timeout, chunksize, ordered, buffersize, progress)
        run.top_up()
        return run.results()

    def imap_unordered(
        self,
        fn: Callable[..., T],
        iterable: Iterable[Any],
        *,
        timeout: float | None = None,
        chunksize: int | None = None,
        buffersize: int | None = None,
        progress: bool = False,
    ) -> Iterator[T]:
        """``map(fn, iterable, ordered=False, ...)``: results as they finish.

        Blocks, Cancellation, Process safety: as :meth:`map`.
        """
        return self.map(
            fn,
            iterable,
            timeout=timeout,
            chunksize=chunksize,
            ordered=False,
            buffersize=buffersize,
            progress=progress,
        )

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; finish the queued ones, then stop the workers.

        ``cancel_futures=True`` cancels every task that has not started,
        also those already queued at a worker. The workers exit once nothing
        is left for them (they never go back to the warm cache).

        Blocks: with ``wait=True``, until every task finished and every
        worker process has exited; else never.
        Cancellation: none; idempotent.
        Process safety: any thread, also a Future callback (then it does not wait).
        """
        self._d.shutdown(wait, cancel_futures)

    def drain(self, timeout: float | None = None) -> None:
        """Stop accepting work, finish what is queued and in flight, stop the workers.

        A running ``map`` stops reading its input and yields what was in flight.

        Blocks: until done (every worker process exited), or ``timeout`` seconds.
        Cancellation: on expiry raises the builtin :class:`TimeoutError`;
        the drain goes on in the background.
        Process safety: any thread.
        """
        self._d.drain()
        if not self._d.wait_stopped(timeout):
            raise TimeoutError(f"the pool did not drain within {timeout} s")

    @property
    def draining(self) -> bool:
        """True once shutdown or drain began (or the pool's ctx is draining). Never blocks."""
        return self._d.draining()

    def stats(self) -> dict[str, Any]:
        """Plain data: per worker pid its state, tasks done, RSS and CPU%; queue depth;
        task counters (``submitted``, ``completed`` (answered), ``failed``
        (raised, crashed or timed out), ``crashed``, ``timed_out``,
        ``retried``, ``cancelled``, ``killed``).

        Never blocks (beyond reading /proc through psutil).
        """
        import psutil

        rows, depth, counts = self._d.snapshot()
        workers: dict[int, dict[str, Any]] = {}
        for s, state, done, queued in rows:
            if s.proc is None:
                try:
                    s.proc = psutil.Process(s.worker.pid)
                    s.proc.cpu_percent(None)
                except psutil.Error:
                    pass
            rss: int | None = None
            cpu: float | None = None
            if s.proc is not None:
                try:
                    rss = int(s.proc.memory_info().rss)
                    cpu = float(s.proc.cpu_percent(None))
                except psutil.Error:
                    pass
            workers[s.worker.pid] = {
                "state": state,
                "tasks_done": done,
                "queued": queued,
                "rss": rss,
                "cpu_percent": cpu,
            }
        return {
            "workers": workers,
            "queue_depth": depth,
            "closed": self._d.closed,
            "broken": self._d.broken is not None,
            **counts,
        }

    def _metric_families(self) -> list[_metrics.Family]:
        # A metrics source (see _metrics.register); cheap: counters only.
        _rows, depth, counts = self._d.snapshot()
        labels = {"pool": self._metrics_id}
        return [
            _metrics.Family(
                "mpchan_pool_tasks_submitted_total",
                "counter",
                "Tasks submitted to the pool (a map chunk is one task)",
                [(labels, counts["submitted"])],
            ),
            _metrics.Family(
                "mpchan_pool_tasks_completed_total",
                "counter",
                "Tasks that returned a result",
                [
                    (
                        labels,
                        counts["completed"]
                        - (counts["failed"] - counts["crashed"] - counts["timed_out"]),
                    )
                ],
            ),
            _metrics.Family(
                "mpchan_pool_tasks_failed_total",
                "counter",
                "Tasks that failed: raised, worker crashed or timed out",
                [(labels, counts["failed"])],
            ),
            _metrics.Family(
                "mpchan_pool_queue_depth",
                "gauge",
                "Tasks waiting for a worker",
                [(labels, depth)],
            ),
            _metrics.Family(
                "mpchan_pool_workers",
                "gauge",
                "Worker processes of the pool",
                [(labels, self._d.worker_count())],
            ),
        ]

    def __enter__(self) -> Pool:
        """Return the pool. Never blocks."""
        return self

    def __exit__(self, *exc: object) -> None:
        """``shutdown(wait=True)``.

        Blocks: until every task finished and every worker process exited.
        Cancellation: none. Process safety: the thread that entered the block.
        """
        self.shutdown(wait=True)

    def __repr__(self) -> str:
        d = self._d
        state = "broken" if d.broken else "closed" if d.closed else "open"
        return f"<mpchan.Pool workers={self._nworkers} {state}>"


_pool_ids = iter(range(1, 1 << 62))  # the "pool" label of the metrics
