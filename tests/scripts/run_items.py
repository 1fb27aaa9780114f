"""Workloads for the ``mpchan run`` failure tests (``tests/test_cli_run.py``).

Item ``FAIL_AT`` (37) is the one that fails, each function its own way; the
others pass through as integers. With ``RUN_ITEMS_DIR`` set (the tests set
it), every call leaves a file there: ``worker-<pid>`` holding the mpchan
session token of the run (so the test can check afterwards that every
worker process and shared-memory segment of the run is gone) and
``call-<item>-<pid>-<n>`` (so it can count how often each item ran).
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
from pathlib import Path

FAIL_AT = 37

_calls = itertools.count()


def _note(x: int) -> Path | None:
    where = os.environ.get("RUN_ITEMS_DIR")
    if not where:
        return None
    d = Path(where)
    worker = d / f"worker-{os.getpid()}"
    if not worker.exists():
        worker.write_text(os.environ.get("MPCHAN_SESSION", "").partition(":")[0])
    (d / f"call-{x}-{os.getpid()}-{next(_calls)}").touch()
    return d


def ident(x: object) -> int:
    value = int(str(x))
    _note(value)
    return value


def _check(x: int) -> None:
    # a frame of the user's own below the function, for --traceback
    if x == FAIL_AT:
        raise ValueError(f"bad input: {x}")


def fails(x: object) -> int:
    value = ident(x)
    _check(value)
    return value


def killed(x: object) -> int:
    """Its worker dies (SIGKILL) at FAIL_AT, every time."""
    value = ident(x)
    if value == FAIL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    return value


def killed_once(x: object) -> int:
    """Its worker dies (SIGKILL) at FAIL_AT the first time only (a marker file
    in RUN_ITEMS_DIR remembers)."""
    value = ident(x)
    d = os.environ.get("RUN_ITEMS_DIR")
    if value == FAIL_AT and d is not None:
        marker = Path(d) / f"killed-{value}"
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
    return value


def unpicklable(x: object) -> object:
    value = ident(x)
    return threading.Lock() if value == FAIL_AT else value


def not_json(x: object) -> object:
    value = ident(x)
    return {value} if value == FAIL_AT else value


def echo(line: str) -> str:
    return line
