"""Process-lifetime hooks (``_lifecycle``): the declared order, errors, forks, and
a user's program that ends normally leaving nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from scripts.procs import wait_until

from mpchan import _lifecycle
from mpchan._compat import SHM_DIR

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["spawn", "forkserver", "fork"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MPCHAN_SESSION"}  # a program of its own
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _run_program(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=50,
        env=_env(),
    )


# -- at exit ----------------------------------------------------------------------------

EXIT_HOOKS = """
    import multiprocessing.util, sys
    from mpchan import _lifecycle

    def hook(name):
        def run():
            print(name, flush=True)
            if name == "supervisor":
                raise RuntimeError("a failing exit hook")
        return run

    # registered against the declared order, and after multiprocessing's hook
    for name in sys.argv[1:]:
        _lifecycle.on_exit(name, hook(name))
    multiprocessing.util.Finalize(None, hook("multiprocessing"), exitpriority=0)
    print("main", flush=True)
"""


def test_exit_hooks_run_in_the_declared_order_and_an_error_stops_none() -> None:
    # "supervisor" raises: its traceback goes to stderr and "shm" still runs;
    # multiprocessing's own exit hook comes after all of them.
    proc = _run_program(EXIT_HOOKS, "shm", "supervisor", "stream", "pool")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "main",
        "pool",
        "stream",
        "supervisor",
        "shm",
        "multiprocessing",
    ]
    assert proc.stderr.count("Traceback") == 1
    assert "RuntimeError: a failing exit hook" in proc.stderr


def test_exit_hooks_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same rules, through the handler itself, with hooks of this test only.
    ran: list[str] = []
    monkeypatch.setattr(_lifecycle, "EXIT_ORDER", ("a", "b", "c"))
    monkeypatch.setattr(_lifecycle, "_exit_hooks", {})

    def boom() -> None:
        ran.append("b")
        raise KeyboardInterrupt  # a BaseException stops nothing either

    _lifecycle.on_exit("c", lambda: ran.append("c"))
    _lifecycle.on_exit("b", boom)
    _lifecycle.on_exit("a", lambda: ran.append("old a"))
    _lifecycle.on_exit("a", lambda: ran.append("a"))  # replaces the first
    _lifecycle._run_exit()
    assert ran == ["a", "b", "c"]


def test_undeclared_names_are_refused() -> None:
    exit_hooks = dict(_lifecycle._exit_hooks)
    fork_hooks = dict(_lifecycle._fork_hooks)
    with pytest.raises(ValueError, match="undeclared exit hook 'nope'"):
        _lifecycle.on_exit("nope", lambda: None)
    with pytest.raises(ValueError, match="undeclared fork hook 'nope'"):
        _lifecycle.on_fork_child("nope", lambda: None)
    with pytest.raises(ValueError):
        _lifecycle.on_fork_child("pool", lambda: None)  # an exit name only
    assert _lifecycle._exit_hooks == exit_hooks
    assert _lifecycle._fork_hooks == fork_hooks


def test_the_declared_orders() -> None:
    # Pools finish while the workers run; the supervisor stops them; shared
    # memory goes last. In a child: lowest layer first.
    assert _lifecycle.EXIT_ORDER == ("pool", "stream", "supervisor", "shm")
    assert _lifecycle.FORK_ORDER == ("wake", "shm", "supervisor", "metrics")


# -- in a fork child ----------------------------------------------------------------------


def test_fork_hooks_run_in_the_child_in_the_declared_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Hooks of this test only (the child runs nothing else of mpchan's).
    monkeypatch.setattr(_lifecycle, "FORK_ORDER", ("first", "second", "third"))
    monkeypatch.setattr(_lifecycle, "_fork_hooks", {})
    r, w = os.pipe()

    def hook(name: str) -> Callable[[], None]:
        def run() -> None:
            os.write(w, f"{name}\n".encode())
            if name == "second":
                raise RuntimeError("a failing fork hook")

        return run

    for name in ("third", "second", "first"):
        _lifecycle.on_fork_child(name, hook(name))
    pid = os.fork()
    if pid == 0:  # the child: report that it got here, and leave at once
        try:
            os.write(w, b"child\n")
        finally:
            os._exit(0)
    os.close(w)
    try:
        _, status = os.waitpid(pid, 0)
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
    finally:
        os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0
    assert b"".join(chunks).decode().split() == ["first", "second", "third", "child"]


# -- a user's program -------------------------------------------------------------------

USER_PROGRAM = """
    import json, os, sys, time
    import psutil
    import mpchan
    from mpchan import _shm, _supervisor

    def square(x):
        return x * x

    def send_back(ch, v):
        ch.send(v)

    def nap_and_print(seconds, text):
        time.sleep(seconds)
        print(text, flush=True)

    if __name__ == "__main__":
        _supervisor.set_supervisor(_supervisor.Supervisor(sys.argv[1]))
        ch = mpchan.Channel(4)
        mpchan.go(send_back, ch, 42).result(timeout=30)
        assert ch.recv(timeout=30) == 42
        pool = mpchan.Pool(2)  # never shut down: the program's exit does it
        assert list(pool.map(square, range(100))) == [x * x for x in range(100)]
        kids = [p.pid for p in psutil.Process().children(recursive=True)]
        print(json.dumps({"token": _shm.session_token(), "pids": kids}), flush=True)
        pool.submit(nap_and_print, 0.3, "finished at exit")  # the exit waits for it
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("method", METHODS)
def test_a_program_that_ends_normally_leaves_nothing(method: str) -> None:
    # What was submitted finishes (the pool's exit hook runs before the
    # supervisor's); then workers of go and of the pool, the reaper, a
    # forkserver: every process the program started is gone soon after it,
    # and so is its shared memory.
    proc = _run_program(USER_PROGRAM, method)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    first, *rest = proc.stdout.splitlines()
    assert rest == ["finished at exit"]
    info = json.loads(first)
    assert len(info["pids"]) >= 3  # two pool workers and a goroutine's worker at least
    assert wait_until(lambda: not any(_alive(p) for p in info["pids"]), 10), [
        p for p in info["pids"] if _alive(p)
    ]
    prefix = f"mpchan-{info['token']}-"
    assert wait_until(lambda: not [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)], 10)
