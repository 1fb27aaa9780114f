"""Streaming pipelines: stages in worker processes joined by channels (layer 8).

Written only against the public API of the lower layers (``Channel``,
``WaitGroup``, contexts, ``go``). This module is what users see
(:func:`stream`, :class:`Stream`: build, then iterate); the work is split
by side, each module importing only those below it::

    _stream         Stream: the stages as immutable records; nothing runs until iterated
      |
    _stream_run     Run, in the parent: feeder thread, consumer, dead workers replaced, end
      |  go(stage_main, ...)
    _stream_worker  stage_main, in each worker process: chunks in, results out
      |
    _stream_wire    what both sides agree on: Stage, Message, ItemError, journal

Data flow of ``stream(src).map(f, workers=2).filter(g).map(h)``::

    parent                      worker processes (mpchan.go)           parent
    ------                      ----------------------------           ------
    feeder thread               stage 0: f x2      stage 1: g   stage 2: h
    next(src) --(message)-----> ch0 --> [f] [f] --> ch1 --> [g] --> ch2 --> [h] --> ch3 --> consumer
         ^                               |   |                                             |
         |                      journal, progress (one pair a worker)  <-- read after a death
         +------------------ ordered: window of W chunks in flight <---------------------+

Every hop carries one message ``(seq, idx, items, failed)``: the source
chunk's number, the source index of each item, the items, and the records
of those that failed (``_stream_wire``). Failures travel in band, so the
results of the items before a failure are delivered before it is raised;
a worker that dies running an item is replaced and the item run again
while its ``retries`` allow (``_stream_run``).

Invariants:
    - a Stream's source, stages and options never change: each building
      method returns a new Stream over the same source; nothing runs until
      one is iterated.
    - a Stream runs once: its :class:`~mpchan._stream_run.Run` is made at
      the first iteration and never replaced.
    - however the iteration ends (exhausted, an error, ``break``, the
      generator closed or collected), the run is closed: no worker process
      is left behind.

Ownership:
    - a Stream owns its Run; the thread that iterates it is the run's
      consumer; ``close`` (or the Stream's collection, which cancels)
      ends it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

from ._context import Context
from ._policy import count, positive
from ._stream_run import Run, empty_stats
from ._stream_wire import ItemError, Kind, OnError, Stage

__all__ = ["Stream", "stream"]


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
        stages: tuple[Stage, ...] = (),
        _trace: bool = False,
    ) -> None:
        # _trace (internal): record every item's run (see trace_records)
        if ctx is not None and not isinstance(ctx, Context):
            raise TypeError(f"ctx must be a Context, not {type(ctx).__name__}")
        self._source = source
        self._ctx = ctx
        self._chunksize = None if chunksize is None else count("chunksize", chunksize, 1)
        self._stages = stages
        self._trace = bool(_trace)
        self._run: Run | None = None

    # -- building ------------------------------------------------------------

    def _add(self, stage: Stage) -> Stream:
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
        count("workers", workers, 1)
        cap = max(2 * workers, 4) if capacity is None else count("capacity", capacity, 0)
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
        count("retries", retries, 0)
        positive("timeout", timeout)
        return self._add(Stage(kind, fn, workers, cap, bool(ordered), on_error, retries, timeout))

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
        count("n", n, 1)
        cap = 4 if capacity is None else count("capacity", capacity, 0)
        return self._add(Stage("batch", None, 1, cap, False, "fail", 0, None, n))

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
        run = self._run = Run(
            self._source, self._ctx, self._chunksize, self._stages, trace=self._trace
        )
        try:
            yield from run.results(indexed)
        finally:
            run.close()

    def collect(self) -> list[Any]:
        """Run the pipeline and return every result in a list.

        Blocks, Cancellation, Process safety: as iteration.
        """
        return list(self)

    def run(self, sink: Callable[[Any], object] | None = None) -> int:
        """Run the pipeline, calling ``sink(result)`` here for each result;
        return how many there were.

        Blocks, Cancellation, Process safety: as iteration (``sink`` runs in
        the calling thread, between results).
        """
        n = 0
        for value in self:
            if sink is not None:
                sink(value)
            n += 1
        return n

    def close(self) -> None:
        """Stop every stage now. Idempotent; a no-op before the stream runs.

        Blocks: until every stage worker process has ended (a busy one is
        killed shortly after the stop).
        Cancellation: none; it is what stops a run. An error the run met
        and has not raised yet (the source failed, a worker crashed) is
        raised here.
        Process safety: the consumer thread.
        """
        if self._run is not None:
            self._run.close()

    def __enter__(self) -> Stream:
        """The stream itself. Never blocks."""
        return self

    def __exit__(self, *exc: object) -> None:
        """:meth:`close` the stream.

        Blocks, Cancellation, Process safety: as :meth:`close`.
        """
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
            return [empty_stats(i, s) for i, s in enumerate(self._stages)]
        return self._run.stats()

    def failures(self) -> list[tuple[str, str]]:
        """With ``on_error="skip"``: (item repr, error) of failed items, in the
        order they were delivered (up to 100 per stage; ``stats()`` counts
        all). Never blocks."""
        return [(r.item, r.error) for r in failed_items(self)]


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
    every item they run (see :func:`trace_records`).
    Never blocks; see :class:`Stream`.
    """
    return Stream(iterable, ctx=ctx, chunksize=chunksize, _trace=_trace)


# -- for ``mpchan run`` (the command line): what a plain iteration hides ----------


def indexed_results(s: Stream) -> Generator[tuple[int | None, Any], None, None]:
    """Iterate ``s`` as iterating it does, yielding ``(source index, result)``
    pairs; the index of a result derived from a source item (filter,
    flat_map) is that item's, None after a batch.

    Blocks, Cancellation, Process safety: as iterating the stream.
    """
    return s._results(indexed=True)


def failed_items(s: Stream) -> list[ItemError]:
    """The records behind :meth:`Stream.failures` (``index``: the item's
    source index). Never blocks."""
    return [] if s._run is None else list(s._run.failures)


def fatal_item(s: Stream) -> ItemError | None:
    """The failed item that ended the run of ``s``, if an item did
    (``stage``, ``index``, ``error``, ``traceback``: the user's own frames).
    Never blocks."""
    return None if s._run is None else s._run.failure


def trace_records(s: Stream) -> list[dict[str, Any]]:
    """With ``_trace=True``, once the run of ``s`` is over, one dict per
    stage worker that reported: ``stage`` (index), ``pid``, ``events``
    (:data:`TraceEvent` tuples, times from ``time.monotonic()``),
    ``dropped`` (events past the limit). A worker killed before it could
    report is missing. Never blocks."""
    return [] if s._run is None else list(s._run.trace)
