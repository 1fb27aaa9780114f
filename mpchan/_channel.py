"""Channel: Go channels across processes, data in shared memory (layer 4).

Data flow of one message::

    sender process                     segment (shared)          receiver process
    value --encode--> payload ---- C: append record at tail ----> C: take record
            (pickle 5; big buffers     (robust mutex held          --decode--> value
             copied once into a        for the copy only)
             reusable payload slot)
    wake keys returned by C ----- one datagram per parked waiter ---> poll() returns

How values become records (ring or payload files) is ``_channel_payload``'s.

One call, fastest first::

    send/recv: one locked core step ---- OK/CLOSED --> done (no Parking made)
      | FULL/EMPTY
      v
    spin (adaptive, yielding) ---------- OK/CLOSED --> done
      | still FULL/EMPTY
      v
    Parking: p.track(core); core step registering p.key in the locked step
      that finds FULL/EMPTY; p.wait() (timeout/ctx raise here); p.release();
      again -- the ``with`` block unregisters whatever ends it

The slow path is one set of steps (``_send_steps`` / ``_recv_steps``, see
``_park``): ``send``/``recv`` drive it with a blocking park, ``asend`` /
``arecv`` / ``async for`` with an awaited one (no spin: the loop runs on).

Invariants:
    - a blocked call registers this thread's waiter key *in the same locked
      step* that found the channel full/empty, so no wake-up is lost.
    - a waiter that leaves (timeout, cancel, interrupt) without taking what
      it may have been woken for passes the wake-up on (``wake_one``), so a
      timed-out receiver never strands a message.
    - capacity 0 is a rendezvous: the sender stages its record and waits
      until a receiver has taken it; a send that times out or is cancelled
      withdraws the record under the lock (``retract``), so it either
      happened or left nothing.
    - Cancelled / TimeoutError are raised only by ``Parking.wait``, before
      parking: the state was re-checked since the last wake-up.
    - an awaited call whose task is cancelled either raises CancelledError
      having done nothing (a receive consumed nothing and passed its
      wake-up on; an unbuffered send withdrew its record) or, when its
      record was taken in that instant, returns: the send happened.

Ownership:
    - the segment is the channel's: any holder writes it under its mutex;
      the last holder to detach (or the reaper) unlinks it (``_shm``).
    - wake keys returned by the core are sent by the caller that changed
      the state, after the mutex is released (``_wake``); keys found dead
      are unregistered here and their wake-up passed on.

Lock order: only the segment mutex, inside one core call at a time; none is
held while encoding, decoding or parked.
"""

from __future__ import annotations

import pickle
from collections.abc import AsyncIterator, Iterable, Iterator
from time import perf_counter
from typing import TYPE_CHECKING, Any

from . import _core, _shm
from ._channel_payload import TAG_BLOB, PayloadCodec, inline_limit, ring_size_for
from ._codec import TAG_PICKLE, cannot_unpickle, note_transit
from ._errors import ChannelClosed, EndOfChannel, WouldBlock
from ._park import SLICE, TURN, Parking, Steps, await_steps, block, deadline_for, task_cancel
from ._wake import wake

if TYPE_CHECKING:
    from ._context import Context

__all__ = ["Channel"]

OK, FULL, CLOSED, NOSPACE, EMPTY = (
    _core.OK,
    _core.FULL,
    _core.CLOSED,
    _core.NOSPACE,
    _core.EMPTY,
)
W_RECV, W_SEND, W_SELECT = _core.W_RECV, _core.W_SEND, _core.W_SELECT
OP_NEED_RECEIVER, OP_SELECT = _core.OP_NEED_RECEIVER, _core.OP_SELECT
NOBLOB = _core.NOBLOB

_loads = pickle.loads

_SPIN_S = 50e-6  # spin (yielding, locked re-checks) this long before parking
# Adaptive spinning: spinning pays only while the other side runs at the same
# time (an idle machine: a round trip then never parks).  Each re-check
# yields the CPU (sched_yield), so on a loaded machine the spin hands its
# core to whoever is runnable -- often the very peer it waits for -- instead
# of stealing it.  Where spins still fail, they only cost: each process keeps a
# credit: a spin that ended in success earns one, a failed one costs one; at
# zero it parks at once and probes again every _SPIN_PROBE parks.  Racy by
# design (a heuristic; any value is safe).
_SPIN_MAX = 16
_SPIN_PROBE = 64
_spin = [_SPIN_MAX, 0]  # [credit, parks since the credit ran out]


def _spin_allowed() -> bool:
    if _spin[0] > 0:
        return True
    _spin[1] += 1
    if _spin[1] >= _SPIN_PROBE:
        _spin[1] = 0
        _spin[0] = 1
        return True
    return False


def _spin_result(ok: bool) -> None:
    c = _spin[0] + (1 if ok else -1)
    _spin[0] = _SPIN_MAX if c > _SPIN_MAX else c


class Channel(PayloadCodec):
    """A Go channel whose buffer lives in shared memory.

    ``Channel(capacity=0)``: 0 is an unbuffered rendezvous (a send completes
    only when a receiver has taken the value); N buffers N messages.

    Any object that (cloud)pickle can serialise may be sent; ``bytes``,
    ``bytearray`` and large buffers (numpy arrays) travel through shared
    memory out of band.  A Channel pickles to a small handle by name, so it
    can be passed to any process of the program -- as a task argument, or
    through another channel.

    Process safety: every method may be called from any thread of any
    process holding a handle, concurrently.
    """

    __slots__ = ("__weakref__", "_cap", "_core", "_inline", "_name", "_seg")

    def __init__(self, capacity: int = 0, *, _ring_extra: int = 0) -> None:
        # _ring_extra (internal): ring bytes beyond what the capacity needs,
        # room for bigger messages inline (the pool's task and result channels)
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        ring = ring_size_for(capacity)
        hard = min(ring // 4, ring // (capacity + 1))
        seg = _shm.create_segment(capacity, ring + (_ring_extra & ~7), hard)
        self._adopt(seg)

    def _adopt(self, seg: _shm.Segment) -> None:
        self._seg = seg
        self._core = seg.core
        self._name = seg.name
        self._cap = int(seg.core.capacity())
        ring = int(seg.core.ring_size())
        self._inline = inline_limit(ring)

    @classmethod
    def _from_segment(cls, seg: _shm.Segment) -> Channel:
        ch = cls.__new__(cls)
        ch._adopt(seg)
        return ch

    # ------------------------------------------------------------ pickling

    def __reduce__(self) -> tuple[Any, ...]:
        self._core.transit(1)
        note_transit(self._core)
        return (_open_channel, (self._name,))

    # ------------------------------------------------------------ properties

    @property
    def capacity(self) -> int:
        """The buffer size given at creation (0: unbuffered).  Never blocks."""
        return self._cap

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called (by any process).  Never blocks."""
        return bool(self._core.is_closed())

    def __len__(self) -> int:
        """Messages buffered now (always 0 when unbuffered).  Never blocks."""
        return int(self._core.length())

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<mpchan.Channel capacity={self._cap} len={len(self)} {state}>"

    def stats(self) -> dict[str, Any]:
        """A snapshot: len, capacity, sent, received, blocked_senders,
        blocked_receivers (a waiting select counts on each channel), closed.

        Never blocks (beyond the channel's short internal lock).
        """
        return _shm.core_stats(self._core)

    # ------------------------------------------------------------ close

    def close(self) -> None:
        """Close the channel: later sends raise ChannelClosed; receivers drain
        what is buffered, then get EndOfChannel.  Idempotent; wakes every
        waiter in every process.  Never blocks.
        """
        _was, wakes = self._core.close()
        if wakes:
            self._wake(wakes)

    def _wake(self, keys: tuple[int, ...]) -> None:
        """Wake the waiters a core call named (keys found dead are dropped and
        their wake-up passed on).  Never blocks.  Process safety: any thread."""
        dead = wake(keys)
        if dead:
            # waiters that died while parked: drop them and pass the wake-up
            # on to a live one (else it would find out only after a slice)
            core = self._core
            for key in dead:
                core.unregister(key)
            again = [*(core.wake_one(W_RECV) or ()), *(core.wake_one(W_SEND) or ())]
            if again:
                self._wake(tuple(again))

    # ------------------------------------------------------------ send

    def send(self, value: Any, *, timeout: float | None = None, ctx: Context | None = None) -> None:
        """Send ``value``.

        Blocks: while the buffer is full; when unbuffered, until a receiver
        has taken the value.
        Cancellation: ``timeout`` raises TimeoutError and a cancelled ``ctx``
        raises Cancelled (at once if it is already done); either way nothing
        was enqueued.  Raises ChannelClosed on a closed channel and
        SerializationError (channel unchanged) if ``value`` cannot be pickled.
        Process safety: any number of threads and processes at once; the
        messages of one sender arrive in the order it sent them.
        """
        if ctx is not None:
            ctx.check()
        tag, payload, blob = self._encode(value)
        if self._cap:
            st, _t, wakes = self._core.send(payload, tag, 0, blob, 0, 0)
            if st == OK:
                if wakes:
                    self._wake(wakes)
                return
            if st == CLOSED:
                self._release_unsent(tag, payload, blob)
                raise ChannelClosed("send on closed channel")
            if st == NOSPACE and not tag & TAG_BLOB:
                # capacity left but the ring's bytes are used up: the value
                # goes out of band, so capacity always means messages
                tag, payload, blob = self._to_blob(tag, payload, [])
        self._send_slow(tag, payload, blob, timeout, ctx)

    def _send_slow(
        self, tag: int, payload: Any, blob: int, timeout: float | None, ctx: Context | None
    ) -> None:
        block(self._send_steps(tag, payload, blob, timeout, ctx, False))

    def _send_steps(
        self,
        tag: int,
        payload: Any,
        blob: int,
        timeout: float | None,
        ctx: Context | None,
        aio: bool,
    ) -> Steps[None]:
        """A send that found the buffer full (or is unbuffered), as steps
        (``_park``).  ``aio``: awaited -- the steps make the first attempt
        too, park on a dedicated waiter and never spin (the loop runs on)."""
        core = self._core
        staged = False  # once staged, _await_taken owns the payload
        try:
            if aio and self._cap:
                st, _t, wakes = core.send(payload, tag, 0, blob, 0, 0)
                if wakes:
                    self._wake(wakes)
                if st == OK:
                    return
                if st == CLOSED:
                    raise ChannelClosed("send on closed channel")
                if st == NOSPACE and not tag & TAG_BLOB:
                    tag, payload, blob = self._to_blob(tag, payload, [])
            if self._cap == 0:
                # Stage without registering: the receiver that takes it mostly
                # does so while _await_taken spins, and then nothing is to
                # unregister and no Parking is made.
                st, ticket, wakes = core.send(payload, tag, 0, blob, 0, 0)
                if wakes:
                    self._wake(wakes)
                if st == OK:
                    staged = True
                    yield from self._await_taken(
                        None, ticket, timeout, ctx, tag, payload, blob, aio
                    )
                    return
                if st == CLOSED:
                    raise ChannelClosed("send on closed channel")
                # NOSPACE: the ring is full of staged records; wait below
            with Parking(timeout, ctx, dedicated=aio) as p:
                while True:
                    p.track(core)
                    st, ticket, wakes = core.send(payload, tag, 0, blob, 0, p.key)
                    if wakes:
                        self._wake(wakes)
                    if st == OK:
                        if self._cap == 0:
                            staged = True  # and registered for its ticket
                            yield from self._await_taken(
                                p, ticket, timeout, ctx, tag, payload, blob, aio
                            )
                        return
                    if st == CLOSED:
                        raise ChannelClosed("send on closed channel")
                    if st == NOSPACE and not tag & TAG_BLOB:
                        p.release()
                        tag, payload, blob = self._to_blob(tag, payload, [])
                        continue
                    yield from self._park(p, W_SEND)
        except BaseException:
            if not staged:
                self._release_unsent(tag, payload, blob)
            raise

    def _await_taken(
        self,
        p: Parking | None,
        ticket: int,
        timeout: float | None,
        ctx: Context | None,
        tag: int,
        payload: Any,
        blob: int,
        aio: bool,
    ) -> Steps[None]:
        """Unbuffered: wait until the staged record was taken, else withdraw it.
        ``p``: the caller's parking, already registered for this ticket by
        the send that staged it (it unregisters when the caller's block
        ends); None: not registered -- spin, then register, re-check, park.
        A raise that finds the record taken already is absorbed (the send
        happened), unless it is a KeyboardInterrupt or SystemExit."""
        core = self._core
        try:
            if _spin_allowed():
                end = perf_counter() + _SPIN_S
                while perf_counter() < end:
                    if core.consumed(ticket):
                        _spin_result(True)
                        return
                    yield TURN
                _spin_result(False)
            if p is not None:
                yield from self._park_until_taken(p, ticket)
            else:
                with Parking(timeout, ctx, dedicated=aio) as q:
                    q.add(core, W_SEND, 0, ticket)
                    yield from self._park_until_taken(q, ticket)
        except BaseException as exc:
            # no exception chaining here: a cycle through the traceback
            # would keep this channel (and its segment) alive until a GC
            consumed, _blob = core.retract(ticket)
            if consumed and (isinstance(exc, Exception) or task_cancel(exc)):
                return  # taken after all: the send happened
            if not consumed:
                self._release_unsent(tag, payload, blob)
            raise

    def _park_until_taken(self, p: Parking, ticket: int) -> Steps[None]:
        core = self._core
        while not core.consumed(ticket):  # the re-check after registering
            if core.is_closed():
                raise ChannelClosed("send on closed channel")
            yield p, SLICE

    def send_nowait(self, value: Any) -> None:
        """Send without waiting, or raise WouldBlock (buffer full, or -- when
        unbuffered -- no receiver waiting).  Never blocks.

        Raises ChannelClosed on a closed channel; SerializationError as send.
        """
        tag, payload, blob = self._encode(value)
        op = 0 if self._cap else OP_NEED_RECEIVER
        st, _t, wakes = self._core.send(payload, tag, 0, blob, op, 0)
        if st == NOSPACE and not tag & TAG_BLOB:
            # capacity left but not ring bytes: the value goes out of band
            tag, payload, blob = self._to_blob(tag, payload, [])
            st, _t, wakes = self._core.send(payload, tag, 0, blob, op, 0)
        if wakes:
            self._wake(wakes)
        if st == OK:
            return
        self._release_unsent(tag, payload, blob)
        if st == CLOSED:
            raise ChannelClosed("send on closed channel")
        raise WouldBlock("channel full" if self._cap else "no receiver waiting")

    def send_many(
        self, values: Iterable[Any], *, timeout: float | None = None, ctx: Context | None = None
    ) -> None:
        """Send every value, in order, with as few wake-ups as possible.

        Blocks: while the buffer is full (unbuffered: each value is a rendezvous).
        Cancellation: ``timeout``/``ctx`` raise TimeoutError/Cancelled; the
        values before the one that was waiting were sent, none after.
        Process safety: as send; other senders may interleave between values.
        """
        if ctx is not None:
            ctx.check()
        items = list(values)
        if not items:
            return
        if self._cap == 0:
            for v in items:
                self.send(v, timeout=timeout, ctx=ctx)
            return
        encoded = [self._encode(v) for v in items]
        deadline = deadline_for(timeout, ctx)
        core = self._core
        i = 0
        n = len(encoded)
        try:
            while i < n:
                tag, payload, blob = encoded[i]
                j = i
                while (
                    j < n
                    and encoded[j][0] == tag
                    and encoded[j][2] == NOBLOB
                    and (type(encoded[j][1]) is bytes)
                ):
                    j += 1
                if j > i:
                    batch = [e[1] for e in encoded[i:j]]
                    sent, st, wakes = core.send_many(batch, tag, 0)
                    if wakes:
                        self._wake(wakes)
                    i += sent
                else:
                    st, _t, wakes = core.send(payload, tag, 0, blob, 0, 0)
                    if wakes:
                        self._wake(wakes)
                    if st == OK:
                        i += 1
                if i >= n:
                    return
                if st == CLOSED:
                    raise ChannelClosed("send on closed channel")
                if st == NOSPACE:
                    tag, payload, blob = encoded[i]
                    if not tag & TAG_BLOB:
                        encoded[i] = self._to_blob(tag, payload, [])
                        continue
                if st in (FULL, NOSPACE):
                    self._wait_space(deadline, timeout, ctx, st == NOSPACE)
        except BaseException:
            for tag, payload, blob in encoded[i:]:
                self._release_unsent(tag, payload, blob)
            raise

    def _wait_space(
        self, deadline: float | None, timeout: float | None, ctx: Context | None, nospace: bool
    ) -> None:
        core = self._core
        with Parking(timeout, ctx, deadline=deadline) as p:
            p.add(core, W_SEND)
            # NOSPACE (a record larger than the free ring bytes): wait for a
            # receive even though the message count is below capacity
            if nospace or core.length() >= self._cap:
                p.wait()

    # ------------------------------------------------------------ recv

    def recv(self, *, timeout: float | None = None, ctx: Context | None = None) -> Any:
        """Receive the next value.

        Blocks: while the channel is empty and open.
        Cancellation: ``timeout`` raises TimeoutError, a cancelled ``ctx``
        raises Cancelled (at once if already done); nothing was consumed.
        Raises EndOfChannel once the channel is closed and drained, and
        SerializationError if the value cannot be unpickled (it is consumed).
        Process safety: any number of threads and processes at once; each
        message is delivered to exactly one receiver.
        """
        if ctx is not None:
            ctx.check()
        st, data, tag, blob, wakes = self._core.recv(0, 0, 0)
        if st == OK:
            if wakes:
                self._wake(wakes)
            if tag == TAG_PICKLE:
                try:
                    return _loads(data)
                except BaseException as exc:
                    raise cannot_unpickle("value", exc) from exc
            return self._decode(data, tag, blob)
        if st == CLOSED:
            raise EndOfChannel("channel closed and drained")
        return self._recv_slow(timeout, ctx)

    def _recv_slow(self, timeout: float | None, ctx: Context | None) -> Any:
        return block(self._recv_steps(timeout, ctx, False))

    def _recv_steps(self, timeout: float | None, ctx: Context | None, aio: bool) -> Steps[Any]:
        """A receive that found the channel empty, as steps (``_park``);
        ``aio`` as ``_send_steps``."""
        core = self._core
        recv = core.recv
        st, data, tag, blob, wakes = recv(0, 0, 0)
        if st == EMPTY and _spin_allowed():
            end = perf_counter() + _SPIN_S
            while st == EMPTY and perf_counter() < end:
                yield TURN
                st, data, tag, blob, wakes = recv(0, 0, 0)
            _spin_result(st != EMPTY)
        if st == EMPTY:
            with Parking(timeout, ctx, dedicated=aio) as p:
                while True:
                    p.track(core)
                    st, data, tag, blob, wakes = recv(0, 0, p.key)
                    if st != EMPTY:
                        break
                    if wakes:
                        # registering as a receiver: selects waiting to send
                        # on this unbuffered channel may proceed now
                        self._wake(wakes)
                    yield from self._park(p, W_RECV)
        if st == OK:
            if wakes:
                self._wake(wakes)
            return self._decode(data, tag, blob)
        raise EndOfChannel("channel closed and drained")

    def _park(self, p: Parking, kind: int) -> Steps[None]:
        # One parked wait on ``p`` (the driver's), then unregister so the
        # caller re-checks and registers afresh.  A waiter that leaves
        # instead (timeout, cancel, interrupt) passes a wake-up it may have
        # had on to another.
        try:
            yield p, SLICE
        except BaseException:
            p.release()
            self._pass_on(kind)
            raise
        p.release()

    def _pass_on(self, kind: int) -> None:
        wakes = self._core.wake_one(kind)
        if wakes:
            self._wake(wakes)

    def recv_nowait(self) -> Any:
        """Receive without waiting, or raise WouldBlock.  Never blocks.

        Raises EndOfChannel (not WouldBlock) when closed and drained.
        """
        st, data, tag, blob, wakes = self._core.recv(0, 0, 0)
        if st == OK:
            if wakes:
                self._wake(wakes)
            return self._decode(data, tag, blob)
        if st == CLOSED:
            raise EndOfChannel("channel closed and drained")
        raise WouldBlock("channel empty")

    def recv_many(
        self, max_items: int, *, timeout: float | None = None, ctx: Context | None = None
    ) -> list[Any]:
        """Receive at least one and up to ``max_items`` values, in order.

        Blocks: until the first value is there (then takes what is buffered).
        Cancellation: as recv; nothing was consumed when it raises.
        Raises EndOfChannel when closed and drained.
        Process safety: as recv.
        """
        if isinstance(max_items, bool) or not isinstance(max_items, int):
            raise TypeError("max_items must be an int")
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        if ctx is not None:
            ctx.check()
        values = self.recv_many_nowait(max_items)
        if values:
            return values
        first = self._recv_slow(timeout, ctx)
        if max_items == 1:
            return [first]
        _, items, wakes = self._core.recv_many(max_items - 1)
        if wakes:
            self._wake(wakes)
        return [first, *self._decode_all(items)]

    def recv_many_nowait(self, max_items: int) -> list[Any]:
        """Up to ``max_items`` buffered values, [] when there are none.

        Never blocks. Raises EndOfChannel when closed and drained.
        """
        st, items, wakes = self._core.recv_many(max_items)
        if wakes:
            self._wake(wakes)
        if st == CLOSED:
            raise EndOfChannel("channel closed and drained")
        if st == EMPTY:
            return []
        return self._decode_all(items)

    def wait_readable(self, timeout: float, every: bool = False) -> None:
        """Park (without spinning) until a value is buffered, the channel is
        closed, or ``timeout`` seconds pass (or the thread's waiter is woken
        by anyone). Takes nothing.

        For a thread that shares its receiving with others of its process:
        it never gives the GIL up except to sleep (a spin's sched_yield
        would, and a busy thread would then keep it a switch interval).
        ``every``: woken by every send, as a select is, even while another
        receiver is parked (a send wakes only one plain receiver).
        Blocks: up to ``timeout``. Cancellation: none; a timeout returns (the
        caller re-checks what it waits for). Process safety: any thread.
        """
        core = self._core
        with Parking() as p:
            wakes = p.add(core, W_RECV | (W_SELECT if every else 0))
            if wakes:
                self._wake(wakes)
            if core.length() == 0 and not core.is_closed():
                p.wait(timeout)

    def transit_pending(self) -> int:
        """How many pickled handles of this channel no process has unpickled
        yet (they pin its segment). Never blocks."""
        return int(self._core.transit(0))

    def forget_transit(self) -> None:
        """Take back one pickled handle that will never be unpickled (the
        message carrying it died with its receiver), so it no longer pins
        the segment. Never blocks."""
        self._core.transit(-1)

    def __iter__(self) -> Iterator[Any]:
        """Receive until the channel is closed and drained.

        Blocks: as recv (no timeout, no context).
        Cancellation: none; use ``recv(timeout=..., ctx=...)`` in a loop.
        Process safety: as recv.
        """
        while True:
            try:
                yield self.recv()
            except EndOfChannel:
                return

    # ------------------------------------------------------------ asyncio

    async def asend(
        self, value: Any, *, timeout: float | None = None, ctx: Context | None = None
    ) -> None:
        """``send``, awaited: the event loop runs on while it waits.

        Blocks: the awaiting task only, as ``send`` would block (the loop
        waits on this call's own descriptor; nothing polls).
        Cancellation: ``timeout`` / ``ctx`` as ``send``.  Cancelling the
        task either raises CancelledError with nothing sent (an unbuffered
        value is withdrawn), or -- when a receiver took the value in the
        same instant -- returns normally: the send happened, and the
        task's cancellation request is withdrawn.
        Process safety: as ``send``; any number of tasks of any loops.
        """
        if ctx is not None:
            ctx.check()
        tag, payload, blob = self._encode(value)
        await await_steps(self._send_steps(tag, payload, blob, timeout, ctx, True))

    async def arecv(self, *, timeout: float | None = None, ctx: Context | None = None) -> Any:
        """``recv``, awaited: the event loop runs on while it waits.

        Blocks: the awaiting task only, while the channel is empty and open.
        Cancellation: ``timeout`` / ``ctx`` as ``recv``; cancelling the task
        raises CancelledError with nothing consumed (a wake-up it had is
        passed on to another receiver).  EndOfChannel once closed and drained.
        Process safety: as ``recv``.
        """
        if ctx is not None:
            ctx.check()
        return await await_steps(self._recv_steps(timeout, ctx, True))

    async def __aiter__(self) -> AsyncIterator[Any]:
        """``async for v in ch``: receive (awaited) until closed and drained.

        Blocks: the awaiting task only.  Cancellation: cancelling the task
        consumes nothing more.  Process safety: as recv.
        """
        while True:
            try:
                value = await await_steps(self._recv_steps(None, None, True))
            except EndOfChannel:
                return
            yield value

    # ------------------------------------------------------------ select protocol
    # Internal: what mpchan._select does with a channel case.  Not public API;
    # the names lack the underscore only because another module calls them.
    # Each is one of the channel's own steps (the same function object).

    def sel_core(self) -> Any:
        """The segment (C core) a select registers on and tries.  Never blocks."""
        return self._core

    sel_wake = _wake  # deliver wake keys a core call returned
    # and, from PayloadCodec: sel_encode, sel_to_blob, sel_decode, sel_release


# ---------------------------------------------------------------- handles


def _open_channel(name: str) -> Channel:
    """Unpickle a handle: attach this process to the named channel."""
    try:
        seg = _shm.open_segment(name)
    except FileNotFoundError:
        raise ChannelClosed(f"channel {name} no longer exists") from None
    ch = Channel._from_segment(seg)
    seg.core.transit(-1)
    return ch
