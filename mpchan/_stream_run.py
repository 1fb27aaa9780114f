"""A running pipeline, parent side: feeder, consumer, replacements, end (layer 8).

:class:`Run` is what iterating a :class:`~mpchan.Stream` starts: one
channel per hop, the stage workers (``go(stage_main, ...)``, see
``_stream_worker``), a feeder thread that reads the source, and the
consumer -- the thread that iterates -- which takes results off the last
channel, puts them back in order, replaces workers that die and, at the
end, joins them all::

    feeder thread ("mpchan-stream-feeder")      consumer thread (iterating)
    --------------------------------------      ---------------------------
    next(source) in chunks (adaptive size)      out.recv(timeout=_POLL_S)
    ordered: wait while seq >= delivered + W      ordered: pending[seq], yield in seq order
    ch0.send((seq, start, chunk, None))           failed records: count, or end the run
    close ch0 (source ended, failed, drained)     _tend: every worker in _ended
                                                      died in an item -> _replace
         supervisor thread: a worker ended ---->      (journal, progress -> Resume)
         done callback appends (slot, pid)            otherwise -> cancel the run
         to _ended                                close: cancel if still running, join
                                                  (SIGKILL the busy after _KILL_AFTER_S),
                                                  collect counters and trace, raise

Failures travel in band, with the chunk they belong to (``_stream_wire``).
The consumer stops the input at the first fatal record; in order, it
delivers every result before that record, then ends the run and raises it;
unordered, it delivers what is in flight, then raises the first fatal
record that arrived. So whatever fails -- an exception, a result that
cannot be pickled, a killed worker, the source -- the results of the
items before it are delivered first.

A worker's death (SIGKILL, ``os._exit``): before running a chunk a worker
writes it to its journal and counts the items it starts on its progress
counter; it clears both before sending the results on. When its process
dies the consumer reads both: progress ``k`` (1..n) means item ``k - 1``
was running. That item counts a failed call, and a replacement worker
(same stage, same slot and guard) runs the chunk again -- its items that
had finished too, their results died with the process -- or, once the
item's calls are spent, runs the items before it and fails that one
(skipped, or fatal) with ``WorkerCrashed``. A death outside an item
(waiting for input, sending results: nothing to blame, and results may
already be on their way) fails the whole run at once. The price: one more
pickling and copy of each chunk a stage runs, and one counter update an
item.

Invariants:
    - each channel is closed exactly by the last worker of the stage that
      writes it to finish (a WaitGroup per stage counts them; a replacement
      takes over the count of the worker it replaces), or by the feeder for
      the first one; so the consumer's loop ends only after every item fed
      was handled by every stage.
    - ordered: the feeder never sends chunk ``s`` before the consumer has
      delivered chunk ``s - W`` (``W``: ``window``), so the reorder buffer
      holds at most ``W`` chunks and no stage can block forever on a
      consumer that waits for a missing chunk (the missing one is always
      among the ``W`` in flight).
    - memory is bounded end to end: every channel has a capacity, the feeder
      blocks on a full first channel and reads the source lazily.
    - ``failure`` is the first fatal record delivered and never changes
      once set; ``closed`` once set stays set, and after it no worker is
      started.

Ownership:
    - the pipeline context (``with_cancel(ctx)``) is cancelled by whoever
      ends the run: a stage worker hit by a bug calls the picklable cancel
      before it raises; the consumer on close, after a fatal failure, or on
      finding a worker dead outside an item; its cause says who
      (``("error" | "crash", stage, pid)`` or ``("closed",)``).
    - the feeder thread alone reads the source, sends on the first channel
      and sets ``source_error``; ``_cond`` guards ``_delivered`` and
      ``_stop``, which it shares with the consumer.
    - the consumer reads a dead worker's journal and progress and clears
      them, only once that worker's process is dead, before starting its
      replacement; it alone replaces, joins and kills (SIGKILL, by pid)
      workers, and closes every channel at the end.
    - ``_ended`` is appended by done callbacks in the supervisor's thread
      and emptied by the consumer (list append and pop are atomic).
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
from typing import Any

from . import _metrics
from . import _stream_wire as wire
from ._channel import Channel
from ._context import CancelFunc, Context, background, with_cancel
from ._errors import Cancelled, ChannelClosed, EndOfChannel, WorkerCrashed, WouldBlock
from ._go import GoHandle, go
from ._policy import Chunker
from ._stream_worker import stage_main
from ._sync import WaitGroup

__all__ = ["Run", "empty_stats"]

_POLL_S = 0.25  # how often a waiting consumer looks at the run (deaths, drain)
_MAX_CHUNK = 16  # largest adaptive chunk (items sent together)
_DRAIN_CHECK_S = 0.05  # a feeder blocked on a full stage looks for a drain this often
_KILL_AFTER_S = 0.5  # grace between a hard cancel and SIGKILL of busy workers
_MAX_FAILURES = 100  # failed items kept per stage with on_error="skip"

_run_ids = itertools.count(1)  # the "stream" label of the metrics


def empty_stats(index: int, stage: wire.Stage) -> dict[str, Any]:
    """The counters of stage ``index`` before any of its workers reported."""
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

    def __init__(self, stage: int, guard: wire.Guard | None) -> None:
        self.stage = stage
        self.guard = guard
        self.handle: GoHandle[dict[str, Any]] | None = None


class Run:
    """One running pipeline (parent side); made by iterating a Stream.

    Making one starts every stage worker and the feeder thread; if a worker
    cannot be started, what was started is stopped and the error raised.
    Process safety: one consumer thread (the one that iterates
    :meth:`results`); :meth:`cancel` and :meth:`stats` from any thread.
    """

    def __init__(
        self,
        source: Iterable[Any],
        ctx: Context | None,
        chunksize: int | None,
        stages: tuple[wire.Stage, ...],
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
        self.failures: list[wire.ItemError] = []  # skipped items, as delivered
        self.failure: wire.ItemError | None = None  # the failed item that ended the run
        self.crash_error: BaseException | None = None  # a death that ended it
        self.source_error: BaseException | None = None
        self._cond = threading.Condition()
        self._delivered = 0  # ordered: chunks handed to the consumer, in order
        self._stop = False
        self._fail_seq: int | None = None  # ordered: the first chunk with a fatal failure
        self._stats = [empty_stats(i, s) for i, s in enumerate(stages)]
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
                    guard = wire.Guard(Channel(1), WaitGroup()) if stage.fn is not None else None
                    self.slots.append(_Slot(i, guard))
                    self._start(len(self.slots) - 1, None)
        except BaseException:
            self.close()
            raise
        _metrics.register(self, Run._metric_families)
        self._feeder = threading.Thread(target=self._feed, name="mpchan-stream-feeder", daemon=True)
        self._feeder.start()

    def cancel(self, cause: Any) -> None:
        """Cancel the pipeline context with ``cause``; the workers stop at their
        next item or channel operation. Never blocks."""
        self._cancel(cause)

    def _start(self, k: int, resume: wire.Resume | None) -> None:
        slot = self.slots[k]
        i = slot.stage
        assert self._worker_cancel is not None, "started after close"
        h = go(
            stage_main,
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
        # Automatic chunks (chunksize=None, the shared rule _policy.Chunker):
        # items travel alone while the first stage keeps up (lowest latency);
        # each time the feeder finds its channel full -- the stages are
        # behind, items would wait anyway -- the chunk doubles, up to
        # _MAX_CHUNK; an empty channel halves it.
        sizer = Chunker(self.chunksize, _MAX_CHUNK)
        adaptive = self.chunksize is None
        size = sizer.size()
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
                        sizer.behind()
                    elif backlog == 0:
                        sizer.idle()
                    size = sizer.size()
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

    def results(self, indexed: bool) -> Iterator[Any]:
        """Yield the results (``indexed``: ``(source index, result)`` pairs),
        then close the run (see :meth:`close`, which raises its error).

        Blocks: while no result is ready (waking every ``_POLL_S`` to replace
        dead workers and to look for a drain).
        Cancellation: a cancelled pipeline context ends the iteration (then
        ``close`` tells why, or nothing if the caller cancelled); a drain
        stops the input, and what was read is still yielded.
        Process safety: one consumer thread, once.
        """
        out = self.chans[-1]
        ctx = self.ctx
        pending: dict[int, wire.Message] = {}
        tails: list[wire.Message] = []
        next_seq = 0
        ended = False
        stopped = False  # a fatal failure was delivered: the run ends there
        while not stopped:
            if self._ended:
                self._tend()
            try:
                msg: wire.Message = out.recv(timeout=_POLL_S, ctx=ctx)
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
            fatal = wire.fatal_of(failed) is not None
            if fatal and (self._fail_seq is None or seq < self._fail_seq):
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

    def _account(self, failed: list[wire.ItemError]) -> bool:
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
        record: wire.Journal | None = None
        started = 0
        if slot.guard is not None:
            record = wire.take_journal(slot.guard.journal)
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
        crash: wire.ItemError | None = None
        if spent[pos] > stage.retries:
            crash = wire.item_error(
                _crashed(stage, pid, exc, ""),
                i,
                wire.index_at(idx, pos),
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
        the first error of the run. Idempotent (only the first call raises).

        Blocks: until every worker process has ended (those still busy
        ``_KILL_AFTER_S`` after a cancel are killed) and the feeder thread
        has stopped (waiting at most 1 s for one stuck in the source).
        Cancellation: none; it is what ends a run.
        Process safety: the consumer thread (or whoever owns the run once
        iteration is over).
        """
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
            h for _i, h in self.handles if h.pid not in self._replaced and h.exception() is not None
        ]
        if isinstance(cause, tuple) and cause and cause[0] in ("error", "crash"):
            for h in errors:
                if h.pid == cause[2]:
                    return h.exception()
        if self.user_ctx is not None and self.user_ctx.err() is not None:
            return None  # the caller cancelled: the stream just ends
        if cause == ("closed",):
            return None
        return errors[0].exception() if errors else None

    def stats(self) -> list[dict[str, Any]]:
        """Per stage, the counters of the workers that have finished. Never blocks."""
        for i, h in self.handles:
            self._collect(i, h)
        return [dict(s) for s in self._stats]


def _pairs(idx: Any, items: list[Any]) -> Iterator[tuple[int | None, Any]]:
    if idx is None:
        return zip(itertools.repeat(None), items)
    return zip(itertools.count(idx) if type(idx) is int else idx, items)  # noqa: B905


def _crashed(stage: wire.Stage, pid: int, exc: WorkerCrashed, when: str) -> WorkerCrashed:
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


def _no_cancel(cause: Any) -> None:
    del cause
