r"""The supervisor: owner of every worker process of this program (layer 6).

One :class:`Supervisor` per program (``get_supervisor()`` makes it lazily)
starts worker processes, keeps idle ones in a bounded warm cache, hands them
out (``acquire``), takes them back (``release``), notices when one dies, and
stops them all (``shutdown``, also at interpreter exit). This module decides
*when* a process starts or stops; how one is started, stopped, reaped and
described when it dies is ``_supervisor_process`` (which never imports this).

Data flow::

    caller thread (go, Pool)                      supervisor thread
    ------------------------                      ("mpchan-infra-supervisor")
    acquire() --- idle cache (LIFO) --+
        |   \__ empty: start_process  |            wait([wake_r,
        v                             |                  conn of every worker,
    run(worker, request) ----------> worker.conn       sentinel of every worker],
        |      send_bytes(b"T"...)       |               timeout=next idle expiry)
        v                                v                 |
    Future <----- set_result(reply) ---- recv_bytes <------+ reply ready
                  set_exception(WorkerCrashed) <-----------+ sentinel ready (died)
                  release: worker -> idle cache            + idle expired -> b"Q"

    death watch:  supervisor holds deathwatch (write end) --pipe--> worker
                  thread reading the read end; EOF (supervisor gone,
                  SIGKILL included) -> os._exit in the worker.

Invariants:
    * ``_workers`` holds every started process that has not been reaped
      (joined) yet, in exactly one state: ``held`` (acquired, no task),
      ``busy`` (a task sent, reply not read), ``idle`` (in ``_idle``),
      ``retiring`` (told to quit), ``lost`` (found dead, not yet reaped).
    * ``worker in _idle`` if and only if ``worker.state == "idle"``;
      ``len(_idle) <= max_idle``.
    * ``worker.task is not None`` if and only if ``worker.state == "busy"``;
      every task's Future is completed exactly once, by whoever takes it out
      of ``worker.task`` under ``_lock`` (reply, death, or shutdown).
    * Once ``_closed`` is set it stays set; no worker is added after it.
    * A forked worker closes every parent end it inherited: ``_start_worker``
      lists the other workers' and the wake-up pipe (see
      ``_supervisor_process``), so a death watch sees end of file as soon as
      the supervisor is gone.

Ownership:
    * ``_lock`` guards ``_workers``, ``_idle``, ``_closed`` and every
      ``Worker.state``/``task``/``idle_since``; it is never held while
      waiting on a process, reading a reply or completing a Future.
    * Caller threads write a worker's ``conn`` (``run``: the task; quit);
      only the supervisor thread reads it (or ``shutdown`` once that thread
      has stopped).
    * Only the supervisor thread (or ``shutdown`` after stopping it) reaps
      worker processes (``Worker.reap``, ``stop_processes``), which joins
      them and closes their connections and death-watch ends.
    * The idle timeout is enforced by the supervisor thread alone; workers
      never time out on their own (that would race with ``acquire``).
    * The metrics server (if any) is started by ``__init__`` before any
      other resource and closed by ``shutdown`` (after the workers are
      gone), which joins its threads.
    * At exit, ``shutdown_all`` (``_lifecycle``'s "supervisor" hook, which
      the first Supervisor registers) stops every supervisor not yet shut
      down: after the pools' hook, before shared memory's.

Lock order: ``_shutdown_lock`` before ``_lock``; ``_fork_lock`` before ``_lock``.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing.connection
import os
import threading
import time
import weakref
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from . import _compat, _lifecycle, _metrics, _shm
from ._errors import ShutdownError
from ._supervisor_process import (
    WORKER_STATES,
    Worker,
    check_start_method,
    crashed_error,
    fd_ready,
    forget_parents_forkserver,
    method_for_start,
    start_process,
    stop_processes,
)
from ._worker import QUIT

__all__ = [
    "Supervisor",
    "Worker",
    "crashed_error",
    "current_supervisor",
    "get_supervisor",
    "set_supervisor",
    "shutdown",
    "shutdown_all",
]

THREAD_NAME = "mpchan-infra-supervisor"
DEFAULT_IDLE_TIMEOUT = 10.0
# Grace period between SIGTERM and SIGKILL when shutdown(timeout=None).
DEFAULT_SHUTDOWN_GRACE = 5.0


class Supervisor:
    """Starts, caches, watches and stops worker processes.

    ``start_method`` is ``"spawn"``, ``"forkserver"`` or ``"fork"`` (default
    :func:`mpchan._compat.default_start_method`). ``"fork"`` falls back to
    ``"forkserver"`` for any start made while another thread of the program
    is alive, since forking a threaded process can copy a held lock.
    ``max_idle`` bounds the warm cache (default ``os.cpu_count()``);
    ``idle_timeout`` is how long a cached worker stays idle before it is told
    to exit (default 10 s, or ``MPCHAN_IDLE_TIMEOUT``).

    ``metrics_port`` serves the program's metrics in the Prometheus text
    format at ``http://127.0.0.1:PORT/metrics`` until :meth:`shutdown`
    (0: any free port, see :attr:`metrics_address`); a port outside
    0..65535 raises ValueError, one that cannot be bound OSError. While
    the server runs, ``"fork"`` starts fall back to ``"forkserver"`` like
    any start made while another thread is alive.
    """

    def __init__(
        self,
        start_method: str | None = None,
        *,
        max_idle: int | None = None,
        idle_timeout: float | None = None,
        metrics_port: int | None = None,
    ) -> None:
        method = check_start_method(start_method or _compat.default_start_method())
        if max_idle is None:
            max_idle = os.cpu_count() or 1
        if max_idle < 0:
            raise ValueError(f"max_idle must be >= 0, not {max_idle}")
        if idle_timeout is None:
            idle_timeout = _env_idle_timeout()
        if idle_timeout < 0:
            raise ValueError(f"idle_timeout must be >= 0, not {idle_timeout}")
        # Workers must inherit the program's shared-memory session (and a
        # forkserver its environment), so it exists before any process starts.
        _shm.session_token()
        # First of all resources: when the port cannot be bound, nothing
        # else was made that would need undoing.
        self._metrics_server = (
            None if metrics_port is None else _metrics.MetricsServer(metrics_port)
        )
        self._start_method = method
        self._max_idle = max_idle
        self._idle_timeout = float(idle_timeout)
        self._ids = itertools.count(1)
        # Lock order: _shutdown_lock, then _fork_lock, then _lock.
        self._lock = threading.Lock()
        self._shutdown_lock = threading.Lock()
        self._fork_lock = threading.Lock()
        self._workers: dict[int, Worker] = {}
        self._idle: list[Worker] = []  # a stack: the most recently used is reused first
        self._closed = False
        self._previous: Supervisor | None = None  # the program's, while in a with block
        self._stopping = False  # tells the supervisor thread to leave
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        _live_supervisors.add(self)
        # On first use (again: replaces, harmless): at exit, stop every
        # process after the pools finished and before shared memory goes.
        _lifecycle.on_exit("supervisor", shutdown_all)
        _metrics.register(self, Supervisor._metric_families)

    # -- properties -----------------------------------------------------------

    @property
    def start_method(self) -> str:
        """The configured start method. Never blocks."""
        return self._start_method

    @property
    def max_idle(self) -> int:
        """The bound of the warm cache. Never blocks."""
        return self._max_idle

    @property
    def idle_timeout(self) -> float:
        """Seconds a cached worker may stay idle before it exits. Never blocks."""
        return self._idle_timeout

    @property
    def closed(self) -> bool:
        """True once shutdown began. Never blocks."""
        return self._closed

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """``(host, port)`` the metrics are served on, or None without
        ``metrics_port`` (or after shutdown). Never blocks."""
        server = self._metrics_server
        return None if server is None or server.closed else server.address

    # -- acquiring and releasing ----------------------------------------------

    def acquire(self) -> Worker:
        """Return a worker for the caller's exclusive use: a cached one, or a new one.

        Blocks: only while a new process starts when the cache is empty
        (milliseconds with fork/forkserver, more with spawn); it never waits
        for another worker to become free.
        Cancellation: none; raises :class:`ShutdownError` if shutdown began
        (a process started meanwhile is stopped again).
        Process safety: any thread of the process that created the supervisor.
        """
        with self._lock:
            self._check_open()
            while self._idle:
                worker = self._idle.pop()
                if fd_ready(worker.sentinel):
                    worker.state = "lost"  # died while idle; the thread reaps it
                    continue
                worker.state = "held"
                return worker
        return self._new_worker()

    def start_worker(self, boot: Any = None) -> Worker:
        """Start a new worker process for the caller's exclusive use (never a cached one).

        ``boot`` travels as an argument of the process start (pickled by
        multiprocessing for spawn and forkserver, inherited with fork), so
        it may hold what only a starting process may get (``mp.Queue``,
        ``mp.Lock``...); the worker's tasks take it with
        :func:`mpchan._worker.take_boot`. A ``boot`` that cannot be passed
        raises what the start raised, and no process is left.

        Blocks: while the process starts. Cancellation: none; raises
        :class:`ShutdownError` if shutdown began. Process safety: any thread
        of the process that created the supervisor.
        """
        with self._lock:
            self._check_open()
        return self._new_worker(boot)

    def release(self, worker: Worker) -> None:
        """Give back a worker obtained from :meth:`acquire` and not running a task.

        It goes back to the warm cache, or is told to exit when the cache is
        full or shutdown began. Never blocks.
        Process safety: any thread; each acquired worker is released once.
        """
        with self._lock:
            if worker.state != "held":
                raise ValueError(f"cannot release {worker!r}: it is not held")
            self._release_locked(worker)
        self._wake()  # a new idle deadline for the thread

    def prestart(self, n: int) -> None:
        """Start workers until the cache holds ``min(n, max_idle)`` idle ones.

        Blocks: while the processes start. Cancellation: none; raises
        :class:`ShutdownError` after shutdown. Process safety: any thread.
        """
        for _ in range(n):
            with self._lock:
                self._check_open()
                if len(self._idle) >= min(n, self._max_idle):
                    return
            self.release(self._new_worker())

    def run(
        self, worker: Worker, request: bytes, *, name: str, release: bool = True
    ) -> Future[bytes]:
        """Send an encoded task to a held worker; return a Future of its raw reply.

        The Future gets the reply bytes (decode with
        :func:`mpchan._worker.decode_reply`), :class:`WorkerCrashed` if the
        worker dies first, or :class:`ShutdownError` if shutdown stops it.
        With ``release=True`` the worker returns to the warm cache as soon as
        its reply arrives (before the Future completes); otherwise it stays
        held by the caller.

        Blocks: only while the request is written to the worker's pipe (the
        worker is idle and reading, so only for the size of the request).
        Cancellation: none.
        Process safety: any thread, one task per held worker at a time.
        """
        future: Future[bytes] = Future()
        future.set_running_or_notify_cancel()
        with self._lock:
            if self._closed:
                if worker.state == "held":
                    self._release_locked(worker)
                raise ShutdownError("the mpchan supervisor is shut down")
            if worker.state != "held":
                raise ValueError(f"cannot run a task on {worker!r}: it is not held")
            worker.state = "busy"
            worker.task = (future, name)
            worker.release_after = release
        # If the worker died before reading the task, the supervisor thread
        # sees its sentinel and fails the Future with WorkerCrashed.
        with contextlib.suppress(OSError):
            worker.conn.send_bytes(request)
        return future

    # -- introspection ----------------------------------------------------------

    def idle_pids(self) -> set[int]:
        """Pids of cached idle workers and of idle ones already told to exit.

        Never blocks. Process safety: any thread.
        """
        with self._lock:
            return {w.pid for w in self._workers.values() if w.state in ("idle", "retiring")}

    def pids(self) -> set[int]:
        """Pids of every worker process not yet reaped. Never blocks."""
        with self._lock:
            return {w.pid for w in self._workers.values()}

    def stats(self) -> dict[str, Any]:
        """Return plain data about the workers. Never blocks."""
        with self._lock:
            workers = [
                {"id": w.id, "pid": w.pid, "state": w.state, "start_method": w.start_method}
                for w in self._workers.values()
            ]
            return {
                "start_method": self._start_method,
                "max_idle": self._max_idle,
                "idle_timeout": self._idle_timeout,
                "closed": self._closed,
                "idle": sum(1 for w in workers if w["state"] == "idle"),
                "busy": sum(1 for w in workers if w["state"] == "busy"),
                "workers": workers,
            }

    def _metric_families(self) -> list[_metrics.Family]:
        # A metrics source (see _metrics.register): workers by state.
        with self._lock:
            states = [w.state for w in self._workers.values()]
        samples = [({"state": s}, float(states.count(s))) for s in WORKER_STATES]
        return [
            _metrics.Family(
                "mpchan_workers", "gauge", "Worker processes of the program by state", samples
            )
        ]

    # -- the program's supervisor ---------------------------------------------

    def __enter__(self) -> Supervisor:
        """Make this the program's supervisor until the block ends.

        ``go``, ``Pool``, ``Group`` and ``stream`` started in the block use
        it (its start method, cache and ``metrics_port``). Never blocks.
        """
        self._previous = set_supervisor(self)
        return self

    def __exit__(self, *exc: object) -> None:
        """Shut this supervisor down and give the program back its previous one.

        Blocks: until this supervisor's workers have exited (see ``shutdown``).
        Cancellation: none. Process safety: the thread that entered the block.
        """
        global _default
        with _default_lock:
            if _default is self:
                _default = self._previous
        self._previous = None
        self.shutdown()

    # -- shutdown -------------------------------------------------------------

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop every worker process and wait until all are gone; idempotent.

        Pending tasks fail with :class:`ShutdownError`. Idle workers are told
        to exit, busy ones get SIGTERM; whatever is still alive after
        ``timeout`` seconds (``None``: :data:`DEFAULT_SHUTDOWN_GRACE`) is
        killed with SIGKILL. Every process is reaped before this returns.

        Blocks: until every worker process has exited (at most about
        ``timeout`` plus the time SIGKILL takes), then until the metrics
        server (if any) has answered the scrapes in progress and stopped.
        Cancellation: none; later calls to ``acquire``/``run`` raise
        :class:`ShutdownError`. A concurrent second call waits for the first.
        Process safety: any thread, including a Future callback.
        """
        grace = DEFAULT_SHUTDOWN_GRACE if timeout is None else max(0.0, timeout)
        with self._shutdown_lock:
            with self._lock:
                self._closed = True
                self._stopping = True
                self._idle.clear()
            self._wake()
            thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join()
            with self._lock:
                workers = list(self._workers.values())
                pending = []
                for w in workers:
                    if w.task is not None:
                        pending.append((w, w.task))
                        w.task = None
            for w, (future, name) in pending:
                _complete(
                    future,
                    exc=ShutdownError(f"mpchan shut down while {w.describe(name)} was running"),
                )
            stop_processes(workers, grace)
            with self._lock:
                self._workers.clear()
            _live_supervisors.discard(self)
            if self._metrics_server is not None:
                self._metrics_server.close()
        self._close_wake_pipe()

    # -- internals --------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ShutdownError("the mpchan supervisor is shut down")

    def _release_locked(self, worker: Worker) -> None:
        # Caller holds _lock.
        if self._closed or len(self._idle) >= self._max_idle:
            worker.state = "retiring"
            with contextlib.suppress(OSError):
                worker.conn.send_bytes(QUIT)  # one byte to an idle reader: never blocks
            return
        worker.state = "idle"
        worker.idle_since = time.monotonic()
        self._idle.append(worker)

    def _start_worker(self, boot: Any = None) -> Worker:
        method = method_for_start(self._start_method, _supervisor_threads)
        wid = next(self._ids)
        if method != "fork":
            return start_process(method, wid, boot)
        with self._fork_lock:
            # The child must close every parent end it inherits: the other
            # workers' and this supervisor's wake-up pipe.
            with self._lock:
                inherited = [self._wake_r, self._wake_w]
                for w in self._workers.values():
                    inherited += [w.conn.fileno(), w.deathwatch.fileno()]
            return start_process(method, wid, boot, inherited)

    def _new_worker(self, boot: Any = None) -> Worker:
        # Start a process and register it as held by the caller. The thread
        # starts first: made right after a fork, it would pay for the
        # copy-on-write faults of every page it touches (milliseconds).
        self._ensure_thread()
        worker = self._start_worker(boot)
        with self._lock:
            closed = self._closed
            if not closed:
                self._workers[worker.id] = worker
        if closed:
            self._discard(worker)
            raise ShutdownError("the mpchan supervisor is shut down")
        self._wake()  # the thread must watch the new worker's conn and sentinel
        return worker

    def _discard(self, worker: Worker) -> None:
        # Stop and reap a worker that never got registered.
        with contextlib.suppress(OSError):
            worker.process.kill()
        worker.reap()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")  # non-blocking; a full pipe wakes anyway

    def _close_wake_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None or self._stopping:
                return
            thread = threading.Thread(target=self._loop, name=THREAD_NAME, daemon=True)
            self._thread = thread
            _supervisor_threads.add(thread)
        thread.start()

    # -- the supervisor thread ----------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                workers = list(self._workers.values())
                expiry = min((w.idle_since for w in self._idle), default=None)
            by_conn = {w.conn: w for w in workers}
            by_sentinel = {w.sentinel: w for w in workers}
            waitables: list[Any] = [self._wake_r, *by_conn, *by_sentinel]
            timeout = None
            if expiry is not None:
                timeout = max(0.0, expiry + self._idle_timeout - time.monotonic())
            ready = multiprocessing.connection.wait(waitables, timeout)
            if self._wake_r in ready:
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 4096)
            dead: list[Worker] = []
            for obj in ready:
                if isinstance(obj, Connection):
                    worker = by_conn[obj]
                    if not self._on_readable(worker):
                        dead.append(worker)
            for obj in ready:
                if isinstance(obj, int) and obj in by_sentinel:
                    worker = by_sentinel[obj]
                    if worker not in dead:
                        dead.append(worker)
            for worker in dead:
                self._on_death(worker)
            self._expire_idle()

    def _on_readable(self, worker: Worker) -> bool:
        """Read a reply; return False if the worker is gone instead."""
        try:
            reply = worker.conn.recv_bytes()
        except (EOFError, OSError):
            return False
        with self._lock:
            task = worker.task
            worker.task = None
            if task is not None and worker.state == "busy":
                if worker.release_after:
                    self._release_locked(worker)
                else:
                    worker.state = "held"
        if task is None:
            # A reply nobody asked for: the protocol is broken, so is the worker.
            with contextlib.suppress(OSError):
                worker.process.kill()
            return False
        _complete(task[0], result=reply)
        return True

    def _on_death(self, worker: Worker) -> None:
        if worker.state == "dead":
            return  # already reaped by a shutdown called from a Future callback
        exitcode = worker.exit_status(timeout=1.0)
        with self._lock:
            task = worker.task
            worker.task = None
            if worker.state == "idle":
                self._idle.remove(worker)
            self._workers.pop(worker.id, None)
            closing = self._closed
        worker.reap()
        if task is None:
            return
        future, name = task
        if closing:
            exc: BaseException = ShutdownError(
                f"mpchan shut down while {worker.describe(name)} was running"
            )
        else:
            exc = crashed_error(worker, exitcode, name)
        _complete(future, exc=exc)

    def _expire_idle(self) -> None:
        if not self._idle:
            return
        now = time.monotonic()
        with self._lock:
            expired = [w for w in self._idle if now - w.idle_since >= self._idle_timeout]
            for w in expired:
                self._idle.remove(w)
                w.state = "retiring"
                with contextlib.suppress(OSError):
                    w.conn.send_bytes(QUIT)


def _complete(
    future: Future[bytes], *, result: bytes | None = None, exc: BaseException | None = None
) -> None:
    # Each Future is completed by exactly one party (see Invariants), so this
    # cannot race; the check only guards against a user having cancelled it.
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        assert result is not None
        future.set_result(result)


def _env_idle_timeout() -> float:
    raw = os.environ.get("MPCHAN_IDLE_TIMEOUT")
    if not raw:
        return DEFAULT_IDLE_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"MPCHAN_IDLE_TIMEOUT must be a number of seconds, not {raw!r}") from None
    return max(0.0, value)


# ---------------------------------------------------------------------------
# The program's supervisor
# ---------------------------------------------------------------------------

_default: Supervisor | None = None
_default_lock = threading.Lock()
_live_supervisors: weakref.WeakSet[Supervisor] = weakref.WeakSet()
_supervisor_threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def get_supervisor() -> Supervisor:
    """Return the program's supervisor, creating it on first use. Never blocks."""
    global _default
    sup = _default
    if sup is not None and not sup.closed:
        return sup
    with _default_lock:
        if _default is None or _default.closed:
            _default = Supervisor()
        return _default


def current_supervisor() -> Supervisor | None:
    """Return the program's supervisor, or None when none was made (never makes one).

    Never blocks. Process safety: any thread.
    """
    return _default


def set_supervisor(supervisor: Supervisor | None) -> Supervisor | None:
    """Make ``supervisor`` the program's supervisor; return the previous one.

    The previous one is not shut down. ``None`` means "make one lazily".
    Never blocks.
    """
    global _default
    with _default_lock:
        previous, _default = _default, supervisor
    return previous


def shutdown(timeout: float | None = None) -> None:
    """Shut down the program's supervisor (see :meth:`Supervisor.shutdown`).

    The next use of mpchan creates a fresh one.

    Blocks: until every worker process has exited.
    Cancellation: none. Process safety: any thread.
    """
    with _default_lock:
        sup = _default
    if sup is not None:
        sup.shutdown(timeout)


def idle_pids() -> set[int]:
    """Pids of the program supervisor's idle cached workers (leak checks ignore these)."""
    sup = _default
    return sup.idle_pids() if sup is not None else set()


def shutdown_all() -> None:
    """Shut down every supervisor of this process not shut down yet (errors ignored).

    Blocks, Cancellation, Process safety: as :meth:`Supervisor.shutdown`.
    """
    for sup in list(_live_supervisors):
        with contextlib.suppress(Exception):
            sup.shutdown()


def _after_fork_in_child() -> None:
    # A forked child has a copy of the parent's supervisors but not their
    # processes or thread; it starts afresh and must not stop the parent's
    # workers at exit.
    global _default, _default_lock
    _default = None
    _default_lock = threading.Lock()
    _live_supervisors.clear()
    _supervisor_threads.clear()
    forget_parents_forkserver()


# At import: _default_lock and multiprocessing's forkserver state can be
# copied by a fork before any supervisor exists.
_lifecycle.on_fork_child("supervisor", _after_fork_in_child)
