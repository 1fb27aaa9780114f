"""The supervisor: the warm cache, death detection, shutdown, and dying programs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cloudpickle
import pytest
from scripts import gate
from scripts.procs import gone, start_json_program, wait_until

from mpchan import _go, _supervisor, _worker
from mpchan._errors import ShutdownError, WorkerCrashed

cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(gate)

METHODS = ["spawn", "forkserver", "fork"]
SCRIPTS = Path(__file__).parent / "scripts"
ROOT = Path(__file__).resolve().parent.parent


def getpid() -> int:
    return os.getpid()


def ignore_sigterm_and_wait(path: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    gate.check_in_and_wait(path)


# -- the cache --------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_acquire_release_reuses(
    make_sup: Callable[..., _supervisor.Supervisor], method: str
) -> None:
    sup = make_sup(method)
    worker = sup.acquire()
    assert worker.state == "held"
    assert sup.idle_pids() == set()
    sup.release(worker)
    assert sup.idle_pids() == {worker.pid}
    again = sup.acquire()
    assert again is worker
    sup.release(again)
    with pytest.raises(ValueError):
        sup.release(again)


def test_cache_is_bounded(make_sup: Callable[..., _supervisor.Supervisor]) -> None:
    sup = make_sup("fork", max_idle=1)
    a, b = sup.acquire(), sup.acquire()
    sup.release(a)
    sup.release(b)  # the cache is full: b is told to exit
    assert sup.stats()["idle"] == 1
    assert wait_until(lambda: b.pid not in sup.pids(), timeout=10)
    assert sup.pids() == {a.pid}


def test_prestart_fills_the_cache(make_sup: Callable[..., _supervisor.Supervisor]) -> None:
    sup = make_sup("forkserver", max_idle=2)
    sup.prestart(5)
    assert len(sup.idle_pids()) == 2
    before = sup.idle_pids()
    assert _go.go(getpid).result(timeout=30) in before


def test_idle_timeout_from_environment(
    make_sup: Callable[..., _supervisor.Supervisor], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPCHAN_IDLE_TIMEOUT", "0.1")
    sup = make_sup("fork")
    assert sup.idle_timeout == 0.1
    pid = _go.go(getpid).result(timeout=30)
    assert wait_until(lambda: pid not in sup.pids(), timeout=10)
    monkeypatch.setenv("MPCHAN_IDLE_TIMEOUT", "soon")
    with pytest.raises(ValueError):
        _supervisor.Supervisor("fork")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        _supervisor.Supervisor("thread")
    with pytest.raises(ValueError):
        _supervisor.Supervisor("fork", max_idle=-1)


def test_idle_worker_death_is_noticed(make_sup: Callable[..., _supervisor.Supervisor]) -> None:
    sup = make_sup("fork")
    worker = sup.acquire()
    sup.release(worker)
    os.kill(worker.pid, signal.SIGKILL)
    assert wait_until(lambda: worker.pid not in sup.pids(), timeout=10)
    assert _go.go(getpid).result(timeout=30) != worker.pid


def test_fork_falls_back_to_forkserver_with_threads(
    make_sup: Callable[..., _supervisor.Supervisor],
) -> None:
    sup = make_sup("fork")
    first = sup.acquire()
    assert first.start_method == "fork"
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, name="user-thread")
    other.start()
    try:
        second = sup.acquire()
        assert second.start_method == "forkserver"
    finally:
        stop.set()
        other.join()
    sup.release(first)
    sup.release(second)


# -- crash descriptions ------------------------------------------------------------


@pytest.mark.parametrize(
    ("exitcode", "sig", "cause"),
    [
        (-signal.SIGSEGV, "SIGSEGV", "segmentation fault"),
        (-signal.SIGKILL, "SIGKILL", "killed (possibly out of memory)"),
        (-signal.SIGABRT, "SIGABRT", "aborted"),
        (-signal.SIGBUS, "SIGBUS", "bus error (bad memory access)"),
        (3, None, "the process exited (os._exit(), or exit() in native code)"),
        (_worker.ORPHANED_EXITCODE, None, "it lost its supervisor"),
    ],
)
def test_crash_names_signal_and_cause(exitcode: int, sig: str | None, cause: str) -> None:
    worker: Any = SimpleNamespace(id=4, pid=1234)
    exc = _supervisor.crashed_error(worker, exitcode, "mod.fn")
    assert isinstance(exc, WorkerCrashed)
    assert (exc.pid, exc.exitcode, exc.signal, exc.cause, exc.task) == (
        1234,
        exitcode,
        sig,
        cause,
        "mod.fn",
    )
    assert "pid 1234" in str(exc) and "mod.fn" in str(exc)
    if sig:
        assert sig in str(exc)


# -- shutdown ------------------------------------------------------------------------


def test_shutdown_kills_what_ignores_sigterm(
    make_sup: Callable[..., _supervisor.Supervisor],
) -> None:
    sup = make_sup("forkserver")
    g = gate.Gate()
    try:
        h = _go.go(ignore_sigterm_and_wait, g.path)
        g.wait_checkins(1, timeout=30)
        started = time.monotonic()
        sup.shutdown(timeout=0.3)
        assert time.monotonic() - started < 10
        assert gone(h.pid)
        assert isinstance(h.exception(timeout=5), ShutdownError)
        assert sup.pids() == set()
        with pytest.raises(ShutdownError):
            sup.acquire()
        sup.shutdown()  # idempotent
    finally:
        g.close()


def test_module_shutdown_without_supervisor_is_a_no_op() -> None:
    previous = _supervisor.set_supervisor(None)
    try:
        _supervisor.shutdown()
        assert _supervisor.idle_pids() == set()
    finally:
        _supervisor.set_supervisor(previous)


# -- programs that die with workers running ---------------------------------------------


def _run_target(
    method: str, mode: str, **popen: Any
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    return start_json_program(SCRIPTS / "kill_target.py", method, mode, **popen)


def _assert_all_gone(pids: list[int], within: float = 1.0) -> None:
    deadline = time.monotonic() + within
    while True:
        alive = [pid for pid in pids if not gone(pid)]
        if not alive:
            return
        if time.monotonic() >= deadline:
            pytest.fail(f"workers {alive} outlived their supervisor by {within} s")
        time.sleep(0.01)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_workers_die_with_a_killed_supervisor(method: str, how: str) -> None:
    proc, info = _run_target(method, "wait")
    try:
        assert len(info["pids"]) == 4
        os.kill(proc.pid, getattr(signal, how))
        proc.wait(timeout=30)
        assert proc.returncode == -getattr(signal, how)
        _assert_all_gone(info["pids"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        gate.remove_socket(info["gate"])
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("mode", "status"), [("raise", 1), ("exit", 3)])
def test_workers_die_with_a_program_that_ends(method: str, mode: str, status: int) -> None:
    proc, info = _run_target(method, mode)
    try:
        proc.wait(timeout=30)
        assert proc.returncode == status
        _assert_all_gone(info["pids"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        gate.remove_socket(info["gate"])
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


@pytest.mark.parametrize("method", METHODS)
def test_ctrl_c_gives_one_traceback_not_one_per_worker(method: str) -> None:
    proc, info = _run_target(method, "wait", start_new_session=True)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGINT  # an uncaught KeyboardInterrupt
        assert stderr.count("Traceback") == 1, stderr
        assert stderr.count("KeyboardInterrupt") == 1, stderr
        _assert_all_gone(info["pids"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        gate.remove_socket(info["gate"])


def test_with_block_makes_it_the_programs_supervisor_until_the_end() -> None:
    previous = _supervisor.set_supervisor(None)
    try:
        with _supervisor.Supervisor(start_method="fork") as sup:
            assert _supervisor.get_supervisor() is sup
            pid = _go.go(getpid).result(timeout=30)
            assert pid in sup.pids()
        assert sup.closed
        assert _supervisor._default is None  # the previous one (none) is back
        assert wait_until(lambda: gone(pid), 10)
    finally:
        _supervisor.set_supervisor(previous)
