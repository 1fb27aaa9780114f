"""Channel: Go channels across processes, data in shared memory (layer 4).

Data flow of one message::

    sender process                     segment (shared)          receiver process
    value --encode--> payload ---- C: append record at tail ----> C: take record
            (pickle 5; big buffers     (robust mutex held          --decode--> value
             copied once into a        for the copy only)
             reusable payload slot)
    wake keys returned by C ----- one datagram per parked waiter ---> poll() returns

Payloads that do not fit in the ring go to per-channel payload slot files
(reused; a new one is sized to its message plus 1/64).  A sender that finds
no free slot that fits, while a receiver is copying out of one (or is
parked, about to take one), waits for that one (at most ``_SLOT_WAIT_S``):
making a slot costs far more than a copy.

A blocked call registers this thread's waiter key in the segment *in the
same locked step* that found the channel full/empty, so no wake-up is lost;
then it polls its wake socket (no CPU used) in slices of at most
``_SLICE`` seconds, re-checking state, the timeout and the context each
time.  A waiter that leaves without taking what it was woken for passes the
wake-up on (``wake_one``), so a timed-out receiver never strands a message.

Capacity 0 is a rendezvous: the sender stages its record and waits until a
receiver has taken it; a send that times out or is cancelled withdraws the
record under the lock (``retract``), so it either happened or left nothing.
"""

from __future__ import annotations

import contextlib
import pickle
import secrets
import struct
import sys
from collections.abc import Iterable, Iterator
from os import sched_yield as _yield
from time import perf_counter
from time import sleep as _sleep
from typing import TYPE_CHECKING, Any

from . import _core, _shm
from ._clock import deadline_after, remaining
from ._codec import (
    TAG_BYTEARRAY,
    TAG_BYTES,
    TAG_PICKLE,
    cannot_unpickle,
    decode,
    encode,
    note_transit,
)
from ._errors import ChannelClosed, EndOfChannel, SerializationError, WouldBlock
from ._wake import Waiter, current_waiter, wake

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
REC = _core.REC_SIZE

_SIMPLE = frozenset({int, float, str, bool, type(None)})  # never out-of-band buffers
_dumps = pickle.dumps
_loads = pickle.loads

TAG_BLOB = 0x100  # record payload is a descriptor of an out-of-band payload file
_DESC = struct.Struct("<iQ16sQH")  # slot, gen, one-off id, pickle/raw length, n buffers
_LEN = struct.Struct("<Q")

_SLICE = 0.25  # longest single park: a safety net, never the wake-up path
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


_MIN_RING = 64 * 1024
_MAX_RING = 64 * 1024 * 1024
_PER_MSG = 512  # ring bytes per message of capacity (see _inline_limit)
_BLOB_MIN = 1 << 20
_SLOT_STEP = 64 * 1024
_SLOT_WAIT_S = 0.05  # longest wait for a payload slot being copied out
_SLOT_POLL_S = 50e-6
_NUMPY_COPY_MIN = 1 << 20


def _ring_size_for(capacity: int) -> int:
    size = max(_MIN_RING, min(_MAX_RING, capacity * _PER_MSG))
    return (size + 7) & ~7


def _inline_limit(ring: int) -> int:
    """Largest payload tried in the ring; bigger ones travel out of band (their
    ring record is a small descriptor).

    Invariant: ``capacity`` records of the *hard* size (``ring/(capacity+1)``)
    plus one end-of-ring PAD always fit, so a buffered channel accepts
    ``capacity`` messages whatever their sizes.  A buffered channel also
    tries records up to a quarter of the ring inline: the core takes one
    only while the room of every message the capacity still allows stays
    free, and answers NOSPACE otherwise (the sender then goes out of band).
    """
    return min((ring // 4) & ~7, 64 * 1024) - REC


def _slot_size(n: int) -> int:
    """Size of a new payload slot for ``n`` bytes: 1/64 headroom, rounded up
    to 64 KiB, at least 1 MiB.  Tight on purpose: every byte of a fresh slot
    is expensive (tmpfs pages allocated and zeroed by the sender -- about
    1 GB/s here, far slower than memcpy -- and mapped by each receiver)."""
    n += n >> 6
    return max(_BLOB_MIN, (n + _SLOT_STEP - 1) // _SLOT_STEP * _SLOT_STEP)


class Channel:
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
        ring = _ring_size_for(capacity)
        hard = min(ring // 4, ring // (capacity + 1))
        seg = _shm.create_segment(capacity, ring + (_ring_extra & ~7), hard)
        self._adopt(seg)

    def _adopt(self, seg: _shm.Segment) -> None:
        self._seg = seg
        self._core = seg.core
        self._name = seg.name
        self._cap = int(seg.core.capacity())
        ring = int(seg.core.ring_size())
        self._inline = _inline_limit(ring)

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

    # ------------------------------------------------------------ encoding

    def _encode(self, value: Any) -> tuple[int, Any, int]:
        """Return (tag, record payload, blob slot).  Copies big payloads into
        a payload file now, before any channel state changes."""
        t = type(value)
        if t in _SIMPLE:
            data = _dumps(value, 5)
            if len(data) <= self._inline:
                return TAG_PICKLE, data, NOBLOB
            return self._to_blob(TAG_PICKLE, data, [])
        if t is memoryview:
            value = value.cast("B") if value.c_contiguous else value.tobytes()
        tag, data, bufs = encode(value)
        if not bufs and len(data) <= self._inline:
            return tag, data, NOBLOB
        return self._to_blob(tag, data, bufs)

    def _to_blob(self, tag: int, data: Any, bufs: list[Any]) -> tuple[int, bytes, int]:
        raws = [b.raw() for b in bufs]
        dlen = len(data) if not isinstance(data, memoryview) else data.nbytes
        total = dlen + sum(r.nbytes for r in raws)
        core = self._core
        slot, gen, ssize, old = core.blob_acquire(total, True)
        if slot == -2:
            # a receiver is copying out of a slot that fits: reusing it in a
            # moment is far cheaper than a fresh slot (whose pages must be
            # allocated, zeroed and mapped on both sides)
            end = perf_counter() + _SLOT_WAIT_S
            while slot == -2:
                _sleep(_SLOT_POLL_S)
                slot, gen, ssize, old = core.blob_acquire(total, perf_counter() < end)
        eph = b"0" * 16
        if slot >= 0:
            name = f"{self._name}-b{slot}-{gen}"
            try:
                # ssize 0: a fresh slot whose file the caller must create
                create = max(total, 1) if ssize == 0 or ssize < total else None
                mm = self._blob_map(slot, gen, create, old)
            except BaseException:
                core.blob_release(slot, True)
                raise
        else:
            eph = secrets.token_hex(8).encode()
            name = f"{self._name}-e{eph.decode()}"
            mm = _shm.map_file(name, max(total, 1), create=True)
        try:
            off = dlen
            mm[0:dlen] = data
            for r in raws:
                mm[off : off + r.nbytes] = r
                off += r.nbytes
        except BaseException:
            self._drop_blob(slot, name, mm)
            raise
        finally:
            if slot < 0:
                mm.close()
        desc = _DESC.pack(slot, gen, eph, dlen, len(raws)) + b"".join(
            _LEN.pack(r.nbytes) for r in raws
        )
        return tag | TAG_BLOB, desc, (slot if slot >= 0 else NOBLOB)

    def _blob_map(self, slot: int, gen: int, create_size: int | None, old: int) -> Any:
        maps = self._seg.blob_maps
        name = f"{self._name}-b{slot}-{gen}"
        if create_size is not None:
            if old:
                stale = f"{self._name}-b{slot}-{old}"
                mm_old = maps.pop(stale, None)
                if mm_old is not None:
                    with contextlib.suppress(BufferError):
                        mm_old.close()
                _shm.unlink_quietly(stale)
            size = _slot_size(create_size)
            mm = _shm.map_file(name, size, create=True)
            self._core.blob_set(slot, size)
            maps[name] = mm
            return mm
        cached = maps.get(name)
        if cached is not None:
            return cached
        prefix = f"{self._name}-b{slot}-"  # an older generation of this slot
        for k in [k for k in maps if k.startswith(prefix)]:
            with contextlib.suppress(BufferError):
                maps.pop(k).close()
        mm = _shm.map_file(name)
        maps[name] = mm
        return mm

    def _drop_blob(self, slot: int, name: str, mm: Any) -> None:
        """Give back the payload slot of a message that was not sent."""
        if slot >= 0:
            self._core.blob_release(slot, False)
        else:
            with contextlib.suppress(Exception):
                mm.close()
            _shm.unlink_quietly(name)

    def _release_unsent(self, tag: int, payload: bytes, blob: int) -> None:
        if not tag & TAG_BLOB:
            return
        if blob != NOBLOB:
            self._core.blob_release(blob, False)
        else:
            eph = _DESC.unpack_from(payload)[2].decode()
            _shm.unlink_quietly(f"{self._name}-e{eph}")

    def _decode(self, data: bytes, tag: int, blob: int) -> Any:
        if not tag & TAG_BLOB:
            if tag == TAG_PICKLE:
                return decode(TAG_PICKLE, data)
            return decode(tag, data)
        tag &= ~TAG_BLOB
        slot, gen, eph, dlen, nbufs = _DESC.unpack_from(data)
        lens = [_LEN.unpack_from(data, _DESC.size + 8 * i)[0] for i in range(nbufs)]
        if slot >= 0:
            mm = self._blob_map(slot, gen, None, 0)
        else:
            name = f"{self._name}-e{eph.decode()}"
            mm = _shm.map_file(name)
            _shm.unlink_quietly(name)
        mv = memoryview(mm)
        try:
            if tag == TAG_BYTES:
                return bytes(mv[:dlen])
            if tag == TAG_BYTEARRAY:
                return bytearray(mv[:dlen])
            bufs: list[Any] = []
            off = dlen
            for n in lens:
                bufs.append(_copy_out(mv[off : off + n]))
                off += n
            return decode(TAG_PICKLE, mv[:dlen], bufs)
        finally:
            mv.release()
            if slot >= 0:
                self._core.blob_release(slot, False)
            else:
                mm.close()

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
        core = self._core
        w = current_waiter()
        deadline = _effective_deadline(timeout, ctx)
        staged = False  # once staged, _await_taken owns the payload
        try:
            while True:
                st, ticket, wakes = core.send(payload, tag, 0, blob, 0, w.key)
                if wakes:
                    self._wake(wakes)
                if st == OK:
                    if self._cap == 0:
                        staged = True
                        self._await_taken(w, ticket, deadline, timeout, ctx, tag, payload, blob)
                    return
                if st == CLOSED:
                    raise ChannelClosed("send on closed channel")
                if st == NOSPACE and not tag & TAG_BLOB:
                    core.unregister(w.key)
                    tag, payload, blob = self._to_blob(tag, payload, [])
                    continue
                try:
                    _park(w, (core,), deadline, timeout, ctx, W_SEND)
                except BaseException:
                    core.unregister(w.key)
                    self._pass_on(W_SEND)
                    raise
                core.unregister(w.key)
        except BaseException:
            if not staged:
                self._release_unsent(tag, payload, blob)
            raise

    def _await_taken(
        self,
        w: Waiter,
        ticket: int,
        deadline: float | None,
        timeout: float | None,
        ctx: Context | None,
        tag: int,
        payload: Any,
        blob: int,
    ) -> None:
        """Unbuffered: wait until the staged record was taken, else withdraw it."""
        core = self._core
        try:
            if _spin_allowed():
                end = perf_counter() + _SPIN_S
                while perf_counter() < end:
                    if core.consumed(ticket):
                        _spin_result(True)
                        return
                    _yield()
                _spin_result(False)
            # registered for this ticket by the send that staged it
            while not core.consumed(ticket):
                if core.is_closed():
                    raise ChannelClosed("send on closed channel")
                _park(w, (core,), deadline, timeout, ctx, W_SEND)
        except BaseException as exc:
            # no exception chaining here: a cycle through the traceback
            # would keep this channel (and its segment) alive until a GC
            consumed, _blob = core.retract(ticket)
            if consumed and isinstance(exc, Exception):
                return  # taken after all: the send happened
            if not consumed:
                self._release_unsent(tag, payload, blob)
            raise
        finally:
            core.unregister(w.key)

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
        deadline = _effective_deadline(timeout, ctx)
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
        w = current_waiter()
        core.register(w.key, W_SEND, 0, 0)
        try:
            # NOSPACE (a record larger than the free ring bytes): wait for a
            # receive even though the message count is below capacity
            if not nospace and core.length() < self._cap:
                return
            _park(w, (core,), deadline, timeout, ctx, W_SEND)
        finally:
            core.unregister(w.key)

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
        core = self._core
        recv = core.recv
        st, data, tag, blob, wakes = recv(0, 0, 0)
        if st == EMPTY and _spin_allowed():
            end = perf_counter() + _SPIN_S
            while st == EMPTY and perf_counter() < end:
                _yield()
                st, data, tag, blob, wakes = recv(0, 0, 0)
            _spin_result(st != EMPTY)
        if st == EMPTY:
            w = current_waiter()
            deadline = _effective_deadline(timeout, ctx)
            while True:
                st, data, tag, blob, wakes = recv(0, 0, w.key)
                if st != EMPTY:
                    break
                try:
                    _park(w, (core,), deadline, timeout, ctx, W_RECV)
                except BaseException:
                    core.unregister(w.key)
                    self._pass_on(W_RECV)
                    raise
                core.unregister(w.key)
        if st == OK:
            if wakes:
                self._wake(wakes)
            return self._decode(data, tag, blob)
        raise EndOfChannel("channel closed and drained")

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
        values = self._recv_many_nowait(max_items)
        if values:
            return values
        first = self._recv_slow(timeout, ctx)
        if max_items == 1:
            return [first]
        _, items, wakes = self._core.recv_many(max_items - 1)
        if wakes:
            self._wake(wakes)
        return [first, *self._decode_all(items)]

    def _recv_many_nowait(self, max_items: int) -> list[Any]:
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

    def _wait_readable(self, timeout: float, every: bool = False) -> None:
        """Park (without spinning) until a value is buffered, the channel is
        closed, or ``timeout`` seconds pass (or the thread's waiter is woken
        by anyone). Takes nothing.

        For a thread that shares its receiving with others of its process:
        it never gives the GIL up except to sleep (a spin's sched_yield
        would, and a busy thread would then keep it a switch interval).
        ``every``: woken by every send, as a select is, even while another
        receiver is parked (a send wakes only one plain receiver).
        Blocks: up to ``timeout``. Process safety: any thread.
        """
        core = self._core
        w = current_waiter()
        wakes = core.register(w.key, W_RECV | (W_SELECT if every else 0), 0, 0)
        try:
            if wakes:
                self._wake(wakes)
            if core.length() == 0 and not core.is_closed():
                w.wait(timeout)
        finally:
            core.unregister(w.key)

    def _decode_all(self, items: list[tuple[bytes, int, int]]) -> list[Any]:
        out: list[Any] = []
        error: BaseException | None = None
        for data, tag, blob in items:
            try:
                out.append(self._decode(data, tag, blob))
            except SerializationError as exc:
                if error is None:
                    error = exc
        if error is not None:
            raise error
        return out

    def __iter__(self) -> Iterator[Any]:
        """Receive until the channel is closed and drained.

        Blocks: as recv.  Process safety: as recv.
        """
        while True:
            try:
                yield self.recv()
            except EndOfChannel:
                return

    # ------------------------------------------------------------ select support

    def _select_core(self) -> Any:
        return self._core


def _copy_out(src: memoryview) -> Any:
    """A private, writable copy of an out-of-band buffer (the one copy on the
    receiving side).  Big ones go into a numpy array when numpy is loaded
    (the value being rebuilt is then almost surely an array): numpy asks for
    transparent huge pages for big allocations, which makes the first touch
    of fresh memory several times cheaper than a bytearray's 4 KiB pages."""
    np = sys.modules.get("numpy")
    if np is not None and src.nbytes >= _NUMPY_COPY_MIN:
        try:
            out = np.empty(src.nbytes, dtype=np.uint8)
            np.copyto(out, np.frombuffer(src, dtype=np.uint8))
            return out
        except Exception:  # an unusual numpy: the plain copy below
            pass
    return bytearray(src)


def _effective_deadline(timeout: float | None, ctx: Context | None) -> float | None:
    deadline = deadline_after(timeout)
    if ctx is not None:
        cd = ctx._monotonic_deadline()
        if cd is not None and (deadline is None or cd < deadline):
            deadline = cd
    return deadline


def _park(
    w: Waiter,
    cores: tuple[Any, ...],
    deadline: float | None,
    timeout: float | None,
    ctx: Context | None,
    kind: int,
) -> None:
    """Wait once (the caller is registered on ``cores``); raise on timeout or
    cancellation.  The caller re-checks the channel after it returns."""
    ctx_cores: tuple[Any, ...] = ()
    if ctx is not None:
        ctx_cores = ctx._wait_cores()
        for c in ctx_cores:
            c.register(w.key, W_RECV, 0, 0)
    try:
        if ctx is not None:
            ctx.check()
        left = remaining(deadline)
        if left is not None and left <= 0:
            _raise_timeout(timeout, ctx)
        w.wait(_SLICE if left is None else min(left, _SLICE))
    finally:
        for c in ctx_cores:
            c.unregister(w.key)
    if ctx is not None:
        ctx.check()
    left = remaining(deadline)
    if left is not None and left <= 0:
        _raise_timeout(timeout, ctx)


def _raise_timeout(timeout: float | None, ctx: Context | None) -> None:
    if ctx is not None:
        ctx.check()  # a passed context deadline raises DeadlineExceeded
    raise TimeoutError(f"timed out after {timeout} s")


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
