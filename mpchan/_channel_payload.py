"""A channel's payloads: records in the ring, big ones in payload files (layer 4).

Where a value travels, by size and kind::

    value --encode (caller)--> pickle 5 bytes + out-of-band buffers
      small, no buffers  ------------------------> ring record (inline)
      bigger, or buffers -> payload slot file  --> ring record = descriptor
                            (reused per slot)       (slot, gen, lengths)
      no free slot fits  -> one-off file      --> ring record = descriptor
                            (unlinked by the        (one-off id, lengths)
                             receiver)

``PayloadCodec`` is the part of :class:`mpchan.Channel` that turns values
into records and back (a base class: its methods are the channel's own, so
the send and receive paths pay no extra lookup).  It never waits for the
channel; it may wait up to ``_SLOT_WAIT_S`` for a payload slot that a
receiver is copying out of, far cheaper than making a new one.

Invariants:
    - a record tagged ``TAG_BLOB`` carries a ``_DESC`` descriptor (plus one
      length per out-of-band buffer) and nothing else.
    - a slot named in a live record is BUSY with owner 0 in the segment;
      exactly one of the receiver (after copying out) or the sender (when
      the send did not happen: ``_release_unsent``) releases it.
    - the one-off file of a record is unlinked by whoever ends the record:
      its receiver, or its sender when the send did not happen.

Ownership:
    - the sender creates (or grows) a slot's file and writes it; the
      receiver maps it read-side and copies out; the slot table itself is
      the segment's (``blob_acquire`` / ``blob_release`` under its lock).
    - ``Segment.blob_maps`` (this process's mappings of slot files) is
      written only here.

Lock order: no lock is held here; each core call takes the segment mutex
alone.
"""

from __future__ import annotations

import contextlib
import pickle
import secrets
import struct
import sys
from time import perf_counter
from time import sleep as _sleep
from typing import Any

from . import _core, _shm
from ._codec import TAG_BYTEARRAY, TAG_BYTES, TAG_PICKLE, decode, encode
from ._errors import SerializationError

__all__ = ["TAG_BLOB", "PayloadCodec", "inline_limit", "ring_size_for"]

NOBLOB = _core.NOBLOB
REC = _core.REC_SIZE

_SIMPLE = frozenset({int, float, str, bool, type(None)})  # never out-of-band buffers
_dumps = pickle.dumps

TAG_BLOB = 0x100  # record payload is a descriptor of an out-of-band payload file
_DESC = struct.Struct("<iQ16sQH")  # slot, gen, one-off id, pickle/raw length, n buffers
_LEN = struct.Struct("<Q")

_MIN_RING = 64 * 1024
_MAX_RING = 64 * 1024 * 1024
_PER_MSG = 512  # ring bytes per message of capacity (see inline_limit)
_BLOB_MIN = 1 << 20
_SLOT_STEP = 64 * 1024
_SLOT_WAIT_S = 0.05  # longest wait for a payload slot being copied out
_SLOT_POLL_S = 50e-6
_NUMPY_COPY_MIN = 1 << 20


def ring_size_for(capacity: int) -> int:
    size = max(_MIN_RING, min(_MAX_RING, capacity * _PER_MSG))
    return (size + 7) & ~7


def inline_limit(ring: int) -> int:
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


class PayloadCodec:
    """Encoding and decoding of one channel's records (a base of Channel).

    Process safety: as the channel -- any thread of any process.
    """

    __slots__ = ()

    # provided by the channel (its slots)
    _core: Any
    _seg: _shm.Segment
    _name: str
    _inline: int

    def _encode(self, value: Any) -> tuple[int, Any, int]:
        """Return (tag, record payload, blob slot).  Copies big payloads into
        a payload file now, before any channel state changes.

        Blocks: at most ``_SLOT_WAIT_S`` (a big payload, while a receiver is
        copying out of the slot that fits it), never for the channel.
        Cancellation: none needed (bounded); a pickling error raises before
        anything changed.  Process safety: any thread.
        """
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
        """Move a record's payload (and buffers) into a payload file; return
        its (tag, descriptor, blob slot).

        Blocks: as ``_encode`` -- at most ``_SLOT_WAIT_S``.
        Cancellation: none needed (bounded); on an error the slot is given back.
        Process safety: any thread.
        """
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
        """Give back what an encoded value that was not sent holds (its slot,
        or its one-off file).  Never blocks."""
        if not tag & TAG_BLOB:
            return
        if blob != NOBLOB:
            self._core.blob_release(blob, False)
        else:
            eph = _DESC.unpack_from(payload)[2].decode()
            _shm.unlink_quietly(f"{self._name}-e{eph}")

    def _decode(self, data: bytes, tag: int, blob: int) -> Any:
        """A received record -> its value (copying out of, then releasing, its
        payload file).  Never blocks.  Raises UnpicklingError (consumed)."""
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

    # -- select protocol (internal: mpchan._select; see Channel.sel_core) ----
    # The same function objects under names another module may call.
    sel_encode = _encode  # a send case's value -> (tag, payload, blob)
    sel_to_blob = _to_blob  # NOSPACE: move a record out of band
    sel_decode = _decode  # a received record -> value
    sel_release = _release_unsent  # a send case that did not fire


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
