"""go(): results, remote exceptions, crashes, promptness and the warm cache."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from scripts import gate
from scripts.procs import gone, own_supervisor, wait_until

from mpchan import _go, _supervisor
from mpchan._errors import RemoteError, SerializationError, ShutdownError, WorkerCrashed

# Workers need not be able to import this module or the gate helper.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(gate)

METHODS = ["spawn", "forkserver", "fork"]


@pytest.fixture(params=METHODS)
def sup(
    request: pytest.FixtureRequest, mpchan_leak_check: None
) -> Iterator[_supervisor.Supervisor]:
    """A supervisor with the given start method, installed as the program's one.

    Requests the leak check so that it is torn down after this fixture's
    shutdown, whatever mpchan's facade exposes.
    """
    with own_supervisor(request.param) as supervisor:
        yield supervisor


@pytest.fixture
def g() -> Iterator[gate.Gate]:
    rendezvous = gate.Gate()
    try:
        yield rendezvous
    finally:
        rendezvous.close()


# -- functions run in workers --------------------------------------------------


def add(a: int, b: int = 0) -> int:
    return a + b


def getpid() -> int:
    return os.getpid()


class CustomError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code


def raise_value_error() -> None:
    raise ValueError("bad value in worker")


def raise_custom() -> None:
    raise CustomError("custom", 42)


class Unpicklable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raise_unpicklable() -> None:
    raise Unpicklable("has a lock")


def call_sys_exit() -> None:
    sys.exit(7)


def hard_exit() -> None:
    os._exit(3)


def segfault() -> None:
    ctypes.string_at(0)


def return_lock() -> threading.Lock:
    return threading.Lock()


def nested_go() -> tuple[int, int]:
    h = _go.go(getpid)
    return os.getpid(), h.result(timeout=30)


# -- results and exceptions ------------------------------------------------------


def test_go_returns_value(sup: _supervisor.Supervisor) -> None:
    h = _go.go(add, 40, b=2)
    assert h.result(timeout=30) == 42
    assert h.done()
    assert h.exception() is None
    assert isinstance(h.pid, int)


def test_exception_keeps_type_cause_and_note(sup: _supervisor.Supervisor) -> None:
    h = _go.go(raise_value_error)
    with pytest.raises(ValueError, match="bad value in worker") as info:
        h.result(timeout=30)
    exc = info.value
    assert "raise_value_error" in str(exc.__cause__)
    assert "Traceback" in str(exc.__cause__)
    notes = "\n".join(getattr(exc, "__notes__", []))
    assert f"pid {h.pid}" in notes
    assert "raise_value_error" in notes
    assert h.exception() is exc


def test_custom_exception_type_arrives(sup: _supervisor.Supervisor) -> None:
    exc = _go.go(raise_custom).exception(timeout=30)
    assert isinstance(exc, CustomError)
    assert exc.code == 42


def test_unpicklable_exception_is_remote_error(sup: _supervisor.Supervisor) -> None:
    exc = _go.go(raise_unpicklable).exception(timeout=30)
    assert isinstance(exc, RemoteError)
    assert exc.type_name.endswith("Unpicklable")
    assert exc.message == "has a lock"
    assert "raise_unpicklable" in exc.traceback


def test_sys_exit_arrives_as_system_exit(sup: _supervisor.Supervisor) -> None:
    h = _go.go(call_sys_exit)
    with pytest.raises(SystemExit) as info:
        h.result(timeout=30)
    assert info.value.code == 7
    # The worker survived and went back to the cache.
    assert _go.go(getpid).result(timeout=30) == h.pid


def test_unpicklable_argument_raises_in_caller(sup: _supervisor.Supervisor) -> None:
    with pytest.raises(SerializationError) as info:
        _go.go(add, threading.Lock())
    assert info.value.__cause__ is not None
    assert sup.pids() == set()  # nothing was started


def test_unpicklable_result_fails_that_task_only(sup: _supervisor.Supervisor) -> None:
    h = _go.go(return_lock)
    with pytest.raises(SerializationError, match="pickling the result") as info:
        h.result(timeout=30)
    assert isinstance(info.value.__cause__, Exception)
    assert _go.go(getpid).result(timeout=30) == h.pid


def test_nested_go_from_a_worker(sup: _supervisor.Supervisor) -> None:
    outer, inner = _go.go(nested_go).result(timeout=30)
    assert outer != inner


# -- crashes -------------------------------------------------------------------


def test_os_exit_is_worker_crashed(sup: _supervisor.Supervisor) -> None:
    h = _go.go(hard_exit)
    with pytest.raises(WorkerCrashed) as info:
        h.result(timeout=30)
    assert info.value.pid == h.pid
    assert info.value.exitcode == 3
    assert info.value.signal is None


def test_sigkill_is_worker_crashed(sup: _supervisor.Supervisor, g: gate.Gate) -> None:
    h = _go.go(gate.check_in_and_wait, g.path)
    g.wait_checkins(1, timeout=30)
    os.kill(h.pid, signal.SIGKILL)
    exc = h.exception(timeout=30)
    assert isinstance(exc, WorkerCrashed)
    assert exc.signal == "SIGKILL"
    assert exc.exitcode == -signal.SIGKILL
    assert exc.cause is not None and "killed" in exc.cause
    assert "SIGKILL" in str(exc)


def test_segfault_is_worker_crashed(sup: _supervisor.Supervisor) -> None:
    exc = _go.go(segfault).exception(timeout=30)
    assert isinstance(exc, WorkerCrashed)
    assert exc.signal == "SIGSEGV"
    assert exc.cause == "segmentation fault"


def test_usable_after_crash(sup: _supervisor.Supervisor) -> None:
    assert isinstance(_go.go(hard_exit).exception(timeout=30), WorkerCrashed)
    assert _go.go(add, 1, 2).result(timeout=30) == 3


# -- timeouts, join, done -------------------------------------------------------


def test_timeouts_raise_builtin_timeout_error(sup: _supervisor.Supervisor, g: gate.Gate) -> None:
    h = _go.go(gate.check_in_and_wait, g.path)
    g.wait_checkins(1, timeout=30)
    with pytest.raises(TimeoutError):
        h.result(timeout=0.05)
    with pytest.raises(TimeoutError):
        h.exception(timeout=0)
    with pytest.raises(TimeoutError):
        h.join(timeout=0.01)
    assert not h.done()
    g.open()
    h.join(timeout=30)
    assert h.done()
    assert h.result() == h.pid


# -- promptness and the warm cache ------------------------------------------------


@pytest.mark.timeout(60)
def test_blocked_goroutines_all_start_promptly(sup: _supervisor.Supervisor, g: gate.Gate) -> None:
    # None of them can finish until all have started: go must not wait for a slot.
    handles = [_go.go(gate.check_in_and_wait, g.path) for _ in range(20)]
    pids = g.wait_checkins(20, timeout=45)
    assert sorted(pids) == sorted(h.pid for h in handles)
    assert len(set(pids)) == 20
    g.open()
    assert sorted(h.result(timeout=30) for h in handles) == sorted(pids)


def test_warm_cache_reuses_the_worker(sup: _supervisor.Supervisor) -> None:
    first = _go.go(getpid)
    assert first.result(timeout=30) == first.pid
    assert first.pid in sup.idle_pids()
    second = _go.go(getpid)
    assert second.pid == first.pid
    assert second.result(timeout=30) == first.pid


def test_fire_and_forget_returns_worker_to_cache(sup: _supervisor.Supervisor) -> None:
    h = _go.go(add, 1)
    del h  # nobody asks for the result
    assert wait_until(lambda: len(sup.idle_pids()) == 1, timeout=30)


def test_idle_workers_exit_after_idle_timeout(mpchan_leak_check: None) -> None:
    supervisor = _supervisor.Supervisor("forkserver", idle_timeout=0.2)
    previous = _supervisor.set_supervisor(supervisor)
    try:
        pid = _go.go(getpid).result(timeout=30)
        assert pid in supervisor.idle_pids()
        assert wait_until(lambda: pid not in supervisor.pids(), timeout=10)
        assert wait_until(lambda: gone(pid), timeout=5)
        # A later go starts a fresh worker.
        assert _go.go(getpid).result(timeout=30) != pid
    finally:
        supervisor.shutdown(timeout=2)
        _supervisor.set_supervisor(previous)


# -- shutdown ------------------------------------------------------------------------


def test_shutdown_stops_running_goroutines(g: gate.Gate, mpchan_leak_check: None) -> None:
    _supervisor.set_supervisor(None)
    try:
        h = _go.go(gate.check_in_and_wait, g.path)
        g.wait_checkins(1, timeout=30)
        _supervisor.shutdown(timeout=2)
        assert isinstance(h.exception(timeout=5), ShutdownError)
        assert gone(h.pid)
        # The next go gets a fresh supervisor.
        assert _go.go(add, 2, 3).result(timeout=30) == 5
    finally:
        _supervisor.shutdown(timeout=2)


# -- how tasks are pickled --------------------------------------------------------------

FRESH_PROGRAM = """
import json, os, sys
from mpchan import _go, _supervisor

def plus_one(x):
    return x + 1

class Box:
    def __init__(self, v):
        self.v = v

def unbox(box):
    return box.v

if __name__ == "__main__":
    _supervisor.set_supervisor(_supervisor.Supervisor(sys.argv[1]))
    out = {
        "other_pid": _go.go(os.getpid).result(timeout=60) != os.getpid(),
        "cloudpickle_after_builtin": "cloudpickle" in sys.modules,
        "main_function": _go.go(plus_one, 1).result(timeout=60),
        "main_class": _go.go(unbox, Box(5)).result(timeout=60),
        "lambda": _go.go(lambda: 7).result(timeout=60),
        "returned_main_class": type(_go.go(Box, 3).result(timeout=60)).__name__,
    }
    _supervisor.shutdown(timeout=5)
    print(json.dumps(out))
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_tasks_go_by_name_or_by_value_in_a_fresh_program(method: str) -> None:
    """A program that has not loaded cloudpickle sends by-name tasks with plain
    pickle; what lives in ``__main__`` (or has no importable name) still goes
    by value, so a worker that cannot import ``__main__`` runs it."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    env.pop("MPCHAN_SESSION", None)
    run = subprocess.run(
        [sys.executable, "-c", FRESH_PROGRAM, method],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1]) == {
        "other_pid": True,
        "cloudpickle_after_builtin": False,
        "main_function": 2,
        "main_class": 5,
        "lambda": 7,
        "returned_main_class": "Box",
    }
