"""One worker process, from its start to its reaping (layer 6, below ``_supervisor``).

The :class:`~mpchan._supervisor.Supervisor` decides *when* a process starts
and stops, and what happens to its tasks; this module knows *how*: which
start method is safe at the moment (``method_for_start``: no fork of a
threaded parent), the pipes a worker is started with, what multiprocessing
must be told for spawn and forkserver starts, the parent's record of the
process (:class:`Worker`), how a group of workers is stopped and reaped
(``stop_processes``), and what a death means (:func:`crashed_error`).

Start of one worker (``start_process``)::

    parent (caller of start_process)              worker process (_worker)
    --------------------------------              ------------------------
    task conn:   Pipe(duplex) parent end  <---->  child end    worker_main(conn,
    death watch: Pipe(simplex) write end  ----->  read end       deathwatch, wid,
                                                                 close_fds, boot)
    spawn, forkserver: a main script no child can run ("<stdin>")
                       is skipped in mpchan's own workers;
    forkserver:        mpchan._worker joins the server's preload list
                       (before the server starts), so a fork of the
                       server has it imported already.
    fork:              close_fds = every parent end the child inherits
                       (its siblings', the caller's, its own parent ends)

    Worker(id, process, conn = parent end, deathwatch = write end)
        ... the supervisor runs tasks, notices the death ...
    reap(): join the process, close both parent ends, release the process.

Invariants:
    * Once ``start_process`` returns (or raises), the parent holds no child
      end of the new worker's pipes; when the start fails it holds no parent
      end either, and no process is left.
    * A forked worker is given every descriptor it inherited that belongs to
      the parent's side of a worker (the caller lists the others'), so its
      siblings' death watches see end of file when the supervisor is gone.
    * A :class:`Worker`'s fields other than ``state``, ``task``,
      ``release_after`` and ``idle_since`` never change after its start.

Ownership:
    * ``state``, ``task``, ``release_after`` and ``idle_since`` of a Worker
      belong to its supervisor (written under its ``_lock``); ``reap`` sets
      ``state`` to ``"dead"`` once nobody else can see the worker.
    * A Worker's ``conn`` and ``deathwatch`` are closed by ``reap`` only.
    * This module changes multiprocessing's process-wide state twice, each
      at most once per process: it wraps ``spawn.get_preparation_data``
      (the wrapper alters only processes whose name starts with
      :data:`WORKER_NAME`), and extends the forkserver's preload list while
      no server runs.
      ``forget_parents_forkserver`` resets the forkserver client state a
      forked child copied from its parent.

Lock order: no lock of its own; a caller that starts forked workers from
several threads serialises those starts (the Supervisor's ``_fork_lock``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Container, Iterable, Sequence
from concurrent.futures import Future
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from ._errors import WorkerCrashed
from ._worker import DEATHWATCH_THREAD_NAME, ORPHANED_EXITCODE, QUIT, worker_main

__all__ = [
    "START_METHODS",
    "WORKER_NAME",
    "WORKER_STATES",
    "Worker",
    "check_start_method",
    "crashed_error",
    "fd_ready",
    "forget_parents_forkserver",
    "method_for_start",
    "start_process",
    "stop_processes",
]

START_METHODS = ("spawn", "forkserver", "fork")

WORKER_NAME = "mpchan-worker-"
"""Prefix of the multiprocessing name of every mpchan worker process."""

WORKER_STATES = ("held", "busy", "idle", "retiring", "lost")
"""The states of a registered worker (see the Supervisor's invariants)."""

_SIGNAL_CAUSES = {
    "SIGSEGV": "segmentation fault",
    "SIGKILL": "killed (possibly out of memory)",
    "SIGABRT": "aborted",
    "SIGBUS": "bus error (bad memory access)",
    "SIGFPE": "floating-point exception",
    "SIGILL": "illegal instruction",
    "SIGTERM": "terminated",
    "SIGINT": "interrupted",
    "SIGPIPE": "broken pipe",
    "SIGXCPU": "CPU time limit exceeded",
}


class Worker:
    """The parent's record of one worker process.

    Fields other than ``state``, ``task``, ``release_after`` and
    ``idle_since`` never change after the worker started. Never blocks.
    """

    __slots__ = (
        "conn",
        "deathwatch",
        "id",
        "idle_since",
        "pid",
        "process",
        "release_after",
        "sentinel",
        "start_method",
        "state",
        "task",
    )

    def __init__(
        self,
        wid: int,
        process: BaseProcess,
        conn: Connection,
        deathwatch: Connection,
        start_method: str,
    ) -> None:
        self.id = wid
        self.process = process
        pid = process.pid
        assert pid is not None  # started
        self.pid: int = pid
        self.sentinel: int = process.sentinel
        self.conn = conn
        self.deathwatch = deathwatch
        self.start_method = start_method
        # Invariant: the fields below change only under Supervisor._lock.
        self.state = "held"
        self.task: tuple[Future[bytes], str] | None = None
        self.release_after = True
        self.idle_since = 0.0

    def describe(self, name: str | None = None) -> str:
        """Return "worker N (pid P) running NAME" for messages. Never blocks."""
        text = f"worker {self.id} (pid {self.pid})"
        return f"{text} running {name}" if name else text

    def exit_status(self, timeout: float) -> int | None:
        """The exit code of a worker whose pipe closed, or None when unknown.

        A process that still lives ``timeout`` seconds later (it closed the
        descriptor itself?) cannot serve any more, and is killed.
        Blocks: up to ``timeout`` seconds. Cancellation: none.
        Process safety: the supervisor thread.
        """
        self.process.join(timeout=timeout)
        if self.process.exitcode is None:
            with contextlib.suppress(OSError):
                self.process.kill()
        return self.process.exitcode

    def reap(self) -> None:
        """Wait for the process to end, then close the parent's ends of its pipes.

        Blocks: until the process has exited (the caller has told it to, or
        seen it die). Cancellation: none. Process safety: called once, by
        whoever took the worker out of its supervisor's records.
        """
        self.process.join()
        self.state = "dead"
        for conn in (self.conn, self.deathwatch):
            with contextlib.suppress(OSError):
                conn.close()
        with contextlib.suppress(ValueError):
            self.process.close()

    def __repr__(self) -> str:
        return f"<mpchan Worker id={self.id} pid={self.pid} {self.state} {self.start_method}>"


def check_start_method(method: str) -> str:
    """Return ``method`` if workers can be started with it here; else raise ValueError.

    Never blocks.
    """
    if method not in START_METHODS:
        raise ValueError(f"unknown start method {method!r}; use one of {START_METHODS}")
    if method not in multiprocessing.get_all_start_methods():
        raise ValueError(f"start method {method!r} is not available on this platform")
    return method


def method_for_start(method: str, own_threads: Container[threading.Thread]) -> str:
    """The start method to use now for a supervisor configured with ``method``.

    ``"fork"`` becomes ``"forkserver"`` while a thread is alive besides the
    caller, a death watch and ``own_threads`` (supervisor threads, which never
    hold a lock a forked worker needs): forking a threaded process can copy a
    held lock. Never blocks. Process safety: any thread.
    """
    if method != "fork":
        return method
    me = threading.current_thread()
    for t in threading.enumerate():
        if t is me or t.name == DEATHWATCH_THREAD_NAME or t in own_threads:
            continue
        return "forkserver"
    return "fork"


def start_process(method: str, wid: int, boot: Any = None, inherited: Iterable[int] = ()) -> Worker:
    """Start worker number ``wid`` with start method ``method``; return its record.

    ``boot`` travels as an argument of the process start (see
    ``Supervisor.start_worker``). ``inherited`` (used with ``"fork"`` only)
    lists descriptors of this process that the forked child must close: the
    parent ends of the other workers' pipes and the caller's own; the new
    worker's parent ends are added here. A start that fails raises what it
    raised, and leaves neither a process nor a descriptor.

    Blocks: while the process starts (milliseconds with fork and
    forkserver, more with spawn). Cancellation: none.
    Process safety: any thread; forked starts must not run concurrently
    (a child would inherit another start's parent ends unlisted).
    """
    ctx = multiprocessing.get_context(method)
    if method != "fork":
        _skip_missing_main()
    if method == "forkserver":
        _preload_worker_in_forkserver()
    parent_conn, child_conn = ctx.Pipe(duplex=True)
    watch_r, watch_w = ctx.Pipe(duplex=False)
    close_fds: list[int] = []
    if method == "fork":
        # A forked child inherits every descriptor; it must close the
        # parent's ends (its own and its siblings') or death watches would
        # never see end of file.
        close_fds = [*inherited, parent_conn.fileno(), watch_w.fileno()]
    process = ctx.Process(  # type: ignore[attr-defined]
        target=worker_main,
        args=(child_conn, watch_r, wid, close_fds, boot),
        name=f"{WORKER_NAME}{wid}",
        daemon=False,
    )
    try:
        process.start()
    except BaseException:
        parent_conn.close()
        watch_w.close()
        raise
    finally:
        child_conn.close()
        watch_r.close()
    return Worker(wid, process, parent_conn, watch_w, method)


def stop_processes(workers: Sequence[Worker], grace: float) -> None:
    """Stop these workers and reap them all; nothing else may use them any more.

    A busy worker (``state == "busy"``) gets SIGTERM, any other is told to
    exit; each is then ``"retiring"``. Whatever still lives ``grace``
    seconds later is killed with SIGKILL.

    Blocks: until every one has exited (at most about ``grace`` plus the
    time SIGKILL takes). Cancellation: none.
    Process safety: one caller, once their supervisor no longer watches them.
    """
    for w in workers:
        if w.state == "busy":
            with contextlib.suppress(OSError):
                w.process.terminate()
        else:
            with contextlib.suppress(OSError):
                w.conn.send_bytes(QUIT)
        w.state = "retiring"
    deadline = time.monotonic() + grace
    alive = [w for w in workers if not fd_ready(w.sentinel)]
    while alive:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        multiprocessing.connection.wait([w.sentinel for w in alive], left)
        alive = [w for w in alive if not fd_ready(w.sentinel)]
    for w in alive:
        with contextlib.suppress(OSError):
            os.kill(w.pid, signal.SIGKILL)
    for w in workers:
        w.reap()


def crashed_error(worker: Worker, exitcode: int | None, name: str | None) -> WorkerCrashed:
    """Build the :class:`WorkerCrashed` for a worker that died. Never blocks."""
    sig: str | None = None
    if exitcode is None:
        how, cause = "died", "unknown"
    elif exitcode < 0:
        try:
            sig = signal.Signals(-exitcode).name
        except ValueError:
            sig = f"signal {-exitcode}"
        how, cause = f"was killed by {sig}", _SIGNAL_CAUSES.get(sig, f"killed by {sig}")
    elif exitcode == ORPHANED_EXITCODE:
        how, cause = f"exited with status {exitcode}", "it lost its supervisor"
    else:
        how = f"exited with status {exitcode}"
        cause = "the process exited (os._exit(), or exit() in native code)"
    what = f"while running {name}" if name else "while idle"
    return WorkerCrashed(
        f"mpchan worker {worker.id} (pid {worker.pid}) {how} {what}: {cause}",
        pid=worker.pid,
        exitcode=exitcode,
        signal=sig,
        task=name,
        cause=cause,
    )


def fd_ready(fd: int) -> bool:
    """True when ``fd`` (a process sentinel) is readable now. Never blocks."""
    try:
        r, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(r)


_prep_patched = False


def _skip_missing_main() -> None:
    # A spawned or forkserver child re-imports the parent's main script by
    # its path; a program read from stdin (``python - < job.py``) has the
    # path "<stdin>", which no child can run, and every worker would die at
    # start. mpchan's own workers then skip the main module (its functions
    # go by value: see _codec); other processes are left as they are.
    global _prep_patched
    if _prep_patched:
        return
    _prep_patched = True
    from multiprocessing import spawn

    original = spawn.get_preparation_data

    def preparation_data(name: str) -> dict[str, Any]:
        data: dict[str, Any] = original(name)
        if name.startswith(WORKER_NAME):
            path = data.get("init_main_from_path")
            if path is not None and not os.path.isfile(path):
                del data["init_main_from_path"]
        return data

    spawn.get_preparation_data = preparation_data


_preloaded = False


def _preload_worker_in_forkserver() -> None:
    # Each forkserver child is a fork of the server, so modules the server
    # imported are free for every worker. Add ours to the preload list, if
    # the server has not started yet, keeping whatever was there.
    global _preloaded
    if _preloaded:
        return
    _preloaded = True
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    if server is None or getattr(server, "_forkserver_pid", None) is not None:
        return
    modules = list(getattr(server, "_preload_modules", ["__main__"]))
    worker_module = worker_main.__module__
    if worker_module not in modules:
        modules.append(worker_module)
        with contextlib.suppress(Exception):
            multiprocessing.get_context("forkserver").set_forkserver_preload(modules)


def forget_parents_forkserver() -> None:
    """In a forked child: drop the forkserver client state copied from the parent.

    multiprocessing's forkserver client state is per process, but a fork
    copies it: the child would try to use (and waitpid) its parent's
    server, and its copy of the server's "alive" pipe would keep that
    server running after the parent died. Start from a clean state; the
    child gets a server of its own if it needs one.
    Never blocks. Process safety: the forked child's only thread, at fork.
    """
    forkserver = sys.modules.get("multiprocessing.forkserver")
    if forkserver is None:
        return  # never imported: there is no server state to forget (and a fork stays cheap)
    server = getattr(forkserver, "_forkserver", None)
    if server is None or getattr(server, "_forkserver_pid", None) is None:
        return
    alive_fd = getattr(server, "_forkserver_alive_fd", None)
    if alive_fd is not None:
        with contextlib.suppress(OSError):
            os.close(alive_fd)
    server._forkserver_alive_fd = None
    server._forkserver_pid = None
    server._forkserver_address = None
    server._lock = threading.Lock()
