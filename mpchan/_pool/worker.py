"""The child side of a Pool: the long-running loop of one pool worker (layer 6).

A pool worker is an ordinary supervised worker process (``_worker``: death
watch, signal policy) running :func:`pool_worker_loop` as one long task. It
reads tasks from its *own* task channel and writes one reply per task, in
order, to the pool's shared result channel, *before* it starts the next task.
So the parent always knows which task a worker is running: the oldest one
it assigned to that worker and got no reply for.

Wire format (every message is ``bytes``)::

    parent -> worker  (task channel of that worker)
        TASK_HDR(tid, kind, fn_key) + payload
            kind CALL:   pickle((fn, args, kwargs))               one call
            kind CHUNK1: pickle((fn, [x0, x1, ...]))              fn(x) for each x
            kind CHUNKN: pickle((fn, [(a0, b0), ...]))            fn(*t) for each t
            kind DEFINE: the by-value pickle of a function        (tid 0)
            fn_key 0: ``fn`` is in the payload (by reference); else ``fn`` is
            None there and the function is the one a DEFINE with that key
            gave this worker before (see ``FN_SLOTS``)
        channel closed: leave the loop, and the process

    worker -> parent  (result channel shared by the pool)
        RES_HDR(tid, wid, seconds) + reply
            reply: b"R" + pickle(value)  |  b"E"/b"S" + failure   (as ``_worker``)
            a chunk's value is (values, failure_reply_or_None): the values
            computed before the first exception, then that exception
        control messages have tid < 0: READY (initializer done), RETIRING
        (this worker leaves after the reply it just sent; nothing is
        running), INIT_FAILED (reply carries the initializer's exception)

The worker takes one message at a time, and the next only after it answered
the last: a task still in the channel has not started, so the parent can
take it back (``Future.cancel``) by draining the channel and sending the
rest again.

Functions by value: the worker keeps the last ``FN_SLOTS`` functions that
DEFINEs gave it, oldest dropped first; the parent mirrors that table for
each worker (same messages, same order, same rule), so it knows which keys
a worker holds without asking.

The worker never decides which task comes next and never talks to other
workers; everything about scheduling, timeouts and crashes is the parent's
(``_pool``).
"""

from __future__ import annotations

import os
import pickle
import struct
import time
from typing import TYPE_CHECKING, Any

from .._codec import pickle_value
from .._errors import EndOfChannel
from .._worker import (
    BROKEN,
    RAISED,
    RESULT,
    call_again,
    encode_failure,
    leave,
    run_call,
    take_boot,
)

if TYPE_CHECKING:
    from .._channel import Channel

__all__ = ["pool_worker_loop"]

# Task kinds.
CALL = 0
CHUNK1 = 1
CHUNKN = 2
DEFINE = 3  # not a task: a function by value for later tasks

# Control "task ids" in the result stream.
READY = -1
RETIRING = -2
INIT_FAILED = -3
WAKE = -4  # written by the parent itself to wake its collector

TASK_HDR = struct.Struct("<qBQ")
RES_HDR = struct.Struct("<qid")

FN_SLOTS = 64  # functions by value a worker keeps (the parent mirrors the table)
_YIELD_AFTER = 0.001  # a task that ran longer gives the CPU away once when it ends

_loads = pickle.loads


def pool_worker_loop(
    tasks: Channel,
    results: Channel,
    wid: int,
    initialize: bool,
    max_tasks: int | None,
    max_memory: int | None,
    retries: int = 0,
) -> None:
    """Serve tasks from ``tasks`` until it is closed (or a recycle limit is
    hit); then end the process, so no pool state outlives the pool.

    ``wid`` names this worker in every reply. With ``initialize``, the
    pool's ``initializer(*initargs)``, given to this process when it started
    (``_worker.take_boot``), runs once, first. After ``max_tasks`` tasks, or
    once the resident memory passes ``max_memory`` bytes after a task, the
    worker announces RETIRING and leaves. ``retries``: an item of a map
    chunk whose call raised is called again, here, up to that many times (a
    single call is queued again by the parent instead, which keeps its
    count).

    Blocks: for the life of the pool worker. Cancellation: the parent closes
    ``tasks``, or kills the process. Process safety: runs in one worker
    process, one per task channel.
    """
    send = results.send
    if initialize:
        try:
            # Pickled by the parent's codec, or (initargs that only a
            # starting process may get) passed as process arguments.
            initializer, initargs = take_boot()
            if isinstance(initializer, bytes):
                initializer = _loads(initializer)
            if isinstance(initargs, bytes):
                initargs = _loads(initargs)
            initializer(*initargs)
        except BaseException as e:
            send(RES_HDR.pack(INIT_FAILED, wid, 0.0) + RAISED + encode_failure(e, ""))
            leave()
        del initializer, initargs
    send(RES_HDR.pack(READY, wid, 0.0) + str(os.getpid()).encode())
    recv = tasks.recv
    fns: dict[int, Any] = {}
    done = 0
    while True:
        try:
            msg = recv()
        except EndOfChannel:
            leave()
        tid, kind, key = TASK_HDR.unpack_from(msg)
        if kind == DEFINE:
            _define(fns, key, memoryview(msg)[TASK_HDR.size :])
            continue
        start = time.perf_counter()
        reply, elapsed = _run(
            kind, memoryview(msg)[TASK_HDR.size :], fns.get(key) if key else None, retries
        )
        if elapsed < 0:
            elapsed = time.perf_counter() - start
        del msg
        send(RES_HDR.pack(tid, wid, elapsed) + reply)
        del reply
        if time.perf_counter() - start > _YIELD_AFTER:
            # Let a waiting thread of the parent (the reply's reader, a
            # map's caller with chunks to pickle) have this CPU now,
            # rather than after this process's time slice: on a machine
            # with as many workers as cores it otherwise waits a tick.
            os.sched_yield()
        done += 1
        if (max_tasks is not None and done >= max_tasks) or (
            max_memory is not None and _rss() > max_memory
        ):
            # What is still in the channel goes back to the parent's queue
            # when it sees this worker gone.
            send(RES_HDR.pack(RETIRING, wid, 0.0))
            leave()


class _Undefined:
    """A DEFINE whose function did not unpickle: tasks using it fail with this."""

    __slots__ = ("failure",)

    def __init__(self, failure: bytes) -> None:
        self.failure = failure


def _define(fns: dict[int, Any], key: int, blob: memoryview) -> None:
    # The parent drops the oldest entry of its mirror at the same point.
    if key not in fns and len(fns) >= FN_SLOTS:
        del fns[next(iter(fns))]
    try:
        fns[key] = _loads(blob)
    except BaseException as e:
        fns[key] = _Undefined(BROKEN + encode_failure(e, "unpickling the task"))


def _run(kind: int, payload: memoryview, by_key: Any, retries: int) -> tuple[bytes, float]:
    """Run one task; return its reply and the seconds its calls took (-1: all of it)."""
    if isinstance(by_key, _Undefined):
        return by_key.failure, -1.0
    if kind == CALL:
        return run_call(payload, by_key), -1.0
    try:
        fn, items = _loads(payload)
    except BaseException as e:
        return BROKEN + encode_failure(e, "unpickling the task"), -1.0
    if by_key is not None:
        fn = by_key
    values: list[Any] = []
    failure: bytes | None = None
    # Only the calls are timed: the parent sizes chunks from the time per item.
    start = time.perf_counter()
    try:
        if retries:
            star = kind != CHUNK1
            for x in items:
                values.append(call_again(fn, x, retries, star=star))
        elif kind == CHUNK1:
            # list.extend keeps what it appended before an exception.
            values.extend(map(fn, items))
        else:
            values.extend(fn(*a) for a in items)
    except BaseException as e:
        failure = RAISED + encode_failure(e, "", skip_frames=2 if retries else 1)
    elapsed = time.perf_counter() - start
    del fn, items
    try:
        return RESULT + pickle_value((values, failure)), elapsed
    except BaseException as e:
        return BROKEN + encode_failure(e, "pickling the result"), elapsed


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    """Resident set size of this process in bytes (cheap on Linux)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)
