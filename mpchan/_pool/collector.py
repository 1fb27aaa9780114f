"""The collector of a Pool: replies in, deaths, timeouts, the end (layer 7, ``_pool``).

One thread per pool ("mpchan-pool-collector") runs :meth:`Collector.run`:

    results channel (shared by the workers) --rx--> on_replies: pop each
        worker's queue head, complete its Future (outside the lock), refill
        the workers below their low-water mark in one batch each
    worker set --on_gone--> core.events + a WAKE --> on_worker_gone: read
        the result channel dry first, then fail (or retry) the task that
        was running, take back what was queued, start a replacement
    task_timeout: kill the worker whose head overran (TaskTimeout)
    shutdown: retire idle workers (close their channels); once none is
        left, finish: close the channels, give back the worker set

A map's caller may take replies between its chunks (:meth:`poll_replies`)
when nobody holds ``rx``: they are handled at once instead of after a GIL
switch interval.

Invariants:
    * A worker's replies are all handled before its death is: they were
      written before it exited, the death event after, and the collector
      reads the result channel dry before each death it handles. So a crash
      fails (or retries) only the task that was running, and a task runs
      again only when it is retried.
    * The result channel is read only under ``rx``, and what is read is
      handled before ``rx`` is released (one worker's replies in order;
      Futures are completed under ``rx``, never under ``lock``). A map's
      caller takes ``rx`` only without waiting; a WAKE it reads is sent on.

Ownership: only the collector thread handles deaths, starts replacement
workers and closes worker channels (after ``shutdown(wait=False)`` it
finishes the job on its own). The collectors of live pools are in a weak
set that the exit hook (:func:`shutdown_all`) stops.

Lock order: ``rx`` before ``lock``.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import threading
import time
import weakref
from collections.abc import Iterable
from concurrent.futures import InvalidStateError

from .._channel import Channel
from .._codec import cannot_unpickle, release_unread
from .._errors import (
    Cancelled,
    ChannelClosed,
    EndOfChannel,
    ShutdownError,
    TaskTimeout,
    WorkerCrashed,
)
from .._worker import RAISED, RESULT, decode_reply, runs_again
from .core import DEPTH_MAX, QUEUE_TARGET, TASK_CAPACITY, PoolCore, State, take_all
from .task import Slot, Task, copy_error, drop_local_tracebacks
from .worker import CALL, INIT_FAILED, READY, RES_HDR, RETIRING, WAKE

__all__ = ["COLLECTOR_THREAD", "WATCHER_THREAD", "Collector", "shutdown_all"]

COLLECTOR_THREAD = "mpchan-pool-collector"
WATCHER_THREAD = "mpchan-pool-ctx"

_TICK = 0.05  # longest collector wait when timeouts or drains need watching
_MAX_INIT_CRASHES = 3  # workers dying before ready, in a row, before the pool breaks
_EXIT_GRACE = 5.0
_EXIT_GRACE_FAILING = 1.0  # a program ending with an error: its running tasks get this

_loads = pickle.loads
_R = RESULT[0]
_E = RAISED[0]


class Collector:
    """The thread that handles a pool's replies and worker deaths (see the module).

    Process safety: :meth:`run` and :meth:`watch_ctx` run on their own
    threads; the other public methods may be called from any thread.
    """

    def __init__(self, core: PoolCore) -> None:
        self.core = core
        self.thread = threading.Thread(target=self.run, name=COLLECTOR_THREAD, daemon=True)
        self.watcher: threading.Thread | None = None
        if self.core.ctx is not None:
            self.watcher = threading.Thread(target=self.watch_ctx, name=WATCHER_THREAD, daemon=True)

    def start(self) -> None:
        """Start the collector (and the ctx watcher). Never blocks."""
        self.thread.start()
        if self.watcher is not None:
            self.watcher.start()
        _live.add(self)

    def fail_all(self, exc: BaseException, *, kill: bool = False) -> None:
        """Fail everything queued or running with ``exc`` and stop intake;
        with ``kill``, kill the workers (a cancelled ctx, the program's end).
        Blocks: only for the lock."""
        core = self.core
        core.fail_all(exc, kill)
        core.wake()

    def wait_stopped(self, timeout: float | None) -> bool:
        """Wait until the collector finished (every worker gone); True if it did.

        Blocks: up to ``timeout`` (None: until then). Cancellation: none.
        Process safety: any thread but the collector's own.
        """
        core = self.core
        if not self.thread.is_alive() and not core.done_event.is_set():
            return True  # never started
        done = core.done_event.wait(timeout)
        if done:
            self.thread.join()
            w = self.watcher
            if w is not None and w is not threading.current_thread() and w.is_alive():
                w.join()
        return done

    def run(self) -> None:
        core = self.core
        rch = core.results
        assert rch is not None
        try:
            while True:
                stopping = core.state is not State.OPEN
                timeout = _TICK if (core.task_timeout or stopping) else 1.0
                if core.deferred:
                    core.deferred = False
                    timeout = 0.001
                core.dispatch_pending()
                with core.lock:
                    # Submitters wake this thread only when it could hand their
                    # task to a worker; when every worker is full, the next
                    # reply wakes it anyway.
                    core.parked = core.has_room()
                    core.woken = False
                if not self.take_replies(rch):
                    rch.wait_readable(timeout)
                    self.take_replies(rch)
                core.parked = False
                while core.events:
                    with core.rx:
                        # Every reply sent before this worker died is handled
                        # first: it must not be blamed on the crash, nor run
                        # again. Read dry before each death: handling one
                        # (replacing the worker) takes a while.
                        while len(rch):
                            self.on_replies(rch.recv_many_nowait(512))
                        wid, exc = core.events.popleft()
                        self.on_worker_gone(wid, exc)
                if core.task_timeout is not None:
                    self.check_timeouts()
                if core.abandoned and core.state is State.OPEN:
                    core.stop_intake(False)
                if core.state is not State.OPEN and self.stop_idle_workers():
                    break
        except BaseException as e:  # a bug here must not hang every caller
            self.break_pool(e)
            raise
        finally:
            self.finish()

    def take_replies(self, rch: Channel) -> bool:
        # The collector: handle what is buffered now. True if there was any.
        with self.core.rx:
            items = rch.recv_many_nowait(512)
            if items:
                self.on_replies(items)
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
        core = self.core
        rch = core.results
        if rch is None or not len(rch) or not core.rx.acquire(blocking=False):
            return 0
        try:
            settled, woke = self.on_replies(rch.recv_many_nowait(512))
        except (EndOfChannel, ChannelClosed, ValueError):
            return 0  # the pool is closing: the collector sees to the rest
        finally:
            core.rx.release()
        if woke:
            core.wake()  # it was meant for the collector: pass it on
        return settled

    def wait_replies(self, timeout: float) -> None:
        """Park the calling thread (a map's caller with nothing to do) until a
        reply is buffered, its waiter is woken, or ``timeout`` passes; then the
        caller polls. While another thread handles replies, wait for it to
        finish instead. Blocks: up to ``timeout``.
        """
        core = self.core
        rch = core.results
        if rch is None:
            return
        if len(rch):
            # Buffered, and not taken by poll_replies: the collector has them.
            if core.rx.acquire(timeout=timeout):
                core.rx.release()
            return
        with contextlib.suppress(ChannelClosed, ValueError):
            rch.wait_readable(timeout, every=True)

    def on_replies(self, items: list[bytes]) -> tuple[int, bool]:
        core = self.core
        # Caller holds rx. Returns (tasks settled, a WAKE was among them).
        done: list[tuple[Task, memoryview, int]] = []
        woke = False
        now = time.monotonic()
        with core.lock:
            slots = core.slots
            for msg in items:
                tid, wid, secs = RES_HDR.unpack_from(msg)
                if tid < 0:
                    if tid == WAKE:
                        woke = True
                    self.on_control(tid, wid, msg, now)
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
                    core.start_task(slot.queue[0])
                if task.owner is not None:
                    task.owner.observe(secs, task.n)
                core.ema = secs if not core.ema else 0.8 * core.ema + 0.2 * secs
                done.append((task, memoryview(msg)[RES_HDR.size :], wid))
            if done:
                core.counts["completed"] += len(done)
                ema = core.ema
                core.depth = (
                    1
                    if ema > 0.01
                    else max(2, min(DEPTH_MAX, int(QUEUE_TARGET / max(ema, 1e-6)) + 1))
                )
                if core.pending:
                    # Refill below the low-water mark only, in one batch: a
                    # worker woken for every task would cost a wake-up each.
                    # Only the workers that answered, and idle ones: one that
                    # is still on its task gets more when it answers (its
                    # task may be long: nothing should wait behind it).
                    low = core.depth // 2
                    answered = {wid for _, _, wid in done}
                    for s in slots.values():
                        if len(s.queue) <= low and (s.wid in answered or not s.queue):
                            core.fill(s)
        for task, reply, wid in done:
            self.settle(task, reply, wid)
        return len(done), woke

    def settle(self, task: Task, reply: memoryview, wid: int) -> None:
        core = self.core
        fut = task.future
        if fut.done() or (task.owner is not None and task.owner.closed):
            # Cancelled or killed meanwhile, or its map was closed: nobody
            # will read this.
            release_unread(reply[1:])
            with contextlib.suppress(InvalidStateError):
                fut.set_result(None)
            return
        if reply[0] == _E and task.kind == CALL and task.retries > 0 and runs_again(reply[1:]):
            # The call raised and may run again (a chunk's items are called
            # again in the worker itself: see _pool.worker).
            release_unread(reply[1:])
            core.retry(task)
            core.wake()
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
            core.raised += 1
            drop_local_tracebacks(e)
            with contextlib.suppress(InvalidStateError):
                fut.set_exception(e)
            return
        if task.kind != CALL and value[1] is not None:
            core.raised += 1  # a map chunk that stopped at an exception
        with contextlib.suppress(InvalidStateError):
            fut.set_result(value)

    def on_control(self, tid: int, wid: int, msg: bytes, now: float) -> None:
        core = self.core
        # Caller holds the lock.
        slot = core.slots.get(wid)
        if slot is None:
            return
        if tid == READY:
            slot.ready = True
            core.init_crashes = 0
            if slot.queue:
                slot.started_at = now
        elif tid == RETIRING:
            slot.retiring = True
        elif tid == INIT_FAILED and core.state is not State.BROKEN:
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
                core.reason = broken
                core.close_state(State.BROKEN)

    def on_worker_gone(self, wid: int, exc: BaseException | None) -> None:
        core = self.core
        crashed: Task | None = None
        with core.lock:
            slot = core.slots.pop(wid, None)
            if slot is None:
                return
            # Whatever is still in its channel never started: take it back.
            with contextlib.suppress(Exception):
                while len(slot.ch):
                    slot.ch.recv_many(TASK_CAPACITY)
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
                self.unpin(slot)
            if died and not slot.ready and not slot.retiring:
                core.init_crashes += 1
                if core.init_crashes >= _MAX_INIT_CRASHES and core.state is not State.BROKEN:
                    broken = WorkerCrashed(
                        f"{_MAX_INIT_CRASHES} pool workers in a row died before they were ready"
                    )
                    broken.__cause__ = exc
                    core.reason = broken
                    core.close_state(State.BROKEN)
            killed = crashed is not None and crashed.tid == slot.killed
            timed_out = crashed is not None and crashed.tid == slot.timed_out
            if crashed is not None and not killed and crashed.retries > 0:
                # Its worker died, or was killed because it ran past its
                # task_timeout: it runs again (on a new worker) while it may.
                crashed.retries -= 1
                core.counts["retried"] += 1
                tasks.insert(0, crashed)
                crashed = None
            core.pending.extendleft(reversed(tasks))
            # While stopping, a worker is still replaced if queued work needs it.
            replace = core.state is not State.BROKEN and (
                core.state is State.OPEN or bool(core.pending)
            )
        if crashed is not None and not killed:
            if timed_out:
                core.counts["timed_out"] += 1
                err: BaseException = TaskTimeout(
                    f"{crashed.name} ran longer than task_timeout={core.task_timeout} s in "
                    f"pool worker {wid} (pid {slot.worker.pid}); the worker was replaced"
                )
            else:
                core.counts["crashed"] += 1
                err = core.workers.crash_error(slot.worker, exc, crashed.name)
            with contextlib.suppress(InvalidStateError):
                crashed.future.set_exception(err)
        if core.state is State.BROKEN:
            core.fail_all(core.reason or WorkerCrashed("the pool is broken"))
            return
        if replace:
            try:
                core.start_slot()
            except BaseException as e:
                self.break_pool(e)
        else:
            with core.lock:
                for s in core.slots.values():
                    core.fill(s)

    def unpin(self, slot: Slot) -> None:
        core = self.core
        # Caller holds the lock. A worker that ended before it was ready may
        # have died before it unpickled its request (its main module failed
        # to import, say): the handles pickled in it would then count as in
        # transit for ever, and pin their segments until the program ends.
        # The task channel travelled in that request alone, so its count
        # says whether the request was unpickled; if not, take back both.
        with contextlib.suppress(Exception):
            if slot.ch.transit_pending() > 0:
                slot.ch.forget_transit()
                if core.results is not None:
                    core.results.forget_transit()

    def check_timeouts(self) -> None:
        core = self.core
        limit = core.task_timeout
        assert limit is not None
        now = time.monotonic()
        with core.lock:
            for s in core.slots.values():
                if (
                    s.queue
                    and s.ready
                    and not s.retiring
                    and s.timed_out < 0
                    and now - s.started_at > limit
                ):
                    s.timed_out = s.queue[0].tid
                    core.workers.kill(s.worker)

    def stop_idle_workers(self) -> bool:
        core = self.core
        # Shutting down: tell workers with nothing left to leave. True once
        # no worker is left.
        with core.lock:
            if core.pending:
                if core.slots and core.state is not State.BROKEN:
                    return False  # the workers still have work
                # Nobody will run these (a submit raced with the end): fail them.
                stranded = take_all(core.pending)
            else:
                stranded = []
            for s in core.slots.values():
                if not s.queue and not s.ch.closed:
                    s.retiring = True
                    s.ch.close()
            done = not core.slots
        for task in stranded:
            with contextlib.suppress(InvalidStateError):
                task.future.set_exception(
                    copy_error(core.broken or ShutdownError("the pool shut down"))
                )
        return done

    def break_pool(self, exc: BaseException) -> None:
        core = self.core
        with core.lock:
            if core.state is not State.BROKEN:
                core.reason = exc
                core.close_state(State.BROKEN)
        core.fail_all(core.reason or exc)

    def finish(self) -> None:
        core = self.core
        # The collector is leaving: no worker is left (or the pool broke).
        with core.lock:
            slots = list(core.slots.values())
            core.slots.clear()
            core.close_state(State.SHUTDOWN)
        for s in slots:
            with contextlib.suppress(ValueError):
                s.ch.close()
            core.workers.kill(s.worker)
            core.workers.join(s.worker, 5)
        rch, core.results = core.results, None
        if rch is not None:
            with contextlib.suppress(ValueError):
                rch.close()  # and dropped: its shared memory goes with the last holder
        del slots, rch
        core.workers.close()
        _live.discard(self)
        core.done_event.set()

    def watch_ctx(self) -> None:
        core = self.core
        ctx = core.ctx
        assert ctx is not None
        draining = False
        while not core.done_event.is_set():
            if ctx.wait(_TICK * 2):
                self.fail_all(ctx.err() or Cancelled(), kill=True)
                return
            if not draining and ctx.draining:
                draining = True
                with core.lock:
                    core.close_state(State.DRAINING)
                core.wake()


_live: weakref.WeakSet[Collector] = weakref.WeakSet()


def shutdown_all(pools: Iterable[Collector] | None = None) -> None:
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
            d.core.stop_intake(failing)
    for d in live:
        with contextlib.suppress(Exception):
            if not d.wait_stopped(_EXIT_GRACE_FAILING if failing else None):
                d.fail_all(ShutdownError("the program is exiting"), kill=True)
                d.wait_stopped(_EXIT_GRACE)
