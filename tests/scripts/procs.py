"""Helpers of the process tests: a supervisor of their own, process facts."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from mpchan import _supervisor

ROOT = Path(__file__).resolve().parents[2]  # the repository


def wait_until(pred: Callable[[], bool], timeout: float = 30) -> bool:
    """Poll a condition that has no event to wait on (another process's death)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie counts: it runs no more)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@contextlib.contextmanager
def own_supervisor(*args: Any, **kwargs: Any) -> Iterator[_supervisor.Supervisor]:
    """A supervisor installed as the program's one, shut down (2 s) at the end."""
    supervisor = _supervisor.Supervisor(*args, **kwargs)
    previous = _supervisor.set_supervisor(supervisor)
    try:
        yield supervisor
    finally:
        supervisor.shutdown(timeout=2)
        _supervisor.set_supervisor(previous)


def start_json_program(
    script: Path, *args: str, own_session: bool = False, **popen: Any
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Run ``python script args...`` as a child program (the repository on
    its PYTHONPATH) and read the JSON line it prints first. ``own_session``:
    the program is a root of its own, not part of this test's session."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    if own_session:
        env.pop("MPCHAN_SESSION", None)
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **popen,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        assert proc.stderr is not None
        pytest.fail(f"{script.name} printed nothing; stderr:\n{proc.stderr.read()}")
    return proc, json.loads(line)
