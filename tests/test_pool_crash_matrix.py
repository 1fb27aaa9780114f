"""Pool crash matrix: where a task fails x how x submit or map -> what the caller gets.

Extends ``test_pool_crash.py`` (a submit-only table of deaths in the worker)
after loky's crash tables (``ExecutorDeadlockTest`` in
``_test_process_executor.py``, ``TestExecutorDeadLock`` in
``test_reusable_executor.py``) with:

* where: also pickling the arguments in the parent;
* how: an ``Exception``, a ``BaseException`` raised (``SystemExit``,
  ``KeyboardInterrupt``), ``sys.exit``, ``os._exit``, SIGKILL of itself, a
  segfault;
* via: ``submit`` and ``map`` (the error reaches the iterating caller in
  input order, after the items before it);
* the initializer (and workers that die before they are ready), done
  callbacks that raise or submit, shutdown while tasks run or crash, and
  ``shutdown(wait=False)`` followed by the program's exit.

Unlike loky, where a dead worker breaks the executor, a failure here fails
only its own task and the pool goes on. Every cell checks the exact error
(type and a key phrase), that the innocent tasks beside it complete, that
the pool serves new work afterwards with every worker back, and that
nothing hangs (every wait has a timeout). Besides the suite's leak check,
``_no_stray_workers`` checks for worker processes started through the
forkserver, whose command line is the forkserver's own.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest

import mpchan
from mpchan._errors import (
    PicklingError,
    SerializationError,
    ShutdownError,
    UnpicklingError,
    WorkerCrashed,
)
from mpchan._pool import Pool

# Workers need not be able to import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

WAIT = 30
ROOT = Path(__file__).resolve().parent.parent

# -- ways to fail -------------------------------------------------------------------


class Boom(Exception):
    pass


RAISES: dict[str, tuple[type[BaseException], str]] = {
    # how -> (the exception the caller sees, a phrase of its message)
    "Exception": (Boom, "boom"),
    "SystemExit": (SystemExit, "boom"),
    "KeyboardInterrupt": (KeyboardInterrupt, "boom"),
    "sys.exit": (SystemExit, "7"),
}
DEATHS: dict[str, tuple[int, str | None, str]] = {
    # how -> (exitcode, signal name, a phrase of the WorkerCrashed message)
    "os._exit": (3, None, "exited with status 3"),
    "SIGKILL": (-9, "SIGKILL", "SIGKILL"),
    "segfault": (-11, "SIGSEGV", "SIGSEGV"),
}
HOWS = [*RAISES, *DEATHS]


def die(how: str) -> None:
    if how == "Exception":
        raise Boom("boom")
    if how == "SystemExit":
        raise SystemExit("boom")
    if how == "KeyboardInterrupt":
        raise KeyboardInterrupt("boom")
    if how == "sys.exit":
        sys.exit(7)
    if how == "os._exit":
        os._exit(3)
    if how == "SIGKILL":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(WAIT)  # the signal is on its way
    if how == "segfault":
        ctypes.string_at(0)
    raise AssertionError(how)


class DiesOnPickle:
    """Pickling it fails ``how`` (in the parent as an argument, in the worker as a result)."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self) -> tuple[Any, ...]:
        die(self.how)
        return (int, ())


class DiesOnUnpickle:
    """Unpickling it fails ``how`` (in the worker as an argument, in the parent as a result)."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self) -> tuple[Any, ...]:
        return (die, (self.how,))


class Order:
    """An item that makes ``work`` fail ``how`` at ``where`` (in the worker)."""

    def __init__(self, where: str, how: str) -> None:
        self.where = where
        self.how = how


def work(item: Any) -> Any:
    """The one task function of the matrix: squares ints, else obeys an Order."""
    if isinstance(item, Order):
        if item.where == "running":
            die(item.how)
        if item.where == "pickling result":
            return DiesOnPickle(item.how)
        if item.where == "unpickling result":
            return DiesOnUnpickle(item.how)
        raise AssertionError(item.where)
    return item * item


def bad_item(where: str, how: str) -> Any:
    """The argument that fails ``how`` at ``where``."""
    if where == "pickling args":
        return DiesOnPickle(how)
    if where == "unpickling args":
        return DiesOnUnpickle(how)
    return Order(where, how)


# Pickling the arguments and unpickling the result happen in the caller's own
# process: a death there is the test's own, so those cells are left out.
IN_CALLER = ("pickling args", "unpickling result")
WHERES = ["pickling args", "unpickling args", "running", "pickling result", "unpickling result"]
CELLS = [
    pytest.param(where, how, id=f"{where}-{how}")
    for where in WHERES
    for how in HOWS
    if not (where in IN_CALLER and how in DEATHS)
]
SERIAL: dict[str, tuple[type[SerializationError], str]] = {
    # where -> (the SerializationError subclass, a phrase of its message)
    "pickling args": (PicklingError, "cannot pickle"),
    "unpickling args": (UnpicklingError, "unpickling the task"),
    "pickling result": (PicklingError, "pickling the result"),
    "unpickling result": (UnpicklingError, "cannot unpickle the result"),
}


# -- helpers ------------------------------------------------------------------------


def caught(fn: Callable[[], Any]) -> BaseException | None:
    """Run ``fn``; return what it raised (KeyboardInterrupt and SystemExit
    included, so a wrong outcome fails the test rather than the session)."""
    try:
        fn()
    except BaseException as e:
        return e
    return None


def check(exc: BaseException | None, where: str, how: str) -> None:
    """``exc`` is exactly what a task failing ``how`` at ``where`` must give."""
    assert exc is not None, "the task did not fail"
    if how in DEATHS:
        code, sig, phrase = DEATHS[how]
        assert isinstance(exc, WorkerCrashed), repr(exc)
        assert isinstance(exc, BrokenProcessPool)
        assert (exc.exitcode, exc.signal) == (code, sig), repr(exc)
        assert exc.pid is not None
        assert phrase in str(exc), str(exc)
        if how == "segfault":
            assert exc.cause == "segmentation fault"
        return
    raised, message = RAISES[how]
    if where == "running":
        assert type(exc) is raised, repr(exc)
        assert message in str(exc), str(exc)
        assert any("pool worker" in n for n in getattr(exc, "__notes__", [])), exc
        assert exc.__cause__ is not None and "die" in str(exc.__cause__)  # remote traceback
        return
    cls, phrase = SERIAL[where]
    assert isinstance(exc, cls), repr(exc)
    assert isinstance(exc, SerializationError)
    pickle_cls = pickle.PicklingError if cls is PicklingError else pickle.UnpicklingError
    assert isinstance(exc, pickle_cls), repr(exc)
    assert phrase in str(exc), str(exc)
    assert raised.__name__ in str(exc) and message in str(exc), str(exc)
    assert isinstance(exc.__cause__, raised), repr(exc.__cause__)


def wait_until(pred: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not pred():
        assert time.monotonic() < deadline, f"not within {WAIT} s: {what}"
        time.sleep(0.01)


def still_serves(pool: Pool, workers: int = 2) -> None:
    """A later submit and map return the right results, with every worker back."""
    assert pool.submit(work, 6).result(timeout=WAIT) == 36
    assert list(pool.map(work, range(5), timeout=WAIT)) == [0, 1, 4, 9, 16]
    wait_until(lambda: len(pool.stats()["workers"]) == workers, "every worker back")
    assert not pool.stats()["broken"]


def _descendants() -> dict[tuple[int, float], psutil.Process]:
    # Every live descendant but the forkserver itself, mpchan's idle cache
    # and its infrastructure: a worker started through the forkserver has
    # the forkserver's command line, which the suite's leak check skips.
    idle = mpchan._idle_pids()
    found: dict[tuple[int, float], psutil.Process] = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() == psutil.STATUS_ZOMBIE or p.pid in idle:
                continue
            cmd = " ".join(p.cmdline())
            if p.ppid() == os.getpid() and "multiprocessing.forkserver" in cmd:
                continue
            if "resource_tracker" in cmd or "mpchan._reaper" in cmd:
                continue
            found[(p.pid, p.create_time())] = p
        except psutil.Error:
            continue
    return found


@pytest.fixture(autouse=True)
def _no_stray_workers() -> Iterator[None]:
    before = set(_descendants())
    yield
    deadline = time.monotonic() + 3
    while True:
        left = {k: p for k, p in _descendants().items() if k not in before}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for p in left.values():
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not left, f"worker processes left behind: {sorted(k[0] for k in left)}"


@pytest.fixture
def pool() -> Iterator[Pool]:
    with Pool(2) as p:
        yield p


# -- the matrix ---------------------------------------------------------------------


@pytest.mark.parametrize(("where", "how"), CELLS)
def test_submit(pool: Pool, where: str, how: str) -> None:
    """submit itself raises nothing: the error is that task's Future's alone,
    and the tasks submitted beside it complete."""
    before = [pool.submit(work, i) for i in range(3)]
    futs: list[Future[Any]] = []
    err = caught(lambda: futs.append(pool.submit(work, bad_item(where, how))))
    assert err is None, f"submit itself raised {err!r}: the error belongs to the Future"
    after = [pool.submit(work, i) for i in range(3, 6)]
    exc = futs[0].exception(timeout=WAIT)
    check(exc, where, how)
    assert caught(lambda: futs[0].result(timeout=0)) is exc  # result() raises it
    assert [f.result(timeout=WAIT) for f in before + after] == [i * i for i in range(6)]
    still_serves(pool)


@pytest.mark.parametrize(("where", "how"), CELLS)
def test_map(pool: Pool, where: str, how: str) -> None:
    """map: the call itself does not raise; iteration yields the items before
    the bad one, then raises its error (one item a chunk, in input order)."""
    items = [2, 3, bad_item(where, how), 5, 6]
    its: list[Iterator[Any]] = []
    err = caught(lambda: its.append(pool.map(work, items, chunksize=1, timeout=WAIT)))
    assert err is None, f"map() itself raised {err!r}: the error belongs to iteration"
    got: list[Any] = []

    def iterate() -> None:
        for value in its[0]:
            got.append(value)

    exc = caught(iterate)
    assert got == [4, 9]
    check(exc, where, how)
    still_serves(pool)


@pytest.mark.parametrize("how", ["Exception", "KeyboardInterrupt", "os._exit"])
def test_map_chunk_with_a_bad_item_fails_as_a_whole(pool: Pool, how: str) -> None:
    """A chunk whose arguments cannot be unpickled fails as one (no item of
    it is yielded); the chunks before it are yielded whole."""
    items = [*range(6), DiesOnUnpickle(how), *range(7, 12)]
    got: list[int] = []

    def iterate() -> None:
        for v in pool.map(work, items, chunksize=4, timeout=WAIT):
            got.append(v)

    exc = caught(iterate)
    assert got == [i * i for i in range(4)]  # the first chunk; the second holds the bad item
    check(exc, "unpickling args", how)
    still_serves(pool)


# -- many failures at once ------------------------------------------------------------


def test_many_pickling_failures_in_the_parent_do_not_clog_the_pool() -> None:
    """loky's queue-full deadlock test: a burst of tasks that fail to pickle,
    among good ones, at a pool of one worker."""
    with Pool(1) as pool:
        bad = [pool.submit(work, DiesOnPickle(h)) for h in RAISES for _ in range(25)]
        good = [pool.submit(work, i) for i in range(100)]
        for f in bad:
            assert isinstance(f.exception(timeout=WAIT), PicklingError)
        assert [f.result(timeout=WAIT) for f in good] == [i * i for i in range(100)]
        still_serves(pool, workers=1)


# -- the initializer --------------------------------------------------------------------


@pytest.mark.parametrize("how", HOWS)
def test_initializer_failure_breaks_the_pool(how: str) -> None:
    """An initializer that raises (any BaseException) or kills its worker
    breaks the pool: the waiting task and later work fail with
    WorkerCrashed, promptly, and shutdown does not hang."""
    with Pool(2, initializer=die, initargs=(how,)) as pool:
        exc = pool.submit(work, 2).exception(timeout=WAIT)
        assert isinstance(exc, WorkerCrashed), repr(exc)
        if how in RAISES:
            raised, message = RAISES[how]
            assert "initializer" in str(exc), str(exc)
            assert raised.__name__ in str(exc) and message in str(exc), str(exc)
            assert isinstance(exc.__cause__, raised), repr(exc.__cause__)
        else:
            code, sig, _ = DEATHS[how]
            # Workers died before they were ready: the last death is the cause.
            cause = exc.__cause__
            assert isinstance(cause, WorkerCrashed), repr(cause)
            assert (cause.exitcode, cause.signal) == (code, sig), repr(cause)
        wait_until(lambda: pool.stats()["broken"], "the pool is broken")
        with pytest.raises(WorkerCrashed):
            pool.submit(work, 3)
        with pytest.raises(WorkerCrashed):
            list(pool.map(work, range(3), timeout=WAIT))


BOOT_FAIL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    if __name__ == "__mp_main__":
        sys.exit(1)  # the main module fails to import in a worker: none gets ready
    sys.path.insert(0, {root!r})
    import mpchan
    from mpchan import _shm

    def segments():
        token = _shm.session_token()
        return {{n for n in os.listdir("/dev/shm") if token in n}}

    if __name__ == "__main__":
        before = segments()
        pool = mpchan.Pool(2)
        print(type(pool.submit(abs, -1).exception(timeout=30)).__name__, flush=True)
        try:
            pool.submit(abs, -2)
        except mpchan.WorkerCrashed:
            print("broken", flush=True)
        pool.shutdown()
        deadline = time.monotonic() + 5
        while segments() - before and time.monotonic() < deadline:
            time.sleep(0.05)
        print("segments left", len(segments() - before), flush=True)
    """
)


def test_workers_that_die_before_ready_break_the_pool_and_leave_nothing(tmp_path: Path) -> None:
    """Workers that die while they start (before their first task, here as
    the program's main module fails to import in them) break the pool after
    a few tries, like a failing initializer; once the pool is shut down,
    none of its segments is left while the program goes on."""
    script = tmp_path / "boot_fail.py"
    script.write_text(BOOT_FAIL_SCRIPT.format(root=str(ROOT)))
    proc = run_program(script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["WorkerCrashed", "broken", "segments left 0"], (
        proc.stdout
    )


# -- done callbacks ---------------------------------------------------------------------


@pytest.mark.parametrize("how", ["Exception", "SystemExit", "KeyboardInterrupt"])
def test_raising_done_callback_is_logged_and_the_pool_goes_on(
    pool: Pool, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A done callback (run by the pool's collector thread) that raises is
    logged through the concurrent.futures logger, as the standard library
    does; the callbacks after it run and the pool goes on."""
    caplog.set_level(logging.ERROR, logger="concurrent.futures")
    gate = mpchan.Channel()
    ran = threading.Event()
    fut = pool.submit(gated_square, 4, gate)
    fut.add_done_callback(lambda f: die(how))
    fut.add_done_callback(lambda f: ran.set())
    gate.send(None, timeout=WAIT)  # the task finishes only now: the collector runs the callbacks
    assert fut.result(timeout=WAIT) == 16
    assert ran.wait(WAIT)
    wait_until(lambda: _callback_logged(caplog, RAISES[how][0]), "the callback's error is logged")
    still_serves(pool)
    # The record's traceback reaches, through its frames' f_back, the
    # collector thread's frames, whose locals hold the pool's channels: a
    # kept record would keep their shared memory after the pool shut down.
    caplog.clear()


def test_raising_callback_on_a_done_future_is_logged_in_the_caller(
    pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="concurrent.futures")
    fut = pool.submit(work, 3)
    assert fut.result(timeout=WAIT) == 9
    fut.add_done_callback(lambda f: die("Exception"))  # runs here, now
    assert _callback_logged(caplog, Boom)
    still_serves(pool)
    caplog.clear()


def _callback_logged(caplog: pytest.LogCaptureFixture, exc_type: type[BaseException]) -> bool:
    return any(
        r.name == "concurrent.futures"
        and "exception calling callback" in r.getMessage()
        and r.exc_info is not None
        and r.exc_info[0] is exc_type
        for r in list(caplog.records)
    )


def gated_square(x: int, gate: mpchan.Channel) -> int:
    gate.recv(timeout=WAIT)
    return x * x


@pytest.mark.parametrize(
    ("where", "how"),
    [("running", "os._exit"), ("running", "SIGKILL"), ("pickling args", "SystemExit")],
)
def test_callback_that_submits_a_failing_task(pool: Pool, where: str, how: str) -> None:
    """loky's in-callback submit test: a callback (on the collector thread)
    submits a task that fails; that task gets its error, nothing else does."""
    box: list[Future[Any]] = []
    submitted = threading.Event()

    def resubmit(_: Future[Any]) -> None:
        box.append(pool.submit(work, bad_item(where, how)))
        submitted.set()

    gate = mpchan.Channel()
    first = pool.submit(gated_square, 5, gate)
    first.add_done_callback(resubmit)
    gate.send(None, timeout=WAIT)
    assert first.result(timeout=WAIT) == 25
    assert submitted.wait(WAIT)
    check(box[0].exception(timeout=WAIT), where, how)
    still_serves(pool)
    # An error raised on the collector thread has a traceback whose frames'
    # f_back reach the collector's, whose locals hold the pool's channels;
    # box <-> resubmit's frame is a cycle: let go of it now, not at a GC pass.
    box.clear()


# -- shutdown while tasks run or crash ------------------------------------------------------


def run_until_opened(started: mpchan.Channel, gate: mpchan.Channel, how: str | None) -> int:
    """Tell the test it runs, wait for the gate, then fail ``how`` (None: return our pid)."""
    started.send(os.getpid(), timeout=WAIT)
    gate.recv(timeout=WAIT)
    if how is not None:
        die(how)
    return os.getpid()


def _shutdown_within(pool: Pool, timeout: float, **kwargs: Any) -> None:
    t = threading.Thread(target=pool.shutdown, kwargs=kwargs, name="test-shutdown")
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"shutdown({kwargs}) hung for {timeout} s"


@pytest.mark.parametrize("cancel_futures", [False, True], ids=["finish-queued", "cancel-queued"])
@pytest.mark.parametrize("how", ["Exception", "os._exit", "SIGKILL", "segfault"])
def test_task_fails_while_the_pool_shuts_down(how: str, cancel_futures: bool) -> None:
    """A task that fails after shutdown began: it gets its error, the other
    running task its value; what was queued finishes (or, with
    cancel_futures, is cancelled); shutdown returns once every worker left."""
    pool = Pool(2)
    started, gate = mpchan.Channel(capacity=2), mpchan.Channel(capacity=2)
    victim = pool.submit(run_until_opened, started, gate, how)
    other = pool.submit(run_until_opened, started, gate, None)
    pids = {started.recv(timeout=WAIT), started.recv(timeout=WAIT)}  # both run now
    queued = [pool.submit(work, i) for i in range(4)]
    pool.shutdown(wait=False, cancel_futures=cancel_futures)
    with pytest.raises(ShutdownError):
        pool.submit(work, 1)
    gate.send(None, timeout=WAIT)
    gate.send(None, timeout=WAIT)
    _shutdown_within(pool, WAIT)
    check(victim.exception(timeout=0), "running", how)
    assert other.result(timeout=0) in pids
    if cancel_futures:
        assert all(f.cancelled() for f in queued)
    else:
        assert [f.result(timeout=0) for f in queued] == [0, 1, 4, 9]


def test_worker_killed_from_outside_then_shutdown() -> None:
    """loky's test_shutdown_deadlock: a worker is SIGKILLed by someone else
    just before shutdown(wait=True); shutdown returns, the task it ran fails
    with WorkerCrashed (SIGKILL), the other finishes."""
    pool = Pool(2)
    started, gate = mpchan.Channel(capacity=2), mpchan.Channel(capacity=2)
    a = pool.submit(run_until_opened, started, gate, None)
    b = pool.submit(run_until_opened, started, gate, None)
    first, second = started.recv(timeout=WAIT), started.recv(timeout=WAIT)
    os.kill(first, signal.SIGKILL)
    gate.send(None, timeout=WAIT)
    gate.send(None, timeout=WAIT)
    _shutdown_within(pool, WAIT)
    outcomes = {f.exception(timeout=0) is None: f for f in (a, b)}
    assert set(outcomes) == {True, False}
    exc = outcomes[False].exception(timeout=0)
    assert isinstance(exc, WorkerCrashed) and exc.signal == "SIGKILL" and exc.pid == first
    assert outcomes[True].result(timeout=0) == second


def test_shutdown_from_the_callback_of_a_crashed_task() -> None:
    """shutdown() called by a done callback of a task whose worker died (on
    the collector thread, which must not wait for itself): the pool stops,
    queued work still finishes, nothing hangs."""
    pool = Pool(2)
    started, gate = mpchan.Channel(capacity=1), mpchan.Channel(capacity=1)
    crashed = pool.submit(run_until_opened, started, gate, "os._exit")
    crashed.add_done_callback(lambda f: pool.shutdown())
    started.recv(timeout=WAIT)
    queued = [pool.submit(work, i) for i in range(4)]
    gate.send(None, timeout=WAIT)  # dies now: the callback runs on the collector thread
    check(crashed.exception(timeout=WAIT), "running", "os._exit")
    assert [f.result(timeout=WAIT) for f in queued] == [0, 1, 4, 9]
    _shutdown_within(pool, WAIT)
    with pytest.raises(ShutdownError):
        pool.submit(work, 1)


# -- shutdown(wait=False), then the program exits ----------------------------------------------

EXIT_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {root!r})
    import mpchan
    from mpchan import _shm

    def slow_print(msg):
        time.sleep(0.3)
        os.write(1, (msg + "\\n").encode())  # one write: lines of two workers do not mix
        return msg

    def crash():
        os._exit(3)

    def main():
        pool = mpchan.Pool(2)
        pool.submit(abs, -1).result(timeout=30)  # both workers up
        print(_shm.session_token(), *pool.stats()["workers"], flush=True)
        if sys.argv[1] == "crash":
            pool.submit(crash)
        pool.submit(slow_print, "apple")
        if sys.argv[1] == "queued":
            for i in range(6):  # more than the workers: most wait in the queue
                pool.submit(slow_print, f"queued {{i}}")
        pool.shutdown(wait=False)
        # returns at once; the program ends with the task still running

    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.parametrize("how", ["running", "crash", "queued"])
def test_shutdown_no_wait_then_exit(tmp_path: Path, how: str) -> None:
    """loky's test_hang_issue39205: shutdown(wait=False), then the program
    ends while a task runs (and, for "crash", another one's worker dies;
    for "queued", six more tasks wait for a worker): what was submitted
    finishes (its output is written) -- shutdown() finishes the queued tasks,
    as concurrent.futures does at exit --, the program exits with status 0
    and nothing on stderr, and no worker or segment is left."""
    script = tmp_path / "no_wait.py"
    script.write_text(EXIT_SCRIPT.format(root=str(ROOT)))
    proc = run_program(script, how)
    lines = proc.stdout.split("\n")
    token, pids = lines[0].split()[0], [int(p) for p in lines[0].split()[1:]]
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "apple" in lines[1:]
    if how == "queued":
        assert sorted(x for x in lines[1:] if x.startswith("queued")) == [
            f"queued {i}" for i in range(6)
        ], proc.stdout
    wait_until(lambda: not any(_alive(p) for p in pids), "the workers exit")
    wait_until(
        lambda: not [n for n in os.listdir("/dev/shm") if token in n], "the segments are gone"
    )


def run_program(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` as a program of its own: its own mpchan session (not
    this test process's), so its segments are its own to account for."""
    env = {k: v for k, v in os.environ.items() if k != "MPCHAN_SESSION"}
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=WAIT, env=env
    )


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
