"""Shared-memory segments and their life (layer 1).

Layout on disk (Linux: ``/dev/shm``; elsewhere the temp directory)::

    mpchan-<session>-c<id>            a channel segment (header + ring)
    mpchan-<session>-c<id>-b<slot>-<gen>   a reusable out-of-band payload slot
    mpchan-<session>-c<id>-e<rand>    a one-off out-of-band payload
    mpchan-<session>-x<id>            a context node (a segment like a channel's)
    mpchan-<session>-w<id>            a WaitGroup counter (likewise)
    mpchan-<session>-a<id>            a read-only array of a joblib call (raw
                                      bytes, no header: ``_joblib``)

The letter before ``<id>`` is the segment's kind (``segment_kind``), so a
snapshot of the program (``mpchan.stats()``) can tell channels from the
contexts and wait groups built on the same segment layout.
``<session>`` is a random token shared by every process of one program (the
root process creates it and passes it on in ``MPCHAN_SESSION``); ``<id>`` and
``<rand>`` are random too, so names are unguessable. Files are created with
mode 0600 and ``O_EXCL``.

Invariants:
    - a channel segment records, inside itself, the pids of the processes
      that hold a handle (``holders``) and the number of handles pickled but
      not yet unpickled (``transit``); it is unlinked only when both are zero.
    - payload files of a channel share its name as prefix, so unlinking a
      channel removes them with one directory scan.
    - nothing here registers with ``multiprocessing.resource_tracker``.
    - an array file (``ARRAY``) is written once, by the process that
      created it, before its name is sent anywhere; others map it read-only.

Ownership:
    - every process maps what it uses and detaches when its last local
      handle goes (or at exit: ``_lifecycle``'s "shm" hook, the last one,
      registered when the process first joins a session or maps a
      segment); the process whose detach leaves no live holder unlinks the
      channel and its payload files, and the root unlinks at its exit
      whatever of its session is left.
    - the reaper (``_reaper.py``, one per program, started by the root on
      first use) unlinks what is left once the holders are dead, and
      everything of the session once the root is gone -- also when the root
      was killed with SIGKILL.
    - an array file has no holder record: the process that created it
      unlinks it (``_joblib``: when the joblib call that shared it ends, or
      at exit); the root's exit and the reaper's pass after the root is
      gone remove what is left (the reaper skips it while the root lives:
      it is not a channel).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import socket
import subprocess
import sys
import threading
import weakref
from typing import Any

from . import _core, _lifecycle
from ._compat import IS_LINUX, SHM_DIR

__all__ = [
    "ARRAY",
    "CHANNEL",
    "CONTEXT",
    "WAITGROUP",
    "Segment",
    "create_segment",
    "mapped_segments",
    "open_segment",
    "registry_snapshot",
    "segment_kind",
    "session_token",
    "shm_path",
]

PREFIX = "mpchan-"
# Segment kinds: the letter that starts a segment's own part of its name.
CHANNEL = "c"
CONTEXT = "x"
WAITGROUP = "w"
ARRAY = "a"
_ENV = "MPCHAN_SESSION"

_lock = threading.Lock()
_session: str | None = None
_reaper: subprocess.Popen[bytes] | None = None
_is_root = False
_reaper_checked = False
_hooked = False
_pid = os.getpid()


def shm_path(name: str) -> str:
    """Absolute path of the segment file called ``name``."""
    return os.path.join(SHM_DIR, name)


def session_token() -> str:
    """The program's session token, creating it (and the reaper) on first use.

    Blocks: never (the reaper starts in the background).
    Process safety: any thread of any process.
    """
    global _session, _is_root
    if _session is not None:
        return _session
    with _lock:
        if _session is None:
            env = os.environ.get(_ENV, "")
            token, _, root = env.partition(":")
            if token and root.isdigit() and _pid_alive(int(root)):
                _session = token
            else:
                _session = secrets.token_hex(6)
                _is_root = True
                os.environ[_ENV] = f"{_session}:{os.getpid()}"
    _hook_lifecycle()
    return _session


def _hook_lifecycle() -> None:
    # On first use -- this process joins a session or maps a segment: from
    # then on there is something to release at exit (last of all, when the
    # pools and the supervisor stopped using it: _lifecycle's order) and to
    # take over in a forked child.
    global _hooked
    if _hooked:
        return
    _lifecycle.on_exit("shm", _at_exit)
    _lifecycle.on_fork_child("shm", _after_fork_in_child)
    _hooked = True


def _ensure_reaper(token: str) -> None:
    """Make sure the program's reaper runs before its first segment exists.

    The first process of the session to create a segment (the root or any
    worker) starts it, once per session: on Linux the claim is an abstract
    socket name that the reaper then holds (the kernel frees the name when
    the reaper ends, so nothing is ever left behind); elsewhere an
    ``O_EXCL`` marker file that the reaper removes when it ends.  A program
    that never makes a segment never pays for a reaper.
    """
    global _reaper_checked
    if _reaper_checked:
        return
    with _lock:
        if _reaper_checked:
            return
        _reaper_checked = True
        root = os.environ.get(_ENV, "").partition(":")[2]
        claim = _claim_reaper(token)
        if claim is None:
            return  # another process of the program started it
        try:
            _start_reaper(token, int(root) if root.isdigit() else os.getpid(), claim)
        finally:
            if claim >= 0:
                os.close(claim)


def _claim_reaper(token: str) -> int | None:
    """An fd the reaper inherits as proof of its claim (-1: none needed), or
    None when the session's reaper was already started."""
    if IS_LINUX:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(b"\0mpchan-reaper-" + token.encode())
        except OSError:
            sock.close()
            return None
        return sock.detach()
    try:
        fd = os.open(reaper_marker(token), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return None
    os.close(fd)
    return -1


def reaper_marker(token: str) -> str:
    """Path of the file that says the session's reaper was started (not Linux)."""
    return os.path.join(SHM_DIR, f".{PREFIX}{token}-reaper")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_reaper(token: str, root: int, claim: int) -> None:
    global _reaper
    cmd = [sys.executable, "-m", "mpchan._reaper", token, str(root)]
    env = dict(os.environ)
    # the reaper must find this very package, also from a checkout
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
    _reaper = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
        start_new_session=True,  # a Ctrl-C to the terminal does not reach it
        env=env,
        pass_fds=(claim,) if claim >= 0 else (),  # it holds the claim for its life
    )


def reaper_pid() -> int | None:
    """Pid of this program's reaper, if this process started it."""
    return _reaper.pid if _reaper is not None else None


def new_name(kind: str) -> str:
    """A fresh, unguessable segment name of this session."""
    token = session_token()
    _ensure_reaper(token)
    return f"{PREFIX}{token}-{kind}{secrets.token_hex(8)}"


def create_file(name: str, size: int) -> int:
    """Create segment file ``name`` (mode 0600, must not exist) of ``size`` bytes.

    Returns an open fd; the caller closes it.
    """
    fd = os.open(shm_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        unlink_quietly(name)
        raise
    return fd


def unlink_quietly(name: str) -> None:
    """Unlink a segment file; a missing file is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shm_path(name))


def unlink_with_payloads(name: str) -> None:
    """Unlink channel segment ``name`` and every payload file of it."""
    unlink_quietly(name)
    prefix = name + "-"
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(SHM_DIR):
            if entry.startswith(prefix):
                unlink_quietly(entry)


def map_file(
    name: str, size: int | None = None, *, create: bool = False, readonly: bool = False
) -> mmap.mmap:
    """Map a (payload or array) segment file, pre-faulting its pages.

    ``readonly``: open and map it read-only (an array file, see ``ARRAY``).
    """
    if create:
        assert size is not None and not readonly
        fd = create_file(name, size)
    else:
        fd = os.open(shm_path(name), os.O_RDONLY if readonly else os.O_RDWR)
    try:
        if size is None:
            size = os.fstat(fd).st_size
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
        return mmap.mmap(fd, size, flags=flags, prot=prot)
    finally:
        os.close(fd)


class Segment:
    """This process's mapping of one channel segment (shared by its handles).

    Process safety: one per (process, segment); any thread may use it.
    """

    __slots__ = ("__weakref__", "_fin", "blob_maps", "core", "name", "pid")

    name: str
    core: Any
    pid: int
    blob_maps: dict[str, mmap.mmap]
    _fin: weakref.finalize[Any, Any]

    def release(self) -> None:
        """Detach now (idempotent)."""
        self._fin()


_registry: weakref.WeakValueDictionary[str, Segment] = weakref.WeakValueDictionary()


def _detach(name: str, core: Any, blob_maps: dict[str, mmap.mmap]) -> None:
    for mm in blob_maps.values():
        with contextlib.suppress(BufferError, ValueError):
            mm.close()
    blob_maps.clear()
    try:
        live = core.detach(os.getpid())
    except ValueError:  # already unmapped
        return
    if live == 0:
        unlink_with_payloads(name)
    core.unmap()


def core_stats(core: Any) -> dict[str, Any]:
    """``Channel.stats()`` of a mapped segment's core (any channel segment)."""
    count, cap, sent, received, bs, br, closed, _rec = core.stats()
    return {
        "len": 0 if cap == 0 else int(count),
        "capacity": int(cap),
        "sent": int(sent),
        "received": int(received),
        "blocked_senders": int(bs),
        "blocked_receivers": int(br),
        "closed": bool(closed),
    }


def create_segment(
    capacity: int, ring_size: int, hard_span: int = 0, *, kind: str = CHANNEL
) -> Segment:
    """Create, initialise and map a new channel segment.

    ``hard_span`` (0: the ring shared by the capacity) bounds the ring bytes
    kept free for each message the capacity allows (see ``_core``).
    ``kind`` (``CHANNEL``, ``CONTEXT`` or ``WAITGROUP``) goes into the name.

    Blocks: never.  Process safety: any thread of any process.
    """
    name = new_name(kind)
    size = _core.HDR_SIZE + ring_size
    fd = create_file(name, size)
    try:
        core = _core.Chan(fd, size, True, capacity, ring_size, hard_span)
    except BaseException:
        unlink_quietly(name)
        raise
    finally:
        os.close(fd)
    seg = _make_segment(name, core)
    return seg


def _make_segment(name: str, core: Any) -> Segment:
    if not _hooked:
        _hook_lifecycle()
    seg = Segment.__new__(Segment)
    seg.name = name
    seg.core = core
    seg.pid = os.getpid()
    seg.blob_maps = {}
    seg._fin = weakref.finalize(seg, _detach, name, core, seg.blob_maps)
    # At exit, _at_exit releases every live segment, after the pools and the
    # supervisor stopped using them (_lifecycle's order); a finalizer run at
    # exit would come first (weakref registers its hook late) and pull a
    # channel from under a thread still waiting on it.
    seg._fin.atexit = False
    with _lock:
        _registry[name] = seg
    return seg


def open_segment(name: str) -> Segment:
    """Map an existing channel segment by name (one mapping per process).

    Blocks: never.  Process safety: any thread of any process.
    Raises FileNotFoundError when the channel no longer exists.
    """
    with _lock:
        seg = _registry.get(name)
    if seg is not None and seg.pid == os.getpid():
        return seg
    fd = os.open(shm_path(name), os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        core = _core.Chan(fd, size)
    finally:
        os.close(fd)
    core.attach(os.getpid())
    return _make_segment(name, core)


def segment_kind(name: str) -> str:
    """The kind letter of segment ``name`` (``CHANNEL``, ``CONTEXT``, ...). Never blocks."""
    rest = name[len(PREFIX) :].partition("-")[2]
    return rest[:1]


def mapped_segments() -> list[Segment]:
    """A snapshot of every segment this process maps now.

    Never blocks (beyond a short lock).  Process safety: any thread.
    """
    me = os.getpid()
    with _lock:
        segs = list(_registry.values())
    return [s for s in segs if s.pid == me]


def registry_snapshot() -> list[Segment]:
    """Every segment this process keeps a record of, taking no lock.

    For a process on its way out, which must not wait for a lock that a
    thread of its parent may have held at the fork. Never blocks.
    Process safety: any thread (a concurrent change may make it raise
    RuntimeError, which such a caller ignores).
    """
    return list(_registry.values())


def _after_fork_in_child() -> None:
    """A forked child holds the parent's mappings: count it as a holder."""
    global _reaper, _is_root
    _reaper = None
    _is_root = False
    me = os.getpid()
    for seg in list(_registry.values()):
        seg.pid = me
        with contextlib.suppress(Exception):
            seg.core.attach(me)


def _at_exit() -> None:
    for seg in list(_registry.values()):
        seg.release()
    if _is_root and _session is not None:
        # the program ends: nothing of the session may outlive it
        prefix = f"{PREFIX}{_session}-"
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(SHM_DIR):
                if entry.startswith(prefix):
                    unlink_quietly(entry)
    if _reaper is not None and _reaper.poll() is None:
        # Not waited for: it finishes by itself (it sees this process end),
        # and a program's exit must not wait on its clean-up pass.
        with contextlib.suppress(Exception):
            _reaper.terminate()
