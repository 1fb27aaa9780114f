"""Pool crash table: where a task dies x how it dies -> what the caller sees.

Modelled on loky's ``tests/test_reusable_executor.py``: for every cell the
exact error reaches that task's future, innocent tasks running beside it
complete, the pool serves new work afterwards, and nothing hangs (every
wait has a timeout).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import cloudpickle
import pytest

from mpchan._errors import RemoteError, SerializationError, TaskTimeout, WorkerCrashed
from mpchan._pool import Pool

# Workers need not be able to import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

WAIT = 30


# -- ways to die ------------------------------------------------------------------


class ExitError(Exception):
    pass


def die(how: str) -> None:
    if how == "raise":
        raise ExitError("boom")
    if how == "sys.exit":
        sys.exit(7)
    if how == "os._exit":
        os._exit(3)
    if how == "SIGKILL":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)
    if how == "segfault":
        ctypes.string_at(0)
    raise AssertionError(how)


class DieOnUnpickle:
    """An object whose unpickling (in the worker, or in the parent) dies."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self) -> tuple[Any, ...]:
        return (die, (self.how,))


class DieOnPickle:
    """An object whose pickling (in the worker, as a result) dies."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self) -> tuple[Any, ...]:
        die(self.how)
        return (int, ())


def identity(x: Any) -> Any:
    return x


def return_dies_on_pickle(how: str) -> DieOnPickle:
    return DieOnPickle(how)


def return_dies_on_unpickle(how: str) -> DieOnUnpickle:
    return DieOnUnpickle(how)


def run_then(how: str) -> None:
    die(how)


def slow_square(x: int) -> int:
    time.sleep(0.05)
    return x * x


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


HOWS = ["raise", "sys.exit", "os._exit", "SIGKILL", "segfault"]
DEATHS = {"os._exit": (3, None), "SIGKILL": (-9, "SIGKILL"), "segfault": (-11, "SIGSEGV")}


@pytest.fixture
def pool() -> Iterator[Pool]:
    with Pool(2) as p:
        yield p


def _expect(fut: Future[Any], where: str, how: str) -> None:
    exc = fut.exception(timeout=WAIT)
    if how in DEATHS:
        code, sig = DEATHS[how]
        assert isinstance(exc, WorkerCrashed), repr(exc)
        assert exc.exitcode == code
        assert exc.signal == sig
        assert exc.pid is not None
        if sig is not None:
            assert sig in str(exc)
        if how == "segfault":
            assert exc.cause == "segmentation fault"
        return
    if where == "running":
        if how == "raise":
            assert isinstance(exc, ExitError)
            assert "boom" in str(exc)
            assert any("pool worker" in n for n in getattr(exc, "__notes__", []))
            assert exc.__cause__ is not None and "die" in str(exc.__cause__)
        else:
            assert isinstance(exc, SystemExit)
            assert exc.code == 7
        return
    # (un)pickling failed with an exception (not a death)
    assert isinstance(exc, SerializationError), repr(exc)
    assert exc.__cause__ is not None


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize(
    "where", ["unpickling args", "running", "pickling result", "unpickling result"]
)
def test_crash_table(pool: Pool, where: str, how: str) -> None:
    if where == "unpickling result" and how in DEATHS:
        pytest.skip("the result is unpickled in the caller's own process")
    innocents = [pool.submit(slow_square, i) for i in range(6)]
    if where == "unpickling args":
        fut = pool.submit(identity, DieOnUnpickle(how))
    elif where == "running":
        fut = pool.submit(run_then, how)
    elif where == "pickling result":
        fut = pool.submit(return_dies_on_pickle, how)
    else:
        fut = pool.submit(return_dies_on_unpickle, how)
    more = [pool.submit(slow_square, i) for i in range(6, 12)]
    _expect(fut, where, how)
    assert [f.result(timeout=WAIT) for f in innocents + more] == [i * i for i in range(12)]
    # still serving, with every worker back
    assert list(pool.map(slow_square, range(4), timeout=WAIT)) == [0, 1, 4, 9]
    deadline = time.monotonic() + WAIT
    while len(pool.stats()["workers"]) != 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def maybe_dies_on_unpickle(x: int) -> Any:
    return DieOnUnpickle("raise") if x == 7 else x


def test_map_result_that_cannot_be_unpickled_raises_in_order(pool: Pool) -> None:
    """A chunk's reply is unpickled by the iterating caller: the values before
    it are yielded, then SerializationError; the pool serves new work after."""
    got: list[int] = []
    with pytest.raises(SerializationError, match="cannot unpickle the result"):
        for v in pool.map(maybe_dies_on_unpickle, range(20), chunksize=3, timeout=WAIT):
            got.append(v)
    assert got == list(range(6))  # the chunks before the one holding item 7
    assert list(pool.map(identity, range(5), timeout=WAIT)) == list(range(5))


def test_unpicklable_argument_fails_that_task_only(pool: Pool) -> None:
    fut = pool.submit(identity, threading.Lock())  # cannot be pickled
    ok = pool.submit(identity, 5)
    exc = fut.exception(timeout=WAIT)
    assert isinstance(exc, SerializationError)
    assert exc.__cause__ is not None
    assert ok.result(timeout=WAIT) == 5


def make_unpicklable_error() -> None:
    class Local(Exception):
        def __reduce__(self) -> Any:
            raise TypeError("no")

    raise Local("local failure")


def test_unpicklable_exception_is_remote_error(pool: Pool) -> None:
    exc = pool.submit(make_unpicklable_error).exception(timeout=WAIT)
    assert isinstance(exc, RemoteError)
    assert "local failure" in str(exc)


def test_crash_in_map_raises_when_reached(pool: Pool) -> None:
    it = pool.map(run_then, ["os._exit"], timeout=WAIT)
    with pytest.raises(WorkerCrashed):
        next(it)
    assert list(pool.map(slow_square, range(3), timeout=WAIT)) == [0, 1, 4]


def die_once(marker: str) -> str:
    # Dies the first time (no marker file yet), succeeds when retried.
    if not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os._exit(9)
    return "second try"


def test_retries_rerun_a_crashed_task(tmp_path: Any) -> None:
    with Pool(1, retries=1) as p:
        assert p.submit(die_once, str(tmp_path / "m")).result(timeout=WAIT) == "second try"
        assert p.stats()["retried"] == 1
        exc = p.submit(run_then, "os._exit").exception(timeout=WAIT)
        assert isinstance(exc, WorkerCrashed)  # retried once, died again


def test_task_timeout_kills_and_replaces() -> None:
    with Pool(2, task_timeout=0.5) as p:
        slow = p.submit(sleep_for, 30)
        fast = [p.submit(slow_square, i) for i in range(10)]
        exc = slow.exception(timeout=WAIT)
        assert isinstance(exc, TaskTimeout)
        assert not isinstance(exc, TimeoutError)
        assert [f.result(timeout=WAIT) for f in fast] == [i * i for i in range(10)]
        assert p.submit(sleep_for, 0.01).result(timeout=WAIT) == 0.01
        assert p.stats()["timed_out"] == 1
