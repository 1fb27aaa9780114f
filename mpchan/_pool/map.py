"""``Pool.map``: lazy input, automatic chunks, a bounded window, order (layer 7).

Flow of one ``map`` call::

    input --slice / islice(chunk size)--> pool.submit_chunk --> Task (PoolFuture)
         ^ read only while the window has room          |
         |                                              v
    caller <-- ChunkIter <-- _chunks() <-- next finished Task (in order,
               (items, C)    (per chunk)       or as finished)

Replies: between chunks the caller takes buffered replies itself
(``Dispatch.poll_replies``), and with nothing to do it waits on the result
channel (woken by every reply) or for the collector to settle a chunk
(``_Note``): no reply waits for another thread to get the GIL.

Chunk size (``chunksize=None``): the shared rule, ``_policy.Chunker``. One
single-item probe per worker first; the first answer gives the time per
call, then chunks hold about ``TARGET_S`` seconds of calls. When the input
has a length, each chunk doubles the last (a one-item probe overstates a
tiny task's time per item: its first call is cold), up to
``len/(4*workers)`` items, so every worker still gets several chunks.

Window: at most ``_WINDOW_PER_WORKER * workers`` chunks at the workers (more
while they hold less work than that many full chunks would), and at most
twice that read and not yet yielded. Every finished chunk wakes the
iterating thread, which tops the window up at once: an ordered map whose
next chunk is slow keeps the other workers busy.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import pickle
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, cast

from .._codec import cannot_unpickle, release_unread
from .._core import ChunkIter
from .._park import SLICE
from .._policy import TARGET_S, Chunker
from .._wake import current_waiter, wake
from .._worker import decode_reply
from .task import Task
from .worker import CHUNK1, CHUNKN

if TYPE_CHECKING:
    from .dispatch import Dispatch

__all__ = ["MapRun"]

_loads = pickle.loads

_CHUNK_MAX = 65536
_WINDOW_PER_WORKER = 4  # default chunks in flight per worker
_FEED_CHUNK = 256  # items per chunk when an input of unknown length is fed at shutdown


class MapRun:
    """One ``map`` call: lazy input, chunking, the window, ordered or not."""

    def __init__(
        self,
        pool: Dispatch,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        timeout: float | None,
        chunksize: int | None,
        ordered: bool,
        buffersize: int | None,
        progress: bool,
    ) -> None:
        self.pool = pool
        self.fn = fn
        # A function by value is pickled once for the whole map (and sent
        # once to each worker); one that cannot be fails its chunks.
        self.ref: tuple[int, bytes] | None = None
        with contextlib.suppress(Exception):
            self.ref = pool.function_ref(fn)
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout
        self.chunksize = chunksize
        self.ordered = ordered
        self.kind = CHUNK1 if len(iterables) == 1 else CHUNKN
        self.it: Iterator[Any] = (
            iter(iterables[0]) if len(iterables) == 1 else zip(*iterables, strict=False)
        )
        # A list, tuple or range is sliced (one copy in C) rather than read
        # item by item; a range's slices pickle as ranges.
        self.seq: list[Any] | tuple[Any, ...] | range | None = None
        if len(iterables) == 1 and type(iterables[0]) in (list, tuple, range):
            self.seq = cast("list[Any] | tuple[Any, ...] | range", iterables[0])
        self.pos = 0
        total: int | None = None
        with contextlib.suppress(TypeError):
            total = min(len(x) for x in iterables)  # type: ignore[arg-type]
        self.total = total
        workers = pool.nworkers
        self.cap = _CHUNK_MAX if total is None else max(1, math.ceil(total / (4 * workers)))
        self.sizer = Chunker(chunksize, self.cap)
        self.buffersize = buffersize
        self.window = _WINDOW_PER_WORKER * workers
        self.probes = 0
        self.waited = False
        self.closed = False
        # Held while the input is read: by the iterating thread (top_up), or
        # by one that shuts the pool down meanwhile (feed_all). Reentrant: a
        # done-callback run by the iterating thread may shut the pool down.
        self.feeding = threading.RLock()
        self.inflight: deque[Task] = deque()
        self.items_inflight = 0
        self.exhausted = False
        self.note = _Note()  # finished chunks, from whichever thread settled them
        self.by_future: dict[Future[Any], Task] = {}  # not yet taken from the note
        self.done: dict[Task, None] = {}  # finished, not yet yielded (insertion order)
        self.bar: Any = None
        if progress:
            self.bar = progress_bar(total)
        pool.add_map(self)

    @property
    def per_item(self) -> float | None:
        """Seconds per call measured so far (None before the first answer). Never blocks."""
        return self.sizer.per_item

    def observe(self, secs: float, n: int) -> None:
        """Collector thread: the calls of a finished chunk took ``secs``. Never blocks."""
        self.sizer.timed(secs, n)

    def next_size(self) -> int:
        sizer = self.sizer
        if sizer.fixed is None and sizer.per_item is None:
            if self.probes >= self.pool.nworkers and self.inflight and not self.waited:
                # Every worker has a probe: give the first one a few ms to
                # answer (once). Tiny tasks answer, and get big chunks at
                # once; a task that does not answer is long, and single
                # items are right for it.
                self.waited = True
                first = self.inflight[0].future
                end = time.monotonic() + TARGET_S
                while sizer.per_item is None and not first.done():
                    if self.pool.poll_replies():
                        continue
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._wait(left)
                if sizer.per_item is not None:
                    return self.next_size()
            self.probes += 1
        size = sizer.size()
        if sizer.fixed is None and sizer.per_item is not None and self.total is not None:
            sizer.behind()  # grow each timed chunk (see the module's header)
        if self.buffersize is not None:
            size = min(size, max(1, self.buffersize - self.items_inflight))
        return size

    def top_up(self) -> None:
        pool = self.pool
        pool.poll_replies()
        self._take_done()
        # Chunks at the workers stay within the window; finished ones wait
        # to be yielded in order, at most another window's worth of them.
        with self.feeding:
            while not self.exhausted and self._has_room():
                if self.buffersize is not None and self.items_inflight >= self.buffersize:
                    return
                if pool.draining():
                    if pool.quiet_stop():
                        self.exhausted = True  # a drain: stop intake, yield what is in flight
                        return
                    pool.check_open()
                if not self._submit_next(self.next_size()):
                    return

    def feed_all(self) -> None:
        """The pool is shutting down: submit the rest of the input now, as
        ``Executor.map`` does at the call, so that every result can still be
        read after the shutdown. A map with a ``buffersize`` stops at the
        shutdown instead (its memory stays bounded). An endless input keeps
        the shutdown waiting, as it keeps ``Executor.map`` from returning.

        Blocks: while the input is read and pickled.
        Process safety: any thread (the iterating thread waits meanwhile).
        """
        if self.buffersize is not None:
            return
        size = self.chunksize or (self.cap if self.total is not None else _FEED_CHUNK)
        with self.feeding:
            while not self.exhausted and self._submit_next(size):
                pass

    def _submit_next(self, size: int) -> bool:
        # Caller holds self.feeding. Submit the next ``size`` items; False
        # once the input is exhausted.
        items: Sequence[Any]
        if self.seq is not None:
            items = self.seq[self.pos : self.pos + size]
            self.pos += len(items)
        else:
            items = list(itertools.islice(self.it, size))
        if not items:
            self.exhausted = True
            return False
        task = self.pool.submit_chunk(self.fn, self.ref, items, self.kind, self)
        # The callback holds the note, not the task: a task <-> future
        # cycle would keep the pool's channels alive until a GC pass.
        self.by_future[task.future] = task
        task.future.add_done_callback(self.note.put)
        self.inflight.append(task)
        self.items_inflight += task.n
        return True

    def _has_room(self) -> bool:
        # At most a window of chunks at the workers -- or, when they hold
        # less work than a window of full chunks would (the first, small
        # chunks of a map of tiny tasks), more of them; and at most two
        # windows finished or not, but not yet yielded.
        inflight = self.inflight
        if len(inflight) >= 2 * self.window:
            return False
        if len(inflight) - len(self.done) < self.window:
            return True
        per_item = self.per_item
        if per_item is None or self.chunksize is not None:
            return False
        items = self.items_inflight - sum(t.n for t in self.done)
        return items * per_item < self.window * TARGET_S

    def _take_done(self) -> int:
        # Move what finished meanwhile into self.done (this thread's); how many.
        q = self.note.q
        n = len(q)
        for _ in range(n):
            self.done[self.by_future.pop(q.popleft())] = None
        return n

    def results(self) -> Iterator[Any]:
        # The items of each chunk are handed out in C (ChunkIter); this
        # generator runs once per chunk, not once per item.
        hint = -1 if self.total is None else self.total
        return _MapIterator(self._chunks(), hint)

    def _chunks(self) -> Generator[list[Any], None, None]:
        try:
            while self.inflight:
                task = self._next_done()
                self.top_up()  # a chunk's worth of room: keep the workers busy
                values, failure = self._outcome(task)
                if self.bar is not None:
                    self.bar.update(len(values) + (failure is not None))
                yield values
                # Counted until yielded, so buffersize bounds what is read
                # from the input and not yet handed to the caller.
                self.items_inflight -= task.n
                if failure is not None:
                    decode_reply(
                        failure, where=f"a pool worker (pid {task.pid}) running {task.name}"
                    )
        finally:
            self.pool.discard_map(self)
            self.closed = True  # replies still to come are nobody's (Dispatch._settle)
            for task in self.inflight:
                fut = task.future
                if not fut.cancel() and fut.done() and fut.exception() is None:
                    # Finished and never yielded: handles in it must not
                    # pin their segments.
                    release_unread(fut.result())
            self.inflight.clear()
            self.done.clear()
            self.by_future.clear()
            self.note.q.clear()
            if self.bar is not None:
                self.bar.close()

    def _next_done(self) -> Task:
        # Every finished chunk wakes this thread, so the window is topped up
        # as soon as any worker has room, not only when the oldest chunk
        # (the next to yield in order) is done.
        done = self.done
        while True:
            if self._take_done():
                self.top_up()  # finished meanwhile: room for more
            if self.ordered:
                task = self.inflight[0]
                if task in done:
                    self.inflight.popleft()
                    break
            elif done:
                task = next(iter(done))
                self.inflight.remove(task)
                break
            if self.pool.poll_replies():
                continue  # settled here, without waiting for the collector
            if self.note.q:
                continue
            left = SLICE  # the longest single wait; the caller re-checks after it
            if self.deadline is not None:
                left = min(left, self.deadline - time.monotonic())
                if left <= 0:
                    raise TimeoutError(f"map results not ready within {self.timeout} s")
            self._wait(left)
        del done[task]
        return task

    def _wait(self, timeout: float) -> None:
        # This thread has nothing to do until a reply comes: it waits for the
        # replies itself (one wake-up, not the collector's and then its
        # own); a chunk the collector settles meanwhile wakes it too.
        note = self.note
        note.key = current_waiter().key
        note.waiting = True
        try:
            if not note.q:
                self.pool.wait_replies(timeout)
        finally:
            note.waiting = False

    @staticmethod
    def _outcome(task: Task) -> tuple[list[Any], bytes | None]:
        # The collector hands a chunk's reply over still pickled (see Pool._settle).
        data = task.future.result()
        try:
            values, failure = _loads(data)
        except BaseException as e:
            raise cannot_unpickle(f"the result of {task.name}", e) from e
        return values, failure


class _Note:
    """Finished chunks of one map, and how to wake its caller.

    ``put`` is the chunks' done callback (any thread); the caller takes them.
    Holds no task and no run: a callback must not make reference cycles.
    """

    __slots__ = ("key", "q", "waiting")

    def __init__(self) -> None:
        self.q: deque[Future[Any]] = deque()
        self.key = 0
        self.waiting = False

    def put(self, fut: Future[Any]) -> None:
        self.q.append(fut)
        # Appended before the flag is read: a caller that set it after its
        # own check of q is woken; one that checks q after sees it.
        if self.waiting:
            wake((self.key,))


class _MapIterator(ChunkIter):
    """The iterator ``map`` returns: the items of the result chunks, in C.

    ``close()`` stops it: what was not started is cancelled. Never blocks.
    """

    __slots__ = ()


def progress_bar(total: int | None) -> Any:
    # tqdm, imported only when asked for. Without its monitor thread: the
    # bar is updated by the iterating thread, and no thread outlives a map.
    from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

    class _Bar(tqdm):  # type: ignore[type-arg,misc]
        monitor_interval = 0

    return _Bar(total=total, file=sys.stderr, unit="task", dynamic_ncols=True, smoothing=0.1)
