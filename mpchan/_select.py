"""select across processes (layer 5).

    index, value, ok = select(ch, (ch2, v), ctx.done(), after(1.0), timeout=None, default=False)
    index, value, ok = await aselect(...)   # the same, awaited: the event loop runs on

Algorithm (one call)::

    try every case once, in a fresh random order --- one fires --> return it
      | none ready                                   (each ready case equally
      v                                               likely to be chosen)
    default? --> (-1, None, False)
      |
      v
    Parking p (made once, on the first park):
      register p.key on every channel of the cases (W_SELECT: woken by
      every change, not one-of-many) and on each context's cores; stage at
      most one unbuffered send, tagged with this select's token
      re-check readiness (a change before the registration is seen here)
      p.wait(nearest of: timeout, a timer case, SLICE)   (aselect: awaited)
      p.release(); withdraw the staged value -- found taken: that send
      fired, return it and nothing else --> else back to the top

Invariants:
    - whatever happens (a case fires, timeout, cancel, an exception), no
      registration and no staged value outlives the call (``Parking``'s
      ``with`` block, then ``retract``).
    - at most one value is staged at a time, so at most one send fires;
      one found taken as the wait ends (a timeout, a cancelled task) fired:
      the select returns it rather than raise.
    - only a staged record carries the select's token; a value it sent into
      a buffer is anyone's, its own next select's too.
    - receives skip records staged under the select's own token, so a
      select that sends and receives on one unbuffered channel never pairs
      with itself.

Ownership:
    - a send case's encoded value (and its payload slot) belongs to the
      select until the case fires; after that to the receiver.  ``select``
      releases what did not fire.

Lock order: one segment mutex at a time, inside single core calls; none is
held while parked.

Case protocol: a channel (``Channel.sel_*``), or any object with
``sel_poll()`` (try to fire: ``(fired, value, ok)``), ``sel_peek()`` (ready
now, consuming nothing), ``sel_cores()`` (segments whose wake-ups concern
it) and ``sel_deadline()`` (monotonic time it becomes ready, or None) --
timers and ``ctx.done()``.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from . import _core
from ._channel import (
    CLOSED,
    NOBLOB,
    OK,
    OP_NEED_RECEIVER,
    OP_SELECT,
    Channel,
)
from ._channel_payload import TAG_BLOB
from ._clock import deadline_after, remaining
from ._errors import ChannelClosed
from ._park import SLICE, Parking, Steps, await_steps, block, task_cancel
from ._wake import current_waiter

if TYPE_CHECKING:
    from ._context import Context

__all__ = ["W_RECV_SEL", "W_SEND_SEL", "aselect", "select"]

_RECV, _SEND, _OTHER = 0, 1, 2
W_RECV_SEL = _core.W_RECV | _core.W_SELECT  # a select's registration to receive
W_SEND_SEL = _core.W_SEND | _core.W_SELECT  # ... and to send


class _Case:
    __slots__ = ("blob", "ch", "core", "kind", "obj", "payload", "tag", "ticket")

    def __init__(self, kind: int, obj: Any) -> None:
        self.kind = kind
        self.obj = obj
        self.ch: Channel | None = obj if isinstance(obj, Channel) else None
        self.core: Any = obj.sel_core() if self.ch is not None else None
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
            case.tag, case.payload, case.blob = c[0].sel_encode(c[1])
            out.append(case)
        elif hasattr(c, "sel_poll"):
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
    parsed = _prepare(cases, ctx)
    try:
        return _outcome(block(_select_steps(parsed, timeout, default, False)), cases, ctx)
    finally:
        _release(parsed)


async def aselect(
    *cases: Any,
    timeout: float | None = None,
    default: bool = False,
    ctx: Context | None = None,
) -> tuple[int, Any, bool]:
    """``select``, awaited: the event loop runs on while it waits.

    Cases, result, ``timeout``, ``default`` and ``ctx`` as :func:`select`.
    Blocks: the awaiting task only (the loop waits on this call's own
    descriptor; nothing polls).
    Cancellation: as ``select``; cancelling the task raises CancelledError
    with no case fired (a staged send withdrawn) -- unless a receiver took
    a staged send in the same instant: then that case is returned, and the
    task's cancellation request is withdrawn.
    Process safety: any number of tasks of any loops.
    """
    parsed = _prepare(cases, ctx)
    try:
        return _outcome(
            await await_steps(_select_steps(parsed, timeout, default, True)), cases, ctx
        )
    finally:
        _release(parsed)


def _prepare(cases: tuple[Any, ...], ctx: Context | None) -> list[_Case]:
    if ctx is not None:
        ctx.check()
    parsed = _parse(cases)
    if ctx is not None:
        # the context is one more (hidden) case: when it fires, raise
        parsed.append(_Case(_OTHER, ctx.done()))
    return parsed


def _outcome(
    fired: tuple[int, Any, bool], cases: tuple[Any, ...], ctx: Context | None
) -> tuple[int, Any, bool]:
    if ctx is not None and fired[0] == len(cases):
        ctx.check()
        raise AssertionError("unreachable: a done context raises")  # pragma: no cover
    return fired


def _release(parsed: list[_Case]) -> None:
    for c in parsed:
        if c.kind == _SEND and c.ticket != -1 and c.ch is not None:
            # a prepared out-of-band payload of a case that did not fire
            c.ch.sel_release(c.tag, c.payload, c.blob)


def _try(case: _Case, token: int) -> tuple[bool, Any, bool]:
    """One non-blocking attempt; (fired, value, ok)."""
    if case.kind == _RECV:
        assert case.ch is not None
        st, data, tag, blob, wakes = case.core.recv(token, OP_SELECT, 0)
        if wakes:
            case.ch.sel_wake(wakes)
        if st == OK:
            return True, case.ch.sel_decode(data, tag, blob), True
        if st == CLOSED:
            return True, None, False
        return False, None, False
    if case.kind == _SEND:
        assert case.ch is not None
        op = OP_NEED_RECEIVER if case.ch.capacity == 0 else 0
        st, _t, wakes = case.core.send(case.payload, case.tag, token, case.blob, op, 0)
        if st == _core.NOSPACE and not case.tag & TAG_BLOB:
            # capacity left but not ring bytes: send out of band (as Channel.send)
            case.tag, case.payload, case.blob = case.ch.sel_to_blob(case.tag, case.payload, [])
            st, _t, wakes = case.core.send(case.payload, case.tag, token, case.blob, op, 0)
        if wakes:
            case.ch.sel_wake(wakes)
        if st == OK:
            case.ticket = -1  # sent: its payload now belongs to the receiver
            return True, None, True
        if st == CLOSED:
            raise ChannelClosed("send on closed channel")
        return False, None, False
    return case.obj.sel_poll()  # type: ignore[no-any-return]


def _select(parsed: list[_Case], timeout: float | None, default: bool) -> tuple[int, Any, bool]:
    return block(_select_steps(parsed, timeout, default, False))


def _select_steps(
    parsed: list[_Case], timeout: float | None, default: bool, aio: bool
) -> Steps[tuple[int, Any, bool]]:
    """One select, as steps (see ``_park``); ``aio``: awaited, so its
    Parking is dedicated -- made first, its key is the select's token."""
    p: Parking | None = None  # made on the first park: a ready select never needs one
    if aio:
        p = Parking(dedicated=True)
        token = p.key
    else:
        token = current_waiter().key  # the Parking made below uses the same waiter
    deadline = deadline_after(timeout)
    order = list(range(len(parsed)))
    try:
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
            if p is None:
                p = Parking()
            fired_case = yield from _park(p, parsed, token, deadline)
            if fired_case is not None:
                return fired_case, None, True
    finally:
        if p is not None:
            p.close()


def _park(p: Parking, parsed: list[_Case], token: int, deadline: float | None) -> Steps[int | None]:
    """Register everywhere, stage one unbuffered send, re-check, wait once
    (yield to the driver), then undo it all.  Returns the index of a staged
    send that was taken meanwhile."""
    staged: list[int] = []
    waits: list[float] = [SLICE]
    # At most one unbuffered send is staged per park (two staged values could
    # both be taken); the others wait to be told that a receiver arrived.
    unbuffered = [
        i
        for i, c in enumerate(parsed)
        if c.kind == _SEND and c.ch is not None and c.ch.capacity == 0
    ]
    stage_at = random.choice(unbuffered) if unbuffered else -1
    key = p.key
    try:
        ready = False
        for i, c in enumerate(parsed):
            if c.kind == _RECV:
                assert c.ch is not None
                wakes = p.add(c.core, W_RECV_SEL, token)
                if wakes:
                    c.ch.sel_wake(wakes)
            elif c.kind == _SEND:
                assert c.ch is not None
                if i == stage_at:
                    p.track(c.core)
                    st, ticket, wakes = c.core.send(c.payload, c.tag, token, c.blob, OP_SELECT, key)
                    if wakes:
                        c.ch.sel_wake(wakes)
                    if st == OK:
                        c.ticket = ticket
                        staged.append(i)
                    elif st == CLOSED:
                        ready = True
                else:
                    p.add(c.core, W_SEND_SEL, token)
            else:
                for core in c.obj.sel_cores():
                    p.add(core, _core.W_RECV)
                d = c.obj.sel_deadline()
                if d is not None:
                    waits.append(remaining(d) or 0.0)
        # re-check after registering: a change before it would be lost otherwise
        if not ready:
            for c in parsed:
                if c.kind == _RECV:
                    ready = bool(c.core.ready(_core.W_RECV, token))
                elif c.kind == _SEND and c.ch is not None and c.ch.capacity:
                    ready = bool(c.core.ready(_core.W_SEND, token))
                elif c.kind == _OTHER:
                    ready = bool(c.obj.sel_peek())
                if ready:
                    break
        if not ready:
            left = remaining(deadline)
            if left is not None:
                waits.append(left)
            yield p, min(waits)
    except BaseException as exc:
        taken = _undo(p, parsed, staged)
        if taken is not None and (isinstance(exc, Exception) or task_cancel(exc)):
            return taken  # a staged send was taken as the wait ended: it fired
        raise
    return _undo(p, parsed, staged)


def _undo(p: Parking, parsed: list[_Case], staged: list[int]) -> int | None:
    """Unregister, and withdraw the staged send; the index of a staged send
    found taken (it fired), else None."""
    p.release()
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
