"""The worker side of a pipeline: the loop every stage worker runs (layer 8).

The parent (``_stream_run``) starts :func:`stage_main` in a worker process
(``mpchan.go``) once per worker of each stage. This module is the whole of
the pipeline a worker process imports; it never imports the parent side.

The path of one chunk through a worker of a ``map``, ``filter`` or
``flat_map`` stage::

    in_ch.recv() -> (seq, idx, items, failed)        (or a Resume, handed over first)
        |
        |  hold:     journal <- (seq, idx, items, failed, spent)
        |  per item: ctx.check(); progress += 1
        |            _call: fn(item), under SIGALRM with a timeout, called
        |            again while retries allow (a failed call re-journals spent)
        |            ok -> its result(s); raised -> ItemError (skip: go on;
        |            fail: the fatal record, and no item after it)
        |  release:  journal emptied; progress -= items started
        v
    out_ch.send((seq, idx', results, failed'))
        a result that cannot be pickled fails its own item, and the rest is sent

A ``batch`` stage (one worker, no journal) gathers items into lists of
``size``; ordered, it first puts chunks back in ``seq`` order. However a
worker ends, it sends its trace (if asked) and counts itself done on its
stage's WaitGroup; the last one to finish closes the stage's output.

Failures travel in band: a failed item (``on_error="fail"``) ends its
chunk's items there, and the worker sends on the results before it, then
the fatal record, and goes on working (later chunks are dropped, or passed
on empty when ordered). A bug, or a message that cannot be passed on,
cancels the pipeline (the picklable cancel) and then propagates; a
cancelled pipeline ends the worker quietly.

Tracing (``stream(..., _trace=True)``, used by ``mpchan run --trace``): the
worker records (start, end, outcome) of every item it runs, from
``time.monotonic()`` (system-wide, so the processes' times compare), at most
``_TRACE_LIMIT`` events (the rest are counted as dropped), and sends them on
the trace channel as it ends -- also when it fails or is cancelled. Without
tracing the worker gets no channel and records nothing.

Invariants:
    - an item is called at most ``retries + 1`` times for its own failures
      (exceptions, time-outs, a worker that died running it): the calls
      spent travel with the chunk, in the journal and in a resume;
    - the journal is emptied and the progress counter cleared before a
      chunk's results are sent: an item whose results were sent on is
      never run again;
    - ordered (``keep_empty``), every source chunk a worker takes gives
      exactly one message out, empty if need be, so the consumer can count
      every ``seq``;
    - once this worker failed chunk ``s``, it runs no chunk after ``s``
      (the run ends at ``s``; nothing after it is wanted);
    - the trace message is sent once, with ``send_nowait`` (the trace
      channel has room for one a worker): it never blocks and never raises.

Ownership:
    - the worker writes its own journal and progress counter and nothing
      else of its :class:`~mpchan._stream_wire.Guard`;
    - it never closes its input; it closes its output only as the last
      worker of its stage to finish (``wg.count == 0``);
    - ``_worker.Alarm`` owns SIGALRM and the real-time interval timer for
      the length of one call with a timeout (stages run in the main thread).

Items run through ``_worker.call_again``, the per-item retry runner a
pool's map items use too (``retries`` and ``timeout``: see ``_policy``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from typing import Any

from ._channel import Channel
from ._codec import pickle_value
from ._context import CancelFunc, Context
from ._errors import (
    Cancelled,
    ChannelClosed,
    EndOfChannel,
    PicklingError,
    SerializationError,
    WouldBlock,
)
from ._stream_wire import (
    Guard,
    ItemError,
    Journal,
    Message,
    Resume,
    Stage,
    TraceEvent,
    dumps_or_none,
    fatal_of,
    index_at,
    item_error,
)
from ._sync import WaitGroup
from ._worker import RETRIED, call_again

__all__ = ["stage_main"]

_TRACE_LIMIT = 500_000  # trace events kept per worker (about 100 bytes each)


class _Held:
    """The worker side of a :class:`Guard`."""

    __slots__ = ("guard", "record", "started")

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.started = 0
        self.record: Journal | None = None

    def hold(self, record: Journal) -> None:
        self.record = record
        # b"": held but cannot be journaled (the parent then cannot run it again)
        self.guard.journal.send_nowait(dumps_or_none(record) or b"")

    def start_item(self) -> None:
        self.guard.progress.add(1)
        self.started += 1

    def spend(self, pos: int, spent: int) -> None:
        """Item ``pos`` failed ``spent`` calls so far (rare path: re-journal)."""
        assert self.record is not None
        seq, idx, items, failed, spent_list = self.record
        spent_list = list(spent_list) if spent_list else [0] * len(items)
        spent_list[pos] = spent
        with contextlib.suppress(WouldBlock, EndOfChannel):
            self.guard.journal.recv_nowait()
        self.hold((seq, idx, items, failed, spent_list))

    def release(self) -> None:
        if self.record is not None:
            self.record = None
            self.guard.journal.recv_nowait()  # Invariant: it holds our one record
        if self.started:
            self.guard.progress.add(-self.started)
            self.started = 0


def _listed(fn: Any) -> Any:
    """``fn`` whose iterable result is read to a list inside the call (a
    flat_map item that fails half-way is retried and timed as one call)."""

    def listed(item: Any) -> list[Any]:
        return list(fn(item))

    return listed


class _Recorder:
    """Trace events of one stage worker, bounded by ``_TRACE_LIMIT``."""

    __slots__ = ("dropped", "events")

    def __init__(self) -> None:
        self.events: list[TraceEvent] = []
        self.dropped = 0

    def add(self, start: float, outcome: str, error: str | None = None) -> None:
        end = time.monotonic()
        if len(self.events) < _TRACE_LIMIT:
            self.events.append((start, end, outcome, error))
        else:
            self.dropped += 1

    def send(self, ch: Channel, index: int) -> None:
        # Never blocks (one message a worker fits the capacity) and never
        # raises: a lost trace must not hide the worker's own outcome.
        with contextlib.suppress(Exception):
            ch.send_nowait(
                {"stage": index, "pid": os.getpid(), "events": self.events, "dropped": self.dropped}
            )


def stage_main(
    stage: Stage,
    index: int,
    in_ch: Channel,
    out_ch: Channel,
    wg: WaitGroup,
    ctx: Context,
    cancel: CancelFunc,
    keep_empty: bool,
    trace_ch: Channel | None = None,
    guard: Guard | None = None,
    resume: Resume | None = None,
) -> dict[str, Any]:
    """One worker of one stage: receive chunks, apply the stage, send results on.

    Runs in a worker process (``mpchan.go``); returns its counters
    (``items_in``, ``items_out``, ``busy_s``, ``blocked_in_s``,
    ``blocked_out_s``). A failed item travels on in band (see the module
    docstring) and the worker goes on. ``guard``: where it leaves what it
    holds (none for a batch); ``resume``: a chunk to run first, taken over
    from a worker that died. With ``trace_ch`` it records every item it
    runs and sends the record there as it ends, however it ends.

    Blocks: until ``in_ch`` is closed and drained and every result is sent
    (waiting on ``in_ch`` for input, on ``out_ch`` for room, and in the
    stage's function).
    Cancellation: a cancelled ``ctx`` (or a channel closed under it) ends
    it quietly, at its next channel operation or item; what it held stays
    in its journal, unsent. A bug, or a message that cannot be passed on,
    calls ``cancel`` (the whole pipeline stops) and then propagates with
    its traceback.
    Process safety: one call per worker process, in its main thread (a
    time-out is a SIGALRM); the stage's workers share ``in_ch``, ``out_ch``
    and ``wg``, each has its own ``guard``.
    """
    perf = time.perf_counter
    clock = time.monotonic
    rec = _Recorder() if trace_ch is not None else None
    held = _Held(guard) if guard is not None else None
    st: dict[str, Any] = {
        "items_in": 0,
        "items_out": 0,
        "busy_s": 0.0,
        "blocked_in_s": 0.0,
        "blocked_out_s": 0.0,
    }
    kind = stage.kind
    skip = stage.on_error == "skip"
    call: Any = _listed(stage.fn) if kind == "flat_map" else stage.fn
    retries, timeout = stage.retries, stage.timeout
    on_retry = held.spend if held is not None else None
    failed_at: int | None = None  # seq of the first chunk this worker failed
    pending: dict[int, tuple[list[Any], list[ItemError] | None]] = {}  # batch, ordered
    tails: list[list[Any]] = []
    acc: list[Any] = []
    next_seq = 0

    def send(msg: Message) -> None:
        t = perf()
        out_ch.send(msg, ctx=ctx)
        st["blocked_out_s"] += perf() - t
        st["items_out"] += len(msg[2])

    def emit(msg: Message, items: list[Any], pos: list[int] | None) -> None:
        nonlocal failed_at
        try:
            send(msg)
        except SerializationError:
            # a result that cannot be pickled fails its own item, not the chunk
            fixed = _without_unpicklable(stage, index, msg, items, pos)
            if fixed is None:
                raise
            if fatal_of(fixed[3]) is not None and msg[0] is not None:
                failed_at = msg[0] if failed_at is None else min(failed_at, msg[0])
            send(fixed)

    def batches(items: list[Any], flush: bool) -> list[Any]:
        acc.extend(items)
        out = []
        while len(acc) >= stage.size:
            out.append(acc[: stage.size])
            del acc[: stage.size]
        if flush and acc:  # a fatal failure: the run ends with this chunk
            out.append(list(acc))
            acc.clear()
        return out

    def batch_chunk(seq: int | None, items: list[Any], failed: list[ItemError] | None) -> None:
        nonlocal next_seq
        t1 = perf()
        if seq is None:
            tails.append(items)
            return
        if not keep_empty:
            out = batches(items, fatal_of(failed) is not None)
            st["busy_s"] += perf() - t1
            if out or failed:
                send((seq, None, out, failed))
            return
        pending[seq] = (items, failed)
        while next_seq in pending:
            its, fl = pending.pop(next_seq)
            out = batches(its, fatal_of(fl) is not None)
            st["busy_s"] += perf() - t1
            send((next_seq, None, out, fl))
            next_seq += 1
            t1 = perf()

    def run_chunk(
        seq: int | None,
        idx: Any,
        items: list[Any],
        failed: list[ItemError] | None,
        spent: list[int] | None,
        crash_pos: int | None,
        crash: ItemError | None,
    ) -> None:
        nonlocal failed_at
        if held is not None and seq is not None:
            held.hold((seq, idx, items, failed, spent))
        t1 = perf()
        out: list[Any] = []
        pos: list[int] = []  # the position in items of each result
        fatal: ItemError | None = None
        for j, item in enumerate(items):
            if j == crash_pos and crash is not None:
                # its last worker died running it, and it has no calls left
                if rec is not None:
                    rec.add(clock(), "error" if crash.fatal else "skipped", crash.error)
                if crash.fatal:
                    fatal = crash
                    break
                failed = _with_skipped(failed, crash)
                continue
            ctx.check()
            if held is not None:
                held.start_item()
            started = 0.0 if rec is None else clock()
            try:
                value = call_again(
                    call,
                    item,
                    retries,
                    spent=spent[j] if spent else 0,
                    timeout=timeout,
                    on_retry=on_retry,
                    key=j,
                )
            except RETRIED as exc:  # a failed item (what a retry would run again)
                error = item_error(exc, index, index_at(idx, j), item, fatal=not skip)
                if rec is not None:
                    rec.add(started, "skipped" if skip else "error", error.error)
                if skip:
                    failed = _with_skipped(failed, error)
                    continue
                fatal = error
                break
            if rec is not None:
                rec.add(started, "ok")
            if kind == "map":
                out.append(value)
                pos.append(j)
            elif kind == "filter":
                if value:
                    out.append(item)
                    pos.append(j)
            else:
                out.extend(value)
                pos.extend(itertools.repeat(j, len(value)))
        if fatal is not None:
            # this item comes before any failure from upstream in this chunk
            failed = [r for r in failed or () if not r.fatal]
            failed.append(fatal)
            if seq is not None:
                failed_at = seq if failed_at is None else min(failed_at, seq)
        if held is not None:
            held.release()
        st["busy_s"] += perf() - t1
        idx = _select(idx, pos, len(items), kind == "flat_map")
        if out or failed or keep_empty or seq is None:
            emit((seq, idx, out, failed), items, pos)

    try:
        while True:
            spent: list[int] | None = None
            crash_pos: int | None = None
            crash: ItemError | None = None
            if resume is not None:
                seq, idx, items, failed, spent, crash_pos, crash = resume
                resume = None
            else:
                t0 = perf()
                try:
                    seq, idx, items, failed = in_ch.recv(ctx=ctx)
                except EndOfChannel:
                    break
                st["blocked_in_s"] += perf() - t0
            st["items_in"] += len(items)
            if kind == "batch":
                batch_chunk(seq, items, failed)
            elif failed_at is not None and seq is not None and seq > failed_at:
                # this worker failed an earlier chunk: the run ends there, and
                # nothing after it is wanted
                if keep_empty:
                    send((seq, None, [], None))
            else:
                run_chunk(seq, idx, items, failed, spent, crash_pos, crash)
        if kind == "batch":
            for items in tails:
                acc.extend(items)
            rest = batches([], True)
            if rest:
                emit((None, None, rest, None), rest, None)
    except (Cancelled, ChannelClosed):
        pass  # the pipeline was cancelled, or closed under it: end quietly
    except BaseException:
        # anything else (a bug, a message that cannot be passed on): fail the
        # pipeline at once rather than when the consumer notices
        cancel(("error", index, os.getpid()))
        raise
    finally:
        if rec is not None and trace_ch is not None:
            rec.send(trace_ch, index)
        wg.done()
        if wg.count == 0:
            out_ch.close()
    return st


def _select(idx: Any, pos: list[int], n: int, derived: bool) -> Any:
    """The index of the results at positions ``pos`` of a chunk of ``n`` items."""
    if idx is None:
        return None
    if not derived and (not pos or pos[-1] == len(pos) - 1):
        # the first len(pos) items, in order (all of them, or up to a failure)
        return idx if type(idx) is int or len(pos) == n else idx[: len(pos)]
    if type(idx) is int:
        return [idx + p for p in pos]
    return [idx[p] for p in pos]


def _with_skipped(failed: list[ItemError] | None, record: ItemError) -> list[ItemError]:
    # Invariant: a fatal record stays last.
    if not failed:
        return [record]
    if failed[-1].fatal:
        return [*failed[:-1], record, failed[-1]]
    return [*failed, record]


def _pickle_problem(value: Any) -> str | None:
    """Why ``value`` cannot be pickled (as a channel pickles), or None if it can."""
    try:
        pickle_value(value)
    except BaseException as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _without_unpicklable(
    stage: Stage, index: int, msg: Message, items: list[Any], pos: list[int] | None
) -> Message | None:
    """``msg`` with each result that cannot be pickled made a failure of its
    item (skipped, or fatal: the results after it dropped); None if every
    result pickles (the message failed for another reason)."""
    seq, idx, out, failed = msg
    if pos is None:
        return None
    upstream = list(failed or ())
    up_fatal = upstream.pop() if upstream and upstream[-1].fatal else None
    kept: list[Any] = []
    kept_idx: list[int | None] = []
    errors: list[ItemError] = []
    for q, value in enumerate(out):
        i = index_at(idx, q)
        problem = _pickle_problem(value)
        if problem is None:
            kept.append(value)
            kept_idx.append(i)
            continue
        err = PicklingError(f"cannot pickle the result ({type(value).__name__}): {problem}")
        record = item_error(
            err, index, i, items[pos[q]], fatal=stage.on_error == "fail", with_traceback=False
        )
        errors.append(record)
        if record.fatal:
            up_fatal = None
            break
    if not errors:
        return None
    if up_fatal is not None:
        errors.append(up_fatal)
    return (seq, None if idx is None else kept_idx, kept, upstream + errors or None)
