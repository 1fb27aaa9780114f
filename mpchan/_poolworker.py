"""The child side of a Pool: the long-running loop of one pool worker (layer 6).

A pool worker is an ordinary supervised worker process (``_worker``: death
watch, signal policy) running :func:`pool_worker_loop` as one long task. It
reads tasks from its *own* task channel and writes one reply per task, in
order, to the pool's shared result channel, *before* it starts the next task.
So the parent always knows which task a worker is running: the oldest one
it assigned to that worker and got no reply for.

Wire format (every message is ``bytes``)::

    parent -> worker  (task channel of that worker)
        _TASK_HDR(tid, kind) + payload
            kind CALL:   b"T" + pickle((fn, args, kwargs))     one call
            kind CHUNK1: pickle((fn, [x0, x1, ...]))             fn(x) for each x
            kind CHUNKN: pickle((fn, [(a0, b0), ...]))           fn(*t) for each t
        channel closed: leave the loop

    worker -> parent  (result channel shared by the pool)
        _RES_HDR(tid, wid, seconds) + reply
            reply: b"R" + pickle(value)  |  b"E"/b"S" + failure   (as ``_worker``)
            a chunk's value is (values, failure_reply_or_None): the values
            computed before the first exception, then that exception
        control messages have tid < 0: READY (initializer done), RETIRING
        (this worker leaves after the reply it just sent; nothing is
        running), INIT_FAILED (reply carries the initializer's exception)

The worker never decides which task comes next and never talks to other
workers; everything about scheduling, timeouts and crashes is the parent's
(``_pool``).
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import cloudpickle

from ._errors import EndOfChannel
from ._worker import BROKEN, RAISED, RESULT, _encode_failure

if TYPE_CHECKING:
    from ._channel import Channel

__all__ = ["pool_worker_loop"]

# Task kinds.
CALL = 0
CHUNK1 = 1
CHUNKN = 2

# Control "task ids" in the result stream.
READY = -1
RETIRING = -2
INIT_FAILED = -3
WAKE = -4  # written by the parent itself to wake its collector

TASK_HDR = struct.Struct("<qB")
RES_HDR = struct.Struct("<qid")

# How many queued tasks one recv takes; the parent bounds what is queued.
_RECV_BATCH = 64
_YIELD_AFTER = 0.001  # a task that ran longer gives the CPU away once when it ends

_loads = pickle.loads
_dumps = pickle.dumps
_HIGHEST = pickle.HIGHEST_PROTOCOL


def dump_value(value: Any) -> bytes:
    """Pickle ``value``: the C pickler first, cloudpickle when it cannot.

    Raises whatever cloudpickle raises when neither can. Never blocks.
    """
    try:
        return _dumps(value, _HIGHEST)
    except Exception:
        data: bytes = cloudpickle.dumps(value, protocol=_HIGHEST)
        return data


def pool_worker_loop(
    tasks: Channel,
    results: Channel,
    wid: int,
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
    max_tasks: int | None,
    max_memory: int | None,
    exit_after: bool,
) -> None:
    """Serve tasks from ``tasks`` until it is closed (or a recycle limit is hit).

    ``wid`` names this worker in every reply. ``initializer(*initargs)`` runs
    once, first. After ``max_tasks`` tasks, or once the resident memory passes
    ``max_memory`` bytes after a task, the worker announces RETIRING and its
    process exits; with ``exit_after`` the process also exits when the
    channel closes (so no initializer state reaches the warm cache).

    Blocks: for the life of the pool worker. Cancellation: the parent closes
    ``tasks``, or kills the process. Process safety: runs in one worker
    process, one per task channel.
    """
    send = results.send
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as e:
            send(RES_HDR.pack(INIT_FAILED, wid, 0.0) + RAISED + _encode_failure(e, ""))
            _leave()
    send(RES_HDR.pack(READY, wid, 0.0) + str(os.getpid()).encode())
    done = 0
    while True:
        try:
            batch = tasks.recv_many(_RECV_BATCH)
        except EndOfChannel:
            if exit_after:
                _leave()
            return
        for msg in batch:
            tid, kind = TASK_HDR.unpack_from(msg)
            start = time.perf_counter()
            reply, elapsed = _run(kind, memoryview(msg)[TASK_HDR.size :])
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
                # The tasks taken with this batch and not started go back
                # to the parent's queue when it sees this worker gone.
                send(RES_HDR.pack(RETIRING, wid, 0.0))
                _leave()
        del batch


def _leave() -> NoReturn:
    # End the process (not just the loop): its state must not reach the
    # warm cache. The parent expects this exit (it was announced).
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass
    os._exit(0)


def _run(kind: int, payload: memoryview) -> tuple[bytes, float]:
    """Run one task; return its reply and the seconds its calls took (-1: all of it)."""
    if kind == CALL:
        return _run_call(payload), -1.0
    try:
        fn, items = _loads(payload)
    except BaseException as e:
        return BROKEN + _encode_failure(e, "unpickling the task"), -1.0
    values: list[Any] = []
    failure: bytes | None = None
    # Only the calls are timed: the parent sizes chunks from the time per item.
    start = time.perf_counter()
    try:
        if kind == CHUNK1:
            # list.extend keeps what it appended before an exception.
            values.extend(map(fn, items))
        else:
            values.extend(fn(*a) for a in items)
    except BaseException as e:
        failure = RAISED + _encode_failure(e, "", skip_frames=1)
    elapsed = time.perf_counter() - start
    del fn, items
    try:
        return RESULT + dump_value((values, failure)), elapsed
    except BaseException as e:
        return BROKEN + _encode_failure(e, "pickling the result"), elapsed


def _run_call(payload: memoryview) -> bytes:
    try:
        fn, args, kwargs = _loads(payload[1:])
    except BaseException as e:
        return BROKEN + _encode_failure(e, "unpickling the task")
    try:
        value = fn(*args, **kwargs)
    except BaseException as e:
        # SystemExit included: sys.exit() in a task is an exception like any other.
        del fn, args, kwargs
        return RAISED + _encode_failure(e, "", skip_frames=1)
    del fn, args, kwargs
    try:
        return RESULT + dump_value(value)
    except BaseException as e:
        return BROKEN + _encode_failure(e, "pickling the result")


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    """Resident set size of this process in bytes (cheap on Linux)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)
