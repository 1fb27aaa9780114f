"""The worker process: bootstrap, death watch, task loop and wire format (layer 6).

This module is the *child side* of the supervisor. :func:`worker_main` is the
function every mpchan worker process runs, whatever the start method; the
encode/decode helpers below are the one place that knows the bytes that travel
over a worker's task connection, so the parent side (``_supervisor``, ``_go``)
imports them from here instead of repeating the format.

Wire format (one ``Connection.send_bytes`` message each)::

    parent -> worker   b"T" + pickle((fn, args, kwargs))          run a task
                       b"Q"                                        exit now
    worker -> parent   b"R" + pickle(value)                        fn returned
                       b"E" + pickle(_Failure)                     fn raised
                       b"S" + pickle(_Failure)                     (un)pickling failed

    (pickled by ``_codec.pickle_value``: by reference where the worker can
    import a function or class, by value with cloudpickle where not)

A worker answers every ``T`` with exactly one reply, in order, and never
writes anything else. A process may also be given a *boot* value when it
starts (``worker_main``'s ``boot``: process arguments, so it may hold what
multiprocessing passes only to a starting process, such as an ``mp.Queue``);
its tasks take it with :func:`take_boot`. Pickling of the task happens in the caller of ``go``;
unpickling of the reply happens in whoever asks for the result.

Signals: a worker ignores SIGINT (one Ctrl-C in a terminal reaches the whole
process group, and the supervisor alone decides what it means) and has the
default SIGTERM (the supervisor stops busy workers with it).

Death watch: the worker holds the read end of a pipe whose only write end is
held by the supervisor. A daemon thread blocks reading it; end of file means
the supervisor is gone, whatever killed it (SIGKILL included), and the worker
leaves at once with :data:`ORPHANED_EXITCODE`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

# Imports: a worker process imports this module and little else (not
# cloudpickle, not the error hierarchy, not channel code), so that starting
# one -- with spawn, a whole new interpreter -- stays cheap. What only the
# parent side or a failure needs is imported where it is used.

__all__ = [
    "ORPHANED_EXITCODE",
    "QUIT",
    "RETRIED",
    "Alarm",
    "call_again",
    "decode_reply",
    "describe_callable",
    "encode_failure",
    "encode_task",
    "leave",
    "release_shared_memory",
    "run_call",
    "runs_again",
    "take_boot",
    "worker_main",
]

# Message tags (first byte of every message).
TASK = b"T"
QUIT = b"Q"
RESULT = b"R"
RAISED = b"E"
BROKEN = b"S"

# Exit status of a worker whose death watch saw its supervisor go away.
ORPHANED_EXITCODE = 75

DEATHWATCH_THREAD_NAME = "mpchan-infra-deathwatch"


class _Failure(NamedTuple):
    """An exception on its way from a worker to the parent.

    ``exc`` is the cloudpickled exception, or None when it could not be
    pickled; the other fields always travel, so the parent can build a
    :class:`RemoteError` when ``exc`` is missing or does not unpickle.
    """

    exc: bytes | None
    type_name: str
    message: str
    traceback: str
    stage: str  # "" for an exception raised by fn; else what failed
    retry: bool = True  # a failure a retry runs again (``RETRIED``)


# ---------------------------------------------------------------------------
# Parent side: encoding tasks, decoding replies
# ---------------------------------------------------------------------------


def describe_callable(fn: Any) -> str:
    """Return ``module.qualname`` of ``fn`` (or its repr) for messages. Never blocks."""
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(qualname, str):
        return _safe_repr(fn)
    module = getattr(fn, "__module__", None)
    return f"{module}.{qualname}" if isinstance(module, str) else qualname


def encode_task(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle a task for a worker; raise :class:`PicklingError` if it cannot be.

    Runs in the caller, so nothing was sent and no worker was touched when it
    fails. Never blocks (beyond the pickling itself).
    """
    from ._codec import cannot_pickle, pickle_value

    try:
        return TASK + pickle_value((fn, args, kwargs))
    except BaseException as e:
        raise cannot_pickle(f"the task {describe_callable(fn)}", e) from e


def decode_reply(reply: bytes, *, where: str) -> Any:
    """Return the value carried by a worker's ``reply``, or raise what it carries.

    ``where`` describes the worker and function ("worker 3 (pid 123) running
    mod.fn") and ends up in the note added to a remote exception.

    An exception raised by the task is re-raised as its original type, with
    the remote traceback text as ``__cause__`` and a note naming ``where``; one
    that could not be pickled (or unpickled here) becomes
    :class:`RemoteError`. Failure to unpickle the task in the worker, to pickle
    the result there, or to unpickle it here raises
    :class:`SerializationError` with the original error as ``__cause__``.
    Never blocks (beyond the unpickling itself).
    """
    from ._codec import cannot_unpickle
    from ._errors import PicklingError, RemoteError, UnpicklingError

    view = memoryview(reply)
    tag = bytes(view[:1])
    if tag == RESULT:
        try:
            return pickle.loads(view[1:])
        except BaseException as e:
            raise cannot_unpickle(f"the result of {where}", e) from e
    if tag not in (RAISED, BROKEN):
        raise RemoteError("ProtocolError", f"unexpected reply tag {tag!r} from {where}")
    failure = _Failure(*pickle.loads(view[1:]))
    exc = _rebuild(failure, where)
    if tag == RAISED:
        raise exc
    cls = PicklingError if failure.stage.startswith("pickling") else UnpicklingError
    raise cls(f"{failure.stage} failed in {where}: {failure.type_name}: {failure.message}") from exc


def _rebuild(failure: _Failure, where: str) -> BaseException:
    from ._errors import rebuild_remote

    return rebuild_remote(
        failure.exc,
        failure.type_name,
        failure.message,
        failure.traceback,
        f"raised in mpchan {where}",
    )


# ---------------------------------------------------------------------------
# Child side
# ---------------------------------------------------------------------------


_boot: Any = None


def take_boot() -> Any:
    """Return (and forget) the boot value this process was started with. Never blocks."""
    global _boot
    value, _boot = _boot, None
    return value


def worker_main(
    conn: Connection,
    deathwatch: Connection,
    worker_id: int,
    close_fds: Iterable[int] = (),
    boot: Any = None,
) -> None:
    """Run the worker loop until told to quit; never returns.

    ``conn`` is this worker's end of the task connection; ``deathwatch`` the
    read end of the death-watch pipe. ``close_fds`` lists descriptors
    inherited by a forked child that belong to the supervisor (write ends of
    death-watch pipes, parent ends of task connections): they are closed
    first, or this worker would keep its own and its siblings' death watches
    from ever seeing end of file. ``boot`` is kept for :func:`take_boot`.

    Blocks: for the whole life of the worker. The process ends with
    ``os._exit`` (status 0 after ``QUIT`` or when the task connection closes),
    so no inherited atexit handler or multiprocessing finalizer runs here.
    Cancellation: none in-process; the supervisor sends ``QUIT``, SIGTERM or
    SIGKILL, or dies (the death watch then ends the worker).
    Process safety: called once, by the bootstrap of a fresh worker process.
    """
    global _boot
    _boot = boot
    del boot
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    watcher = threading.Thread(
        target=_watch_supervisor, args=(deathwatch,), name=DEATHWATCH_THREAD_NAME, daemon=True
    )
    watcher.start()
    try:
        _serve(conn, worker_id)
    finally:
        leave()


def leave() -> NoReturn:
    """End this worker process now, with status 0. Never returns.

    What a process of ``multiprocessing`` does when its target returns,
    then ``os._exit`` (no inherited atexit hook runs): stop the workers this
    one started itself, run multiprocessing's finalizers (an ``mp.Queue``
    a task put into is flushed to its pipe), flush stdout and stderr, and
    stop holding the shared memory it maps.
    """
    with contextlib.suppress(BaseException):
        sup = sys.modules.get(__name__.rpartition(".")[0] + "._supervisor")
        if sup is not None:
            sup.shutdown_all()
    with contextlib.suppress(BaseException):
        util = sys.modules.get("multiprocessing.util")
        if util is not None:
            util._run_finalizers()
    _flush_std_streams()
    with contextlib.suppress(BaseException):
        release_shared_memory()
    os._exit(0)


def _watch_supervisor(deathwatch: Connection) -> None:
    # The supervisor never writes to this pipe; the only way recv_bytes
    # returns is end of file (every write end closed: the supervisor exited
    # or closed it) or an error. Either way this worker has no one to
    # answer to any more.
    try:
        while True:
            deathwatch.recv_bytes()
    except BaseException:
        pass
    try:
        release_shared_memory()
    finally:
        os._exit(ORPHANED_EXITCODE)


def release_shared_memory() -> None:
    """Stop holding every segment this process maps (before it ends). Never blocks."""
    # Uncount this process as a holder of every segment it maps before it
    # goes, unlinking those it held last. The reaper would otherwise have to
    # wait for this pid to disappear, and an orphan that nobody reaps stays
    # a zombie -- alive to kill(pid, 0) -- for as long as the system's init
    # pleases. The mappings stay: the main thread may still be using them
    # until os._exit. Channel code is never imported just for this.
    shm = sys.modules.get(__name__.rpartition(".")[0] + "._shm")
    if shm is None:
        return
    me = os.getpid()
    for seg in shm.registry_snapshot():
        with contextlib.suppress(Exception):
            if seg.core.detach(me) == 0:
                shm.unlink_with_payloads(seg.name)


def _serve(conn: Connection, worker_id: int) -> None:
    del worker_id  # kept in the signature for tracing; the parent names the worker
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if msg[:1] != TASK:
            return  # QUIT, or anything unexpected: leave rather than guess
        reply = run_call(memoryview(msg)[1:])
        del msg
        try:
            conn.send_bytes(reply)
        except OSError:
            return
        del reply


def run_call(payload: memoryview, fn: Any = None) -> bytes:
    """Run the call pickled in ``payload`` (``(fn, args, kwargs)``) and encode
    its outcome as a reply: ``RESULT`` + the value, ``RAISED`` + what the
    call raised, ``BROKEN`` + what failed around it (unpickling the call,
    pickling the value). ``fn``, when given, is the function to call (the
    payload's is None: a pool worker's function sent by value once).

    The one task runner of a worker: ``go`` tasks (:func:`worker_main`) and
    pool calls (``_pool.worker``). Blocks: for the call. Cancellation: none
    here (the caller's process is killed to stop it). Process safety: the
    worker's serving thread.
    """
    try:
        f, args, kwargs = pickle.loads(payload)
    except BaseException as e:
        return BROKEN + encode_failure(e, "unpickling the task")
    if fn is not None:
        f = fn
    try:
        value = f(*args, **kwargs)
    except BaseException as e:
        # SystemExit and KeyboardInterrupt included: sys.exit() in a task is
        # an exception like any other and must not end the worker.
        del f, args, kwargs
        return RAISED + encode_failure(e, "", skip_frames=1)
    del f, args, kwargs
    try:
        data = _dumps(value)
    except BaseException as e:
        return BROKEN + encode_failure(e, "pickling the result")
    return RESULT + data


# What a retry runs again: an exception the call raised, sys.exit() in it
# included; not a KeyboardInterrupt or GeneratorExit (a stop, not a failure).
RETRIED = (Exception, SystemExit)


class Alarm:
    """Raise ``TaskTimeout`` in this (main) thread after ``seconds`` (SIGALRM).

    Owns SIGALRM and the real-time interval timer while entered, and gives
    both back on exit. Blocks: never. Process safety: the main thread only.
    """

    __slots__ = ("old", "seconds")

    def __init__(self, seconds: float) -> None:
        """An alarm of ``seconds``, not yet set; never blocks."""
        self.seconds = seconds
        self.old: Any = None

    def __enter__(self) -> None:
        """Set the alarm. Never blocks."""
        seconds = self.seconds

        def fire(_signum: int, _frame: Any) -> None:
            from ._errors import TaskTimeout

            raise TaskTimeout(f"task ran past its time limit of {seconds} s")

        self.old = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, seconds)

    def __exit__(self, *exc: object) -> None:
        """Clear the alarm and restore the old handler. Never blocks."""
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old)


def call_again(
    fn: Callable[..., Any],
    item: Any,
    retries: int,
    *,
    star: bool = False,
    spent: int = 0,
    timeout: float | None = None,
    on_retry: Callable[[int, int], None] | None = None,
    key: int = 0,
) -> Any:
    """``fn(item)`` (``fn(*item)`` with ``star``), called again after a
    failure (``RETRIED``) while ``retries`` allow: the one per-item retry
    runner of a pool's map items and a stream stage's items (see
    ``_policy``). ``spent`` failed calls were made before (an item taken
    over from a worker that died); ``on_retry(key, failed_calls)`` is told
    of each failure that is run again. With ``timeout`` each call runs under
    an :class:`Alarm` (a stage: ``TaskTimeout`` counts as a failure). The
    last failure propagates.

    Blocks: for the calls. Cancellation: none here (the worker is killed to
    stop it). Process safety: the worker's main thread when ``timeout`` is
    set (SIGALRM), any thread otherwise.
    """
    attempt = spent
    while True:
        try:
            if timeout is None:
                return fn(*item) if star else fn(item)
            with Alarm(timeout):
                return fn(*item) if star else fn(item)
        except RETRIED:
            if attempt >= retries:
                raise
            attempt += 1
            if on_retry is not None:
                on_retry(key, attempt)


def _dumps(obj: Any) -> bytes:
    from ._codec import pickle_value

    return pickle_value(obj)


def encode_failure(exc: BaseException, stage: str, skip_frames: int = 0) -> bytes:
    """The body of a ``RAISED`` or ``BROKEN`` reply carrying ``exc``.

    ``stage`` is "" for an exception the task raised, else what failed
    ("pickling the result"...); ``skip_frames`` drops the caller's own
    frames from the front of the traceback. An exception that cannot be
    pickled still travels as its type name, message and traceback text.
    Never blocks (beyond the pickling).
    """
    tb = exc.__traceback__
    for _ in range(skip_frames):  # drop this module's own frames
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    import traceback

    try:
        tb_text = "".join(traceback.format_exception(type(exc), exc, tb))
    except Exception:
        tb_text = f"{type(exc).__name__} (traceback unavailable)\n"
    try:
        exc_bytes: bytes | None = _dumps(exc)
    except BaseException:
        exc_bytes = None
    cls = type(exc)
    failure = _Failure(
        exc=exc_bytes,
        type_name=f"{cls.__module__}.{cls.__qualname__}",
        message=_safe_str(exc),
        traceback=tb_text,
        stage=stage,
        retry=not stage and isinstance(exc, RETRIED),
    )
    return pickle.dumps(tuple(failure), protocol=pickle.HIGHEST_PROTOCOL)


def runs_again(body: bytes | memoryview) -> bool:
    """Whether the failure in a ``RAISED`` reply's ``body`` is one a retry
    runs again (``RETRIED``: not a KeyboardInterrupt). Never blocks."""
    try:
        return _Failure(*pickle.loads(body)).retry
    except Exception:
        return False


def _safe_str(obj: object) -> str:
    try:
        return str(obj)
    except Exception:
        return f"<unprintable {type(obj).__name__}>"


def _safe_repr(obj: object) -> str:
    try:
        return repr(obj)
    except Exception:
        return f"<unprintable {type(obj).__name__}>"


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass
