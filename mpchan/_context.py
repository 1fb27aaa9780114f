"""Context: Go-style cancellation and deadlines that cross processes (layer 3).

Shape::

    background()                     (never done, no segment)
      └─ with_cancel ── node A  ── segment A: closed flag = cancelled,
           │                          first staged record = (cause, when),
           │                          counter = drain requested
           ├─ with_value  (no segment: same chain, one more value)
           └─ with_timeout ── node B (segment B, deadline d)

A context is its *chain*: the cancellable nodes from itself up to the root,
each one a small shared segment, plus the earliest deadline of the chain
(kept on the monotonic clock, which is system-wide, so it means the same in
every process) and its values.  A context is done when any node of its
chain is closed or its deadline passed.  So cancelling a node reaches every
descendant in every process -- they all watch it -- and never a parent.

Invariants:
    - a node's closed flag only goes from 0 to 1; the first record staged
      in it is the cause of the first ``cancel`` (later ones find it closed,
      or stage behind it); a record is at most a quarter of the node's ring,
      so the first one always fits.
    - the deadline of a context is the minimum along its chain.
    - ``Context._own`` is true only for the context ``with_cancel`` /
      ``with_deadline`` made the chain's first node for; only it cancels
      that node when its ``with`` block ends.
    - err(): of the chain's cancelled nodes, the one cancelled first (by its
      record's monotonic time) decides the cause; a deadline that passed
      before it makes it DeadlineExceeded instead.

Ownership:
    - ``cancel`` (picklable) is the only writer of its node; any process may
      call it.  Segments are freed like channels: when no live process holds
      a handle.
    - a blocking call under a context registers its waiter on every node of
      the chain (``wait_cores``) through its ``Parking``, which removes them
      when the call ends; ``cancel`` wakes every key registered on the node.

Lock order: none nests -- a node's segment mutex is taken inside single core
calls (cancel: send, then close), never while another is held.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Hashable
from typing import Any

from . import _core, _shm
from ._clock import deadline_after, monotonic_to_unix, remaining, unix_to_monotonic
from ._codec import dumps, note_transit
from ._errors import Cancelled, DeadlineExceeded
from ._park import SLICE, Parking, Steps, await_steps, block
from ._wake import wake

__all__ = [
    "CancelFunc",
    "Context",
    "background",
    "with_cancel",
    "with_deadline",
    "with_timeout",
    "with_value",
]

_NODE_RING = 4096
# Invariant: a cause record fits in the ring many times over, so the first
# cancel's record is always staged whatever later cancels try to add.
_MAX_RECORD = _NODE_RING // 4


def _short_repr(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception:
        text = f"<unprintable {type(obj).__name__}>"
    return text if len(text) <= _MAX_RECORD // 2 else text[: _MAX_RECORD // 2] + "..."


class _Node:
    """One cancellable context: a mapped segment."""

    __slots__ = ("core", "name", "seg")

    def __init__(self, seg: _shm.Segment) -> None:
        self.seg = seg
        self.core = seg.core
        self.name = seg.name

    @classmethod
    def new(cls) -> _Node:
        return cls(_shm.create_segment(0, _NODE_RING, kind=_shm.CONTEXT))

    def cancelled(self) -> bool:
        return bool(self.core.is_closed())

    def cancel(self, cause: Any) -> None:
        if self.core.is_closed():
            return
        when = time.monotonic()
        # Racing cancels may each stage a record; the ring keeps them in lock
        # order, so the first one staged -- the first cancel -- is the cause.
        # A cause that cannot be pickled, or would not fit in the node's ring,
        # travels as (a prefix of) its repr instead: the cancel itself never fails.
        for whole in (True, False):
            try:
                data = dumps((cause if whole else _short_repr(cause), when))
            except Exception:
                continue
            if len(data) > _MAX_RECORD:
                continue
            st, _t, wakes = self.core.send(data, 0, 0, _core.NOBLOB, 0, 0)
            if wakes:
                wake(wakes)
            if st == _core.OK:
                break
        _was, wakes = self.core.close()
        if wakes:
            wake(wakes)

    def record(self) -> tuple[Any, float] | None:
        data = self.core.peek()
        if data is None:
            return None
        try:
            rec = pickle.loads(data)
        except Exception:
            return (None, 0.0)
        return (rec[0], float(rec[1]))

    def __reduce__(self) -> tuple[Any, ...]:
        self.core.transit(1)
        note_transit(self.core)
        return (_open_node, (self.name,))


def _open_node(name: str) -> _Node:
    seg = _shm.open_segment(name)
    seg.core.transit(-1)
    return _Node(seg)


class Context:
    """A Go context: cancellation, deadline and values, valid in every process.

    Pickles to a handle that stays linked to the original: cancelling it (or
    an ancestor) anywhere is seen everywhere, at once by every process blocked
    under it.  Use as a context manager to cancel it on leaving the block; a
    context made by ``with_value`` (or ``background()``) has no cancel of its
    own, so leaving its block cancels nothing -- least of all its parent.
    Process safety: every method may be called from any thread or process.
    """

    __slots__ = ("_chain", "_deadline", "_own", "_values")

    def __init__(
        self,
        chain: tuple[_Node, ...] = (),
        deadline: float | None = None,
        values: tuple[tuple[Any, Any], ...] = (),
        own: bool = False,
    ) -> None:
        # Invariant: chain[0] belongs to this context (made for it by
        # with_cancel/with_deadline) iff _own; a with_value child shares its
        # parent's chain and must never cancel it.
        self._chain = chain
        self._deadline = deadline
        self._values = values
        self._own = own and bool(chain)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Context, (self._chain, self._deadline, self._values, self._own))

    # -- internal protocol of blocking calls (mpchan._park.CancelScope) -----
    # Not public API; no underscore only because other modules call them.

    def wait_cores(self) -> tuple[Any, ...]:
        """The segments whose close wakes a waiter of this context (one per
        cancellable node of the chain).  Never blocks."""
        return tuple(n.core for n in self._chain)

    def monotonic_deadline(self) -> float | None:
        """The chain's earliest deadline on the monotonic clock, or None.
        Never blocks."""
        return self._deadline

    # -- public -------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """True once cancelled or past its deadline.  Never blocks."""
        return self.err() is not None

    def err(self) -> Cancelled | None:
        """None while live; else a Cancelled or DeadlineExceeded instance.
        Never blocks."""
        first: tuple[float, Any] | None = None
        for node in self._chain:
            if node.cancelled():
                rec = node.record()
                when = rec[1] if rec else 0.0
                if first is None or when < first[0]:
                    first = (when, rec[0] if rec else None)
        d = self._deadline
        if d is not None and time.monotonic() >= d and (first is None or d <= first[0]):
            return DeadlineExceeded()
        if first is not None:
            return Cancelled("context cancelled", first[1])
        return None

    def cause(self) -> Any:
        """The cause given to ``cancel(cause)``, else ``err()``.  Never blocks."""
        err = self.err()
        if err is None:
            return None
        if not isinstance(err, DeadlineExceeded) and err.cause is not None:
            return err.cause
        return err

    def check(self) -> None:
        """Raise Cancelled / DeadlineExceeded if done.  Never blocks."""
        if not self._chain and self._deadline is None:
            return
        err = self.err()
        if err is not None:
            # Break the cycle error -> traceback -> this frame -> error, so the
            # context's segments go when the caller drops them, not at the
            # next garbage collection.
            try:
                raise err
            finally:
                del err

    def deadline(self) -> float | None:
        """The earliest deadline of the chain as unix time, or None.  Never blocks."""
        return None if self._deadline is None else monotonic_to_unix(self._deadline)

    def value(self, key: Hashable) -> Any:
        """The value bound to ``key`` here or in an ancestor, else None.  Never blocks."""
        for k, v in reversed(self._values):
            if k == key:
                return v
        return None

    @property
    def draining(self) -> bool:
        """True once a graceful drain was requested (see ``mpchan.main``).
        Never blocks."""
        return any(n.core.flag() for n in self._chain)

    def request_drain(self) -> None:
        """Ask every holder of this context (and its descendants), in every
        process, to drain: :attr:`draining` turns True and
        :meth:`drain_requested` becomes ready (the first Ctrl-C under
        ``mpchan.main`` does this). Raises ValueError on the background
        context. Never blocks."""
        if not self._chain:
            raise ValueError("background context cannot drain")
        _was, wakes = self._chain[0].core.set_flag()
        if wakes:
            wake(wakes)

    def done(self) -> DoneCase:
        """A receive-only, selectable object that is ready once this context
        is done (``select`` returns ``ok=False`` for it).  Never blocks."""
        return DoneCase(self, drain=False)

    def drain_requested(self) -> DoneCase:
        """A receive-only, selectable object ready once a drain was requested.
        Never blocks."""
        return DoneCase(self, drain=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the context is done; True if it is, False on timeout.

        Blocks: up to ``timeout`` seconds (None: until done), using no CPU.
        Cancellation: returning is the point.  Process safety: any thread.
        """
        if self.err() is not None:
            return True
        if timeout is not None and timeout <= 0:
            return False
        return block(self._done_steps(deadline_after(timeout), False))

    async def adone(self) -> None:
        """Await until the context is done, without blocking the event loop.

        Blocks: the awaiting task only (the loop waits on this wait's own
        descriptor, woken by the cancel itself: nothing polls).
        Cancellation: cancelling the task stops the wait.  Process safety:
        any task of any loop.
        """
        if self.err() is None:
            await await_steps(self._done_steps(None, True))

    def _done_steps(self, end: float | None, aio: bool) -> Steps[bool]:
        # wait / adone: True once done, False at ``end`` (monotonic; None: never)
        with Parking(dedicated=aio) as p:
            for c in self.wait_cores():
                p.add(c, _core.W_RECV)
            while self.err() is None:
                left = remaining(end)
                if left is not None and left <= 0:
                    return False
                yield p, _nearest(SLICE, left, remaining(self._deadline))
            return True

    def __enter__(self) -> Context:
        """The context itself.  Never blocks."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Cancel this context (and its descendants) if it has a cancel of its
        own; else nothing.  Never blocks."""
        # Leaving the block cancels this context and its descendants.  A
        # context without a node of its own (background, with_value) has
        # nothing to cancel that is not its parent's, so nothing happens.
        if self._own:
            self._chain[0].cancel(None)

    def __repr__(self) -> str:
        state = "done" if self.err() is not None else "live"
        return f"<mpchan.Context {state} deadline={self.deadline()}>"


class DoneCase:
    """``ctx.done()`` / ``ctx.drain_requested()``: a receive-only select case."""

    __slots__ = ("_ctx", "_drain")

    def __init__(self, ctx: Context, drain: bool) -> None:
        self._ctx = ctx
        self._drain = drain

    # -- select case protocol (see mpchan._select); internal ----------------

    def sel_poll(self) -> tuple[bool, Any, bool]:
        """(ready, None, False); consumes nothing.  Never blocks."""
        if self._drain:
            return (self._ctx.draining or self._ctx.err() is not None, None, False)
        return (self._ctx.err() is not None, None, False)

    def sel_peek(self) -> bool:
        """Ready now.  Never blocks."""
        return self.sel_poll()[0]

    def sel_cores(self) -> tuple[Any, ...]:
        """The segments whose wake-ups concern this case.  Never blocks."""
        return self._ctx.wait_cores()

    def sel_deadline(self) -> float | None:
        """When it becomes ready by itself (monotonic), or None.  Never blocks."""
        return self._ctx._deadline

    def recv(self, *, timeout: float | None = None) -> None:
        """Wait until ready (returns None).

        Blocks: up to ``timeout``; TimeoutError after it.  Process safety: any thread.
        """
        if not self._drain:
            if not self._ctx.wait(timeout):
                raise TimeoutError("timed out")
            return None
        if self.sel_peek():
            return None
        with Parking(timeout) as p:
            for c in self.sel_cores():
                p.add(c, _core.W_RECV)
            while not self.sel_peek():
                p.wait()
        return None


def _nearest(*waits: float | None) -> float | None:
    """The shortest of the waits that are not None (None if all are)."""
    out: float | None = None
    for w in waits:
        if w is not None and (out is None or w < out):
            out = w
    return out


class CancelFunc:
    """``cancel(cause=None)``: cancel a context (idempotent, picklable; a
    worker may call it).  Never blocks."""

    __slots__ = ("_node",)

    def __init__(self, node: _Node) -> None:
        self._node = node

    def __call__(self, cause: Any = None) -> None:
        self._node.cancel(cause)

    def __reduce__(self) -> tuple[Any, ...]:
        return (CancelFunc, (self._node,))


_BACKGROUND = Context()


def background() -> Context:
    """The root context: never cancelled, no deadline, no values.  Never blocks."""
    return _BACKGROUND


def _check_parent(parent: Context) -> None:
    if not isinstance(parent, Context):
        raise TypeError(f"parent must be a Context, not {type(parent).__name__}")


def with_cancel(parent: Context) -> tuple[Context, CancelFunc]:
    """A child of ``parent`` with its own cancel.  Never blocks."""
    _check_parent(parent)
    node = _Node.new()
    ctx = Context((node, *parent._chain), parent._deadline, parent._values, own=True)
    return ctx, CancelFunc(node)


def with_deadline(parent: Context, unix_time: float) -> tuple[Context, CancelFunc]:
    """A child cancelled at ``unix_time`` (or earlier with the parent).  Never blocks."""
    _check_parent(parent)
    d = unix_to_monotonic(float(unix_time))
    if parent._deadline is not None:
        d = min(d, parent._deadline)
    node = _Node.new()
    ctx = Context((node, *parent._chain), d, parent._values, own=True)
    return ctx, CancelFunc(node)


def with_timeout(parent: Context, seconds: float) -> tuple[Context, CancelFunc]:
    """A child cancelled ``seconds`` from now (or earlier with the parent).
    Never blocks."""
    return with_deadline(parent, time.time() + float(seconds))


def with_value(parent: Context, key: Hashable, value: Any) -> Context:
    """A child carrying ``key -> value``.  ``key`` must be hashable and not None.
    Never blocks."""
    _check_parent(parent)
    if key is None:
        raise TypeError("context key must not be None")
    try:
        hash(key)
    except TypeError:
        raise TypeError(f"context key must be hashable, not {type(key).__name__}") from None
    return Context(parent._chain, parent._deadline, (*parent._values, (key, value)), own=False)
