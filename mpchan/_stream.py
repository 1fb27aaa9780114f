"""Streaming pipelines: stages in worker processes joined by channels (layer 8).

Written only against the public API of the lower layers (``Channel``,
``WaitGroup``, contexts, ``go``).

Data flow of ``stream(src).map(f, workers=2).filter(g).map(h)``::

    parent                      worker processes (mpchan.go)           parent
    ------                      ----------------------------           ------
    feeder thread               stage 0: f x2      stage 1: g   stage 2: h
    next(src) --(seq, chunk)--> ch0 --> [f] [f] --> ch1 --> [g] --> ch2 --> [h] --> ch3 --> consumer
         ^                                                                               |
         +------------------ ordered: window of W chunks in flight <---------------------+

    every hop carries ``(seq, items)``: ``seq`` numbers the source chunk
    (``None`` for the tail a ``batch`` stage emits at the end); every stage
    keeps it, so an ordered pipeline is put back in source order by the
    consumer alone.

Invariants:
    - each channel is closed exactly by the last worker of the stage that
      writes it to finish (a WaitGroup per stage counts them), or by the
      feeder for the first one; so the consumer's loop ends only after
      every item fed was handled by every stage.
    - ordered: the feeder never sends chunk ``s`` before the consumer has
      delivered chunk ``s - W``, so the reorder buffer holds at most ``W``
      chunks and no stage can block forever on a consumer that waits for a
      missing chunk (the missing one is always among the ``W`` in flight).
    - memory is bounded end to end: every channel has a capacity, the feeder
      blocks on a full first channel and reads the source lazily.

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
      fails first (a stage worker calls the picklable cancel before it
      raises; the feeder when the source raises; the consumer on close or on
      finding a crashed worker); its cause says who.
    - the consumer (the thread iterating the stream) joins every worker, and
      kills (SIGKILL, by pid) those still busy shortly after a cancel.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from . import _metrics
from ._channel import Channel
from ._context import CancelFunc, Context, background, with_cancel
from ._errors import Cancelled, ChannelClosed, EndOfChannel, TaskTimeout, WouldBlock
from ._go import GoHandle, go
from ._sync import WaitGroup

__all__ = ["Stream", "stream"]

OnError = Literal["fail", "skip"]
Kind = Literal["map", "filter", "flat_map", "batch"]

_POLL_S = 0.25  # how often a waiting consumer looks for crashed workers
_MAX_CHUNK = 16  # largest adaptive chunk (items sent together)
_DRAIN_CHECK_S = 0.05  # a feeder blocked on a full stage looks for a drain this often
_KILL_AFTER_S = 0.5  # grace between a hard cancel and SIGKILL of busy workers
_MAX_FAILURES = 100  # failed items kept per worker with on_error="skip"
_TRACE_LIMIT = 500_000  # trace events kept per worker (about 100 bytes each)

# One traced item: (start, end) from time.monotonic(), outcome ("ok",
# "skipped" or "error"), and the error ("Type: message") or None.
TraceEvent = tuple[float, float, str, str | None]


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


def _call(stage: _Stage, item: Any) -> Any:
    fn = stage.fn
    assert fn is not None
    for attempt in itertools.count():
        try:
            if stage.timeout is None:
                return fn(item)
            with _Alarm(stage.timeout):
                return fn(item)
        except Exception:
            if attempt >= stage.retries:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


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
) -> dict[str, Any]:
    """One worker of one stage: receive chunks, apply the stage, send results on.

    Runs in a worker process (``mpchan.go``); returns its counters. An
    exception from the user function (``on_error="fail"``) cancels the
    pipeline, then propagates with its traceback; a cancelled pipeline ends
    the worker quietly. With ``trace_ch`` it records every item it runs
    and sends the record there as it ends, however it ends.
    """
    perf = time.perf_counter
    clock = time.monotonic
    rec = _Recorder() if trace_ch is not None else None
    st: dict[str, Any] = {
        "items_in": 0,
        "items_out": 0,
        "failed": 0,
        "busy_s": 0.0,
        "blocked_in_s": 0.0,
        "blocked_out_s": 0.0,
        "failures": [],
        "cancelled": False,
    }
    kind = stage.kind
    pending: dict[int, list[Any]] = {}  # batch, ordered: chunks that came early
    tails: list[list[Any]] = []
    acc: list[Any] = []
    next_seq = 0

    def batches(items: list[Any]) -> list[Any]:
        acc.extend(items)
        out = []
        while len(acc) >= stage.size:
            out.append(acc[: stage.size])
            del acc[: stage.size]
        return out

    def emit(seq: int | None, out: list[Any]) -> None:
        t = perf()
        if out or keep_empty or seq is None:
            out_ch.send((seq, out), ctx=ctx)
        st["blocked_out_s"] += perf() - t
        st["items_out"] += len(out)

    try:
        while True:
            t0 = perf()
            try:
                seq, items = in_ch.recv(ctx=ctx)
            except EndOfChannel:
                break
            t1 = perf()
            st["blocked_in_s"] += t1 - t0
            st["items_in"] += len(items)
            if kind == "batch":
                if seq is None:
                    tails.append(items)
                    continue
                if not keep_empty:
                    out = batches(items)
                    st["busy_s"] += perf() - t1
                    if out:
                        emit(seq, out)
                    continue
                pending[seq] = items
                while next_seq in pending:
                    out = batches(pending.pop(next_seq))
                    st["busy_s"] += perf() - t1
                    emit(next_seq, out)
                    next_seq += 1
                    t1 = perf()
                continue
            out = []
            for item in items:
                ctx.check()
                started = 0.0 if rec is None else clock()
                try:
                    value = _call(stage, item)
                except Exception as exc:
                    if stage.on_error == "skip":
                        st["failed"] += 1
                        if len(st["failures"]) < _MAX_FAILURES:
                            st["failures"].append((_short_repr(item), _describe(exc)))
                        if rec is not None:
                            rec.add(started, "skipped", _describe(exc))
                        continue
                    if rec is not None:
                        rec.add(started, "error", _describe(exc))
                    cancel(("error", index, os.getpid()))
                    raise
                if rec is not None:
                    rec.add(started, "ok")
                if kind == "map":
                    out.append(value)
                elif kind == "filter":
                    if value:
                        out.append(item)
                else:
                    out.extend(value)
            st["busy_s"] += perf() - t1
            if out or seq is None or keep_empty:
                emit(seq, out)
        if kind == "batch":
            for items in tails:
                acc.extend(items)
            rest = batches([])
            if acc:
                rest.append(list(acc))
            if rest:
                emit(None, rest)
    except (Cancelled, ChannelClosed):
        st["cancelled"] = True
    except BaseException:
        # anything else (a result that cannot be pickled, a bug): fail the
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


def _short_repr(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception:
        text = f"<unprintable {type(obj).__name__}>"
    return text if len(text) <= 200 else text[:197] + "..."


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- parent side


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
        whose call raised (see :meth:`failures`); ``retries`` calls again
        before that; ``timeout`` limits one call (``TaskTimeout``).
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
        yielded before the iteration ends. The first error of any stage
        cancels all of them and is raised here with its remote traceback.
        Leaving the loop early (break, an exception, closing the generator)
        stops every stage and leaves no process behind.
        Process safety: one consumer thread.
        """
        if self._run is not None:
            raise RuntimeError("a stream runs once")
        if not self._stages:
            raise ValueError("a stream needs at least one stage (map, filter, flat_map, batch)")
        run = self._run = _Run(
            self._source, self._ctx, self._chunksize, self._stages, trace=self._trace
        )
        try:
            yield from run.results()
        finally:
            run.close()

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
        as workers finish, so they are complete once the run is over.
        Never blocks."""
        if self._run is None:
            return [_empty_stats(i, s) for i, s in enumerate(self._stages)]
        return self._run.stats()

    def failures(self) -> list[tuple[str, str]]:
        """With ``on_error="skip"``: (item repr, error) of failed items (up to
        100 per worker; ``stats()`` counts all). Never blocks."""
        return [] if self._run is None else list(self._run.failures)

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
        self.closed = False
        self.failures: list[tuple[str, str]] = []
        self.source_error: BaseException | None = None
        self._cond = threading.Condition()
        self._delivered = 0  # ordered: chunks handed to the consumer, in order
        self._stop = False
        self._stats = [_empty_stats(i, s) for i, s in enumerate(stages)]
        self._collected: set[int] = set()
        self.chans = [Channel(s.capacity) for s in stages]
        self.chans.append(Channel(stages[-1].capacity))
        # one message from each worker at its end: sending it never waits
        self.trace_ch = Channel(sum(s.workers for s in stages)) if trace else None
        self.trace: list[dict[str, Any]] = []
        self.handles: list[tuple[int, GoHandle[dict[str, Any]]]] = []
        self._it = iter(source)
        try:
            for i, stage in enumerate(stages):
                wg = WaitGroup()
                wg.add(stage.workers)
                for _ in range(stage.workers):
                    h = go(
                        _stage_main,
                        stage,
                        i,
                        self.chans[i],
                        self.chans[i + 1],
                        wg,
                        self.ctx,
                        self._cancel,
                        self.ordered,
                        self.trace_ch,
                    )
                    self.handles.append((i, h))
        except BaseException:
            self.close()
            raise
        _metrics.register(self, _Run._metric_families)
        self._feeder = threading.Thread(target=self._feed, name="mpchan-stream-feeder", daemon=True)
        self._feeder.start()

    def cancel(self, cause: Any) -> None:
        self._cancel(cause)

    # -- feeder thread -----------------------------------------------------------

    def _feed(self) -> None:
        ch = self.chans[0]
        ctx = self.ctx
        it = self._it
        seq = 0
        # Adaptive chunks (chunksize=None): items travel alone while the first
        # stage keeps up (lowest latency); each time the feeder finds its
        # channel full -- the stages are behind, items would wait anyway --
        # the chunk doubles, up to _MAX_CHUNK; an empty channel halves it.
        adaptive = self.chunksize is None
        size = 1 if self.chunksize is None else self.chunksize
        try:
            while not ctx.draining and ctx.err() is None:
                chunk = list(itertools.islice(it, size))
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
                if not self._send_unless_draining(ch, (seq, chunk)):
                    break  # drain or cancel: this chunk was not taken
                seq += 1
        except ChannelClosed:
            pass
        except BaseException as exc:
            self.source_error = exc
            self._cancel(("source",))
        finally:
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
                if ctx.draining:
                    return False
            except Cancelled:
                return False

    # -- consumer ----------------------------------------------------------------

    def results(self) -> Iterator[Any]:
        out = self.chans[-1]
        ctx = self.ctx
        pending: dict[int, list[Any]] = {}
        tails: list[list[Any]] = []
        next_seq = 0
        ended = False
        while True:
            try:
                seq, items = out.recv(timeout=_POLL_S, ctx=ctx)
            except TimeoutError:
                self._look_for_crashes()
                if ctx.draining:
                    # The feeder may be stuck inside the source (a read from a
                    # terminal or pipe): stop the input here. What was sent is
                    # still delivered; a send in progress fails and its chunk,
                    # never taken, is dropped.
                    out_first = self.chans[0]
                    out_first.close()
                    del out_first
                continue
            except EndOfChannel:
                ended = True
                break
            except Cancelled:
                break
            if not self.ordered:
                yield from items
                continue
            if seq is None:
                tails.append(items)
                continue
            pending[seq] = items
            while next_seq in pending:
                ready = pending.pop(next_seq)
                next_seq += 1
                with self._cond:
                    self._delivered = next_seq
                    self._cond.notify_all()
                yield from ready
        del out, ctx  # no handle on shared memory in this frame once it raises
        if ended:
            for seq in sorted(pending):
                yield from pending[seq]
            for items in tails:
                yield from items
        self.close()

    def _look_for_crashes(self) -> None:
        for i, h in self.handles:
            if h.done() and h.exception() is not None:
                self._cancel(("crash", i, h.pid))
                return

    # -- ending ------------------------------------------------------------------

    def close(self) -> None:
        """Stop (if still running), join every worker, collect counters, raise
        the first error of the run. Idempotent."""
        if self.closed:
            return
        self.closed = True
        finished = all(h.done() for _i, h in self.handles) and not self._feeder_alive()
        if not finished:
            # workers still running at close: the consumer stopped early, or
            # the pipeline is being cancelled
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
        while chans:
            chans.pop().close()
        error = self._first_error()
        self._cancel(None)  # frees the pipeline context; harmless when done
        # Drop every handle on shared memory: an exception raised from here
        # keeps this object alive through its traceback.
        self.ctx = background()
        self._cancel = _no_cancel
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
        for key in ("items_in", "items_out", "failed", "busy_s", "blocked_in_s", "blocked_out_s"):
            agg[key] += st[key]
        self.failures.extend(st["failures"])

    def _first_error(self) -> BaseException | None:
        if self.source_error is not None:
            return self.source_error
        cause = self.ctx.cause() if self.ctx.err() is not None else None
        errors = [(i, h) for i, h in self.handles if h.exception() is not None]
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
