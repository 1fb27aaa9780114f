"""Pool: a supervised worker pool that is a ``concurrent.futures.Executor`` (layer 7).

Data flow::

    submit/map (caller threads)                        pool workers (processes)
    ---------------------------                        ------------------------
    pickle the call here                              +--> pool_worker_loop (_poolworker)
      | quiet pool (or a map chunk): _assign now -----+      recv_many -> run -> send reply
      v busy pool: append (no lock)                   |          |   (one reply per task,
    _pending (deque) --> _fill: slot.queue += tasks,  |          |    before the next task)
        ^                send_many to slot.ch --------+          v
        |                (a channel per worker)       results (one channel, shared)
        | refill below the low-water mark                        |
        +------------ whoever holds _rx <------------------------+
                      the collector thread ("mpchan-pool-collector"), or a
                      map's caller between its chunks (_poll_replies): take
                      the buffered replies, pop slot.queue heads, complete
                      the Futures, refill in batches. Only the collector
                      handles worker deaths (supervisor callback -> _events
                      + wake), task timeouts and the drain.

Each worker is a supervised process (``_supervisor``: death watch, signals)
running :func:`pool_worker_loop` as one long task; when it ends, the
supervisor completes that task's Future, whose callback tells the collector.

Invariants:
    * ``slot.queue`` lists, oldest first, every task assigned to the worker
      and not answered; the worker runs them in that order and answers each
      before starting the next, so ``slot.queue[0]`` is the one it is
      running (when it is ready and not retiring).
    * ``len(slot.queue) <= _depth <= _DEPTH_MAX <= _TASK_CAPACITY`` (the
      capacity of the slot's channel), so sending to it never blocks.
    * ``_pending`` is FIFO; a submitter appends to it without ``_lock``
      (deque.append is atomic) after checking the pool is open; whoever
      empties it pops item by item (``_take_all``), so a racing append is
      either taken or still queued, and the collector fails what is left
      once no worker can run it.
    * Every task's Future is completed exactly once, by whoever removes the
      task from ``_pending`` or a ``slot.queue`` under ``_lock``.
    * The dead worker's replies are all read before its death is handled:
      they were written before it exited, the death event after.

Ownership:
    * ``_lock`` guards ``_pending``, ``_slots`` and every slot's fields,
      and the pool's state flags; it is never held while a Future is
      completed (callbacks run user code) or a process is started.
    * The result channel is read only under ``_rx``, and what is read is
      handled before ``_rx`` is released (one worker's replies in order;
      Futures are completed under ``_rx``, never under ``_lock``). A map's
      caller takes ``_rx`` only without waiting; a WAKE it reads is sent on.
    * Only the collector thread handles deaths, starts replacement workers
      and closes worker channels (after ``shutdown(wait=False)`` it
      finishes the job on its own).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import pickle
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, InvalidStateError
from functools import partial
from typing import Any, TypeVar

from . import _metrics, _supervisor
from ._channel import Channel
from ._context import Context
from ._errors import (
    Cancelled,
    ChannelClosed,
    EndOfChannel,
    SerializationError,
    ShutdownError,
    TaskTimeout,
    WorkerCrashed,
    WouldBlock,
)
from ._poolmap import MapRun
from ._pooltask import (
    Slot,
    Task,
    copy_error,
    drop_local_tracebacks,
    dump,
    encode_call,
)
from ._poolworker import (
    CALL,
    INIT_FAILED,
    READY,
    RES_HDR,
    RETIRING,
    TASK_HDR,
    WAKE,
    pool_worker_loop,
)
from ._worker import RESULT, decode_reply, describe_callable, encode_task

__all__ = ["Pool"]

T = TypeVar("T")

COLLECTOR_THREAD = "mpchan-pool-collector"
WATCHER_THREAD = "mpchan-pool-ctx"

_DEPTH_MAX = 1024  # most tasks queued at one worker
# Invariant: _TASK_CAPACITY >= _DEPTH_MAX. The rings get room beyond what
# the capacities need, so tasks and replies of up to 64 KiB (a map chunk of
# some thousand small items) travel inline rather than through a payload
# file, which costs a fresh file's pages the first time.
_TASK_CAPACITY = 4096
_RESULTS_CAPACITY = 4096
_TASK_RING_EXTRA = 1 << 20  # > _QUEUE_BYTES + 64 KiB
_RESULTS_RING_EXTRA = 4 << 20
_TICK = 0.05  # longest collector wait when timeouts or drains need watching
_QUEUE_TARGET = 0.01  # seconds of work to keep queued at each worker (> a GIL switch)
_QUEUE_BYTES = 256 * 1024  # most bytes of tasks queued at one worker (ring: 512 KiB)
_STALL_FACTOR = 4  # a task running this many times its expected time ...
_STALL_MIN = 0.002  # ... and at least this long (s) gets nothing queued behind it
_MAX_INIT_CRASHES = 3  # workers dying before ready, in a row, before the pool breaks

_loads = pickle.loads
_dumps = pickle.dumps
_HIGHEST = pickle.HIGHEST_PROTOCOL
_R = RESULT[0]
_WAKE_MSG = RES_HDR.pack(WAKE, 0, 0.0)


class Pool(Executor):
    """A pool of supervised worker processes; a real :class:`concurrent.futures.Executor`.

    ``workers`` (default: the CPU count) processes run tasks; a worker that
    dies fails only the task it was running (:class:`mpchan.WorkerCrashed`,
    or the task runs again while ``retries`` allows) and is replaced.
    ``task_timeout`` (seconds) kills and replaces a worker whose task
    overruns and fails the task with :class:`mpchan.TaskTimeout`.
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
        if isinstance(workers, bool) or not isinstance(workers, int):
            raise TypeError(f"workers must be an int, not {type(workers).__name__}")
        if workers <= 0:
            raise ValueError(f"workers must be > 0, not {workers}")
        for name, value in (
            ("max_tasks_per_worker", max_tasks_per_worker),
            ("max_memory_per_worker", max_memory_per_worker),
            ("task_timeout", task_timeout),
        ):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or None, not {value}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, not {retries}")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be callable")
        if ctx is not None:
            ctx.check()
        self._nworkers = workers
        self._own_sup: _supervisor.Supervisor | None = None
        sup = _supervisor.get_supervisor()
        if start_method is not None and start_method != sup.start_method:
            sup = self._own_sup = _supervisor.Supervisor(start_method, max_idle=0)
        self._sup = sup
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._max_tasks = max_tasks_per_worker
        self._max_memory = max_memory_per_worker
        self._task_timeout = task_timeout
        self._retries = retries
        self._ctx = ctx
        self._loop_args: bytes | None = None
        self._tids = itertools.count()
        self._lock = threading.Lock()
        # Held by whoever takes replies from the result channel and handles
        # them (the collector, or a map's caller between chunks): the
        # replies of one worker must be handled in the order they came.
        self._rx = threading.Lock()
        self._pending: deque[Task] = deque()
        self._slots: dict[int, Slot] = {}
        self._events: deque[tuple[int, Future[bytes]]] = deque()
        self._closed = False  # no more submits (shutdown, drain, cancel, broken)
        self._stopping = False  # workers are told to leave once nothing is left
        self._drained = False  # closed by a drain: a running map ends quietly
        self._deferred = False  # a refill did not fit: retry soon
        self._parked = False  # the collector waits for replies (submit must wake it)
        self._woken = False  # a wake-up is on its way to the collector
        self._broken: BaseException | None = None
        self._init_crashes = 0
        self._ema = 0.0  # seconds per task (exponential average)
        self._depth = 1  # tasks queued per worker; grows once tasks prove short
        self._submitted = 0
        self._counts = {"completed": 0, "crashed": 0, "timed_out": 0, "retried": 0}
        self._raised = 0  # answered tasks that failed (written by the collector only)
        self._metrics_id = str(next(_pool_ids))
        self._done_event = threading.Event()
        self._results: Channel | None = Channel(_RESULTS_CAPACITY, _ring_extra=_RESULTS_RING_EXTRA)
        self._collector = threading.Thread(target=self._collect, name=COLLECTOR_THREAD, daemon=True)
        self._watcher: threading.Thread | None = None
        try:
            for _ in range(workers):
                self._start_slot()
        except BaseException:
            self._abort()
            raise
        self._collector.start()
        if ctx is not None:
            self._watcher = threading.Thread(
                target=self._watch_ctx, name=WATCHER_THREAD, daemon=True
            )
            self._watcher.start()
        _live_pools.add(self)
        _metrics.register(self, Pool._metric_families)

    # -- public API -------------------------------------------------------------

    @property
    def workers(self) -> int:
        """The number of worker processes the pool keeps. Never blocks."""
        return self._nworkers

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` in a worker; return its Future.

        The call is pickled here: if it cannot be, the returned Future holds
        :class:`mpchan.SerializationError` and nothing was sent. A remote
        exception keeps its type (remote traceback as ``__cause__``).

        Blocks: never (tasks queue in the parent when every worker is busy).
        Cancellation: raises :class:`mpchan.ShutdownError` after shutdown or
        drain began, :class:`mpchan.Cancelled` once the pool's ``ctx`` is
        cancelled; ``future.cancel()`` works until a worker was given the task.
        Process safety: any thread.
        """
        try:
            msg = TASK_HDR.pack(0, CALL) + encode_call(fn, args, kwargs)
        except Exception as e:
            name = describe_callable(fn)
            self._check_open()
            fut: Future[Any] = Future()
            err = SerializationError(f"cannot pickle the task {name}: {type(e).__name__}: {e}")
            err.__cause__ = e
            fut.set_exception(err)
            return fut
        return self._submit_msg(msg, fn, CALL, 1, None).future

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
        raised when iteration reaches it. ``progress=True`` shows a tqdm
        progress bar on stderr.

        Blocks: the call submits the first window and returns; iteration
        blocks until the next result is ready.
        Cancellation: ``timeout`` counts from this call; when it passes,
        iteration raises the builtin :class:`TimeoutError` and cancels what
        was not started. A drain (``pool.drain()`` or a draining ``ctx``)
        stops reading the input and yields what was in flight; a cancelled
        ``ctx`` raises :class:`mpchan.Cancelled`.
        Process safety: any thread; one thread iterates a given iterator.
        """
        if chunksize is not None and chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, not {chunksize}")
        if buffersize is not None and buffersize < 1:
            raise ValueError(f"buffersize must be >= 1, not {buffersize}")
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        self._check_open()
        run = MapRun(self, fn, iterables, timeout, chunksize, ordered, buffersize, progress)
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

        ``cancel_futures=True`` cancels the tasks no worker was given yet.
        Workers leave once nothing is left for them; a worker without an
        initializer goes back to the warm cache, others exit.

        Blocks: with ``wait=True``, until every task finished and every
        worker left the pool; else never.
        Cancellation: none; idempotent.
        Process safety: any thread, also a Future callback (then it does not wait).
        """
        cancelled: list[Task] = []
        with self._lock:
            self._closed = True
            self._stopping = True
            if cancel_futures:
                cancelled = _take_all(self._pending)
        for task in cancelled:
            task.future.cancel()
        self._wake()
        if wait and threading.current_thread() is not self._collector:
            self._wait_stopped(None)

    def drain(self, timeout: float | None = None) -> None:
        """Stop accepting work, finish what is queued and in flight, stop the workers.

        A running ``map`` stops reading its input and yields what was in flight.

        Blocks: until done, or ``timeout`` seconds.
        Cancellation: on expiry raises the builtin :class:`TimeoutError`;
        the drain goes on in the background.
        Process safety: any thread.
        """
        self._drained = True
        self.shutdown(wait=False)
        if not self._wait_stopped(timeout):
            raise TimeoutError(f"the pool did not drain within {timeout} s")

    @property
    def draining(self) -> bool:
        """True once shutdown or drain began (or the pool's ctx is draining). Never blocks."""
        return self._closed or (self._ctx is not None and self._ctx.draining)

    def stats(self) -> dict[str, Any]:
        """Plain data: per worker pid its state, tasks done, RSS and CPU%; queue depth;
        task counters (``submitted``, ``completed`` (answered), ``failed``
        (raised, crashed or timed out), ``crashed``, ``timed_out``, ``retried``).

        Never blocks (beyond reading /proc through psutil).
        """
        import psutil

        with self._lock:
            slots = list(self._slots.values())
            rows = []
            for s in slots:
                if s.proc is None:
                    with contextlib.suppress(psutil.Error):
                        s.proc = psutil.Process(s.worker.pid)
                        s.proc.cpu_percent(None)
                state = (
                    "retiring"
                    if s.retiring
                    else "starting"
                    if not s.ready
                    else "busy"
                    if s.queue
                    else "idle"
                )
                rows.append((s, state, s.done, len(s.queue)))
            depth = len(self._pending)
            counts = dict(self._counts, submitted=self._submitted)
            counts["failed"] = self._raised + counts["crashed"] + counts["timed_out"]
        workers: dict[int, dict[str, Any]] = {}
        for s, state, done, queued in rows:
            rss: int | None = None
            cpu: float | None = None
            if s.proc is not None:
                with contextlib.suppress(psutil.Error):
                    rss = int(s.proc.memory_info().rss)
                    cpu = float(s.proc.cpu_percent(None))
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
            "closed": self._closed,
            "broken": self._broken is not None,
            **counts,
        }

    def _metric_families(self) -> list[_metrics.Family]:
        # A metrics source (see _metrics.register); cheap: counters only.
        with self._lock:
            depth = len(self._pending)
            workers = len(self._slots)
            counts = dict(self._counts)
            raised = self._raised
        submitted = self._submitted
        labels = {"pool": self._metrics_id}
        failed = raised + counts["crashed"] + counts["timed_out"]
        return [
            _metrics.Family(
                "mpchan_pool_tasks_submitted_total",
                "counter",
                "Tasks submitted to the pool (a map chunk is one task)",
                [(labels, submitted)],
            ),
            _metrics.Family(
                "mpchan_pool_tasks_completed_total",
                "counter",
                "Tasks that returned a result",
                [(labels, counts["completed"] - raised)],
            ),
            _metrics.Family(
                "mpchan_pool_tasks_failed_total",
                "counter",
                "Tasks that failed: raised, worker crashed or timed out",
                [(labels, failed)],
            ),
            _metrics.Family(
                "mpchan_pool_queue_depth",
                "gauge",
                "Tasks waiting for a worker",
                [(labels, depth)],
            ),
            _metrics.Family(
                "mpchan_pool_workers", "gauge", "Worker processes of the pool", [(labels, workers)]
            ),
        ]

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)

    def __repr__(self) -> str:
        state = "broken" if self._broken else "closed" if self._closed else "open"
        return f"<mpchan.Pool workers={self._nworkers} {state}>"

    # -- submission -------------------------------------------------------------

    def _quiet_stop(self) -> bool:
        # True when intake stopped because of a drain (not a shutdown,
        # cancellation or breakage): a running map then ends normally.
        if self._ctx is not None and self._ctx.cancelled:
            return False
        if self._broken is not None:
            return False
        return self._drained or (self._ctx is not None and self._ctx.draining)

    def _check_open(self) -> None:
        if self._ctx is not None and self._ctx.cancelled:
            self._ctx.check()
        if self._broken is not None:
            raise WorkerCrashed(f"the pool is broken: {self._broken}") from self._broken
        if self._closed:
            raise ShutdownError("cannot submit to a pool after shutdown or drain began")

    def _submit_msg(self, msg: bytes, fn: Any, kind: int, n: int, owner: Any) -> Task:
        if self._closed or self._broken is not None or self._ctx is not None:
            if self._ctx is not None and self._ctx.draining:
                with self._lock:
                    self._drained = self._closed = True
            self._check_open()
        tid = next(self._tids)
        # The header's task id is patched in place of the placeholder 0.
        msg = TASK_HDR.pack(tid, kind) + memoryview(msg)[TASK_HDR.size :]
        task = Task(tid, msg, fn, self._retries, kind, n, owner)
        self._submitted += 1
        if not self._pending and (self._parked or kind != CALL):
            # The pool is quiet (the collector waits): hand the task to an
            # idle worker now, for the lowest latency. A map chunk goes to
            # the least loaded worker with room even while the collector
            # runs: chunks are few and big, so a wake-up each is cheap, and
            # waiting for the collector to dispatch one can idle a worker.
            with self._lock:
                if not self._pending:
                    slot = self._direct_slot(kind, len(msg))
                    if slot is not None:
                        self._assign(slot, task)
                        return task
        # Otherwise the collector dispatches in batches: one wake-up per
        # batch for each worker, and none while it runs. A lock-free append
        # (atomic under the GIL) keeps a submitting loop fast.
        self._pending.append(task)
        if self._parked and not self._woken:
            self._woken = True
            self._wake()
        return task

    def _submit_chunk(self, fn: Any, items: Sequence[Any], kind: int, owner: Any) -> Task:
        name = describe_callable(fn)
        try:
            msg = TASK_HDR.pack(0, kind) + dump((fn, items), fn)
        except Exception as e:
            self._check_open()
            task = Task(-1, b"", fn, 0, kind, len(items), None)
            err = SerializationError(f"cannot pickle a task of {name}: {type(e).__name__}: {e}")
            err.__cause__ = e
            task.future.set_exception(err)
            return task
        return self._submit_msg(msg, fn, kind, len(items), owner)

    def _direct_slot(self, kind: int, size: int) -> Slot | None:
        # Caller holds _lock. A single call only to an idle worker; a chunk
        # to the shortest queue below the refill mark with bytes to spare.
        best: Slot | None = None
        best_load = (0.0, 0)
        now = time.monotonic()
        low = self._depth // 2
        for s in self._slots.values():
            if s.retiring or not self._may_take(s) or self._stalled(s, now):
                continue
            n = len(s.queue)
            if kind == CALL:
                if n == 0:
                    return s
            elif n <= low and (n == 0 or sum(len(t.msg) for t in s.queue) + size <= _QUEUE_BYTES):
                # Chunks differ in size: the one with the least work queued
                # (then the shortest queue: its work may be unknown yet).
                load = (_queued_seconds(s, now) if n else 0.0, n)
                if best is None or load < best_load:
                    best, best_load = s, load
        return best

    def _may_take(self, slot: Slot) -> bool:
        # Caller holds _lock.
        return self._max_tasks is None or slot.assigned < self._max_tasks

    def _assign(self, slot: Slot, task: Task) -> bool:
        # Caller holds _lock. False if the task was cancelled meanwhile.
        if not self._claim(slot, task):
            return False
        # Never blocks: fewer than _DEPTH_MAX messages are queued (Invariants).
        slot.ch.send(task.msg)
        return True

    def _claim(self, slot: Slot, task: Task) -> bool:
        # Caller holds _lock: record that ``slot`` runs ``task`` (not sent yet).
        if not task.running:
            if not task.future.set_running_or_notify_cancel():
                return False
            task.running = True
        q = slot.queue
        if not q:
            slot.started_at = time.monotonic()
        q.append(task)
        slot.assigned += 1
        return True

    def _fill(self, slot: Slot) -> None:
        # Caller holds _lock. One send_many (one wake-up) per call, and never
        # a blocking one: the collector must always go back to reading
        # replies, or a worker blocked on a full result channel and this
        # thread blocked on that worker's full task channel would wait for
        # each other. What does not fit now goes back to _pending.
        pending = self._pending
        if not pending or slot.retiring or self._stalled(slot, time.monotonic()):
            return
        room = self._depth - len(slot.queue)
        if self._max_tasks is not None:
            room = min(room, self._max_tasks - slot.assigned)
        # A fair share of what waits: one worker must not take every queued
        # task while another has room (tasks may be long: few and big).
        room = min(room, -(-len(pending) // max(1, len(self._slots))))
        queued = sum(len(t.msg) for t in slot.queue) if slot.queue else 0
        msgs: list[bytes] = []
        claimed: list[Task] = []
        while room > 0 and pending:
            if queued and queued + len(pending[0].msg) > _QUEUE_BYTES:
                break  # the ring of the worker's channel stays far from full
            task = pending.popleft()
            if self._claim(slot, task):
                msgs.append(task.msg)
                claimed.append(task)
                queued += len(task.msg)
                room -= 1
        if not msgs:
            return
        ch = slot.ch
        before = ch.stats()["sent"]
        try:
            ch.send_many(msgs, timeout=0)
        except (TimeoutError, ChannelClosed):
            # Only this thread sends to the channel now (we hold _lock), so
            # the counter tells how many went; take the others back.
            sent = ch.stats()["sent"] - before
            unsent = claimed[sent:]
            for _ in unsent:
                slot.queue.pop()
            slot.assigned -= len(unsent)
            pending.extendleft(reversed(unsent))
            self._deferred = True

    def _has_room(self) -> bool:
        # Caller holds _lock.
        depth = self._depth
        low = depth // 2
        now = time.monotonic()
        return any(
            len(s.queue) <= low
            and not s.retiring
            and self._may_take(s)
            and not self._stalled(s, now)
            for s in self._slots.values()
        )

    def _stalled(self, slot: Slot, now: float) -> bool:
        # Caller holds _lock. The worker's running task overran its expected
        # time (its map's time per item, else the pool's average task) by
        # far: nothing more is queued behind it until it answers.
        q = slot.queue
        if not q:
            return False
        expected = _expected_seconds(q[0], self._ema)
        return now - slot.started_at > max(_STALL_FACTOR * expected, _STALL_MIN)

    def _dispatch(self) -> None:
        with self._lock:
            if not self._pending:
                return
            low = self._depth // 2
            for s in sorted(self._slots.values(), key=lambda s: len(s.queue)):
                if len(s.queue) <= low:
                    self._fill(s)

    # -- workers ----------------------------------------------------------------

    def _start_slot(self) -> None:
        worker = self._sup.acquire()
        try:
            ch = Channel(_TASK_CAPACITY, _ring_extra=_TASK_RING_EXTRA)
            request = encode_task(
                pool_worker_loop,
                (
                    ch,
                    self._results_channel(),
                    worker.id,
                    self._initializer,
                    self._initargs,
                    self._max_tasks,
                    self._max_memory,
                    self._initializer is not None,
                ),
                {},
            )
        except BaseException:
            self._sup.release(worker)
            raise
        slot = Slot(worker, ch)
        with self._lock:
            self._slots[slot.wid] = slot
            self._fill(slot)
        loop = self._sup.run(worker, request, name="mpchan pool worker", release=False)
        slot.loop = loop
        loop.add_done_callback(partial(self._on_loop_done, slot.wid))

    def _results_channel(self) -> Channel:
        rch = self._results
        if rch is None:
            raise ShutdownError("the pool is shut down")
        return rch

    def _on_loop_done(self, wid: int, loop: Future[bytes]) -> None:
        # Runs on the supervisor thread (or here, if already done): hand over.
        self._events.append((wid, loop))
        self._wake()

    def _wake(self) -> None:
        rch = self._results
        if rch is not None:
            # ValueError: the segment was detached at interpreter exit.
            with contextlib.suppress(WouldBlock, ChannelClosed, OSError, ValueError):
                rch.send_nowait(_WAKE_MSG)

    def _abort(self) -> None:
        # __init__ failed: give back what was made.
        with self._lock:
            slots = list(self._slots.values())
            self._slots.clear()
            self._closed = True
        for s in slots:
            s.ch.close()
            with contextlib.suppress(OSError):
                os.kill(s.worker.pid, signal.SIGKILL)
        for s in slots:
            if s.loop is not None:
                with contextlib.suppress(BaseException):
                    s.loop.exception(timeout=5)
        rch, self._results = self._results, None
        if rch is not None:
            rch.close()
        if self._own_sup is not None:
            self._own_sup.shutdown()

    # -- the collector thread -----------------------------------------------------

    def _collect(self) -> None:
        rch = self._results
        assert rch is not None
        try:
            while True:
                timeout = _TICK if (self._task_timeout or self._stopping) else 1.0
                if self._deferred:
                    self._deferred = False
                    timeout = 0.001
                self._dispatch()
                with self._lock:
                    # Submitters wake this thread only when it could hand their
                    # task to a worker; when every worker is full, the next
                    # reply wakes it anyway.
                    self._parked = self._has_room()
                    self._woken = False
                if not self._take_replies(rch):
                    rch._wait_readable(timeout)
                    self._take_replies(rch)
                self._parked = False
                if self._events:
                    with self._rx:
                        # Replies sent before a worker died are handled first:
                        # they must not be blamed on the crash.
                        while len(rch):
                            self._on_replies(rch._recv_many_nowait(512))
                        while self._events:
                            wid, loop = self._events.popleft()
                            self._on_worker_gone(wid, loop)
                if self._task_timeout is not None:
                    self._check_timeouts()
                if self._stopping and self._stop_idle_workers():
                    break
        except BaseException as e:  # a bug here must not hang every caller
            self._break(e)
            raise
        finally:
            self._finish()

    def _take_replies(self, rch: Channel) -> bool:
        # The collector: handle what is buffered now. True if there was any.
        with self._rx:
            items = rch._recv_many_nowait(512)
            if items:
                self._on_replies(items)
        return bool(items)

    def _poll_replies(self) -> int:
        """Handle buffered replies in the calling thread (a map's caller, between
        chunks); return how many tasks they settled.

        A thread busy with Python code keeps the GIL for a whole switch
        interval (5 ms) before a waiting thread gets it, so replies left to the
        collector while the caller pickles and unpickles chunks wait that
        long; handled here they wait for nothing. Never blocks: returns 0 when
        the collector is handling replies itself.
        """
        rch = self._results
        if rch is None or not len(rch) or not self._rx.acquire(blocking=False):
            return 0
        try:
            settled, woke = self._on_replies(rch._recv_many_nowait(512))
        except (EndOfChannel, ChannelClosed, ValueError):
            return 0  # the pool is closing: the collector sees to the rest
        finally:
            self._rx.release()
        if woke:
            self._wake()  # it was meant for the collector: pass it on
        return settled

    def _wait_replies(self, timeout: float) -> None:
        """Park the calling thread (a map's caller with nothing to do) until a
        reply is buffered, its waiter is woken, or ``timeout`` passes; then the
        caller polls. While another thread handles replies, wait for it to
        finish instead. Blocks: up to ``timeout``.
        """
        rch = self._results
        if rch is None:
            return
        if len(rch):
            # Buffered, and not taken by _poll_replies: the collector has them.
            if self._rx.acquire(timeout=timeout):
                self._rx.release()
            return
        with contextlib.suppress(ChannelClosed, ValueError):
            rch._wait_readable(timeout, every=True)

    def _on_replies(self, items: list[bytes]) -> tuple[int, bool]:
        # Caller holds _rx. Returns (tasks settled, a WAKE was among them).
        done: list[tuple[Task, memoryview, int]] = []
        woke = False
        now = time.monotonic()
        with self._lock:
            slots = self._slots
            for msg in items:
                tid, wid, secs = RES_HDR.unpack_from(msg)
                if tid < 0:
                    if tid == WAKE:
                        woke = True
                    self._on_control(tid, wid, msg, now)
                    continue
                slot = slots.get(wid)
                if slot is None or not slot.queue or slot.queue[0].tid != tid:
                    continue  # a reply for a task already settled (cancelled pool)
                task = slot.queue.popleft()
                slot.done += 1
                if slot.queue:
                    slot.started_at = now
                if task.owner is not None:
                    task.owner.observe(secs, task.n)
                self._ema = secs if not self._ema else 0.8 * self._ema + 0.2 * secs
                done.append((task, memoryview(msg)[RES_HDR.size :], wid))
            if done:
                self._counts["completed"] += len(done)
                ema = self._ema
                self._depth = (
                    1
                    if ema > 0.01
                    else max(2, min(_DEPTH_MAX, int(_QUEUE_TARGET / max(ema, 1e-6)) + 1))
                )
                if self._pending:
                    # Refill below the low-water mark only, in one batch: a
                    # worker woken for every task would cost a wake-up each.
                    # Only the workers that answered, and idle ones: one that
                    # is still on its task gets more when it answers (its
                    # task may be long: nothing should wait behind it).
                    low = self._depth // 2
                    answered = {wid for _, _, wid in done}
                    for s in slots.values():
                        if len(s.queue) <= low and (s.wid in answered or not s.queue):
                            self._fill(s)
        for task, reply, wid in done:
            self._settle(task, reply, wid)
        return len(done), woke

    def _settle(self, task: Task, reply: memoryview, wid: int) -> None:
        fut = task.future
        if task.owner is not None and reply[0] == _R:
            # A map chunk: its caller unpickles the values when it needs them,
            # so this thread is back at the result channel sooner.
            with contextlib.suppress(InvalidStateError):
                fut.set_result(reply[1:])
            return
        try:
            if reply[0] == _R:
                try:
                    value = _loads(reply[1:])
                except BaseException as e:
                    err = SerializationError(
                        f"cannot unpickle the result of {task.name}: {type(e).__name__}: {e}"
                    )
                    err.__cause__ = e
                    raise err from e
            else:
                where = f"pool worker {wid} running {task.name}"
                value = decode_reply(bytes(reply), where=where)
        except BaseException as e:
            self._raised += 1
            drop_local_tracebacks(e)
            with contextlib.suppress(InvalidStateError):
                fut.set_exception(e)
            return
        if task.kind != CALL and value[1] is not None:
            self._raised += 1  # a map chunk that stopped at an exception
        with contextlib.suppress(InvalidStateError):
            fut.set_result(value)

    def _on_control(self, tid: int, wid: int, msg: bytes, now: float) -> None:
        # Caller holds _lock.
        slot = self._slots.get(wid)
        if slot is None:
            return
        if tid == READY:
            slot.ready = True
            self._init_crashes = 0
            if slot.queue:
                slot.started_at = now
        elif tid == RETIRING:
            slot.retiring = True
        elif tid == INIT_FAILED and self._broken is None:
            try:
                decode_reply(msg[RES_HDR.size :], where=f"pool worker {wid} initializer")
            except BaseException as e:
                drop_local_tracebacks(e)
                broken = WorkerCrashed(
                    f"the pool's initializer failed in worker {wid} (pid {slot.worker.pid}): "
                    f"{type(e).__name__}: {e}",
                    pid=slot.worker.pid,
                    cause="initializer failed",
                )
                broken.__cause__ = e
                self._broken = broken
                self._closed = True

    def _on_worker_gone(self, wid: int, loop: Future[bytes]) -> None:
        exc = loop.exception()
        crashed: Task | None = None
        with self._lock:
            slot = self._slots.pop(wid, None)
            if slot is None:
                return
            # Whatever is still in its channel never started: take it back.
            with contextlib.suppress(Exception):
                while len(slot.ch):
                    slot.ch.recv_many(_DEPTH_MAX)
            slot.ch.close()
            tasks = list(slot.queue)
            slot.queue.clear()
            died = isinstance(exc, WorkerCrashed)
            if tasks and died and slot.ready and not slot.retiring:
                crashed = tasks.pop(0)
            if died and not slot.ready and not slot.retiring:
                self._init_crashes += 1
                if self._init_crashes >= _MAX_INIT_CRASHES and self._broken is None:
                    self._broken = WorkerCrashed(
                        f"{_MAX_INIT_CRASHES} pool workers in a row died before they were ready"
                    )
                    self._broken.__cause__ = exc
                    self._closed = True
            if crashed is not None and slot.timed_out != crashed.tid and crashed.retries > 0:
                crashed.retries -= 1
                self._counts["retried"] += 1
                tasks.insert(0, crashed)
                crashed = None
            self._pending.extendleft(reversed(tasks))
            # While stopping, a worker is still replaced if queued work needs it.
            replace = self._broken is None and (not self._stopping or bool(self._pending))
        if crashed is not None:
            if slot.timed_out == crashed.tid:
                self._counts["timed_out"] += 1
                err: BaseException = TaskTimeout(
                    f"{crashed.name} ran longer than task_timeout={self._task_timeout} s in "
                    f"pool worker {wid} (pid {slot.worker.pid}); the worker was replaced"
                )
            else:
                self._counts["crashed"] += 1
                err = _supervisor.crashed_error(
                    slot.worker, getattr(exc, "exitcode", None), crashed.name
                )
            with contextlib.suppress(InvalidStateError):
                crashed.future.set_exception(err)
        if exc is None:
            # The loop returned: the worker is held by us and reusable.
            with contextlib.suppress(Exception):
                self._sup.release(slot.worker)
        if self._broken is not None:
            self._fail_all(self._broken)
            return
        if replace:
            try:
                self._start_slot()
            except BaseException as e:
                self._break(e)
        else:
            with self._lock:
                for s in self._slots.values():
                    self._fill(s)

    def _check_timeouts(self) -> None:
        limit = self._task_timeout
        assert limit is not None
        now = time.monotonic()
        with self._lock:
            for s in self._slots.values():
                if (
                    s.queue
                    and s.ready
                    and not s.retiring
                    and s.timed_out < 0
                    and now - s.started_at > limit
                ):
                    s.timed_out = s.queue[0].tid
                    with contextlib.suppress(OSError):
                        os.kill(s.worker.pid, signal.SIGKILL)

    def _stop_idle_workers(self) -> bool:
        # Shutting down: tell workers with nothing left to leave. True once
        # no worker is left.
        with self._lock:
            if self._pending:
                if self._slots and self._broken is None:
                    return False  # the workers still have work
                # Nobody will run these (a submit raced with the end): fail them.
                stranded = _take_all(self._pending)
            else:
                stranded = []
            for s in self._slots.values():
                if not s.queue and not s.ch.closed:
                    s.retiring = True
                    s.ch.close()
            done = not self._slots
        for task in stranded:
            with contextlib.suppress(InvalidStateError):
                task.future.set_exception(
                    copy_error(self._broken or ShutdownError("the pool shut down"))
                )
        return done

    def _break(self, exc: BaseException) -> None:
        with self._lock:
            if self._broken is None:
                self._broken = exc
            self._closed = True
        self._fail_all(self._broken or exc)

    def _fail_all(self, exc: BaseException, kill: bool = False) -> None:
        with self._lock:
            tasks = _take_all(self._pending)
            self._closed = True
            self._stopping = True
            slots = list(self._slots.values())
            for s in slots:
                tasks.extend(s.queue)
                s.queue.clear()
                if kill:
                    s.retiring = True
        for task in tasks:
            with contextlib.suppress(InvalidStateError):
                task.future.set_exception(copy_error(exc))
        for s in slots:
            if kill:
                with contextlib.suppress(OSError):
                    os.kill(s.worker.pid, signal.SIGKILL)
            else:
                with contextlib.suppress(ValueError):
                    s.ch.close()

    def _finish(self) -> None:
        # The collector is leaving: no worker is left (or the pool broke).
        with self._lock:
            slots = list(self._slots.values())
            self._slots.clear()
            self._closed = True
        for s in slots:
            with contextlib.suppress(ValueError):
                s.ch.close()
            with contextlib.suppress(OSError):
                os.kill(s.worker.pid, signal.SIGKILL)
            if s.loop is not None:
                with contextlib.suppress(BaseException):
                    s.loop.exception(timeout=5)
        rch, self._results = self._results, None
        if rch is not None:
            with contextlib.suppress(ValueError):
                rch.close()  # and dropped: its shared memory goes with the last holder
        del slots, rch
        if self._own_sup is not None:
            self._own_sup.shutdown()
        _live_pools.discard(self)
        self._done_event.set()

    def _wait_stopped(self, timeout: float | None) -> bool:
        if not self._collector.is_alive() and not self._done_event.is_set():
            return True  # never started
        done = self._done_event.wait(timeout)
        if done:
            self._collector.join()
            if self._watcher is not None and self._watcher is not threading.current_thread():
                self._watcher.join()
        return done

    # -- context --------------------------------------------------------------------

    def _watch_ctx(self) -> None:
        ctx = self._ctx
        assert ctx is not None
        draining = False
        while not self._done_event.is_set():
            if ctx.wait(_TICK * 2):
                err = ctx.err() or Cancelled()
                self._fail_all(err, kill=True)
                self._wake()
                return
            if not draining and ctx.draining:
                draining = True
                with self._lock:
                    self._drained = True
                    self._closed = True
                    self._stopping = True
                self._wake()


def _take_all(pending: deque[Task]) -> list[Task]:
    # Empty a deque that submitters append to without the lock: popleft and
    # append are each atomic, so a task appended meanwhile is either taken
    # here or stays queued -- never lost, as list() + clear() could lose it.
    taken = []
    with contextlib.suppress(IndexError):
        while True:
            taken.append(pending.popleft())
    return taken


_live_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


def _expected_seconds(task: Task, unknown: float) -> float:
    # A map chunk's items times its map's measured time per item; ``unknown``
    # for a single call, or before the map measured anything.
    per_item = getattr(task.owner, "per_item", None)
    return task.n * per_item if per_item else unknown


def _queued_seconds(slot: Slot, now: float) -> float:
    # Caller holds _lock. The work queued at a worker, from each map's time
    # per item (0 where unknown); the running task counts what it has left.
    total = 0.0
    for i, t in enumerate(slot.queue):
        expected = _expected_seconds(t, 0.0)
        if i == 0:
            expected = max(0.0, expected - (now - slot.started_at))
        total += expected
    return total


_pool_ids = itertools.count(1)  # the "pool" label of the metrics
_EXIT_GRACE = 5.0


def _shutdown_pools() -> None:
    # At interpreter exit, before the supervisor stops the processes and
    # shared memory is detached (atexit runs this first: registered later).
    for pool in list(_live_pools):
        with contextlib.suppress(Exception):
            pool.shutdown(wait=False, cancel_futures=True)
            if not pool._wait_stopped(_EXIT_GRACE):
                pool._fail_all(ShutdownError("the program is exiting"), kill=True)
                pool._wait_stopped(_EXIT_GRACE)


atexit.register(_shutdown_pools)
