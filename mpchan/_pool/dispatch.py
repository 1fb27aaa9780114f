"""The dispatch of a Pool: the calls that put work in and take it back (layer 7, ``_pool``).

``Pool`` (``executor.py``) is the public facade and ``MapRun`` (``map.py``)
a running map; both talk to a :class:`Dispatch` only. It owns the pool's
:class:`~mpchan._pool.core.PoolCore` (queue, slots, lock, state), its
:class:`~mpchan._pool.collector.Collector` (the thread that handles
replies and deaths) and, through the core, its worker set (the processes;
:class:`~mpchan._pool.workerset.LocalWorkerSet` here). It holds no
reference to the facade, and nothing it runs holds the Dispatch, so a pool
that its program drops is collected and shut down (the facade's finalizer
calls :meth:`Dispatch.close`) although the collector lives on until the
workers are gone.

    Pool.submit / MapRun --> Dispatch.submit / submit_chunk: pickle here,
        then (quiet pool) straight to an idle worker, else core.pending
        (the collector sends it in a batch)
    Future.cancel / kill --> cancel_task / kill_task (take it back from the
        worker's channel, or kill the worker running it)
    shutdown / drain / close --> core.stop_intake / close_state, collector

Roles, one way (each module imports only those after it)::

    executor -> map -> dispatch -> collector -> core -> task -> workerset -> worker

Process safety: every method may be called from any thread of the process
that made the pool; nothing here pickles but the calls it is given.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED
from typing import Any

from .._codec import cannot_pickle, pickle_value
from .._supervisor import Supervisor
from .._worker import describe_callable
from .collector import Collector
from .core import PoolCore, Settings, State, failed
from .task import PoolFuture, Slot, Task
from .worker import CALL, TASK_HDR
from .workerset import LocalWorkerSet

__all__ = ["Dispatch", "State"]


class Dispatch:
    """Everything behind one ``Pool``: its core, collector and workers.

    Process safety: every method may be called from any thread of the
    process that made it; it does not pickle.
    """

    def __init__(self, settings: Settings, *, sup: Supervisor, own_sup: bool) -> None:
        self.nworkers = settings.workers
        self.task_timeout = settings.task_timeout
        self.ctx = settings.ctx
        self.core = core = PoolCore(settings, lambda boot: LocalWorkerSet(sup, own_sup, boot))
        self.collector = Collector(core)
        try:
            for _ in range(settings.workers):
                core.start_slot()
        except BaseException:
            core.abort()
            raise
        self.collector.start()

    # -- state ----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """No more submits (shutdown, drain, broken). Never blocks."""
        return self.core.closed

    @property
    def broken(self) -> BaseException | None:
        """Why the pool broke, or None. Never blocks."""
        return self.core.broken

    def quiet_stop(self) -> bool:
        """True when intake stopped because of a drain (a running map then
        ends normally). Never blocks."""
        return self.core.quiet_stop()

    def check_open(self) -> None:
        """Raise why no work can be submitted now, if anything. Never blocks."""
        self.core.check_open()

    def draining(self) -> bool:
        """True once shutdown or drain began (or the pool's ctx is draining). Never blocks."""
        return self.core.draining()

    # -- submission -------------------------------------------------------------

    def submit(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> PoolFuture[Any]:
        """Pickle ``fn(*args, **kwargs)`` here and queue it; its Future.

        A call that cannot be pickled gets a Future holding the
        :class:`mpchan.PicklingError`, and nothing was queued.
        """
        try:
            ref = self.core.fns.get(fn)
            if ref is None:
                payload = pickle_value((fn, args, kwargs))
                key, blob = 0, None
            else:
                key, blob = ref
                payload = pickle_value((None, args, kwargs))
        except BaseException as e:
            self.check_open()
            return failed(cannot_pickle(f"the task {describe_callable(fn)}", e))
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
        return self.core.fns.get(fn)

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
        core = self.core
        ctx = self.ctx
        if core.state is not State.OPEN or ctx is not None:
            if ctx is not None and ctx.draining:
                with core.lock:
                    core.close_state(State.DRAINING)
            self.check_open()
        tid = next(core.tids)
        msg = TASK_HDR.pack(tid, kind, key) + payload
        task = Task(tid, msg, fn, core.retries, kind, n, owner, key, blob)
        fut = task.future
        fut.bind(task, self)
        core.submitted += 1
        if not core.pending and (core.parked or kind != CALL):
            # The pool is quiet (the collector waits): hand the task to an
            # idle worker now, for the lowest latency. A map chunk goes to
            # the least loaded worker with room even while the collector
            # runs: chunks are few and big, so a wake-up each is cheap, and
            # waiting for the collector to dispatch one can idle a worker.
            with core.lock:
                if not core.pending:
                    slot = core.direct_slot(kind, len(task.msg))
                    if slot is not None:
                        core.send(slot, [task])
                        return task
        # Otherwise the collector dispatches in batches: one wake-up per
        # batch for each worker, and none while it runs. A lock-free append
        # (atomic under the GIL) keeps a submitting loop fast.
        core.pending.append(task)
        if core.parked and not core.woken:
            core.woken = True
            core.wake()
        return task

    def cancel_task(self, task: Task) -> bool:
        """Take back a task that has not started; True if it is cancelled.

        Blocks: only for the lock. Process safety: any thread.
        """
        core = self.core
        fut = task.future
        with core.lock:
            slot = task.slot
            if slot is not None and (task.started or not core.withdraw(slot, {task.tid})):
                # Started, or the worker already took it: it runs.
                core.start_task(task)
                return False
        if slot is not None:
            # Out of every queue now: nobody else completes it.
            if fut.cancel_now():
                core.counts["cancelled"] += 1
                return True
            return False
        # Still pending (or never queued): the base class decides; the
        # dispatcher skips a cancelled task, and notifies its waiters here.
        if not Future.cancel(fut):
            return False
        with core.lock:
            if fut.state == CANCELLED:
                fut.set_running_or_notify_cancel()
        core.counts["cancelled"] += 1
        return True

    def kill_task(self, task: Task) -> bool:
        """Stop ``task``: cancel it, or kill the worker running it. True
        unless it had finished. Blocks: only for the lock. Process safety: any thread."""
        core = self.core
        if self.cancel_task(task):
            return True
        fut = task.future
        with core.lock:
            slot = task.slot
            if slot is None or task not in slot.queue or fut.done():
                return fut.cancelled()
            slot.killed = task.tid
            slot.retiring = True  # nothing more is sent to it
            core.workers.kill(slot.worker)
        if fut.cancel_now():
            core.counts["killed"] += 1
            return True
        return False

    def add_map(self, run: Any) -> None:
        """Track a running map (held weakly), for :meth:`shutdown`. Never blocks."""
        self.core.maps.add(run)

    def discard_map(self, run: Any) -> None:
        """The map ended. Never blocks."""
        self.core.maps.discard(run)

    def drain(self) -> None:
        """Stop intake as a drain: a running map ends quietly. Never blocks."""
        core = self.core
        with core.lock:
            core.close_state(State.DRAINING)
        core.wake()

    def close(self) -> None:
        """The facade was collected: the collector thread shuts the pool down
        (``shutdown(wait=False)``). Never blocks.

        Not done here: a finalizer may run in any thread at any moment (a
        garbage collection inside a map's own feeding), and the shutdown
        reads the running maps' input.
        """
        core = self.core
        core.abandoned = True
        core.wake()

    # -- the end ------------------------------------------------------------------

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        """Stop intake; cancel what has not started if asked; with ``wait``,
        return once every worker process has exited (see ``Pool.shutdown``).

        Blocks: with ``wait``, until the workers exited. Cancellation: none.
        Process safety: any thread.
        """
        self.core.stop_intake(cancel_futures)
        if wait and threading.current_thread() is not self.collector.thread:
            self.collector.wait_stopped(None)

    def wait_stopped(self, timeout: float | None) -> bool:
        """Wait until every worker is gone; True if they are.

        Blocks: up to ``timeout``. Cancellation: none. Process safety: any thread.
        """
        return self.collector.wait_stopped(timeout)

    def fail_all(self, exc: BaseException, *, kill: bool = False) -> None:
        """Fail everything queued or running with ``exc`` and stop intake;
        with ``kill``, kill the workers. Blocks: only for the lock."""
        self.collector.fail_all(exc, kill=kill)

    # -- replies, for a map's caller ------------------------------------------------

    def poll_replies(self) -> int:
        """See :meth:`Collector.poll_replies`. Never blocks."""
        return self.collector.poll_replies()

    def wait_replies(self, timeout: float) -> None:
        """See :meth:`Collector.wait_replies`. Blocks: up to ``timeout``."""
        self.collector.wait_replies(timeout)

    # -- introspection ------------------------------------------------------------

    def snapshot(self) -> tuple[list[tuple[Slot, str, int, int]], int, dict[str, int]]:
        """(per slot: slot, state, tasks done, queued), queue depth, counters. Never blocks."""
        core = self.core
        with core.lock:
            rows = []
            for s in core.slots.values():
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
            depth = len(core.pending)
            counts = dict(core.counts, submitted=core.submitted)
            counts["failed"] = core.raised + counts["crashed"] + counts["timed_out"]
        return rows, depth, counts

    def worker_count(self) -> int:
        """Worker processes now. Never blocks."""
        return len(self.core.slots)
