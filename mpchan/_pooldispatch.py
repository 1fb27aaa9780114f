"""The dispatch of a Pool: queue, workers, replies, deaths (layer 7).

``Pool`` (``_pool``) is the public facade; a :class:`Dispatch` is everything
behind it, and holds no reference to the facade, so a pool that its program
drops is collected and shut down (its finalizer calls :meth:`Dispatch.close`)
although the collector thread lives on until the workers are gone.

Data flow::

    submit/map (caller threads)                        pool workers (processes)
    ---------------------------                        ------------------------
    pickle the call here                              +--> pool_worker_loop (_poolworker)
      | quiet pool (or a map chunk): _assign now -----+      recv -> run -> send reply
      v busy pool: append (no lock)                   |          |   (one reply per task,
    _pending (deque) --> _fill: slot.queue += tasks,  |          |    before the next recv)
        ^                send_many to slot.ch --------+          v
        |                (a channel per worker)       results (one channel, shared)
        | refill below the low-water mark                        |
        +------------ whoever holds _rx <------------------------+
                      the collector thread ("mpchan-pool-collector"), or a
                      map's caller between its chunks (poll_replies): take
                      the buffered replies, pop slot.queue heads, complete
                      the Futures, refill in batches. Only the collector
                      handles worker deaths (supervisor callback -> _events
                      + wake), task timeouts and the end.

    cancel(task queued at a worker): under _lock, drain that worker's
    channel (what is there has not started), drop the task, send the rest
    back in the same order.

Each worker is a fresh supervised process (``_supervisor``: death watch,
signals) running :func:`pool_worker_loop` as one long task, and exits when
the pool is done with it (never back to the warm cache: the pool's
initializer and tasks leave state behind). When it ends, the supervisor
completes that task's Future, whose callback tells the collector.

Lifecycle (``_state``, forward only)::

    OPEN --shutdown--> SHUTDOWN --(nothing left, workers gone)--> collector ends
      |  \\--drain---> DRAINING (a running map ends quietly)       (_done set)
      \\-- initializer failed / workers die before ready / a bug --> BROKEN

Invariants:
    * ``slot.queue`` lists, oldest first, every task assigned to the worker
      and not answered; the worker runs them in that order and answers each
      before it takes the next message, so ``slot.queue[0]`` is the one it
      runs (when it is ready and not retiring) and the others have not
      started -- those still in its channel can be taken back.
    * ``len(slot.queue) <= _depth <= _DEPTH_MAX <= _TASK_CAPACITY`` (the
      capacity of the slot's channel; DEFINE messages ride in the spare
      room of the ring), so sending to it never blocks.
    * ``slot.fns`` is the worker's table of functions by value: a DEFINE
      for a key is sent before the first task that needs it, and the table
      is updated only for messages that were sent.
    * ``_pending`` is FIFO; a submitter appends to it without ``_lock``
      (deque.append is atomic) after checking the pool is open; whoever
      empties it pops item by item (``_take_all``), so a racing append is
      either taken or still queued, and the collector fails what is left
      once no worker can run it.
    * Every task's Future is completed exactly once, by whoever removes the
      task from ``_pending`` or a ``slot.queue`` under ``_lock``; a task is
      started (RUNNING) when it becomes the head of its worker's queue.
    * A worker's replies are all handled before its death is: they were
      written before it exited, the death event after, and the collector
      reads the result channel dry before each death it handles. So a crash
      fails (or retries) only the task that was running, and a task runs
      again only when it is retried.

Ownership:
    * ``_lock`` guards ``_pending``, ``_slots``, every slot's and task's
      fields and ``_state``; it is never held while a Future is completed
      (callbacks run user code) or a process is started.
    * The result channel is read only under ``_rx``, and what is read is
      handled before ``_rx`` is released (one worker's replies in order;
      Futures are completed under ``_rx``, never under ``_lock``). A map's
      caller takes ``_rx`` only without waiting; a WAKE it reads is sent on.
    * Only the collector thread handles deaths, starts replacement workers
      and closes worker channels (after ``shutdown(wait=False)`` it
      finishes the job on its own).

Lock order: ``_rx`` before ``_lock``.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import os
import pickle
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import CANCELLED, PENDING, RUNNING
from functools import partial
from typing import Any

from . import _supervisor
from ._channel import Channel
from ._codec import (
    FunctionCache,
    cannot_pickle,
    cannot_unpickle,
    pickle_value,
    release_unread,
)
from ._context import Context
from ._errors import (
    Cancelled,
    ChannelClosed,
    EndOfChannel,
    ShutdownError,
    TaskTimeout,
    WorkerCrashed,
    WouldBlock,
)
from ._pooltask import PoolFuture, Slot, Task, copy_error, drop_local_tracebacks
from ._poolworker import (
    CALL,
    DEFINE,
    FN_SLOTS,
    INIT_FAILED,
    READY,
    RES_HDR,
    RETIRING,
    TASK_HDR,
    WAKE,
    pool_worker_loop,
)
from ._worker import RESULT, decode_reply, describe_callable, encode_task

__all__ = ["COLLECTOR_THREAD", "WATCHER_THREAD", "Dispatch", "State", "shutdown_all"]

COLLECTOR_THREAD = "mpchan-pool-collector"
WATCHER_THREAD = "mpchan-pool-ctx"

_DEPTH_MAX = 1024  # most tasks queued at one worker
# Invariant: _TASK_CAPACITY >= _DEPTH_MAX + FN_SLOTS. The rings get room
# beyond what the capacities need, so tasks and replies of up to 64 KiB (a
# map chunk of some thousand small items) travel inline rather than through
# a payload file, which costs a fresh file's pages the first time.
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
_EXIT_GRACE = 5.0
_EXIT_GRACE_FAILING = 1.0  # a program ending with an error: its running tasks get this

_loads = pickle.loads
_R = RESULT[0]
_WAKE_MSG = RES_HDR.pack(WAKE, 0, 0.0)


class State(enum.Enum):
    """Where a pool is in its life (forward only)."""

    OPEN = "open"  # takes work
    SHUTDOWN = "shutdown"  # takes no work; what is queued finishes, then the workers leave
    DRAINING = "draining"  # as SHUTDOWN, begun by a drain: a running map ends quietly
    BROKEN = "broken"  # failed: what is queued failed, later submits fail


class Dispatch:
    """Everything behind one ``Pool``: its queue, workers, threads and counters.

    Process safety: every method may be called from any thread of the
    process that made it; it does not pickle.
    """

    def __init__(
        self,
        workers: int,
        *,
        sup: _supervisor.Supervisor,
        own_sup: _supervisor.Supervisor | None,
        initializer: Callable[..., Any] | None,
        initargs: tuple[Any, ...],
        max_tasks: int | None,
        max_memory: int | None,
        task_timeout: float | None,
        retries: int,
        ctx: Context | None,
    ) -> None:
        self.nworkers = workers
        self._sup = sup
        self._own_sup = own_sup
        self._initializer = initializer
        self._initargs = initargs
        self._max_tasks = max_tasks
        self._max_memory = max_memory
        self.task_timeout = task_timeout
        self._retries = retries
        self.ctx = ctx
        self._fns = FunctionCache()
        self._maps: weakref.WeakSet[Any] = weakref.WeakSet()  # running MapRuns
        self._tids = itertools.count(1)  # 0 is the tid of a DEFINE
        self._lock = threading.Lock()
        # Lock order: _rx, then _lock. Held by whoever takes replies from the
        # result channel and handles them (the collector, or a map's caller
        # between chunks): the replies of one worker must be handled in the
        # order they came.
        self._rx = threading.Lock()
        self._pending: deque[Task] = deque()
        self._slots: dict[int, Slot] = {}
        self._events: deque[tuple[int, Future[bytes]]] = deque()
        self._state = State.OPEN
        self._reason: BaseException | None = None  # why the pool broke
        # Wake-up bookkeeping of the collector (not the pool's state):
        self._deferred = False  # a refill did not fit: retry soon
        self._parked = False  # the collector waits for replies (submit must wake it)
        self._woken = False  # a wake-up is on its way to the collector
        self._abandoned = False  # the facade was collected (see close)
        self._init_crashes = 0
        self._ema = 0.0  # seconds per task (exponential average)
        self._depth = 1  # tasks queued per worker; grows once tasks prove short
        self.submitted = 0
        self._counts = {
            "completed": 0,
            "crashed": 0,
            "timed_out": 0,
            "retried": 0,
            "cancelled": 0,
            "killed": 0,
        }
        self._raised = 0  # answered tasks that failed (written by the collector only)
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
        _live.add(self)

    # -- state ----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """No more submits (shutdown, drain, broken). Never blocks."""
        return self._state is not State.OPEN

    @property
    def broken(self) -> BaseException | None:
        """Why the pool broke, or None. Never blocks."""
        return self._reason if self._state is State.BROKEN else None

    def _close(self, state: State) -> None:
        # Caller holds _lock. Forward only: OPEN -> SHUTDOWN/DRAINING -> BROKEN.
        order = (State.OPEN, State.SHUTDOWN, State.DRAINING, State.BROKEN)
        if order.index(state) > order.index(self._state):
            self._state = state

    def quiet_stop(self) -> bool:
        """True when intake stopped because of a drain (not a shutdown,
        cancellation or breakage): a running map then ends normally. Never blocks."""
        ctx = self.ctx
        if ctx is not None and ctx.cancelled:
            return False
        if self._state is State.BROKEN:
            return False
        return self._state is State.DRAINING or (ctx is not None and ctx.draining)

    def check_open(self) -> None:
        """Raise why no work can be submitted now, if anything. Never blocks."""
        ctx = self.ctx
        if ctx is not None and ctx.cancelled:
            ctx.check()
        state = self._state
        if state is State.BROKEN:
            raise WorkerCrashed(f"the pool is broken: {self._reason}") from self._reason
        if state is not State.OPEN:
            raise ShutdownError("cannot schedule new futures after shutdown or drain began")

    def draining(self) -> bool:
        """True once shutdown or drain began (or the pool's ctx is draining). Never blocks."""
        ctx = self.ctx
        return self.closed or (ctx is not None and ctx.draining)

    # -- submission -------------------------------------------------------------

    def submit(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> PoolFuture[Any]:
        """Pickle ``fn(*args, **kwargs)`` here and queue it; its Future.

        A call that cannot be pickled gets a Future holding the
        :class:`mpchan.PicklingError`, and nothing was queued.
        """
        try:
            ref = self._fns.get(fn)
            if ref is None:
                payload = pickle_value((fn, args, kwargs))
                key, blob = 0, None
            else:
                key, blob = ref
                payload = pickle_value((None, args, kwargs))
        except BaseException as e:
            self.check_open()
            return _failed(cannot_pickle(f"the task {describe_callable(fn)}", e))
        return self._submit(payload, fn, CALL, 1, None, key, blob).future

    def submit_chunk(
        self, fn: Any, ref: tuple[int, bytes] | None, items: Sequence[Any], kind: int, owner: Any
    ) -> Task:
        """Queue a map chunk ``fn`` over ``items`` (``ref``: ``fn`` by value,
        from :meth:`function_ref`); its Task. A chunk that cannot be pickled
        gets a Task whose Future holds the :class:`mpchan.PicklingError`."""
        try:
            payload = pickle_value((fn if ref is None else None, items))
        except BaseException as e:
            self.check_open()
            task = Task(-1, b"", fn, 0, kind, len(items), None)
            task.future.set_exception(cannot_pickle(f"a task of {describe_callable(fn)}", e))
            return task
        key, blob = (0, None) if ref is None else ref
        return self._submit(payload, fn, kind, len(items), owner, key, blob)

    def function_ref(self, fn: Any) -> tuple[int, bytes] | None:
        """``(key, blob)`` when ``fn`` goes by value (pickled once), else None.
        Raises what pickling it raises. Never blocks."""
        return self._fns.get(fn)

    def _submit(
        self,
        payload: bytes,
        fn: Any,
        kind: int,
        n: int,
        owner: Any,
        key: int,
        blob: bytes | None,
    ) -> Task:
        ctx = self.ctx
        if self._state is not State.OPEN or ctx is not None:
            if ctx is not None and ctx.draining:
                with self._lock:
                    self._close(State.DRAINING)
            self.check_open()
        tid = next(self._tids)
        msg = TASK_HDR.pack(tid, kind, key) + payload
        task = Task(tid, msg, fn, self._retries, kind, n, owner, key, blob)
        fut = task.future
        fut._task = task
        fut._pool = self
        self.submitted += 1
        if not self._pending and (self._parked or kind != CALL):
            # The pool is quiet (the collector waits): hand the task to an
            # idle worker now, for the lowest latency. A map chunk goes to
            # the least loaded worker with room even while the collector
            # runs: chunks are few and big, so a wake-up each is cheap, and
            # waiting for the collector to dispatch one can idle a worker.
            with self._lock:
                if not self._pending:
                    slot = self._direct_slot(kind, len(task.msg))
                    if slot is not None:
                        self._send(slot, [task])
                        return task
        # Otherwise the collector dispatches in batches: one wake-up per
        # batch for each worker, and none while it runs. A lock-free append
        # (atomic under the GIL) keeps a submitting loop fast.
        self._pending.append(task)
        if self._parked and not self._woken:
            self._woken = True
            self._wake()
        return task

    # -- cancellation -----------------------------------------------------------

    def cancel_task(self, task: Task) -> bool:
        """Take back a task that has not started; True if it is cancelled.

        Blocks: only for ``_lock``. Process safety: any thread.
        """
        fut = task.future
        with self._lock:
            slot = task.slot
            if slot is not None and (task.started or not self._withdraw(slot, {task.tid})):
                # Started, or the worker already took it: it runs.
                self._start(task)
                return False
        if slot is not None:
            # Out of every queue now: nobody else completes it.
            if fut._cancel_now():
                self._counts["cancelled"] += 1
                return True
            return False
        # Still in _pending (or never queued): the base class decides; the
        # dispatcher skips a cancelled task, and notifies its waiters here.
        if not Future.cancel(fut):
            return False
        with self._lock:
            if fut._state == CANCELLED:
                fut.set_running_or_notify_cancel()
        self._counts["cancelled"] += 1
        return True

    def kill_task(self, task: Task) -> bool:
        """Stop ``task``: cancel it, or kill the worker running it. True
        unless it had finished. Blocks: only for ``_lock``. Process safety: any thread."""
        if self.cancel_task(task):
            return True
        fut = task.future
        with self._lock:
            slot = task.slot
            if slot is None or task not in slot.queue or fut.done():
                return fut.cancelled()
            slot.killed = task.tid
            slot.retiring = True  # nothing more is sent to it
            with contextlib.suppress(OSError):
                os.kill(slot.worker.pid, signal.SIGKILL)
        if fut._cancel_now():
            self._counts["killed"] += 1
            return True
        return False

    def _withdraw(self, slot: Slot, tids: set[int] | None) -> bool:
        # Caller holds _lock. Take the tasks ``tids`` (None: all) back from
        # the worker's channel if they are still there, sending the rest of
        # what was there back in order; True if every one named was there.
        ch = slot.ch
        try:
            msgs = ch._recv_many_nowait(_TASK_CAPACITY)
        except (WouldBlock, EndOfChannel, ChannelClosed):
            return False
        found: set[int] = set()
        keep: list[bytes] = []
        for msg in msgs:
            tid, kind, _key = TASK_HDR.unpack_from(msg)
            if kind != DEFINE and (tids is None or tid in tids):
                found.add(tid)
            else:
                keep.append(msg)
        if found:
            for t in [t for t in slot.queue if t.tid in found]:
                slot.queue.remove(t)
                slot.assigned -= 1
                t.slot = None
        if keep:
            # The channel held these a moment ago: they fit again.
            with contextlib.suppress(ChannelClosed):
                ch.send_many(keep, timeout=0)
        return tids is None or found == tids

    # -- dispatch ----------------------------------------------------------------

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

    def _claim(self, slot: Slot, task: Task) -> bool:
        # Caller holds _lock: record that ``slot`` runs ``task`` (not sent
        # yet). False for a task cancelled meanwhile (its waiters are told).
        fut = task.future
        state = fut._state
        if state != PENDING and state != RUNNING:  # RUNNING: a task being retried
            if state == CANCELLED:
                fut.set_running_or_notify_cancel()
            return False
        q = slot.queue
        q.append(task)
        task.slot = slot
        slot.assigned += 1
        if len(q) == 1:
            slot.started_at = time.monotonic()
            self._start(task)
        return True

    @staticmethod
    def _start(task: Task) -> None:
        # Caller holds _lock: the task is its worker's head (or was taken).
        if not task.started:
            task.started = True
            if task.future._state == PENDING:  # not when it is retried
                task.future.set_running_or_notify_cancel()

    def _send(self, slot: Slot, tasks: list[Task]) -> int:
        # Caller holds _lock. Claim ``tasks`` for ``slot`` and send them in
        # one send_many (one wake-up), each function by value the worker
        # lacks in a DEFINE before the first task that needs it. Never
        # blocks: what does not fit goes back to the front of _pending.
        # Returns how many tasks went.
        msgs: list[bytes] = []
        claimed: list[Task] = []
        table = dict(slot.fns)  # the worker's table once these are sent
        defines: list[tuple[int, int]] = []  # (index in msgs, key)
        for task in tasks:
            if not self._claim(slot, task):
                continue
            key = task.key
            if key and key not in table:
                if len(table) >= FN_SLOTS:
                    del table[next(iter(table))]
                table[key] = None
                defines.append((len(msgs), key))
                assert task.blob is not None
                msgs.append(TASK_HDR.pack(0, DEFINE, key) + task.blob)
            msgs.append(task.msg)
            claimed.append(task)
        if not msgs:
            return 0
        ch = slot.ch
        before = ch.stats()["sent"]
        sent = len(msgs)
        try:
            ch.send_many(msgs, timeout=0)
        except (TimeoutError, ChannelClosed):
            # Only this thread sends to the channel now (we hold _lock), so
            # the counter tells how many went; take the others back.
            sent = ch.stats()["sent"] - before
            self._deferred = True
        if sent == len(msgs):
            slot.fns = table
            return len(claimed)
        for index, key in defines:
            if index < sent:
                if key not in slot.fns and len(slot.fns) >= FN_SLOTS:
                    del slot.fns[next(iter(slot.fns))]
                slot.fns[key] = None
        went = sent - sum(1 for index, _ in defines if index < sent)
        unsent = claimed[went:]
        for t in unsent:
            slot.queue.pop()
            t.slot = None
        slot.assigned -= len(unsent)
        self._pending.extendleft(reversed(unsent))
        return went

    def _fill(self, slot: Slot) -> None:
        # Caller holds _lock. One send_many (one wake-up) per call, and never
        # a blocking one: the collector must always go back to reading
        # replies, or a worker blocked on a full result channel and this
        # thread blocked on that worker's full task channel would wait for
        # each other.
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
        batch: list[Task] = []
        while room > 0 and pending:
            if queued and queued + len(pending[0].msg) > _QUEUE_BYTES:
                break  # the ring of the worker's channel stays far from full
            task = pending.popleft()
            batch.append(task)
            if task.future._state in (PENDING, RUNNING):
                queued += len(task.msg)
                room -= 1
        if batch:
            self._send(slot, batch)

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

    def _boot(self) -> Any:
        # What a new worker gets at its start: the initializer (pickled by
        # the codec, by value if need be) and its arguments -- pickled too,
        # unless only a starting process may get them (mp.Queue, mp.Lock...),
        # which then go as process arguments, as ProcessPoolExecutor does.
        if self._initializer is None:
            return None
        fn = pickle_value(self._initializer)
        try:
            args: Any = pickle_value(self._initargs)
        except Exception:
            args = self._initargs
        return (fn, args)

    def _start_slot(self) -> None:
        worker = self._sup.start_worker(self._boot())
        try:
            ch = Channel(_TASK_CAPACITY, _ring_extra=_TASK_RING_EXTRA)
            request = encode_task(
                pool_worker_loop,
                (
                    ch,
                    self._results_channel(),
                    worker.id,
                    self._initializer is not None,
                    self._max_tasks,
                    self._max_memory,
                ),
                {},
            )
        except BaseException:
            with contextlib.suppress(OSError):
                os.kill(worker.pid, signal.SIGKILL)
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
            self._close(State.SHUTDOWN)
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

    # -- the end ------------------------------------------------------------------

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        """Stop intake; cancel what has not started if asked; with ``wait``,
        return once every worker process has exited (see ``Pool.shutdown``)."""
        if not cancel_futures and self._state is State.OPEN:
            # A map made before the shutdown is work that was submitted:
            # its input goes in now (see MapRun.feed_all).
            for run in list(self._maps):
                with contextlib.suppress(Exception):
                    run.feed_all()
        cancelled: list[Task] = []
        with self._lock:
            self._close(State.SHUTDOWN)
            if cancel_futures:
                cancelled = _take_all(self._pending)
                for s in self._slots.values():
                    queued = [t for t in s.queue if not t.started]
                    if queued and self._withdraw(s, None):
                        cancelled += queued
        for task in cancelled:
            if task.slot is None and task.future._cancel_now():
                self._counts["cancelled"] += 1
        self._wake()
        if wait and threading.current_thread() is not self._collector:
            self.wait_stopped(None)

    def add_map(self, run: Any) -> None:
        """Track a running map (held weakly), for :meth:`shutdown`. Never blocks."""
        self._maps.add(run)

    def discard_map(self, run: Any) -> None:
        """The map ended. Never blocks."""
        self._maps.discard(run)

    def drain(self) -> None:
        """Stop intake as a drain: a running map ends quietly. Never blocks."""
        with self._lock:
            self._close(State.DRAINING)
        self._wake()

    def close(self) -> None:
        """The facade was collected: the collector thread shuts the pool down
        (``shutdown(wait=False)``). Never blocks.

        Not done here: a finalizer may run in any thread at any moment (a
        garbage collection inside a map's own feeding), and the shutdown
        reads the running maps' input.
        """
        self._abandoned = True
        self._wake()

    def wait_stopped(self, timeout: float | None) -> bool:
        """Wait until the collector finished (every worker gone); True if it did."""
        if not self._collector.is_alive() and not self._done_event.is_set():
            return True  # never started
        done = self._done_event.wait(timeout)
        if done:
            self._collector.join()
            if self._watcher is not None and self._watcher is not threading.current_thread():
                self._watcher.join()
        return done

    # -- the collector thread -----------------------------------------------------

    def _collect(self) -> None:
        rch = self._results
        assert rch is not None
        try:
            while True:
                stopping = self._state is not State.OPEN
                timeout = _TICK if (self.task_timeout or stopping) else 1.0
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
                while self._events:
                    with self._rx:
                        # Every reply sent before this worker died is handled
                        # first: it must not be blamed on the crash, nor run
                        # again. Read dry before each death: handling one
                        # (replacing the worker) takes a while.
                        while len(rch):
                            self._on_replies(rch._recv_many_nowait(512))
                        wid, loop = self._events.popleft()
                        self._on_worker_gone(wid, loop)
                if self.task_timeout is not None:
                    self._check_timeouts()
                if self._abandoned and self._state is State.OPEN:
                    self.shutdown(False, False)
                if self._state is not State.OPEN and self._stop_idle_workers():
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

    def poll_replies(self) -> int:
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

    def wait_replies(self, timeout: float) -> None:
        """Park the calling thread (a map's caller with nothing to do) until a
        reply is buffered, its waiter is woken, or ``timeout`` passes; then the
        caller polls. While another thread handles replies, wait for it to
        finish instead. Blocks: up to ``timeout``.
        """
        rch = self._results
        if rch is None:
            return
        if len(rch):
            # Buffered, and not taken by poll_replies: the collector has them.
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
                    continue  # a reply for a task already settled (killed, cancelled pool)
                task = slot.queue.popleft()
                task.slot = None
                task.pid = slot.worker.pid
                slot.done += 1
                if slot.queue:
                    slot.started_at = now
                    self._start(slot.queue[0])
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
        if fut.done() or (task.owner is not None and task.owner.closed):
            # Cancelled or killed meanwhile, or its map was closed: nobody
            # will read this.
            release_unread(reply[1:])
            with contextlib.suppress(InvalidStateError):
                fut.set_result(None)
            return
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
                    raise cannot_unpickle(f"the result of {task.name}", e) from e
            else:
                where = f"pool worker {wid} (pid {task.pid}) running {task.name}"
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
        elif tid == INIT_FAILED and self._state is not State.BROKEN:
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
                self._reason = broken
                self._close(State.BROKEN)

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
                    slot.ch.recv_many(_TASK_CAPACITY)
            slot.ch.close()
            tasks = list(slot.queue)
            slot.queue.clear()
            for t in tasks:
                t.slot = None
                t.started = False
            died = isinstance(exc, WorkerCrashed)
            # The head was running, unless the worker was not ready, or
            # retiring (its replies said nothing runs), or killed for
            # another task than its head (which then had not started).
            if slot.killed >= 0:
                blame = tasks[0].tid == slot.killed if tasks else False
            else:
                blame = died and slot.ready and not slot.retiring
            if tasks and blame:
                crashed = tasks.pop(0)
            if not slot.ready:
                self._unpin(slot)
            if died and not slot.ready and not slot.retiring:
                self._init_crashes += 1
                if self._init_crashes >= _MAX_INIT_CRASHES and self._state is not State.BROKEN:
                    broken = WorkerCrashed(
                        f"{_MAX_INIT_CRASHES} pool workers in a row died before they were ready"
                    )
                    broken.__cause__ = exc
                    self._reason = broken
                    self._close(State.BROKEN)
            killed = crashed is not None and crashed.tid == slot.killed
            timed_out = crashed is not None and crashed.tid == slot.timed_out
            if crashed is not None and not (killed or timed_out) and crashed.retries > 0:
                crashed.retries -= 1
                self._counts["retried"] += 1
                tasks.insert(0, crashed)
                crashed = None
            self._pending.extendleft(reversed(tasks))
            # While stopping, a worker is still replaced if queued work needs it.
            replace = self._state is not State.BROKEN and (
                self._state is State.OPEN or bool(self._pending)
            )
        if crashed is not None and not killed:
            if timed_out:
                self._counts["timed_out"] += 1
                err: BaseException = TaskTimeout(
                    f"{crashed.name} ran longer than task_timeout={self.task_timeout} s in "
                    f"pool worker {wid} (pid {slot.worker.pid}); the worker was replaced"
                )
            else:
                self._counts["crashed"] += 1
                err = _supervisor.crashed_error(
                    slot.worker, getattr(exc, "exitcode", None), crashed.name
                )
            with contextlib.suppress(InvalidStateError):
                crashed.future.set_exception(err)
        if self._state is State.BROKEN:
            self._fail_all(self._reason or WorkerCrashed("the pool is broken"))
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

    def _unpin(self, slot: Slot) -> None:
        # Caller holds _lock. A worker that ended before it was ready may
        # have died before it unpickled its request (its main module failed
        # to import, say): the handles pickled in it would then count as in
        # transit for ever, and pin their segments until the program ends.
        # The task channel travelled in that request alone, so its count
        # says whether the request was unpickled; if not, take back both.
        with contextlib.suppress(Exception):
            if slot.ch._core.transit(0) > 0:
                slot.ch._core.transit(-1)
                if self._results is not None:
                    self._results._core.transit(-1)

    def _check_timeouts(self) -> None:
        limit = self.task_timeout
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
                if self._slots and self._state is not State.BROKEN:
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
                    copy_error(self.broken or ShutdownError("the pool shut down"))
                )
        return done

    def _break(self, exc: BaseException) -> None:
        with self._lock:
            if self._state is not State.BROKEN:
                self._reason = exc
                self._close(State.BROKEN)
        self._fail_all(self._reason or exc)

    def fail_all(self, exc: BaseException, *, kill: bool = False) -> None:
        """Fail everything queued or running with ``exc`` and stop intake;
        with ``kill``, SIGKILL the workers (a cancelled ctx, the program's end)."""
        self._fail_all(exc, kill)
        self._wake()

    def _fail_all(self, exc: BaseException, kill: bool = False) -> None:
        with self._lock:
            tasks = _take_all(self._pending)
            self._close(State.SHUTDOWN)
            slots = list(self._slots.values())
            for s in slots:
                tasks.extend(s.queue)
                for t in s.queue:
                    t.slot = None
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
            self._close(State.SHUTDOWN)
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
        _live.discard(self)
        self._done_event.set()

    # -- context --------------------------------------------------------------------

    def _watch_ctx(self) -> None:
        ctx = self.ctx
        assert ctx is not None
        draining = False
        while not self._done_event.is_set():
            if ctx.wait(_TICK * 2):
                self.fail_all(ctx.err() or Cancelled(), kill=True)
                return
            if not draining and ctx.draining:
                draining = True
                self.drain()

    # -- introspection ------------------------------------------------------------

    def snapshot(self) -> tuple[list[tuple[Slot, str, int, int]], int, dict[str, int]]:
        """(per slot: slot, state, tasks done, queued), queue depth, counters. Never blocks."""
        with self._lock:
            rows = []
            for s in self._slots.values():
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
            counts = dict(self._counts, submitted=self.submitted)
            counts["failed"] = self._raised + counts["crashed"] + counts["timed_out"]
        return rows, depth, counts

    def worker_count(self) -> int:
        """Worker processes now. Never blocks."""
        return len(self._slots)


def _failed(err: BaseException) -> PoolFuture[Any]:
    fut: PoolFuture[Any] = PoolFuture()
    fut.set_exception(err)
    return fut


def _take_all(pending: deque[Task]) -> list[Task]:
    # Empty a deque that submitters append to without the lock: popleft and
    # append are each atomic, so a task appended meanwhile is either taken
    # here or stays queued -- never lost, as list() + clear() could lose it.
    taken = []
    with contextlib.suppress(IndexError):
        while True:
            taken.append(pending.popleft())
    return taken


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


_live: weakref.WeakSet[Dispatch] = weakref.WeakSet()


def shutdown_all(pools: Iterable[Dispatch] | None = None) -> None:
    """At interpreter exit, before the supervisor stops the processes and
    shared memory is detached: stop every pool still alive.

    A program that ends normally lets what it submitted finish first, as
    ``concurrent.futures`` does at exit (a pool shut down with
    ``wait=False``, or never shut down). One that ends with an unhandled
    exception (Ctrl-C's KeyboardInterrupt among them) cancels what has not
    started and kills the workers of a pool that does not stop within a
    second.
    """
    failing = getattr(sys, "last_value", None) is not None
    live = list(_live if pools is None else pools)
    for d in live:
        with contextlib.suppress(Exception):
            d.shutdown(False, failing)
    for d in live:
        with contextlib.suppress(Exception):
            if not d.wait_stopped(_EXIT_GRACE_FAILING if failing else None):
                d.fail_all(ShutdownError("the program is exiting"), kill=True)
                d.wait_stopped(_EXIT_GRACE)
