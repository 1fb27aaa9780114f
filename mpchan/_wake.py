"""Cross-process parking and wake-ups (layer 1).

Every thread that ever waits owns a :class:`Waiter`: a non-blocking Unix
datagram socket bound to an address derived from a random 63-bit key
(Linux: the abstract namespace, so no file exists and nothing is left
behind; elsewhere a socket file in a private temp directory). To park, a
thread registers its key in the shared waiter table of every channel it
waits on, re-checks, then polls its socket -- the steps that
:class:`mpchan._park.Parking` owns, for every blocking call of the
channel layers.  To wake it, any process sends one byte to that address
with ``MSG_DONTWAIT``::

    thread T (Waiter: key, socket)           any thread of any process
    Parking: register key ---> segment <--- state change reads the table
             poll(socket)  <--- datagram --- wake(keys)  (never blocks)

Why a socket:
    - the waker never blocks: a full socket buffer means a wake-up is
      already pending, and a dead waiter answers ECONNREFUSED at once;
    - one thread can wait on many channels (select) with one descriptor;
    - the descriptor is pollable, so an asyncio loop can wait on it too.

Invariants:
    - a key names one socket for its life; keys are random and odd, so 0
      (no waiter) is never one.
    - a wake-up is only a hint: a woken thread always re-checks the state
      under the channel lock, so spurious or stale wake-ups are harmless.

Ownership:
    - a Waiter belongs to the thread that made it (``current_waiter``:
      one per thread, made on first use), or to one wait at a time
      (``lend_waiter``: an event loop's waits, several per thread, each
      with its own socket; ``take_back`` keeps it for the next wait, so an
      awaited receive does not make and bind a socket); only its owner
      polls or drains it, and it closes its socket.
    - the sending socket is shared by all threads of a process; a forked
      child makes its own.

Lock order: ``_out_lock`` only guards making the sending socket; it is
never held while sending or with any other lock.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import select
import socket
import sys
import tempfile
import threading
from collections.abc import Iterable

from ._core import dgram_drain, dgram_wake

__all__ = ["Waiter", "current_waiter", "lend_waiter", "take_back", "wake"]

_ABSTRACT = sys.platform.startswith("linux")
_sockdir: str | None = None


_addresses: dict[int, bytes] = {}


def _address(key: int) -> bytes:
    addr = _addresses.get(key)
    if addr is None:
        if len(_addresses) > 4096:  # bounded: keys of dead waiters pile up
            _addresses.clear()
        if _ABSTRACT:
            addr = b"\0mpchan-w-%016x" % key
        else:
            addr = os.fsencode(os.path.join(_socket_dir(), f"w-{key:016x}"))
        _addresses[key] = addr
    return addr


def _socket_dir() -> str:
    global _sockdir
    if _sockdir is None:
        base = os.environ.get("MPCHAN_SOCKDIR")
        if not base:
            base = os.path.join(tempfile.gettempdir(), f"mpchan-sock-{os.getuid()}")
            os.environ["MPCHAN_SOCKDIR"] = base
        os.makedirs(base, mode=0o700, exist_ok=True)
        _sockdir = base
    return _sockdir


class Waiter:
    """One thread's parking spot.

    Process safety: owned by one thread; ``wake`` may target it from any
    thread of any process.
    """

    __slots__ = ("_path", "_pid", "_poll", "key", "sock")

    def __init__(self) -> None:
        self.key = secrets.randbits(63) | 1
        self._pid = os.getpid()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        addr = _address(self.key)
        self._path = None if _ABSTRACT else addr
        self.sock.bind(addr)
        self._poll = select.poll()
        self._poll.register(self.sock.fileno(), select.POLLIN)

    def fileno(self) -> int:
        """The pollable descriptor (readable when woken)."""
        return self.sock.fileno()

    def wait(self, timeout: float | None) -> bool:
        """Park until woken or ``timeout`` seconds pass; True when woken.

        Blocks: up to ``timeout`` (None: until woken), using no CPU.
        Cancellation: none here; callers register a context's wake source.
        Process safety: only the owning thread.
        """
        ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
        try:
            ready = self._poll.poll(ms)
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            ready = []
        if ready:
            self.clear()
            return True
        return False

    def clear(self) -> None:
        """Drop pending wake-ups.  Never blocks."""
        dgram_drain(self.sock.fileno())  # in C, keeping the GIL

    def close(self) -> None:
        """Close the socket (and remove its file, where there is one)."""
        self.sock.close()
        if self._path is not None and self._pid == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


_tls = threading.local()
_out: socket.socket | None = None
_out_lock = threading.Lock()


def current_waiter() -> Waiter:
    """This thread's waiter (created on first use).  Never blocks."""
    w: Waiter | None = getattr(_tls, "waiter", None)
    if w is None:
        w = Waiter()
        _tls.waiter = w
    return w


# Waiters lent to one wait each (an event loop's), kept for the next one.
# list.append / list.pop are atomic under the GIL: any thread may lend.
_spare: list[Waiter] = []
_SPARE_MAX = 256  # more idle waiters than this are closed, not kept


def lend_waiter() -> Waiter:
    """A waiter for one wait, with no wake-up pending (a spare one, or a
    new one); give it back with :func:`take_back`.  Never blocks.
    Process safety: any thread; the waiter is the borrower's until given back."""
    try:
        w = _spare.pop()
    except IndexError:
        return Waiter()
    w.clear()  # a late wake-up meant for its last wait: only a hint, dropped
    return w


def take_back(w: Waiter) -> None:
    """End a loan: keep ``w`` for a later wait (or close it when enough are
    kept).  The caller has unregistered its key everywhere.  Never blocks."""
    if len(_spare) < _SPARE_MAX and w._pid == os.getpid():
        _spare.append(w)
    else:
        w.close()


def _sender() -> socket.socket:
    global _out
    s = _out
    if s is None:
        with _out_lock:
            if _out is None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                s.setblocking(False)
                _out = s
            s = _out
    assert s is not None
    return s


def wake(keys: Iterable[int]) -> list[int]:
    """Wake the waiters with these keys; return the keys found dead.

    Blocks: never (a full buffer means a wake-up is pending already).
    Process safety: any thread of any process.
    """
    fd = _sender().fileno()
    dead: list[int] = []
    for key in keys:
        # in C, keeping the GIL: socket.sendto would release it
        err = dgram_wake(fd, _address(key))
        if err in _DEAD:
            dead.append(key)
        # EAGAIN: a wake-up is pending already; other errors: nothing to do
    return dead


_DEAD = frozenset({errno.ECONNREFUSED, errno.ENOENT})


def _after_fork_in_child() -> None:
    # the parent's sockets belong to the parent's threads
    global _out, _tls, _spare
    _out = None
    _tls = threading.local()
    _spare = []


# At import: _tls, whose waiters a forked child must not reuse, exists from then on.
from ._lifecycle import on_fork_child  # noqa: E402  (beside its only use)

on_fork_child("wake", _after_fork_in_child)
