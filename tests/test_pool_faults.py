"""Fault injection: many submits, a few of which crash, raise or return the unpicklable.

A crash must fail (or retry) only the task that was running when its worker
died, and no task may run twice unless it is retried. Every task marks its
run with an ``O_EXCL`` file, so a second run of the same task is seen.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest

import mpchan
from mpchan import PicklingError, WorkerCrashed
from mpchan._pool import Pool

FAULTS = ("exit", "sigkill", "raise", "unpicklable")


class Boom(Exception):
    pass


def faulty(i: int, fault: str, marks: str) -> int:
    try:
        os.close(os.open(os.path.join(marks, str(i)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        os.close(os.open(os.path.join(marks, f"again-{i}"), os.O_CREAT | os.O_WRONLY))
    if fault == "exit":
        os._exit(3)
    if fault == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "raise":
        raise Boom(i)
    if fault == "unpicklable":
        return threading.Lock()  # type: ignore[return-value]
    return i * 2


def _plan(n: int, rate: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(FAULTS) if rng.random() < rate else "" for _ in range(n)]


def _run(tmp: Path, n: int, rate: float, seed: int) -> Counter[str]:
    """Submit ``n`` tasks, about ``rate`` of them faulty; return what went wrong."""
    plan = _plan(n, rate, seed)
    marks = tmp / f"marks-{seed}"
    marks.mkdir()
    wrong: Counter[str] = Counter()
    with Pool(2) as pool:
        futs = [pool.submit(faulty, i, fault, str(marks)) for i, fault in enumerate(plan)]
        for i, (fault, fut) in enumerate(zip(plan, futs, strict=True)):
            exc = fut.exception(timeout=120)
            if fault == "":
                if exc is not None or fut.result() != i * 2:
                    wrong[f"innocent failed: {type(exc).__name__}"] += 1
            elif fault == "raise":
                if not isinstance(exc, Boom):
                    wrong[f"raise gave {type(exc).__name__}"] += 1
            elif fault == "unpicklable":
                if not isinstance(exc, PicklingError):
                    wrong[f"unpicklable gave {type(exc).__name__}"] += 1
            elif not isinstance(exc, WorkerCrashed):
                wrong[f"{fault} gave {type(exc).__name__}"] += 1
        # After the storm the pool still works.
        assert pool.submit(faulty, n, "", str(marks)).result(timeout=60) == 2 * n
    again = [name for name in os.listdir(marks) if name.startswith("again-")]
    wrong["ran twice"] += len(again)
    ran = {int(name) for name in os.listdir(marks) if name.isdigit()}
    wrong["never ran"] += sum(1 for i in range(n) if i not in ran)
    return +wrong


@pytest.mark.timeout(240)
def test_crashes_fail_only_their_own_task_and_nothing_runs_twice(tmp_path: Path) -> None:
    wrong = _run(tmp_path, 1500, 0.03, seed=1)
    assert not wrong, dict(wrong)
    mpchan.shutdown()


@pytest.mark.stress
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_fault_injection_10000_tasks(tmp_path: Path, seed: int) -> None:
    wrong = _run(tmp_path, 10_000, 0.03, seed=seed)
    assert not wrong, dict(wrong)
    mpchan.shutdown()
