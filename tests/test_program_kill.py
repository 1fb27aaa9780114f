"""A program dies holding busy workers, blocked goroutines, channels and contexts:
nothing of it may outlive it -- no process after 1 s, no shared-memory file.

The program (``scripts/program_kill.py``) prints every process it has and
its session token, then is killed with SIGKILL or SIGTERM, or dies of an
unhandled exception.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from scripts.procs import gone, start_json_program

from mpchan._compat import SHM_DIR

METHODS = ["spawn", "forkserver", "fork"]
SCRIPT = Path(__file__).parent / "scripts" / "program_kill.py"
ROOT = Path(__file__).resolve().parent.parent


def session_files(token: str) -> list[str]:
    return sorted(f for f in os.listdir(SHM_DIR) if f.startswith(f"mpchan-{token}-"))


def start_program(method: str, mode: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    return start_json_program(SCRIPT, method, mode, own_session=True)


def assert_nothing_left(info: dict[str, Any], died_at: float) -> None:
    # Every process of the program is gone 1 s after it died ...
    pids = info["pids"]
    while True:
        alive = [p for p in pids if not gone(p)]
        if not alive:
            break
        if time.monotonic() - died_at > 1.0:
            names = {p: _cmdline(p) for p in alive}
            pytest.fail(f"processes outlived their program by 1 s: {names}")
        time.sleep(0.01)
    # ... and every file of its session soon after (the reaper removes them).
    while session_files(info["token"]):
        if time.monotonic() - died_at > 3.0:
            pytest.fail(f"shared memory left behind: {session_files(info['token'])}")
        time.sleep(0.02)


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return "?"


def _cleanup(proc: subprocess.Popen[str], info: dict[str, Any] | None) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in info["pids"] if info else ():
        if not gone(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for name in session_files(info["token"]) if info else ():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, name))
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "exception"])
def test_nothing_outlives_a_dying_program(method: str, how: str) -> None:
    proc, info = start_program(method, "raise" if how == "exception" else "wait")
    try:
        assert len(info["workers"]) == 4
        assert set(info["workers"]) <= set(info["pids"])
        assert info["root"] == proc.pid
        assert session_files(info["token"]), "the program should hold shared memory"
        if how == "exception":
            proc.wait(timeout=30)
            died_at = time.monotonic()
            assert proc.returncode == 1
            assert proc.stderr is not None
            assert "the program dies of an unhandled exception" in proc.stderr.read()
        else:
            sig = getattr(signal, how)
            os.kill(proc.pid, sig)
            proc.wait(timeout=30)
            died_at = time.monotonic()
            assert proc.returncode == -sig
        assert_nothing_left(info, died_at)
    finally:
        _cleanup(proc, info)
