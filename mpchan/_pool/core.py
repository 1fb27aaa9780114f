r"""The state of a Pool and its scheduling: queue, slots, lock (layer 7, ``_pool``).

A :class:`PoolCore` is the one owner of a pool's queue (``pending``), its
worker slots, its lock and its lifecycle state. The dispatch
(``dispatch.py``) puts work in; the collector (``collector.py``) takes
replies out and handles deaths; both change the state only through the
methods here, or under ``lock`` as the invariants below say.

    submit ----> pending (FIFO, lock-free append) ---fill(slot)---> slot.queue
                                                    send_many       + the worker's
                                                    (one wake-up)     task channel
    cancel ----> withdraw(slot): drain the worker's channel, drop the task,
                 send the rest back in order

Lifecycle (``state``, forward only)::

    OPEN --shutdown--> SHUTDOWN --(nothing left, workers gone)--> collector ends
      |  \--drain---> DRAINING (a running map ends quietly)       (done_event set)
      \-- initializer failed / workers die before ready / a bug --> BROKEN

Invariants:
    * ``slot.queue`` lists, oldest first, every task assigned to the worker
      and not answered; the worker runs them in that order and answers each
      before it takes the next message, so ``slot.queue[0]`` is the one it
      runs (when it is ready and not retiring) and the others have not
      started -- those still in its channel can be taken back.
    * ``len(slot.queue) <= depth <= DEPTH_MAX <= TASK_CAPACITY`` (the
      capacity of the slot's channel; DEFINE messages ride in the spare
      room of the ring), so sending to it never blocks.
    * ``slot.fns`` is the worker's table of functions by value: a DEFINE
      for a key is sent before the first task that needs it, and the table
      is updated only for messages that were sent.
    * ``pending`` is FIFO; a submitter appends to it without ``lock``
      (deque.append is atomic) after checking the pool is open; whoever
      empties it pops item by item (:func:`take_all`), so a racing append is
      either taken or still queued, and the collector fails what is left
      once no worker can run it.
    * Every task's Future is completed exactly once, by whoever removes the
      task from ``pending`` or a ``slot.queue`` under ``lock``; a task is
      started (RUNNING) when it becomes the head of its worker's queue.

Ownership:
    * ``lock`` guards ``pending``, ``slots``, every slot's and task's
      fields and ``state``; it is never held while a Future is completed
      (callbacks run user code) or a process is started.
    * ``rx`` is held by whoever reads the result channel and handles what
      it read (see ``collector.py``).
    * The worker set (``workers``) starts and kills the processes; only
      the collector replaces them.

Lock order: ``rx`` before ``lock``.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import InvalidStateError
from concurrent.futures._base import CANCELLED, PENDING, RUNNING
from dataclasses import dataclass
from functools import partial
from typing import Any

from .._channel import Channel
from .._codec import FunctionCache, pickle_value
from .._context import Context
from .._errors import (
    ChannelClosed,
    EndOfChannel,
    ShutdownError,
    WorkerCrashed,
    WouldBlock,
)
from .._worker import encode_task
from .task import PoolFuture, Slot, Task, copy_error
from .worker import (
    CALL,
    DEFINE,
    FN_SLOTS,
    RES_HDR,
    TASK_HDR,
    WAKE,
    pool_worker_loop,
)
from .workerset import Member, WorkerSet

__all__ = [
    "DEPTH_MAX",
    "TASK_CAPACITY",
    "PoolCore",
    "Settings",
    "State",
    "boot_args",
    "expected_seconds",
    "failed",
    "take_all",
]

DEPTH_MAX = 1024  # most tasks queued at one worker
# Invariant: TASK_CAPACITY >= DEPTH_MAX + FN_SLOTS. The rings get room
# beyond what the capacities need, so tasks and replies of up to 64 KiB (a
# map chunk of some thousand small items) travel inline rather than through
# a payload file, which costs a fresh file's pages the first time.
TASK_CAPACITY = 4096
RESULTS_CAPACITY = 4096
_TASK_RING_EXTRA = 1 << 20  # > QUEUE_BYTES + 64 KiB
_RESULTS_RING_EXTRA = 4 << 20
QUEUE_TARGET = 0.01  # seconds of work to keep queued at each worker (> a GIL switch)
QUEUE_BYTES = 256 * 1024  # most bytes of tasks queued at one worker (ring: 512 KiB)
_STALL_FACTOR = 4  # a task running this many times its expected time ...
_STALL_MIN = 0.002  # ... and at least this long (s) gets nothing queued behind it

_WAKE_MSG = RES_HDR.pack(WAKE, 0, 0.0)


class State(enum.Enum):
    """Where a pool is in its life (forward only)."""

    OPEN = "open"  # takes work
    SHUTDOWN = "shutdown"  # takes no work; what is queued finishes, then the workers leave
    DRAINING = "draining"  # as SHUTDOWN, begun by a drain: a running map ends quietly
    BROKEN = "broken"  # failed: what is queued failed, later submits fail


@dataclass(frozen=True)
class Settings:
    """What a pool was made with (checked by the facade). Never blocks."""

    workers: int
    initializer: Callable[..., Any] | None = None
    initargs: tuple[Any, ...] = ()
    max_tasks: int | None = None  # per worker, then it is replaced
    max_memory: int | None = None  # bytes of RSS after a task, then it is replaced
    task_timeout: float | None = None  # seconds; the worker is killed and replaced
    retries: int = 0  # runs again of a failed task (see _policy)
    ctx: Context | None = None


class PoolCore:
    """A pool's queue, slots, lock, state and counters (see the module).

    Process safety: any thread of the process that made it, as the
    invariants say; it does not pickle.
    """

    def __init__(
        self, settings: Settings, worker_set: Callable[[Callable[[], Any]], WorkerSet]
    ) -> None:
        self.nworkers = settings.workers
        self.initializer = settings.initializer
        self.initargs = settings.initargs
        self.max_tasks = settings.max_tasks
        self.max_memory = settings.max_memory
        self.task_timeout = settings.task_timeout
        self.retries = settings.retries
        self.ctx = settings.ctx
        self.fns = FunctionCache()
        self.maps: weakref.WeakSet[Any] = weakref.WeakSet()  # running MapRuns
        self.tids = itertools.count(1)  # 0 is the tid of a DEFINE
        self.lock = threading.Lock()
        # Lock order: rx, then lock. Held by whoever takes replies from the
        # result channel and handles them (the collector, or a map's caller
        # between chunks): the replies of one worker must be handled in the
        # order they came.
        self.rx = threading.Lock()
        self.pending: deque[Task] = deque()
        self.slots: dict[int, Slot] = {}
        self.events: deque[tuple[int, BaseException | None]] = deque()  # worker deaths
        self.state = State.OPEN
        self.reason: BaseException | None = None  # why the pool broke
        # Wake-up bookkeeping of the collector (not the pool's state):
        self.deferred = False  # a refill did not fit: retry soon
        self.parked = False  # the collector waits for replies (submit must wake it)
        self.woken = False  # a wake-up is on its way to the collector
        self.abandoned = False  # the facade was collected (see Dispatch.close)
        self.init_crashes = 0
        self.ema = 0.0  # seconds per task (exponential average)
        self.depth = 1  # tasks queued per worker; grows once tasks prove short
        self.submitted = 0
        self.counts = {
            "completed": 0,
            "crashed": 0,
            "timed_out": 0,
            "retried": 0,
            "cancelled": 0,
            "killed": 0,
        }
        self.raised = 0  # answered tasks that failed (written by the collector only)
        self.done_event = threading.Event()
        self.results: Channel | None = Channel(RESULTS_CAPACITY, _ring_extra=_RESULTS_RING_EXTRA)
        # The boot is a partial of a module function, not a method: the
        # worker set holding it must not keep this core (and its channels,
        # its ctx) alive in a reference cycle.
        self.workers = worker_set(partial(boot_args, self.initializer, self.initargs))

    @property
    def closed(self) -> bool:
        """No more submits (shutdown, drain, broken). Never blocks."""
        return self.state is not State.OPEN

    @property
    def broken(self) -> BaseException | None:
        """Why the pool broke, or None. Never blocks."""
        return self.reason if self.state is State.BROKEN else None

    def close_state(self, state: State) -> None:
        # Caller holds the lock. Forward only: OPEN -> SHUTDOWN/DRAINING -> BROKEN.
        order = (State.OPEN, State.SHUTDOWN, State.DRAINING, State.BROKEN)
        if order.index(state) > order.index(self.state):
            self.state = state

    def quiet_stop(self) -> bool:
        """True when intake stopped because of a drain (not a shutdown,
        cancellation or breakage): a running map then ends normally. Never blocks."""
        ctx = self.ctx
        if ctx is not None and ctx.cancelled:
            return False
        if self.state is State.BROKEN:
            return False
        return self.state is State.DRAINING or (ctx is not None and ctx.draining)

    def check_open(self) -> None:
        """Raise why no work can be submitted now, if anything. Never blocks."""
        ctx = self.ctx
        if ctx is not None and ctx.cancelled:
            ctx.check()
        state = self.state
        if state is State.BROKEN:
            raise WorkerCrashed(f"the pool is broken: {self.reason}") from self.reason
        if state is not State.OPEN:
            raise ShutdownError("cannot schedule new futures after shutdown or drain began")

    def draining(self) -> bool:
        """True once shutdown or drain began (or the pool's ctx is draining). Never blocks."""
        ctx = self.ctx
        return self.closed or (ctx is not None and ctx.draining)

    def withdraw(self, slot: Slot, tids: set[int] | None) -> bool:
        # Caller holds the lock. Take the tasks ``tids`` (None: all) back from
        # the worker's channel if they are still there, sending the rest of
        # what was there back in order; True if every one named was there.
        ch = slot.ch
        try:
            msgs = ch.recv_many_nowait(TASK_CAPACITY)
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

    def direct_slot(self, kind: int, size: int) -> Slot | None:
        # Caller holds the lock. A single call only to an idle worker; a chunk
        # to the shortest queue below the refill mark with bytes to spare.
        best: Slot | None = None
        best_load = (0.0, 0)
        now = time.monotonic()
        low = self.depth // 2
        for s in self.slots.values():
            if s.retiring or not self.may_take(s) or self.stalled(s, now):
                continue
            n = len(s.queue)
            if kind == CALL:
                if n == 0:
                    return s
            elif n <= low and (n == 0 or sum(len(t.msg) for t in s.queue) + size <= QUEUE_BYTES):
                # Chunks differ in size: the one with the least work queued
                # (then the shortest queue: its work may be unknown yet).
                load = (queued_seconds(s, now) if n else 0.0, n)
                if best is None or load < best_load:
                    best, best_load = s, load
        return best

    def may_take(self, slot: Slot) -> bool:
        # Caller holds the lock.
        return self.max_tasks is None or slot.assigned < self.max_tasks

    def claim(self, slot: Slot, task: Task) -> bool:
        # Caller holds the lock: record that ``slot`` runs ``task`` (not sent
        # yet). False for a task cancelled meanwhile (its waiters are told).
        fut = task.future
        state = fut.state
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
            self.start_task(task)
        return True

    @staticmethod
    def start_task(task: Task) -> None:
        # Caller holds the lock: the task is its worker's head (or was taken).
        if not task.started:
            task.started = True
            if task.future.state == PENDING:  # not when it is retried
                task.future.set_running_or_notify_cancel()

    def send(self, slot: Slot, tasks: list[Task]) -> int:
        # Caller holds the lock. Claim ``tasks`` for ``slot`` and send them in
        # one send_many (one wake-up), each function by value the worker
        # lacks in a DEFINE before the first task that needs it. Never
        # blocks: what does not fit goes back to the front of _pending.
        # Returns how many tasks went.
        msgs: list[bytes] = []
        claimed: list[Task] = []
        table = dict(slot.fns)  # the worker's table once these are sent
        defines: list[tuple[int, int]] = []  # (index in msgs, key)
        for task in tasks:
            if not self.claim(slot, task):
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
            # Only this thread sends to the channel now (we hold the lock), so
            # the counter tells how many went; take the others back.
            sent = ch.stats()["sent"] - before
            self.deferred = True
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
        self.pending.extendleft(reversed(unsent))
        return went

    def fill(self, slot: Slot) -> None:
        # Caller holds the lock. One send_many (one wake-up) per call, and never
        # a blocking one: the collector must always go back to reading
        # replies, or a worker blocked on a full result channel and this
        # thread blocked on that worker's full task channel would wait for
        # each other.
        pending = self.pending
        if not pending or slot.retiring or self.stalled(slot, time.monotonic()):
            return
        room = self.depth - len(slot.queue)
        if self.max_tasks is not None:
            room = min(room, self.max_tasks - slot.assigned)
        # A fair share of what waits: one worker must not take every queued
        # task while another has room (tasks may be long: few and big).
        room = min(room, -(-len(pending) // max(1, len(self.slots))))
        queued = sum(len(t.msg) for t in slot.queue) if slot.queue else 0
        batch: list[Task] = []
        while room > 0 and pending:
            if queued and queued + len(pending[0].msg) > QUEUE_BYTES:
                break  # the ring of the worker's channel stays far from full
            task = pending.popleft()
            batch.append(task)
            if task.future.state in (PENDING, RUNNING):
                queued += len(task.msg)
                room -= 1
        if batch:
            self.send(slot, batch)

    def has_room(self) -> bool:
        # Caller holds the lock.
        depth = self.depth
        low = depth // 2
        now = time.monotonic()
        return any(
            len(s.queue) <= low and not s.retiring and self.may_take(s) and not self.stalled(s, now)
            for s in self.slots.values()
        )

    def stalled(self, slot: Slot, now: float) -> bool:
        # Caller holds the lock. The worker's running task overran its expected
        # time (its map's time per item, else the pool's average task) by
        # far: nothing more is queued behind it until it answers.
        q = slot.queue
        if not q:
            return False
        expected = expected_seconds(q[0], self.ema)
        return now - slot.started_at > max(_STALL_FACTOR * expected, _STALL_MIN)

    def dispatch_pending(self) -> None:
        with self.lock:
            if not self.pending:
                return
            low = self.depth // 2
            for s in sorted(self.slots.values(), key=lambda s: len(s.queue)):
                if len(s.queue) <= low:
                    self.fill(s)

    def start_slot(self) -> None:
        """Start a worker (a new slot); it gets queued work at once.

        Blocks: while the process starts. Process safety: any thread.
        """

        def request(worker: Member) -> bytes:
            # Called before the worker runs: its slot is known (and filled)
            # before it can send anything, or die.
            ch = Channel(TASK_CAPACITY, _ring_extra=_TASK_RING_EXTRA)
            msg = encode_task(
                pool_worker_loop,
                (
                    ch,
                    self.results_channel(),
                    worker.id,
                    self.initializer is not None,
                    self.max_tasks,
                    self.max_memory,
                    self.retries,
                ),
                {},
            )
            slot = Slot(worker, ch)
            with self.lock:
                self.slots[slot.wid] = slot
                self.fill(slot)
            return msg

        self.workers.start(request, self.on_gone)

    def results_channel(self) -> Channel:
        """The result channel; raises ShutdownError once it is gone. Never blocks."""
        rch = self.results
        if rch is None:
            raise ShutdownError("the pool is shut down")
        return rch

    def on_gone(self, worker: Member, exc: BaseException | None) -> None:
        """A worker's loop ended (any thread): the collector handles it. Never blocks."""
        self.events.append((worker.id, exc))
        self.wake()

    def wake(self) -> None:
        """Wake the collector (a message on the result channel). Never blocks."""
        rch = self.results
        if rch is not None:
            # ValueError: the segment was detached at interpreter exit.
            with contextlib.suppress(WouldBlock, ChannelClosed, OSError, ValueError):
                rch.send_nowait(_WAKE_MSG)

    def abort(self) -> None:
        """The pool could not start: give back what was made. Blocks: briefly."""
        with self.lock:
            slots = list(self.slots.values())
            self.slots.clear()
            self.close_state(State.SHUTDOWN)
        for s in slots:
            s.ch.close()
            self.workers.kill(s.worker)
        for s in slots:
            self.workers.join(s.worker, 5)
        rch, self.results = self.results, None
        if rch is not None:
            rch.close()
        self.workers.close()

    def fail_all(self, exc: BaseException, kill: bool = False) -> None:
        """Fail everything queued or running with ``exc`` and stop intake;
        with ``kill``, kill the workers. Blocks: only for the lock."""
        with self.lock:
            tasks = take_all(self.pending)
            self.close_state(State.SHUTDOWN)
            slots = list(self.slots.values())
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
                self.workers.kill(s.worker)
            else:
                with contextlib.suppress(ValueError):
                    s.ch.close()

    def retry(self, task: Task) -> None:
        """Queue ``task`` again, first, after it failed (its worker answered
        that the call raised): one of its ``retries`` is spent. Never blocks
        (but for the lock); the caller wakes the collector."""
        with self.lock:
            task.retries -= 1
            task.started = False
            task.slot = None
            self.counts["retried"] += 1
            self.pending.appendleft(task)

    def stop_intake(self, cancel_futures: bool) -> None:
        """Shut down: no more submits; what was submitted finishes, or with
        ``cancel_futures`` is cancelled unless it started. Wakes the
        collector. Blocks: only for the lock.
        """
        if not cancel_futures and self.state is State.OPEN:
            # A map made before the shutdown is work that was submitted:
            # its input goes in now (see MapRun.feed_all).
            for run in list(self.maps):
                with contextlib.suppress(Exception):
                    run.feed_all()
        cancelled: list[Task] = []
        with self.lock:
            self.close_state(State.SHUTDOWN)
            if cancel_futures:
                cancelled = take_all(self.pending)
                for s in self.slots.values():
                    queued = [t for t in s.queue if not t.started]
                    if queued and self.withdraw(s, None):
                        cancelled += queued
        for task in cancelled:
            if task.slot is None and task.future.cancel_now():
                self.counts["cancelled"] += 1
        self.wake()


def boot_args(initializer: Callable[..., Any] | None, initargs: tuple[Any, ...]) -> Any:
    """What a new worker gets at its start: the initializer (pickled by the
    codec, by value if need be) and its arguments -- pickled too, unless
    only a starting process may get them (mp.Queue, mp.Lock...), which then
    go as process arguments, as ProcessPoolExecutor does. Never blocks."""
    if initializer is None:
        return None
    fn = pickle_value(initializer)
    try:
        args: Any = pickle_value(initargs)
    except Exception:
        args = initargs
    return (fn, args)


def failed(err: BaseException) -> PoolFuture[Any]:
    fut: PoolFuture[Any] = PoolFuture()
    fut.set_exception(err)
    return fut


def take_all(pending: deque[Task]) -> list[Task]:
    # Empty a deque that submitters append to without the lock: popleft and
    # append are each atomic, so a task appended meanwhile is either taken
    # here or stays queued -- never lost, as list() + clear() could lose it.
    taken = []
    with contextlib.suppress(IndexError):
        while True:
            taken.append(pending.popleft())
    return taken


def expected_seconds(task: Task, unknown: float) -> float:
    # A map chunk's items times its map's measured time per item; ``unknown``
    # for a single call, or before the map measured anything.
    per_item = getattr(task.owner, "per_item", None)
    return task.n * per_item if per_item else unknown


def queued_seconds(slot: Slot, now: float) -> float:
    # Caller holds _lock. The work queued at a worker, from each map's time
    # per item (0 where unknown); the running task counts what it has left.
    total = 0.0
    for i, t in enumerate(slot.queue):
        expected = expected_seconds(t, 0.0)
        if i == 0:
            expected = max(0.0, expected - (now - slot.started_at))
        total += expected
    return total
