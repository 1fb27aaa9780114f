"""pytest plugin: fail a test that leaks processes, shared memory or threads.

Installing mpchan registers this module as a pytest plugin (entry point
``pytest11: mpchan``). It changes nothing by itself: a test suite opts in by
requesting the ``mpchan_leak_check`` fixture, usually from an autouse fixture
in its ``conftest.py``.

What counts as a leak, compared with a snapshot taken before the test:

- a live child process of the test process (at any depth) that did not exist
  before, except idle processes of mpchan's warm cache and mpchan's reaper
  (and the standard library's forkserver and resource tracker, which live as
  long as the program by design);
- a file in the shared-memory directory (``/dev/shm`` on Linux) of this
  program's mpchan session (``mpchan-<session>-...``) that did not exist
  before (segments of other mpchan programs running meanwhile are not
  counted);
- a live thread that did not exist before, except threads named
  ``mpchan-infra...``.

Processes and shared-memory files get a grace period (ini option
``mpchan_leak_grace``, default 3 s) to go away, since their owners release
them asynchronously. Leaked child processes are killed after being reported,
so one leak does not cascade into the following tests.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

__all__ = ["mpchan_leak_check"]

_MARKER = "mpchan_allow_leaks"
_GRACE_INI = "mpchan_leak_grace"
_DEFAULT_GRACE = 3.0
_POLL_INTERVAL = 0.02
_SHM_PREFIX = "mpchan-"
_SESSION_ENV = "MPCHAN_SESSION"
_INFRA_THREAD_PREFIX = "mpchan-infra"
# Command-line fragments of long-lived infrastructure processes: started
# lazily by the first test that needs them and alive until the program ends.
_INFRA_CMDLINES = (
    "mpchan._reaper",
    "multiprocessing.forkserver",
    "multiprocessing.resource_tracker",
)

# Where named shared-memory segments appear as files: a tmpfs on Linux, the
# temporary directory for the file-backed fallback elsewhere. This mirrors the
# library's platform shim without importing its internals.
SHM_DIR = "/dev/shm" if sys.platform.startswith("linux") else tempfile.gettempdir()

# A process is identified by pid and creation time, so a reused pid is not
# mistaken for the process that held it before.
_ProcKey = tuple[int, float]


@dataclass(frozen=True)
class _Snapshot:
    processes: frozenset[_ProcKey]
    shm_files: frozenset[str]
    threads: frozenset[threading.Thread]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        _GRACE_INI,
        "seconds that leaked mpchan processes and shared memory get to go away "
        f"before mpchan_leak_check fails the test (default {_DEFAULT_GRACE})",
        default=str(_DEFAULT_GRACE),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_MARKER}: skip the mpchan_leak_check fixture (processes, shared memory, threads) "
        "for this test",
    )


def _live_children() -> dict[_ProcKey, psutil.Process]:
    """All live (non-zombie) descendants of this process, by (pid, create_time)."""
    found: dict[_ProcKey, psutil.Process] = {}
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return found
    for proc in children:
        try:
            # A zombie has exited; only its parent's bookkeeping is left.
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            found[(proc.pid, proc.create_time())] = proc
        except psutil.Error:
            continue
    return found


def _shm_files() -> frozenset[str]:
    # Only this program's own segments: their names carry its session token
    # (MPCHAN_SESSION, set when the program makes its first one); another
    # mpchan program running beside the tests is none of their business.
    token = os.environ.get(_SESSION_ENV, "").partition(":")[0]
    if not token:
        return frozenset()
    prefix = f"{_SHM_PREFIX}{token}-"
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return frozenset()
    return frozenset(n for n in names if n.startswith(prefix))


def _snapshot() -> _Snapshot:
    return _Snapshot(
        processes=frozenset(_live_children()),
        shm_files=_shm_files(),
        threads=frozenset(t for t in threading.enumerate() if t.is_alive()),
    )


def _idle_pids() -> set[int]:
    """Pids of mpchan's idle warm-cache processes (not leaks).

    mpchan is looked up in ``sys.modules`` rather than imported: a test that
    never imported mpchan cannot have idle mpchan processes, and the check
    must not start anything.
    """
    mod = sys.modules.get("mpchan")
    hook = getattr(mod, "_idle_pids", None)
    if hook is None:
        return set()
    try:
        return {int(pid) for pid in hook()}
    except Exception:
        return set()


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def _is_infra(proc: psutil.Process) -> bool:
    cmdline = _cmdline(proc)
    for fragment in _INFRA_CMDLINES:
        if fragment in cmdline:
            # A process the forkserver forked (a worker) has the server's
            # command line too: only the server itself is infrastructure.
            try:
                parent = proc.parent()
            except psutil.Error:
                parent = None
            return parent is None or fragment not in _cmdline(parent)
    return False


def _leaked_processes(before: _Snapshot) -> dict[_ProcKey, psutil.Process]:
    idle = _idle_pids()
    return {
        key: proc
        for key, proc in _live_children().items()
        if key not in before.processes and proc.pid not in idle and not _is_infra(proc)
    }


def _leaked_shm(before: _Snapshot) -> list[str]:
    return sorted(_shm_files() - before.shm_files)


def _leaked_threads(before: _Snapshot) -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t.is_alive() and t not in before.threads and not t.name.startswith(_INFRA_THREAD_PREFIX)
    ]


def _describe_process(proc: psutil.Process) -> str:
    try:
        name = proc.name()
        status = proc.status()
        ppid = proc.ppid()
    except psutil.Error:
        return f"pid {proc.pid} (exited while being reported)"
    cmdline = _cmdline(proc)
    if len(cmdline) > 200:
        cmdline = cmdline[:197] + "..."
    return f"pid {proc.pid} {name!r} ({status}, parent {ppid}): {cmdline}"


def _is_alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running()) and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill(leaked: dict[_ProcKey, psutil.Process]) -> list[int]:
    """SIGKILL the leaked processes that are still our descendants; return the pids not dead.

    Only processes found again among this process's live descendants, with the
    same creation time, are signalled, so a reused pid is never hit. They are
    not reaped here: their zombie stays for whoever owns the handle (a Popen,
    a multiprocessing.Process) to collect.
    """
    current = _live_children()
    targets = [current[key] for key in leaked if key in current]
    for proc in targets:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        survivors = [p for p in targets if _is_alive(p)]
        if not survivors:
            return []
        time.sleep(_POLL_INTERVAL)
    return [p.pid for p in targets if _is_alive(p)]


def _grace(config: pytest.Config) -> float:
    raw = config.getini(_GRACE_INI)
    try:
        return max(0.0, float(raw))
    except (TypeError, ValueError):
        raise pytest.UsageError(f"{_GRACE_INI} must be a number of seconds, got {raw!r}") from None


def _check(before: _Snapshot, grace: float, test_id: str) -> None:
    # Owners release processes and segments asynchronously (a worker exiting
    # after shutdown, a finalizer unlinking a segment): poll for them to go.
    deadline = time.monotonic() + grace
    while True:
        procs = _leaked_processes(before)
        shm = _leaked_shm(before)
        if (not procs and not shm) or time.monotonic() >= deadline:
            break
        time.sleep(_POLL_INTERVAL)
    threads = _leaked_threads(before)
    if not procs and not shm and not threads:
        return

    lines = [f"mpchan leak check: {test_id} left resources behind:"]
    if procs:
        lines.append(f"  {len(procs)} child process(es) still alive after {grace:g} s:")
        lines.extend(f"    {_describe_process(p)}" for p in procs.values())
    if shm:
        lines.append(f"  {len(shm)} shared-memory file(s) in {SHM_DIR}:")
        lines.extend(f"    {os.path.join(SHM_DIR, name)}" for name in shm)
    if threads:
        lines.append(f"  {len(threads)} thread(s) still alive:")
        lines.extend(
            f"    {t.name!r} (ident {t.ident}{', daemon' if t.daemon else ''})" for t in threads
        )
    if procs:
        survivors = _kill(procs)
        lines.append("  the leaked child processes were killed (SIGKILL)")
        if survivors:
            lines.append(f"  could not kill: {', '.join(map(str, survivors))}")
    lines.append(f"  (mark the test with @pytest.mark.{_MARKER} if this is intended)")
    pytest.fail("\n".join(lines), pytrace=False)


@pytest.fixture
def mpchan_leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves child processes, mpchan shared memory or threads behind.

    Blocks: at teardown, up to the grace period (``mpchan_leak_grace``, 3 s)
    while leaked processes or segments remain, plus up to 2 s to kill leaked
    processes.
    Process safety: use from the test process only; it inspects that
    process's descendants, threads and the shared-memory directory.
    """
    if request.node.get_closest_marker(_MARKER) is not None:
        yield
        return
    before = _snapshot()
    yield
    _check(before, _grace(request.config), request.node.nodeid)
