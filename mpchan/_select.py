"""select across processes (layer 5).

    index, value, ok = select(ch, (ch2, v), ctx.done(), after(1.0), timeout=None, default=False)

Algorithm (one call):

    1. try every case once, in a fresh random order; the first that can
       proceed fires -- so among ready cases each is chosen uniformly.
    2. ``default``: nothing ready -> (-1, None, False).
    3. register this thread's waiter on every channel (and context) of the
       cases; an unbuffered send case *stages* its value tagged with this
       select's token; then park until woken, a timer or the timeout.
    4. on waking: first withdraw every staged value.  A withdraw that finds
       its value already taken means that send case fired -- it wins and
       nothing else is attempted.  Otherwise go back to 1.
    5. whatever happens, every registration is removed before returning.

Receives skip records staged under the select's own token, so a select
that sends and receives on one unbuffered channel never pairs with itself.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from . import _core
from ._channel import (
    _SLICE,
    CLOSED,
    NOBLOB,
    OK,
    OP_NEED_RECEIVER,
    OP_SELECT,
    TAG_BLOB,
    Channel,
)
from ._clock import deadline_after, remaining
from ._errors import ChannelClosed
from ._wake import current_waiter

if TYPE_CHECKING:
    from ._context import Context

__all__ = ["select"]

_RECV, _SEND, _OTHER = 0, 1, 2
_W_RECV_SEL = _core.W_RECV | _core.W_SELECT
_W_SEND_SEL = _core.W_SEND | _core.W_SELECT


class _Case:
    __slots__ = ("blob", "ch", "core", "kind", "obj", "payload", "tag", "ticket")

    def __init__(self, kind: int, obj: Any) -> None:
        self.kind = kind
        self.obj = obj
        self.ch: Channel | None = obj if isinstance(obj, Channel) else None
        self.core: Any = obj._core if self.ch is not None else None
        self.tag = 0
        self.payload: Any = None
        self.blob = NOBLOB
        self.ticket = 0


def _parse(cases: tuple[Any, ...]) -> list[_Case]:
    out: list[_Case] = []
    for c in cases:
        if isinstance(c, Channel):
            out.append(_Case(_RECV, c))
        elif isinstance(c, tuple):
            if len(c) != 2 or not isinstance(c[0], Channel):
                raise TypeError("a send case is a (Channel, value) pair")
            case = _Case(_SEND, c[0])
            case.tag, case.payload, case.blob = c[0]._encode(c[1])
            out.append(case)
        elif hasattr(c, "_sel_poll"):
            out.append(_Case(_OTHER, c))
        else:
            raise TypeError(f"not a select case: {c!r}")
    return out


def select(
    *cases: Any,
    timeout: float | None = None,
    default: bool = False,
    ctx: Context | None = None,
) -> tuple[int, Any, bool]:
    """Wait until one of ``cases`` can proceed and perform it.

    Cases: ``ch`` (receive), ``(ch, value)`` (send), ``ctx.done()``,
    ``after(seconds)`` / ``tick(seconds)``.  Returns ``(index, value, ok)``:
    for a receive the value and ok (False, None once closed and drained);
    for a send ``(index, None, True)``; for a timer its fire time and True;
    for ``ctx.done()`` ``(index, None, False)``.

    Blocks: until a case fires; with ``default=True`` never (returns
    ``(-1, None, False)`` when nothing is ready).
    Cancellation: ``timeout`` raises TimeoutError and a cancelled ``ctx``
    raises Cancelled (at once if it is already done); then no case fired --
    a value prepared for a send case that did not fire was withdrawn.
    Otherwise exactly one case fired.  A send case on a closed channel
    raises ChannelClosed.
    Process safety: any thread of any process; no registration outlives
    the call.
    """
    if ctx is not None:
        ctx.check()
    parsed = _parse(cases)
    if ctx is not None:
        # the context is one more (hidden) case: when it fires, raise
        parsed.append(_Case(_OTHER, ctx.done()))
    try:
        index, value, ok = _select(parsed, timeout, default)
        if ctx is not None and index == len(cases):
            ctx.check()
            raise AssertionError("unreachable: a done context raises")  # pragma: no cover
        return index, value, ok
    finally:
        for c in parsed:
            if c.kind == _SEND and c.ticket != -1 and c.ch is not None:
                # a prepared out-of-band payload of a case that did not fire
                c.ch._release_unsent(c.tag, c.payload, c.blob)


def _try(case: _Case, token: int) -> tuple[bool, Any, bool]:
    """One non-blocking attempt; (fired, value, ok)."""
    if case.kind == _RECV:
        assert case.ch is not None
        st, data, tag, blob, wakes = case.core.recv(token, OP_SELECT, 0)
        if wakes:
            case.ch._wake(wakes)
        if st == OK:
            return True, case.ch._decode(data, tag, blob), True
        if st == CLOSED:
            return True, None, False
        return False, None, False
    if case.kind == _SEND:
        assert case.ch is not None
        op = OP_NEED_RECEIVER if case.ch.capacity == 0 else 0
        st, _t, wakes = case.core.send(case.payload, case.tag, token, case.blob, op, 0)
        if st == _core.NOSPACE and not case.tag & TAG_BLOB:
            # capacity left but not ring bytes: send out of band (as Channel.send)
            case.tag, case.payload, case.blob = case.ch._to_blob(case.tag, case.payload, [])
            st, _t, wakes = case.core.send(case.payload, case.tag, token, case.blob, op, 0)
        if wakes:
            case.ch._wake(wakes)
        if st == OK:
            case.ticket = -1  # sent: its payload now belongs to the receiver
            return True, None, True
        if st == CLOSED:
            raise ChannelClosed("send on closed channel")
        return False, None, False
    return case.obj._sel_poll()  # type: ignore[no-any-return]


def _select(parsed: list[_Case], timeout: float | None, default: bool) -> tuple[int, Any, bool]:
    w = current_waiter()
    token = w.key
    deadline = deadline_after(timeout)
    order = list(range(len(parsed)))
    while True:
        random.shuffle(order)
        for i in order:
            fired, value, ok = _try(parsed[i], token)
            if fired:
                return i, value, ok
        if default:
            return -1, None, False
        left = remaining(deadline)
        if left is not None and left <= 0:
            raise TimeoutError(f"select timed out after {timeout} s")
        fired_case = _park(parsed, w.key, token, deadline)
        if fired_case is not None:
            return fired_case, None, True


def _park(parsed: list[_Case], key: int, token: int, deadline: float | None) -> int | None:
    """Register everywhere, stage unbuffered sends, wait once, then undo it
    all.  Returns the index of a staged send that was taken meanwhile."""
    registered: list[Any] = []
    staged: list[int] = []
    waits: list[float] = [_SLICE]
    # At most one unbuffered send is staged per park (two staged values could
    # both be taken); the others wait to be told that a receiver arrived.
    unbuffered = [
        i
        for i, c in enumerate(parsed)
        if c.kind == _SEND and c.ch is not None and c.ch.capacity == 0
    ]
    stage_at = random.choice(unbuffered) if unbuffered else -1
    try:
        ready = False
        for i, c in enumerate(parsed):
            if c.kind == _RECV:
                wakes = c.core.register(key, _W_RECV_SEL, token, 0)
                registered.append(c.core)
                if wakes:
                    c.ch._wake(wakes)  # type: ignore[union-attr]
            elif c.kind == _SEND:
                assert c.ch is not None
                if c.ch.capacity == 0 and i != stage_at:
                    c.core.register(key, _W_SEND_SEL, token, 0)
                    registered.append(c.core)
                elif c.ch.capacity == 0:
                    st, ticket, wakes = c.core.send(c.payload, c.tag, token, c.blob, OP_SELECT, key)
                    registered.append(c.core)
                    if wakes:
                        c.ch._wake(wakes)
                    if st == OK:
                        c.ticket = ticket
                        staged.append(i)
                    elif st == CLOSED:
                        ready = True
                else:
                    c.core.register(key, _W_SEND_SEL, token, 0)
                    registered.append(c.core)
            else:
                for core in c.obj._sel_cores():
                    core.register(key, _core.W_RECV, 0, 0)
                    registered.append(core)
                d = c.obj._sel_deadline()
                if d is not None:
                    waits.append(max(0.0, remaining(d) or 0.0))
        # re-check after registering: a change before it would be lost otherwise
        if not ready:
            for c in parsed:
                if c.kind == _RECV:
                    ready = bool(c.core.ready(_core.W_RECV, token))
                elif c.kind == _SEND and c.ch is not None and c.ch.capacity:
                    ready = bool(c.core.ready(_core.W_SEND, token))
                elif c.kind == _OTHER:
                    ready = _peek_other(c.obj)
                if ready:
                    break
        if not ready:
            left = remaining(deadline)
            if left is not None:
                waits.append(left)
            current_waiter().wait(min(waits))
    finally:
        for core in registered:
            core.unregister(key)
        taken: int | None = None
        for i in staged:
            c = parsed[i]
            consumed, _blob = c.core.retract(c.ticket)
            if consumed:
                taken = i
                c.ticket = -1  # its payload belongs to the receiver now
            else:
                c.ticket = 0
        staged.clear()
    return taken


def _peek_other(obj: Any) -> bool:
    d = obj._sel_deadline()
    if d is not None and (remaining(d) or 0.0) <= 0:
        return True
    if obj._sel_cores():
        ready, _v, _ok = _ready_without_consuming(obj)
        return ready
    return False


def _ready_without_consuming(obj: Any) -> tuple[bool, Any, bool]:
    # context cases do not consume anything when polled
    if hasattr(obj, "_ctx"):
        return obj._sel_poll()  # type: ignore[no-any-return]
    return (False, None, False)
