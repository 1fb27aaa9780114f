"""Streaming pipelines: stages in worker processes joined by channels (layer 8).

Written only against the public API of the lower layers (``Channel``,
``WaitGroup``, contexts, ``go``).

Data flow of ``stream(src).map(f, workers=2).filter(g).map(h)``::

    parent                      worker processes (mpchan.go)           parent
    ------                      ----------------------------           ------
    feeder thread               stage 0: f x2      stage 1: g   stage 2: h
    next(src) --(message)-----> ch0 --> [f] [f] --> ch1 --> [g] --> ch2 --> [h] --> ch3 --> consumer
         ^                               |   |                                             |
         |                      journal, progress (one pair a worker)  <-- read after a death
         +------------------ ordered: window of W chunks in flight <---------------------+

    every hop carries one message ``(seq, idx, items, failed)``:
      seq     numbers the source chunk (``None`` for the tail a ``batch``
              stage emits at the end); every stage keeps it, so an ordered
              pipeline is put back in source order by the consumer alone.
      idx     the source index of each item: an int, the index of the first,
              while the items are consecutive source items (one for one); a
              list once a stage dropped or multiplied some (a derived item
              has the index of the source item it came from); ``None`` after
              a ``batch``. (An int, not a range: a range pickles slowly.)
      failed  ``None``, or the :class:`_ItemError` records of the chunk's items
              that failed: skipped ones (``on_error="skip"``), and at most one
              fatal one, always last, after which the chunk holds no item.

Failures travel in band, with the chunk they belong to: a stage that fails
an item (``on_error="fail"``) sends on the results of the chunk's items
before it, then the fatal record, and goes on working.  The consumer stops
the input; in order, it delivers every result before the first fatal record,
then ends the run and raises it; unordered, it delivers what is in flight,
then raises the first fatal record that arrived.  So whatever fails -- an
exception, a result that cannot be pickled, a killed worker, the source --
the results of the items before it are delivered first.

A worker's death (SIGKILL, ``os._exit``): before running a chunk a worker
writes it to its *journal* (a channel of capacity 1) and counts the items it
starts on its *progress* counter (a WaitGroup used as a shared integer); it
clears both before sending the results on.  When its process dies the
consumer reads both: progress ``k`` (1..n) means item ``k - 1`` was running.
That item counts a failed call, and a replacement worker (same stage, same
WaitGroup slot) runs the chunk again -- its items that had finished too,
their results died with the process -- or, once the item's calls are spent,
runs the items before it and fails that one (skipped, or fatal) with
``WorkerCrashed``.  A death outside an item (waiting for input, sending
results: nothing to blame, and results may already be on their way) fails
the whole run at once.  The price: one more pickling and copy of each chunk
a stage runs (the journal), and one counter update an item.

Invariants:
    - each channel is closed exactly by the last worker of the stage that
      writes it to finish (a WaitGroup per stage counts them; a replacement
      takes over the count of the worker it replaces), or by the feeder for
      the first one; so the consumer's loop ends only after every item fed
      was handled by every stage.
    - ordered: the feeder never sends chunk ``s`` before the consumer has
      delivered chunk ``s - W``, so the reorder buffer holds at most ``W``
      chunks and no stage can block forever on a consumer that waits for a
      missing chunk (the missing one is always among the ``W`` in flight).
    - memory is bounded end to end: every channel has a capacity, the feeder
      blocks on a full first channel and reads the source lazily.
    - an item is called at most ``retries + 1`` times for its own failures
      (exceptions, time-outs, its worker dying while running it); an item
      whose results were sent on is never run again.
    - a journal holds at most one chunk: its worker's, from before the first
      item starts until before the results are sent.

Tracing (``stream(..., _trace=True)``, used by ``mpchan run --trace``):
each stage worker records (start, end, outcome) of every item it runs,
from ``time.monotonic()`` (system-wide, so the processes' times compare),
at most ``_TRACE_LIMIT`` a worker (the rest are counted as dropped), and
sends them on one trace channel (capacity: one message per worker, so the
send never waits) as it ends -- also when it fails or is cancelled.  The
consumer takes them after joining the workers.  Without tracing the
workers get no channel and record nothing.

Ownership:
    - the pipeline context (``with_cancel(ctx)``) is cancelled by whoever
      ends the run: a stage worker hit by a bug calls the picklable cancel
      before it raises; the consumer on close, after a fatal failure, or on
      finding a worker dead outside an item; its cause says who.
    - a worker writes its own journal and progress; the consumer reads and
      clears them only once that worker's process is dead, before starting
      its replacement.
    - the consumer (the thread iterating the stream) replaces dead workers,
      joins every worker, and kills (SIGKILL, by pid) those still busy
      shortly after a cancel.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from . import _metrics
from ._channel import Channel
from ._codec import pickle_value
from ._context import CancelFunc, Context, background, with_cancel
from ._errors import (
    Cancelled,
    ChannelClosed,
    EndOfChannel,
    PicklingError,
    SerializationError,
    TaskTimeout,
    WorkerCrashed,
    WouldBlock,
    rebuild_remote,
)
from ._go import GoHandle, go
from ._sync import WaitGroup

__all__ = ["Stream", "stream"]

OnError = Literal["fail", "skip"]
Kind = Literal["map", "filter", "flat_map", "batch"]

_POLL_S = 0.25  # how often a waiting consumer looks at the run (deaths, drain)
_MAX_CHUNK = 16  # largest adaptive chunk (items sent together)
_DRAIN_CHECK_S = 0.05  # a feeder blocked on a full stage looks for a drain this often
_KILL_AFTER_S = 0.5  # grace between a hard cancel and SIGKILL of busy workers
_MAX_FAILURES = 100  # failed items kept per stage with on_error="skip"
_TRACE_LIMIT = 500_000  # trace events kept per worker (about 100 bytes each)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

# One traced item: (start, end) from time.monotonic(), outcome ("ok",
# "skipped" or "error"), and the error ("Type: message") or None.
TraceEvent = tuple[float, float, str, str | None]

# A message between stages: (seq, idx, items, failed), see the module docstring.
# (idx: an int, a list of int or None; typed Any, as the code that reads it takes all)
Message = tuple[int | None, Any, list[Any], "list[_ItemError] | None"]


@dataclass(frozen=True)
class _Stage:
    kind: Kind
    fn: Callable[..., Any] | None
    workers: int
    capacity: int
    ordered: bool
    on_error: OnError
    retries: int
    timeout: float | None
    size: int = 0  # batch size

    @property
    def name(self) -> str:
        if self.fn is None:
            return f"{self.kind}({self.size})"
        qual = getattr(self.fn, "__qualname__", None) or repr(self.fn)
        return f"{self.kind}({qual})"


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


# --------------------------------------------------------------------------- failures


class _ItemError(NamedTuple):
    """One item that failed, on its way to the consumer with its chunk (plain data).

    ``exc`` (the exception, pickled) and ``traceback`` (the user's own frames:
    no mpchan frame) travel for a fatal failure only.
    """

    stage: int
    source_index: int | None  # the source index of the item, if known
    item: str  # its repr, shortened
    type_name: str
    message: str  # the first line of the exception's message
    fatal: bool
    pid: int
    exc: bytes | None = None
    traceback: str = ""

    @property
    def error(self) -> str:
        return f"{self.type_name}: {self.message}" if self.message else self.type_name

    def rebuild(self, stage_name: str) -> BaseException:
        """The exception, as raised to the consumer (see :meth:`Stream.__iter__`)."""
        what = self.item
        if self.source_index is not None:
            what = f"input item {self.source_index}: {self.item}"
        note = (
            f"raised in mpchan worker (pid {self.pid}) running stage {self.stage} "
            f"{stage_name}, on {what}"
        )
        return rebuild_remote(self.exc, self.type_name, self.message, self.traceback, note)


def _item_error(
    exc: BaseException,
    stage: int,
    index: int | None,
    item: Any,
    *,
    fatal: bool,
    pid: int | None = None,
    with_traceback: bool = True,
) -> _ItemError:
    type_name = type(exc).__name__
    message = _first_line(exc)
    if not fatal:
        return _ItemError(stage, index, _short_repr(item), type_name, message, False, _pid(pid))
    blob = _dumps(exc)
    tb = _user_traceback(exc) if with_traceback else ""
    return _ItemError(
        stage, index, _short_repr(item), type_name, message, True, _pid(pid), blob, tb
    )


def _pid(pid: int | None) -> int:
    return os.getpid() if pid is None else pid


def _first_line(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        return "<message cannot be printed>"
    first, sep, _rest = text.strip().partition("\n")
    return first + (" [...]" if sep else "")


def _user_traceback(exc: BaseException) -> str:
    """``exc`` formatted with its chain, without mpchan's own frames."""
    try:
        te = traceback.TracebackException.from_exception(exc)
        _strip_frames(te, set())
        return "".join(te.format())
    except Exception:
        return ""


def _strip_frames(te: traceback.TracebackException, seen: set[int]) -> None:
    if id(te) in seen:
        return
    seen.add(id(te))
    te.stack = traceback.StackSummary.from_list(
        [f for f in te.stack if not f.filename.startswith(_PACKAGE_DIR)]
    )
    for sub in (te.__cause__, te.__context__, *(te.exceptions or ())):
        if sub is not None:
            _strip_frames(sub, seen)


def _dumps(obj: Any) -> bytes | None:
    """Pickle ``obj`` as a channel would (by the codec's rule); None if it cannot be."""
    try:
        return pickle_value(obj)
    except BaseException:
        return None


def _short_repr(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception:
        text = f"<unprintable {type(obj).__name__}>"
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------- worker side


class _Alarm:
    """Raise TaskTimeout in this (main) thread after ``seconds`` (SIGALRM)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.old: Any = None

    def __enter__(self) -> None:
        def fire(_signum: int, _frame: Any) -> None:
            raise TaskTimeout(f"task ran past its time limit of {self.seconds} s")

        self.old = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old)


class _Guard(NamedTuple):
    """Where a stage worker leaves what it holds, for its parent to read after
    its death: the chunk (``journal``, capacity 1, pickled bytes) and how many
    of its items it started (``progress``)."""

    journal: Channel
    progress: WaitGroup


# What a journal holds, and what a replacement is handed to run first: the
# chunk (seq, idx, items, failed) and the failed calls spent per item (None:
# none); a resume adds the position of the item to fail at once (its calls
# are spent: its last worker died running it) and that failure.
_Journal = tuple[int, Any, list[Any], "list[_ItemError] | None", "list[int] | None"]
_Resume = tuple[
    int, Any, list[Any], "list[_ItemError] | None", "list[int] | None", "int | None", Any
]


class _Held:
    """The worker side of a :class:`_Guard`."""

    __slots__ = ("guard", "record", "started")

    def __init__(self, guard: _Guard) -> None:
        self.guard = guard
        self.started = 0
        self.record: _Journal | None = None

    def hold(self, record: _Journal) -> None:
        self.record = record
        # b"": held but cannot be journaled (the parent then cannot run it again)
        self.guard.journal.send_nowait(_dumps(record) or b"")

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


def _call(stage: _Stage, item: Any, spent: int, held: _Held | None, pos: int) -> Any:
    """``stage.fn(item)``, called again after an exception while the item's
    ``retries`` allow (``spent`` failed calls were made before)."""
    fn = stage.fn
    assert fn is not None
    materialize = stage.kind == "flat_map"
    attempt = spent
    while True:
        try:
            if stage.timeout is None:
                value = fn(item)
                return list(value) if materialize else value
            with _Alarm(stage.timeout):
                value = fn(item)
                return list(value) if materialize else value
        except (Exception, SystemExit):
            if attempt >= stage.retries:
                raise
            attempt += 1
            if held is not None:
                held.spend(pos, attempt)


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


def _stage_main(
    stage: _Stage,
    index: int,
    in_ch: Channel,
    out_ch: Channel,
    wg: WaitGroup,
    ctx: Context,
    cancel: CancelFunc,
    keep_empty: bool,
    trace_ch: Channel | None = None,
    guard: _Guard | None = None,
    resume: _Resume | None = None,
) -> dict[str, Any]:
    """One worker of one stage: receive chunks, apply the stage, send results on.

    Runs in a worker process (``mpchan.go``); returns its counters. A failed
    item travels on in band (see the module docstring) and the worker goes
    on; a bug or a message that cannot be passed on cancels the pipeline,
    then propagates with its traceback; a cancelled pipeline ends the worker
    quietly. ``guard``: where it leaves what it holds (none for a batch);
    ``resume``: a chunk to run first, taken over from a worker that died.
    With ``trace_ch`` it records every item it runs and sends the record
    there as it ends, however it ends.
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
        "cancelled": False,
    }
    kind = stage.kind
    skip = stage.on_error == "skip"
    failed_at: int | None = None  # seq of the first chunk this worker failed
    pending: dict[int, tuple[list[Any], list[_ItemError] | None]] = {}  # batch, ordered
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
            if _fatal_of(fixed[3]) is not None and msg[0] is not None:
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

    def batch_chunk(seq: int | None, items: list[Any], failed: list[_ItemError] | None) -> None:
        nonlocal next_seq
        t1 = perf()
        if seq is None:
            tails.append(items)
            return
        if not keep_empty:
            out = batches(items, _fatal_of(failed) is not None)
            st["busy_s"] += perf() - t1
            if out or failed:
                send((seq, None, out, failed))
            return
        pending[seq] = (items, failed)
        while next_seq in pending:
            its, fl = pending.pop(next_seq)
            out = batches(its, _fatal_of(fl) is not None)
            st["busy_s"] += perf() - t1
            send((next_seq, None, out, fl))
            next_seq += 1
            t1 = perf()

    def run_chunk(
        seq: int | None,
        idx: Any,
        items: list[Any],
        failed: list[_ItemError] | None,
        spent: list[int] | None,
        crash_pos: int | None,
        crash: _ItemError | None,
    ) -> None:
        nonlocal failed_at
        if held is not None and seq is not None:
            held.hold((seq, idx, items, failed, spent))
        t1 = perf()
        out: list[Any] = []
        pos: list[int] = []  # the position in items of each result
        fatal: _ItemError | None = None
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
                value = _call(stage, item, spent[j] if spent else 0, held, j)
            except (Exception, SystemExit) as exc:
                error = _item_error(exc, index, _index_at(idx, j), item, fatal=not skip)
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
            crash: _ItemError | None = None
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
        st["cancelled"] = True
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


def _index_at(idx: Any, j: int) -> int | None:
    """The source index of item ``j`` of a chunk whose index is ``idx``."""
    if idx is None:
        return None
    return idx + j if type(idx) is int else int(idx[j])


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


def _fatal_of(failed: list[_ItemError] | None) -> _ItemError | None:
    return failed[-1] if failed and failed[-1].fatal else None


def _with_skipped(failed: list[_ItemError] | None, record: _ItemError) -> list[_ItemError]:
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
    stage: _Stage, index: int, msg: Message, items: list[Any], pos: list[int] | None
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
    errors: list[_ItemError] = []
    for q, value in enumerate(out):
        i = _index_at(idx, q)
        problem = _pickle_problem(value)
        if problem is None:
            kept.append(value)
            kept_idx.append(i)
            continue
        err = PicklingError(f"cannot pickle the result ({type(value).__name__}): {problem}")
        record = _item_error(
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


class Stream:
    """A lazily built pipeline over ``iterable``; see :func:`stream`.

    Building methods (``map``, ``filter``, ``flat_map``, ``batch``) return a
    new Stream and start nothing. Iterating (or ``collect``/``run``) starts
    every stage; a Stream runs once.

    Process safety: build and consume a Stream from one thread of one
    process; its stages run in worker processes.
    """

    def __init__(
        self,
        source: Iterable[Any],
        *,
        ctx: Context | None = None,
        chunksize: int | None = None,
        stages: tuple[_Stage, ...] = (),
        _trace: bool = False,
    ) -> None:
        # _trace (internal): record every item's run (see _trace_records)
        if ctx is not None and not isinstance(ctx, Context):
            raise TypeError(f"ctx must be a Context, not {type(ctx).__name__}")
        self._source = source
        self._ctx = ctx
        self._chunksize = None if chunksize is None else _check_count("chunksize", chunksize, 1)
        self._stages = stages
        self._trace = bool(_trace)
        self._run: _Run | None = None

    # -- building ------------------------------------------------------------

    def _add(self, stage: _Stage) -> Stream:
        return Stream(
            self._source,
            ctx=self._ctx,
            chunksize=self._chunksize,
            stages=(*self._stages, stage),
            _trace=self._trace,
        )

    def _stage(
        self,
        kind: Kind,
        fn: Callable[..., Any],
        workers: int,
        capacity: int | None,
        ordered: bool,
        on_error: OnError,
        retries: int,
        timeout: float | None,
    ) -> Stream:
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        _check_count("workers", workers, 1)
        cap = max(2 * workers, 4) if capacity is None else _check_count("capacity", capacity, 0)
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
        _check_count("retries", retries, 0)
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        return self._add(_Stage(kind, fn, workers, cap, bool(ordered), on_error, retries, timeout))

    def map(
        self,
        fn: Callable[[Any], Any],
        *,
        workers: int = 1,
        capacity: int | None = None,
        ordered: bool = False,
        on_error: OnError = "fail",
        retries: int = 0,
        timeout: float | None = None,
    ) -> Stream:
        """Apply ``fn`` to every item in ``workers`` processes. Never blocks.

        ``capacity``: the stage's input channel, in chunks (default
        ``max(2 * workers, 4)``). ``ordered=True`` on any stage makes the
        whole stream deliver in source order. ``on_error="skip"`` drops items
        that failed (see :meth:`failures`): the call raised, its result
        cannot be pickled, or its worker died running it. ``retries``: calls
        again before that -- after an exception, a time-out, or a worker
        that died (SIGKILL, ``os._exit``) while running the item, which runs
        again on a new worker; an item is called at most ``retries + 1``
        times for its own failures. (The items that came with it in one
        chunk and had finished run again too: their results died with the
        worker.) ``timeout`` limits one call (``TaskTimeout``).
        """
        return self._stage("map", fn, workers, capacity, ordered, on_error, retries, timeout)

    def filter(
        self,
        fn: Callable[[Any], Any],
        *,
        workers: int = 1,
        capacity: int | None = None,
        ordered: bool = False,
        on_error: OnError = "fail",
        retries: int = 0,
        timeout: float | None = None,
    ) -> Stream:
        """Keep the items for which ``fn`` is true. Options as :meth:`map`. Never blocks."""
        return self._stage("filter", fn, workers, capacity, ordered, on_error, retries, timeout)

    def flat_map(
        self,
        fn: Callable[[Any], Iterable[Any]],
        *,
        workers: int = 1,
        capacity: int | None = None,
        ordered: bool = False,
        on_error: OnError = "fail",
        retries: int = 0,
        timeout: float | None = None,
    ) -> Stream:
        """Replace every item by the items of ``fn(item)``. Options as :meth:`map`.
        Never blocks."""
        return self._stage("flat_map", fn, workers, capacity, ordered, on_error, retries, timeout)

    def batch(self, n: int, *, capacity: int | None = None) -> Stream:
        """Group items into lists of ``n`` (the last may be shorter), in one
        worker process. Never blocks."""
        _check_count("n", n, 1)
        cap = 4 if capacity is None else _check_count("capacity", capacity, 0)
        return self._add(_Stage("batch", None, 1, cap, False, "fail", 0, None, n))

    # -- running -------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        """Start the pipeline and yield its results.

        Blocks: while no result is ready.
        Cancellation: a cancelled ``ctx`` stops every stage and ends the
        iteration (check ``ctx.err()``); a drain requested on ``ctx`` stops
        reading the source, and every item already read is processed and
        yielded before the iteration ends. A failed item (``on_error="fail"``)
        stops reading the source; the results of the items before it are
        yielded (ordered: exactly those; unordered: every item in flight
        finishes and is yielded), then every stage stops and its exception
        (unordered: the first to arrive) is raised here, with its remote
        traceback as ``__cause__`` and a note naming the stage, the worker
        and the item. The source raising ends the run the same way, after
        the results of every item read before. Leaving the loop early
        (break, an exception, closing the generator) stops every stage and
        leaves no process behind.
        Process safety: one consumer thread.
        """
        return self._results(indexed=False)

    def _results(self, *, indexed: bool) -> Generator[Any, None, None]:
        if self._run is not None:
            raise RuntimeError("a stream runs once")
        if not self._stages:
            raise ValueError("a stream needs at least one stage (map, filter, flat_map, batch)")
        run = self._run = _Run(
            self._source, self._ctx, self._chunksize, self._stages, trace=self._trace
        )
        try:
            yield from run.results(indexed)
        finally:
            run.close()

    def _enumerate(self) -> Generator[tuple[int | None, Any], None, None]:
        """Internal (``mpchan run``): iterate as :meth:`__iter__` does, yielding
        ``(source index, result)`` pairs; the index of a result derived from a
        source item (filter, flat_map) is that item's, None after a batch."""
        return self._results(indexed=True)

    def collect(self) -> list[Any]:
        """Run the pipeline and return every result in a list.

        Blocks, Cancellation, Process safety: as iteration.
        """
        return list(self)

    def run(self, sink: Callable[[Any], object] | None = None) -> int:
        """Run the pipeline, calling ``sink(result)`` here for each result;
        return how many there were. Blocks, Cancellation: as iteration."""
        n = 0
        for value in self:
            if sink is not None:
                sink(value)
            n += 1
        return n

    def close(self) -> None:
        """Stop every stage now (idempotent); blocks until their processes are done."""
        if self._run is not None:
            self._run.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        run = getattr(self, "_run", None)
        if run is not None and not run.closed:
            with contextlib.suppress(Exception):
                run.cancel(("closed",))

    def stats(self) -> list[dict[str, Any]]:
        """Per stage: name, kind, workers, items_in, items_out, failed,
        busy_s, blocked_in_s (waiting for input), blocked_out_s (waiting for
        the next stage), summed over the stage's workers. Counters come in
        as workers finish (``failed``: as the results are delivered), so
        they are complete once the run is over; a worker that died takes
        its counters with it. Never blocks."""
        if self._run is None:
            return [_empty_stats(i, s) for i, s in enumerate(self._stages)]
        return self._run.stats()

    def failures(self) -> list[tuple[str, str]]:
        """With ``on_error="skip"``: (item repr, error) of failed items, in the
        order they were delivered (up to 100 per stage; ``stats()`` counts
        all). Never blocks."""
        return [(r.item, r.error) for r in self._failed_items()]

    def _failed_items(self) -> list[_ItemError]:
        """Internal (``mpchan run``): the records behind :meth:`failures`
        (``index``: the item's source index). Never blocks."""
        return [] if self._run is None else list(self._run.failures)

    def _fatal_item(self) -> _ItemError | None:
        """Internal (``mpchan run``): the failed item that ended the run, if an
        item did (``stage``, ``index``, ``error``, ``traceback``: the user's own
        frames). Never blocks."""
        return None if self._run is None else self._run.failure

    def _trace_records(self) -> list[dict[str, Any]]:
        """Internal (``mpchan run --trace``): with ``_trace=True``, once the
        run is over, one dict per stage worker that reported: ``stage``
        (index), ``pid``, ``events`` (:data:`TraceEvent` tuples, times from
        ``time.monotonic()``), ``dropped`` (events past the limit). A worker
        killed before it could report is missing. Never blocks."""
        return [] if self._run is None else list(self._run.trace)


def _empty_stats(index: int, stage: _Stage) -> dict[str, Any]:
    return {
        "stage": index,
        "name": stage.name,
        "kind": stage.kind,
        "workers": stage.workers,
        "items_in": 0,
        "items_out": 0,
        "failed": 0,
        "busy_s": 0.0,
        "blocked_in_s": 0.0,
        "blocked_out_s": 0.0,
    }


class _Slot:
    """One worker place of a stage: its guard, and the handle of the worker
    holding the place now (a replacement takes over the place of the dead)."""

    __slots__ = ("guard", "handle", "stage")

    def __init__(self, stage: int, guard: _Guard | None) -> None:
        self.stage = stage
        self.guard = guard
        self.handle: GoHandle[dict[str, Any]] | None = None


class _Run:
    """One running pipeline (parent side)."""

    def __init__(
        self,
        source: Iterable[Any],
        ctx: Context | None,
        chunksize: int | None,
        stages: tuple[_Stage, ...],
        *,
        trace: bool = False,
    ) -> None:
        self.stages = stages
        self.id = str(next(_run_ids))
        self.ordered = any(s.ordered for s in stages)
        self.window = sum(s.workers * 2 + s.capacity for s in stages) + 8
        self.chunksize = chunksize  # None: adaptive, see _feed
        self.user_ctx = ctx
        self.ctx, cancel = with_cancel(ctx if ctx is not None else background())
        self._cancel: Callable[[Any], None] = cancel
        self._worker_cancel: CancelFunc | None = cancel  # what stage workers call
        self.closed = False
        self.failures: list[_ItemError] = []  # skipped items, as delivered
        self.failure: _ItemError | None = None  # the failed item that ended the run
        self.crash_error: BaseException | None = None  # a death that ended it
        self.source_error: BaseException | None = None
        self._cond = threading.Condition()
        self._delivered = 0  # ordered: chunks handed to the consumer, in order
        self._stop = False
        self._fail_seq: int | None = None  # ordered: the first chunk with a fatal failure
        self._stats = [_empty_stats(i, s) for i, s in enumerate(stages)]
        self._kept = [0] * len(stages)  # failure records kept, per stage
        self._collected: set[int] = set()
        self.chans = [Channel(s.capacity) for s in stages]
        self.chans.append(Channel(stages[-1].capacity))
        # one message from each worker at its end: sending it never waits
        # (a replacement sends in place of the worker that died unreported)
        self.trace_ch = Channel(sum(s.workers for s in stages)) if trace else None
        self.trace: list[dict[str, Any]] = []
        self.wgs: list[WaitGroup] = []
        self.slots: list[_Slot] = []
        # every worker started, replaced ones too (all are joined at close)
        self.handles: list[tuple[int, GoHandle[dict[str, Any]]]] = []
        self._replaced: set[int] = set()  # pids of dead workers that were replaced
        # (slot, pid) of each worker that ended, appended by its done callback
        # (in the supervisor's thread), taken by the consumer (_tend)
        self._ended: list[tuple[int, int]] = []
        self._it = iter(source)
        try:
            for i, stage in enumerate(stages):
                wg = WaitGroup()
                wg.add(stage.workers)
                self.wgs.append(wg)
                for _ in range(stage.workers):
                    guard = _Guard(Channel(1), WaitGroup()) if stage.fn is not None else None
                    self.slots.append(_Slot(i, guard))
                    self._start(len(self.slots) - 1, None)
        except BaseException:
            self.close()
            raise
        _metrics.register(self, _Run._metric_families)
        self._feeder = threading.Thread(target=self._feed, name="mpchan-stream-feeder", daemon=True)
        self._feeder.start()

    def cancel(self, cause: Any) -> None:
        self._cancel(cause)

    def _start(self, k: int, resume: _Resume | None) -> None:
        slot = self.slots[k]
        i = slot.stage
        assert self._worker_cancel is not None, "started after close"
        h = go(
            _stage_main,
            self.stages[i],
            i,
            self.chans[i],
            self.chans[i + 1],
            self.wgs[i],
            self.ctx,
            self._worker_cancel,
            self.ordered,
            self.trace_ch,
            slot.guard,
            resume,
        )
        slot.handle = h
        self.handles.append((i, h))
        ended, pid = self._ended, h.pid  # no reference to self or h: no cycle
        h.add_done_callback(lambda _h: ended.append((k, pid)))

    # -- feeder thread -----------------------------------------------------------

    def _feed(self) -> None:
        ch = self.chans[0]
        ctx = self.ctx
        it = self._it
        seq = 0
        start = 0  # the source index of the chunk's first item
        # Adaptive chunks (chunksize=None): items travel alone while the first
        # stage keeps up (lowest latency); each time the feeder finds its
        # channel full -- the stages are behind, items would wait anyway --
        # the chunk doubles, up to _MAX_CHUNK; an empty channel halves it.
        adaptive = self.chunksize is None
        size = 1 if self.chunksize is None else self.chunksize
        error: BaseException | None = None
        try:
            while error is None and not ctx.draining and ctx.err() is None and not self._stop:
                chunk: list[Any] = []
                try:
                    for item in itertools.islice(it, size):
                        chunk.append(item)
                except BaseException as exc:
                    # The input ends here: what was read before (this chunk's
                    # first items too) is still processed and delivered, then
                    # close() raises it.
                    error = exc
                if not chunk:
                    break
                if adaptive:
                    backlog = len(ch)
                    if backlog >= ch.capacity:
                        size = min(size * 2, _MAX_CHUNK)
                    elif backlog == 0:
                        size = max(size // 2, 1)
                if self.ordered:
                    with self._cond:
                        while seq >= self._delivered + self.window and not self._stop:
                            if ctx.draining or ctx.err() is not None:
                                break
                            self._cond.wait(_POLL_S)
                        if seq >= self._delivered + self.window or self._stop:
                            break
                msg = (seq, start, chunk, None)
                if not self._send_unless_draining(ch, msg):
                    break  # drain or cancel: this chunk was not taken
                seq += 1
                start += len(chunk)
        except ChannelClosed:
            pass
        except BaseException as exc:  # a chunk that cannot be sent (pickled)
            error = error or exc
        finally:
            self.source_error = error
            ch.close()

    def _send_unless_draining(self, ch: Channel, msg: Any) -> bool:
        """Send ``msg``; False (not sent) once a drain or cancel was requested.

        A plain send with a short timeout, re-checking the drain flag between
        tries, costs far less per item than a select on the drain case; the
        price is up to ``_DRAIN_CHECK_S`` of delay before a drain is seen.
        """
        ctx = self.ctx
        while True:
            try:
                ch.send(msg, timeout=_DRAIN_CHECK_S, ctx=ctx)
                return True
            except TimeoutError:
                if ctx.draining or self._stop:
                    return False
            except Cancelled:
                return False

    # -- consumer ----------------------------------------------------------------

    def results(self, indexed: bool = False) -> Iterator[Any]:
        out = self.chans[-1]
        ctx = self.ctx
        pending: dict[int, Message] = {}
        tails: list[Message] = []
        next_seq = 0
        ended = False
        stopped = False  # a fatal failure was delivered: the run ends there
        while not stopped:
            if self._ended:
                self._tend()
            try:
                msg: Message = out.recv(timeout=_POLL_S, ctx=ctx)
            except TimeoutError:
                if ctx.draining:
                    # The feeder may be stuck inside the source (a read from a
                    # terminal or pipe): stop the input here. What was sent is
                    # still delivered; a send in progress fails and its chunk,
                    # never taken, is dropped.
                    self._stop_input()
                continue
            except EndOfChannel:
                ended = True
                break
            except Cancelled:
                break
            seq, idx, items, failed = msg
            if not self.ordered:
                yield from _pairs(idx, items) if indexed else items
                if failed is not None and self._account(failed):
                    # the run ends: no more input, and what is in flight
                    # (computed before the failure, maybe) is still delivered
                    self._stop_input()
                continue
            if seq is None:
                tails.append(msg)
                continue
            if _fatal_of(failed) is not None and (self._fail_seq is None or seq < self._fail_seq):
                # the run ends at this chunk: no more input; the chunks
                # before it are all in flight (they were fed first)
                self._fail_seq = seq
                self._stop_input()
            if self._fail_seq is not None and seq > self._fail_seq:
                continue  # after the failure: not wanted
            pending[seq] = msg
            while next_seq in pending:
                _seq, idx, ready, failed = pending.pop(next_seq)
                next_seq += 1
                with self._cond:
                    self._delivered = next_seq
                    self._cond.notify_all()
                yield from _pairs(idx, ready) if indexed else ready
                if failed is not None and self._account(failed):
                    stopped = True
                    break
        del out, ctx  # no handle on shared memory in this frame once it raises
        if ended and not stopped:
            for _seq, idx, ready, failed in [pending[s] for s in sorted(pending)] + tails:
                yield from _pairs(idx, ready) if indexed else ready
                if failed is not None and self._account(failed):
                    break
        self.close()

    def _account(self, failed: list[_ItemError]) -> bool:
        """Count delivered failures; True at a fatal one (the first one seen is
        the run's failure)."""
        for r in failed:
            if r.fatal:
                if self.failure is None:
                    self.failure = r
                return True
            self._stats[r.stage]["failed"] += 1
            if self._kept[r.stage] < _MAX_FAILURES:
                self._kept[r.stage] += 1
                self.failures.append(r)
        return False

    def _stop_input(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self.chans:
            self.chans[0].close()

    def _tend(self) -> None:
        """Deal with the workers that ended: replace one that died (see the
        module docstring); anything else unexpected ends the run."""
        while self._ended:
            k, pid = self._ended.pop(0)
            if self.closed or self.ctx.err() is not None:
                continue  # ending anyway: a death now is most likely our SIGKILL
            slot = self.slots[k]
            h = slot.handle
            if h is None or h.pid != pid:
                continue
            exc = h.exception()
            if exc is None:
                continue
            if isinstance(exc, WorkerCrashed):
                self._replace(k, exc)
            else:  # a shutdown under the stream, a bug: the worker may not have cancelled
                self._cancel(("error", slot.stage, pid))

    def _replace(self, k: int, exc: WorkerCrashed) -> None:
        slot = self.slots[k]
        i = slot.stage
        stage = self.stages[i]
        assert slot.handle is not None
        pid = slot.handle.pid
        self._replaced.add(pid)
        record: _Journal | None = None
        started = 0
        if slot.guard is not None:
            record = _take_journal(slot.guard.journal)
            started = slot.guard.progress.count
        if record is None or not 1 <= started <= len(record[2]):
            # not in an item: nothing to blame, and results may be on their way
            self._fail_run(_crashed(stage, pid, exc, " while it ran no item"), i, pid)
            return
        assert slot.guard is not None
        seq, idx, items, failed, spent = record
        pos = started - 1
        spent = list(spent) if spent else [0] * len(items)
        spent[pos] += 1  # its worker died running it: a failed call
        crash: _ItemError | None = None
        if spent[pos] > stage.retries:
            crash = _item_error(
                _crashed(stage, pid, exc, ""),
                i,
                _index_at(idx, pos),
                items[pos],
                fatal=stage.on_error == "fail",
                pid=pid,
                with_traceback=False,
            )
        slot.guard.progress.add(-started)
        try:
            self._start(k, (seq, idx, items, failed, spent, None if crash is None else pos, crash))
        except Exception as e:  # no new worker (a shutdown): the run ends
            self._fail_run(e, i, pid)

    def _fail_run(self, error: BaseException, stage: int, pid: int) -> None:
        if self.crash_error is None:
            self.crash_error = error
        self._cancel(("crash", stage, pid))

    # -- ending ------------------------------------------------------------------

    def close(self) -> None:
        """Stop (if still running), join every worker, collect counters, raise
        the first error of the run. Idempotent."""
        if self.closed:
            return
        self.closed = True
        finished = all(h.done() for _i, h in self.handles) and not self._feeder_alive()
        if not finished:
            # workers still running at close: the consumer stopped early, a
            # failure ended the run, or the pipeline is being cancelled
            out_done = self.chans[-1].closed and len(self.chans[-1]) == 0
            if not out_done or self.ctx.err() is not None:
                self._cancel(("closed",))
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._join_workers()
        if self._feeder_alive():
            self._feeder.join(timeout=1.0)
        _metrics.unregister(self)
        self._take_trace()
        chans, self.chans = self.chans, []
        chans.extend(s.guard.journal for s in self.slots if s.guard is not None)
        while chans:
            chans.pop().close()
        error = self._first_error()
        self._cancel(None)  # frees the pipeline context; harmless when done
        # Drop every handle on shared memory: an exception raised from here
        # keeps this object alive through its traceback.
        self.ctx = background()
        self._cancel = _no_cancel
        self._worker_cancel = None
        self.slots = []
        self.wgs = []
        if self.source_error is not None:
            traceback.clear_frames(self.source_error.__traceback__)
        if error is not None:
            raise error

    def _take_trace(self) -> None:
        # Every worker has ended: what they sent is all there is.
        ch, self.trace_ch = self.trace_ch, None
        if ch is None:
            return
        for _ in range(ch.capacity):
            try:
                self.trace.append(ch.recv_nowait())
            except (WouldBlock, EndOfChannel):
                break
            except Exception:
                continue  # a record that does not unpickle is lost, not the others
        ch.close()

    def _metric_families(self) -> list[_metrics.Family]:
        # A metrics source (see _metrics.register): per stage, its input channel.
        chans = list(self.chans)
        queued: list[tuple[dict[str, str], float]] = []
        capacity: list[tuple[dict[str, str], float]] = []
        received: list[tuple[dict[str, str], float]] = []
        for i, (stage, ch) in enumerate(zip(self.stages, chans, strict=False)):
            labels = {"stream": self.id, "stage": str(i), "fn": stage.name}
            st = ch.stats()
            queued.append((labels, st["len"]))
            capacity.append((labels, st["capacity"]))
            received.append((labels, st["received"]))
        return [
            _metrics.Family(
                "mpchan_stream_stage_queue_length",
                "gauge",
                "Chunks waiting in the stage's input channel",
                queued,
            ),
            _metrics.Family(
                "mpchan_stream_stage_queue_capacity",
                "gauge",
                "Capacity of the stage's input channel, in chunks",
                capacity,
            ),
            _metrics.Family(
                "mpchan_stream_stage_chunks_received_total",
                "counter",
                "Chunks the stage's workers took from their input channel",
                received,
            ),
        ]

    def _feeder_alive(self) -> bool:
        feeder = getattr(self, "_feeder", None)
        return feeder is not None and feeder.is_alive()

    def _join_workers(self) -> None:
        if self.ctx.err() is not None:
            end = time.monotonic() + _KILL_AFTER_S
            for _i, h in self.handles:
                with contextlib.suppress(TimeoutError):
                    h.join(timeout=max(0.0, end - time.monotonic()))
            for _i, h in self.handles:
                if not h.done():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(h.pid, signal.SIGKILL)
        for _i, h in self.handles:
            h.join()
        for i, h in self.handles:
            self._collect(i, h)

    def _collect(self, index: int, h: GoHandle[dict[str, Any]]) -> None:
        if id(h) in self._collected or not h.done() or h.exception() is not None:
            return
        self._collected.add(id(h))
        st = h.result()
        agg = self._stats[index]
        for key in ("items_in", "items_out", "busy_s", "blocked_in_s", "blocked_out_s"):
            agg[key] += st[key]

    def _first_error(self) -> BaseException | None:
        if self.failure is not None:
            return self.failure.rebuild(self.stages[self.failure.stage].name)
        if self.crash_error is not None:
            return self.crash_error
        if self.source_error is not None:
            return self.source_error
        cause = self.ctx.cause() if self.ctx.err() is not None else None
        errors = [
            (i, h)
            for i, h in self.handles
            if h.pid not in self._replaced and h.exception() is not None
        ]
        if isinstance(cause, tuple) and cause and cause[0] in ("error", "crash"):
            for _i, h in errors:
                if h.pid == cause[2]:
                    return h.exception()
        if self.user_ctx is not None and self.user_ctx.err() is not None:
            return None  # the caller cancelled: the stream just ends
        if cause == ("closed",):
            return None
        for _i, h in errors:
            return h.exception()
        return None

    def stats(self) -> list[dict[str, Any]]:
        for i, h in self.handles:
            self._collect(i, h)
        return [dict(s) for s in self._stats]


def _pairs(idx: Any, items: list[Any]) -> Iterator[tuple[int | None, Any]]:
    if idx is None:
        return zip(itertools.repeat(None), items)
    return zip(itertools.count(idx) if type(idx) is int else idx, items)  # noqa: B905


def _take_journal(journal: Channel) -> _Journal | None:
    """What a dead worker held (its journal emptied), or None."""
    try:
        blob = journal.recv_nowait()
    except Exception:  # empty; or left half written by the death
        return None
    if not blob:
        return None
    try:
        record: _Journal = pickle.loads(blob)
    except Exception:
        return None
    return record


def _crashed(stage: _Stage, pid: int, exc: WorkerCrashed, when: str) -> WorkerCrashed:
    """The error of a stage worker's death, told in the stage's terms."""
    if exc.signal:
        how = f"was killed by {exc.signal}"
    elif exc.exitcode is not None:
        how = f"exited with status {exc.exitcode}"
    else:
        how = "died"
    cause = f": {exc.cause}" if exc.cause else ""
    return WorkerCrashed(
        f"the worker (pid {pid}) running {stage.name} {how}{when}{cause}",
        pid=pid,
        exitcode=exc.exitcode,
        signal=exc.signal,
        task=stage.name,
        cause=exc.cause,
    )


def _no_cancel(cause: Any = None) -> None:
    del cause


_run_ids = itertools.count(1)  # the "stream" label of the metrics


def stream(
    iterable: Iterable[Any],
    *,
    ctx: Context | None = None,
    chunksize: int | None = None,
    _trace: bool = False,
) -> Stream:
    """Start building a pipeline over ``iterable`` (read lazily, in this process).

    ``chunksize`` items travel together between stages (fewer channel
    operations for tiny items). ``None`` (default) adapts: one item at a
    time while the stages keep up, chunks of up to 16 while they are behind.
    ``_trace`` (internal, for ``mpchan run --trace``): stage workers record
    every item they run (see ``Stream._trace_records``).
    Never blocks; see :class:`Stream`.
    """
    return Stream(iterable, ctx=ctx, chunksize=chunksize, _trace=_trace)
