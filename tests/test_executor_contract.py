"""The ``ProcessPoolExecutor`` contract, restated for ``mpchan.Pool``.

Each test restates, in its own code, a behaviour that CPython's
``Lib/test/test_concurrent_futures`` checks of ``ProcessPoolExecutor``; its
docstring names the CPython test (``Class.test_name``). Code written for
``ProcessPoolExecutor`` should keep working on ``mpchan.Pool``
(``max_workers`` is ``workers``, ``mp_context`` is ``start_method``,
``max_tasks_per_child`` is ``max_tasks_per_worker``).

Where mpchan differs on purpose, the test states what mpchan does:

- a task whose call or result cannot be pickled or unpickled fails alone,
  with :class:`mpchan.SerializationError` (on the pickling side also a
  :class:`pickle.PicklingError`), where ``ProcessPoolExecutor`` may break;
- a worker that dies fails only the task it was running, with
  :class:`mpchan.WorkerCrashed` (a ``BrokenProcessPool``), and is replaced;
  ``ProcessPoolExecutor`` breaks and fails everything.

CPython's tests that look at internals (``_processes``,
``_executor_manager_thread``, ...) are restated through public means: the
pids in ``pool.stats()`` or reported by tasks, and psutil.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import logging
import logging.handlers
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures import BrokenExecutor, CancelledError, Future, InvalidStateError
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import psutil
import pytest
from scripts.procs import wait_until

import mpchan
from mpchan import SerializationError, WorkerCrashed

WAIT = 30
METHODS = ["forkserver", "spawn", "fork"]
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


# -- tasks (module level: workers import this module, functions go by reference) --

INITIALIZER_STATUS = "uninitialized"


def mul(x: int, y: int) -> int:
    return x * y


def capture(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def init(x: str) -> None:
    global INITIALIZER_STATUS
    INITIALIZER_STATUS = x


def get_init_status() -> str:
    return INITIALIZER_STATUS


def init_fail() -> None:
    raise ValueError("error in initializer")


def init_log_to(log_queue: Any) -> None:
    logger = logging.getLogger("mpchan.test.executor_contract.child")
    logger.addHandler(logging.handlers.QueueHandler(log_queue))
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.info("initialized in %d", os.getpid())


def raise_runtime_error() -> None:
    raise RuntimeError(123)  # the remote line


def raise_os_error() -> None:
    raise OSError("remote failure")


def exit_one() -> None:
    sys.exit(1)


def segfault(*_: Any) -> None:
    ctypes.string_at(0)


def block_on(gate: mpchan.Channel, value: Any = "released") -> Any:
    gate.recv(timeout=WAIT)
    return value


def sleep_or_block(seconds: float | None, gate: mpchan.Channel) -> None:
    if seconds is None:
        gate.recv(timeout=WAIT)
    else:
        time.sleep(seconds)


def announce_then_block(started: mpchan.Channel, gate: mpchan.Channel, value: Any = None) -> Any:
    started.send(os.getpid(), timeout=WAIT)
    gate.recv(timeout=WAIT)
    return value


def announce_then_crash(started: mpchan.Channel, gate: mpchan.Channel) -> None:
    announce_then_block(started, gate)
    segfault()


def sleep_and_print(seconds: float, msg: str) -> None:
    time.sleep(seconds)
    print(msg, flush=True)


class MyObject:
    def my_method(self) -> None:
        pass


def make_dummy_object(_: Any) -> MyObject:
    return MyObject()


class GcSignal:
    """Sends the pid of the process that drops it (the worker, for a task argument)."""

    def __init__(self, ch: mpchan.Channel) -> None:
        self.ch = ch

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.ch.send_nowait(os.getpid())


def return_instance(cls: type) -> Any:
    return cls()


def _raise(exc: BaseException) -> None:
    raise exc


class ErrorAtPickle:
    def __reduce__(self) -> Any:
        raise pickle.PicklingError("cannot pickle this on purpose")


class ErrorAtUnpickle:
    def __reduce__(self) -> Any:
        return _raise, (pickle.UnpicklingError("cannot unpickle this on purpose"),)


class ExitAtPickle:
    def __reduce__(self) -> Any:
        sys.exit(1)


class ExitAtUnpickle:
    def __reduce__(self) -> Any:
        return sys.exit, (1,)


class CrashAtPickle:
    def __reduce__(self) -> Any:
        segfault()
        return int, ()


class CrashAtUnpickle:
    def __reduce__(self) -> Any:
        return segfault, ()


# -- helpers ---------------------------------------------------------------------


def cancelled_future(notified: bool) -> Future[Any]:
    f: Future[Any] = Future()
    f.cancel()
    if notified:
        f.set_running_or_notify_cancel()  # CANCELLED -> CANCELLED_AND_NOTIFIED
    return f


def finished_future(result: Any = None, exc: BaseException | None = None) -> Future[Any]:
    f: Future[Any] = Future()
    if exc is not None:
        f.set_exception(exc)
    else:
        f.set_result(result)
    return f


def alive(pid: int) -> bool:
    # Never waits on the process: a wait would reap the supervisor's child.
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def worker_pids(pool: mpchan.Pool) -> set[int]:
    return set(pool.stats()["workers"])


def prime(pool: mpchan.Pool) -> None:
    """Have every worker run a task of this module (started and ready), so a
    timing assertion does not count their start-up."""
    n = pool.workers
    started, gate = mpchan.Channel(n), mpchan.Channel(n)
    fs = [pool.submit(announce_then_block, started, gate) for _ in range(n)]
    for _ in range(n):
        started.recv(timeout=WAIT)
    for _ in range(n):
        gate.send(None, timeout=WAIT)
    for f in fs:
        f.result(timeout=WAIT)


def run_script(code: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS), str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=env,
        cwd=str(tmp_path),
    )


@pytest.fixture
def pool() -> Iterator[mpchan.Pool]:
    with mpchan.Pool(2) as p:
        yield p


@pytest.fixture
def pool1() -> Iterator[mpchan.Pool]:
    with mpchan.Pool(1) as p:
        yield p


@contextlib.contextmanager
def gated() -> Iterator[mpchan.Channel]:
    """A channel tasks block on until the test sends to it. Whatever still
    waits on it when the block ends is released, so the pool can shut down.
    (Made in the test, not in a fixture: pytest holds a fixture's value past
    the leak check, which would see the channel's segment as leaked.)"""
    gate = mpchan.Channel(64)
    try:
        yield gate
    finally:
        with contextlib.suppress(mpchan.WouldBlock):
            while True:
                gate.send_nowait(None)


# -- submit and map -----------------------------------------------------------------


def test_submit_runs_the_call_in_a_worker(pool: mpchan.Pool) -> None:
    """CPython: ExecutorTest.test_submit."""
    assert pool.submit(pow, 2, 8).result(timeout=WAIT) == 256
    assert pool.submit(os.getpid).result(timeout=WAIT) != os.getpid()


def test_submit_passes_keyword_arguments_through(pool: mpchan.Pool) -> None:
    """CPython: ExecutorTest.test_submit_keyword."""
    assert pool.submit(mul, 2, y=8).result(timeout=WAIT) == 16
    # "self" and "fn" are plain keyword arguments of the call, not of submit.
    assert pool.submit(capture, 1, self=2, fn=3).result(timeout=WAIT) == (
        (1,),
        {"self": 2, "fn": 3},
    )
    with pytest.raises(TypeError):
        pool.submit(fn=capture, arg=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        pool.submit(arg=1)  # type: ignore[call-arg]


@pytest.mark.parametrize("chunksize", [None, 1, 3, 6, 40, 50])
def test_map_matches_builtin_map(pool: mpchan.Pool, chunksize: int | None) -> None:
    """CPython: ExecutorTest.test_map, ProcessPoolExecutorTest.test_map_chunksize."""
    got = list(pool.map(pow, range(40), range(40), chunksize=chunksize, timeout=WAIT))
    assert got == list(map(pow, range(40), range(40)))
    # Several iterables stop at the shortest, as zip does.
    assert list(pool.map(mul, range(10), range(3), chunksize=chunksize, timeout=WAIT)) == [0, 1, 4]


@pytest.mark.parametrize("chunksize", [0, -1])
def test_map_refuses_a_chunksize_below_one(pool: mpchan.Pool, chunksize: int) -> None:
    """CPython: ProcessPoolExecutorTest.test_map_chunksize (chunksize=-1)."""
    with pytest.raises(ValueError):
        list(pool.map(pow, range(40), range(40), chunksize=chunksize))


def test_map_raises_a_task_exception_at_its_position(pool: mpchan.Pool) -> None:
    """CPython: ExecutorTest.test_map_exception."""
    it = pool.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5], timeout=WAIT)
    assert next(it) == (0, 1)
    assert next(it) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(it)


def test_map_timeout_raises_after_the_results_that_came_in_time(pool: mpchan.Pool) -> None:
    """CPython: ExecutorTest.test_map_timeout (the last call never finishes in time)."""
    with gated() as gate:
        prime(pool)
        results = []
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            for r in pool.map(sleep_or_block, [0, 0, None], itertools.repeat(gate), timeout=1.0):
                results.append(r)
        assert results == [None, None]
        assert time.monotonic() - started < WAIT
        assert issubclass(futures.TimeoutError, TimeoutError)


def test_map_keeps_no_reference_to_yielded_results(pool: mpchan.Pool) -> None:
    """CPython: ExecutorTest.test_free_reference."""
    for obj in pool.map(make_dummy_object, range(10), timeout=WAIT):
        watch = weakref.ref(obj)
        del obj
        gc.collect()
        assert watch() is None


def test_shutdown_with_an_unread_map(pool: mpchan.Pool) -> None:
    """CPython: ExecutorTest.test_shutdown_race_issue12456 (a map never iterated,
    then shutdown: must not hang)."""
    pool.map(str, [2] * (pool.workers + 1))
    pool.shutdown()


def test_a_discarded_future_keeps_its_callable_alive_no_longer(pool: mpchan.Pool) -> None:
    """CPython: ExecutorTest.test_no_stale_references."""
    obj = MyObject()
    collected = threading.Event()
    watch = weakref.ref(obj, lambda _: collected.set())
    pool.submit(obj.my_method)  # the future is dropped at once
    del obj
    assert collected.wait(WAIT), "the pool still holds the task's callable"
    assert watch() is None


def test_workers_must_be_positive() -> None:
    """CPython: ExecutorTest.test_max_workers_negative (mpchan names the
    argument ``workers``)."""
    for number in (0, -1):
        with pytest.raises(ValueError, match="workers must be"):
            mpchan.Pool(number)


def test_remote_exception_keeps_its_type_and_remote_traceback(
    pool: mpchan.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    """CPython: ProcessPoolExecutorTest.test_traceback."""
    with pytest.raises(RuntimeError) as info:
        pool.submit(raise_runtime_error).result(timeout=WAIT)
    exc = info.value
    assert type(exc) is RuntimeError
    assert exc.args == (123,)
    assert "raise RuntimeError(123)  # the remote line" in str(exc.__cause__)
    assert any("raise_runtime_error" in note for note in getattr(exc, "__notes__", []))
    try:
        raise exc
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
    assert "raise RuntimeError(123)  # the remote line" in capsys.readouterr().err


def test_task_arguments_are_freed_in_the_worker(pool: mpchan.Pool) -> None:
    """CPython: ProcessPoolExecutorTest.test_ressources_gced_in_workers."""
    ch = mpchan.Channel(4)
    obj = GcSignal(ch)
    assert isinstance(pool.submit(id, obj).result(timeout=WAIT), int)
    # The worker's copy is dropped after the call: its __del__ reports its pid.
    assert ch.recv(timeout=10) != os.getpid()
    del obj


# -- shutdown -----------------------------------------------------------------------


def test_submit_after_shutdown_raises_runtime_error(pool: mpchan.Pool) -> None:
    """CPython: ExecutorShutdownTest.test_run_after_shutdown."""
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(pow, 2, 5)
    with pytest.raises(RuntimeError):
        pool.map(abs, [1])


def test_shutdown_is_idempotent(pool: mpchan.Pool) -> None:
    """CPython: every ExecutorMixin.tearDown shuts down a pool the test may
    have shut down already (e.g. ExecutorShutdownTest.test_hang_issue12364)."""
    assert pool.submit(mul, 6, 7).result(timeout=WAIT) == 42
    pool.shutdown()
    pool.shutdown(wait=False)
    pool.shutdown(wait=True, cancel_futures=True)


def test_shutdown_waits_for_everything_submitted() -> None:
    """CPython: ExecutorShutdownTest.test_hang_issue12364."""
    p = mpchan.Pool(2)
    fs = [p.submit(time.sleep, 0.01) for _ in range(50)]
    p.shutdown()
    assert all(f.done() for f in fs)
    assert [f.result(timeout=0) for f in fs] == [None] * 50


@pytest.mark.parametrize("method", METHODS)
def test_leaving_the_with_block_waits_for_the_workers_to_exit(method: str) -> None:
    """CPython: ProcessPoolShutdownTest.test_context_manager_shutdown and
    test_processes_terminate (which join ``executor._processes``)."""
    with mpchan.Pool(3, start_method=method) as p:
        pids = worker_pids(p)
        assert len(pids) == 3
        assert list(p.map(abs, range(-5, 5), timeout=WAIT)) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    assert not [pid for pid in pids if alive(pid)], "workers outlived shutdown(wait=True)"
    with pytest.raises(RuntimeError):
        p.submit(abs, 1)


def test_shutdown_without_wait_returns_and_the_work_still_completes() -> None:
    """CPython: ProcessPoolShutdownTest.test_shutdown_no_wait (with futures; a
    map is the next test)."""
    p = mpchan.Pool(2)
    pids = worker_pids(p)
    fs = [p.submit(abs, v) for v in range(-5, 5)]
    p.shutdown(wait=False)
    assert [f.result(timeout=WAIT) for f in fs] == [abs(v) for v in range(-5, 5)]
    assert wait_until(lambda: not any(alive(pid) for pid in pids)), "workers did not exit"
    p.shutdown(wait=True)  # idempotent; returns once the pool's threads are done


@pytest.mark.parametrize("how", ["shutdown(wait=False)", "with-block", "dropped"])
def test_a_map_made_before_shutdown_yields_every_result(how: str) -> None:
    """CPython: ProcessPoolShutdownTest.test_shutdown_no_wait and test_del_shutdown:
    the results of a map made before the pool shut down (or was dropped) are
    all read after it. (``Executor.map`` takes its whole input at the call;
    mpchan's is read lazily, but a map made before shutdown is work that was
    submitted.)"""
    items = range(-50, 50)
    if how == "with-block":
        with mpchan.Pool(2) as p:
            res = p.map(abs, items, timeout=WAIT)
    else:
        p = mpchan.Pool(2)
        res = p.map(abs, items, timeout=WAIT)
        if how == "dropped":
            del p
            gc.collect()
        else:
            p.shutdown(wait=False)
    assert list(res) == [abs(v) for v in items]


def test_shutdown_cancel_futures_cancels_what_did_not_start() -> None:
    """CPython: ExecutorShutdownTest.test_cancel_futures."""
    p = mpchan.Pool(2)
    fs = [p.submit(time.sleep, 0.05) for _ in range(50)]
    p.shutdown(cancel_futures=True)
    cancelled = [f for f in fs if f.cancelled()]
    others = [f for f in fs if not f.cancelled()]
    assert len(cancelled) > 20
    assert others, "the tasks already running finish"
    for f in others:
        assert f.done()
        assert f.exception(timeout=0) is None


@pytest.mark.timeout(20)
def test_shutdown_right_after_a_cancel_does_not_hang() -> None:
    """CPython: ExecutorShutdownTest.test_hang_gh94440."""
    p = mpchan.Pool(1)
    assert p.submit(int).result(timeout=WAIT) == 0
    p.submit(int).cancel()
    p.shutdown(wait=True)


def test_a_pool_dropped_without_shutdown_is_shut_down() -> None:
    """CPython: ProcessPoolShutdownTest.test_del_shutdown. A submitted task
    still finishes. (A running map iterator keeps its pool alive in mpchan: it
    submits its input lazily; CPython's map submits everything at once.)"""
    p = mpchan.Pool(2)
    pids = worker_pids(p)
    fs = [p.submit(abs, v) for v in range(-5, 5)]
    res = p.map(abs, range(-5, 5), timeout=WAIT)
    watch = weakref.ref(p)
    del p
    assert list(res) == [abs(v) for v in range(-5, 5)]
    del res
    gc.collect()
    assert watch() is None, "something still holds the pool"
    assert [f.result(timeout=WAIT) for f in fs] == [abs(v) for v in range(-5, 5)]
    assert wait_until(lambda: not any(alive(pid) for pid in pids)), "workers did not exit"
    assert wait_until(
        lambda: not [t for t in threading.enumerate() if t.name.startswith("mpchan-pool")]
    ), "the dropped pool's threads are still running"


EXIT_WITH_WORK = """
    import mpchan
    from test_executor_contract import sleep_and_print

    if __name__ == "__main__":
        pool = mpchan.Pool(5, start_method={method!r})
        pool.submit(sleep_and_print, 0.3, "apple")
"""


@pytest.mark.parametrize("method", METHODS)
def test_program_exit_finishes_submitted_work_quietly(tmp_path: Path, method: str) -> None:
    """CPython: ExecutorShutdownTest.test_interpreter_shutdown (the program ends
    without shutting its pool down)."""
    proc = run_script(EXIT_WITH_WORK.format(method=method), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.strip() == "apple"


SUBMIT_AT_EXIT = """
    import atexit

    @atexit.register
    def run_last():
        try:
            pool.submit(id, None)
        except RuntimeError:
            print("runtime-error")
            raise

    import mpchan

    if __name__ == "__main__":
        pool = mpchan.Pool(5)
        pool.submit(id, 42).result(timeout=30)
"""


def test_submit_in_an_exit_hook_after_the_pools_shut_down(tmp_path: Path) -> None:
    """CPython: ExecutorShutdownTest.test_submit_after_interpreter_shutdown (an
    atexit hook registered before the import runs after the pools shut down;
    mpchan's message differs from CPython's "cannot schedule new futures")."""
    proc = run_script(SUBMIT_AT_EXIT, tmp_path)
    assert proc.stdout.strip() == "runtime-error"
    assert "ShutdownError" in proc.stderr


# -- initializer ----------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_initializer_runs_in_every_worker(method: str) -> None:
    """CPython: InitializerMixin.test_initializer."""
    with mpchan.Pool(2, start_method=method, initializer=init, initargs=("initialized",)) as p:
        fs = [p.submit(get_init_status) for _ in range(4)]
        assert [f.result(timeout=WAIT) for f in fs] == ["initialized"] * 4
    assert INITIALIZER_STATUS == "uninitialized"  # it ran in the workers only


@pytest.mark.parametrize("method", METHODS)
def test_failing_initializer_breaks_the_pool(method: str) -> None:
    """CPython: FailingInitializerMixin.test_initializer (mpchan carries the
    initializer's error as the cause rather than logging it in the worker)."""
    with mpchan.Pool(2, start_method=method, initializer=init_fail) as p:
        try:
            fut = p.submit(get_init_status)
        except BrokenExecutor:
            pass  # already broken
        else:
            exc = fut.exception(timeout=WAIT)
            assert isinstance(exc, BrokenProcessPool), repr(exc)
            chain = [exc, exc.__cause__, getattr(exc.__cause__, "__cause__", None)]
            assert any(
                isinstance(e, ValueError) and "error in initializer" in str(e) for e in chain
            ) or "error in initializer" in str(exc)
        # ... and from this point on, submit fails.
        with pytest.raises(BrokenExecutor):
            p.submit(get_init_status)


@pytest.mark.parametrize("method", METHODS)
def test_initargs_may_carry_a_multiprocessing_queue(method: str) -> None:
    """CPython: FailingInitializerMixin.setUp (the workers' logging is sent
    back through a ``multiprocessing`` Queue given in initargs)."""
    log_queue = multiprocessing.get_context(method).Queue()
    try:
        with mpchan.Pool(
            2, start_method=method, initializer=init_log_to, initargs=(log_queue,)
        ) as p:
            pids = worker_pids(p)
            assert p.submit(mul, 6, 7).result(timeout=WAIT) == 42
        messages = sorted(log_queue.get(timeout=WAIT).getMessage() for _ in pids)
        assert messages == sorted(f"initialized in {pid}" for pid in pids)
    finally:
        log_queue.close()
        log_queue.join_thread()


# -- wait and as_completed ------------------------------------------------------------


def test_wait_first_completed(pool: mpchan.Pool) -> None:
    """CPython: WaitTests.test_first_completed."""
    with gated() as gate:
        cancelled = cancelled_future(notified=False)
        future1 = pool.submit(mul, 21, 2)
        future2 = pool.submit(block_on, gate)
        done, not_done = futures.wait(
            [cancelled, future1, future2], timeout=WAIT, return_when=futures.FIRST_COMPLETED
        )
        assert done == {future1}
        assert not_done == {cancelled, future2}


def test_wait_first_completed_some_already_completed(pool: mpchan.Pool) -> None:
    """CPython: WaitTests.test_first_completed_some_already_completed."""
    with gated() as gate:
        cancelled, succeeded = cancelled_future(notified=True), finished_future(42)
        future1 = pool.submit(block_on, gate)
        finished, pending = futures.wait(
            [cancelled, succeeded, future1], timeout=WAIT, return_when=futures.FIRST_COMPLETED
        )
        assert finished == {cancelled, succeeded}
        assert pending == {future1}


def test_wait_first_exception(pool: mpchan.Pool) -> None:
    """CPython: WaitTests.test_first_exception."""
    with gated() as gate:
        future1 = pool.submit(mul, 2, 21)
        assert future1.result(timeout=WAIT) == 42
        future2 = pool.submit(raise_os_error)
        future3 = pool.submit(block_on, gate)
        finished, pending = futures.wait(
            [future1, future2, future3], timeout=WAIT, return_when=futures.FIRST_EXCEPTION
        )
        assert finished == {future1, future2}
        assert pending == {future3}


def test_wait_first_exception_some_already_complete(pool: mpchan.Pool) -> None:
    """CPython: WaitTests.test_first_exception_some_already_complete."""
    with gated() as gate:
        succeeded = finished_future(42)
        cancelled, notified = cancelled_future(notified=False), cancelled_future(notified=True)
        future1 = pool.submit(divmod, 21, 0)
        future2 = pool.submit(block_on, gate)
        finished, pending = futures.wait(
            [succeeded, cancelled, notified, future1, future2],
            timeout=WAIT,
            return_when=futures.FIRST_EXCEPTION,
        )
        assert finished == {succeeded, notified, future1}
        assert pending == {cancelled, future2}


def test_wait_first_exception_one_already_failed(pool: mpchan.Pool) -> None:
    """CPython: WaitTests.test_first_exception_one_already_failed."""
    with gated() as gate:
        failed = finished_future(exc=OSError())
        future1 = pool.submit(block_on, gate)
        finished, pending = futures.wait(
            [failed, future1], timeout=WAIT, return_when=futures.FIRST_EXCEPTION
        )
        assert finished == {failed}
        assert pending == {future1}


def test_wait_all_completed(pool: mpchan.Pool) -> None:
    """CPython: WaitTests.test_all_completed."""
    others = [finished_future(42), cancelled_future(notified=True), finished_future(exc=OSError())]
    future1 = pool.submit(divmod, 2, 0)
    future2 = pool.submit(mul, 2, 21)
    finished, pending = futures.wait(
        [*others, future1, future2], timeout=WAIT, return_when=futures.ALL_COMPLETED
    )
    assert finished == {*others, future1, future2}
    assert pending == set()
    assert isinstance(future1.exception(), ZeroDivisionError)


def test_wait_timeout(pool: mpchan.Pool) -> None:
    """CPython: WaitTests.test_timeout."""
    with gated() as gate:
        others = [
            cancelled_future(notified=True),
            finished_future(exc=OSError()),
            finished_future(42),
        ]
        future = pool.submit(block_on, gate)
        finished, pending = futures.wait(
            [*others, future], timeout=0.05, return_when=futures.ALL_COMPLETED
        )
        assert finished == set(others)
        assert pending == {future}


def test_wait_with_the_same_future_twice(pool: mpchan.Pool) -> None:
    """CPython: WaitTests.test_20369."""
    future = pool.submit(mul, 3, 4)
    done, not_done = futures.wait([future, future], timeout=WAIT)
    assert done == {future}
    assert not_done == set()


def test_as_completed_yields_every_finished_future(pool: mpchan.Pool) -> None:
    """CPython: AsCompletedTests.test_no_timeout."""
    others = [cancelled_future(notified=True), finished_future(exc=OSError()), finished_future(42)]
    future1 = pool.submit(mul, 2, 21)
    future2 = pool.submit(mul, 7, 6)
    completed = set(futures.as_completed([*others, future1, future2], timeout=WAIT))
    assert completed == {*others, future1, future2}


@pytest.mark.parametrize("timeout", [0, 0.1])
def test_as_completed_times_out_before_an_unfinished_future(
    pool: mpchan.Pool, timeout: float
) -> None:
    """CPython: AsCompletedTests.test_future_times_out."""
    with gated() as gate:
        already = {
            cancelled_future(notified=True),
            finished_future(exc=OSError()),
            finished_future(42),
        }
        future = pool.submit(block_on, gate)
        seen = set()
        with pytest.raises(TimeoutError):
            for f in futures.as_completed(already | {future}, timeout=timeout):
                seen.add(f)
        assert seen == already


def test_as_completed_with_the_same_future_three_times(pool: mpchan.Pool) -> None:
    """CPython: AsCompletedTests.test_duplicate_futures (any iterable)."""
    future1 = pool.submit(mul, 2, 3)
    assert list(futures.as_completed(itertools.repeat(future1, 3), timeout=WAIT)) == [future1]


def test_as_completed_timeout_names_the_unfinished_count(pool: mpchan.Pool) -> None:
    """CPython: AsCompletedTests.test_correct_timeout_exception_msg."""
    with gated() as gate:
        running = pool.submit(block_on, gate)
        pending: Future[Any] = Future()
        fs = [cancelled_future(notified=True), pending, running, finished_future(42)]
        with pytest.raises(TimeoutError, match=r"^2 \(of 4\) futures unfinished$"):
            list(futures.as_completed(fs, timeout=0))


# -- future states and callbacks ----------------------------------------------------


def test_future_states_over_a_task_life(pool1: mpchan.Pool) -> None:
    """CPython: FutureTests.test_cancel, test_cancelled, test_done, test_running,
    test_result_with_cancel, on the futures of a pool."""
    with gated() as gate:
        started = mpchan.Channel(1)
        running = pool1.submit(announce_then_block, started, gate, "ran")
        queued = pool1.submit(mul, 2, 3)
        started.recv(timeout=WAIT)
        assert running.running() and not running.done() and not running.cancelled()
        assert not running.cancel(), "a running task cannot be cancelled"
        assert not queued.running() and not queued.done()
        assert queued.cancel()
        assert queued.cancelled() and queued.done() and not queued.running()
        assert queued.cancel(), "cancelling again still says it is cancelled"
        with pytest.raises(CancelledError):
            queued.result(timeout=0)
        with pytest.raises(CancelledError):
            queued.exception(timeout=0)
        gate.send(None, timeout=WAIT)
        assert running.result(timeout=WAIT) == "ran"
        assert running.done() and not running.running() and not running.cancelled()
        assert not running.cancel()


def test_result_and_exception_with_a_timeout(pool: mpchan.Pool) -> None:
    """CPython: FutureTests.test_result_with_timeout, test_exception_with_timeout,
    test_result_with_success, test_exception_with_success."""
    with gated() as gate:
        blocked = pool.submit(block_on, gate)
        with pytest.raises(TimeoutError):
            blocked.result(timeout=0.05)
        with pytest.raises(futures.TimeoutError):
            blocked.exception(timeout=0.05)
        gate.send(None, timeout=WAIT)
        assert blocked.result(timeout=WAIT) == "released"
        assert blocked.exception(timeout=WAIT) is None
        failing = pool.submit(raise_os_error)
        assert isinstance(failing.exception(timeout=WAIT), OSError)
        with pytest.raises(OSError, match="remote failure"):
            failing.result(timeout=WAIT)
        # The raised exception's traceback holds this frame (and the gate):
        # dropping the future that holds the exception lets them go at once,
        # as with concurrent.futures.Future (see the next test).
        del failing


class Marker:
    """A local of the frame that reads a failed result."""


def _read_failed_result(fut: Future[Any], marker: Marker) -> None:
    # The traceback of what result() raises holds this frame: it must not
    # hold the future too (that cycle would be the caller's own).
    with contextlib.suppress(OSError):
        fut.result(timeout=WAIT)
    del fut


def test_a_raised_result_leaves_no_reference_cycle(pool: mpchan.Pool) -> None:
    """CPython: no test of its own; ``Future.result`` breaks the cycle
    future -> exception -> traceback -> ``result`` frame -> future (``self =
    None``), so dropping the future frees the frames of whoever read it
    without a garbage collection (test_result_and_exception_with_a_timeout
    and every test's leak check rely on it)."""
    fut = pool.submit(raise_os_error)
    marker = Marker()
    watch = weakref.ref(marker)
    gc.disable()
    try:
        _read_failed_result(fut, marker)
        del marker, fut
        assert watch() is None, "the failed future is kept alive by a reference cycle"
    finally:
        gc.enable()


def test_done_callbacks_see_the_outcome(pool1: mpchan.Pool) -> None:
    """CPython: FutureTests.test_done_callback_with_result,
    test_done_callback_with_exception, test_done_callback_with_cancel."""
    with gated() as gate:
        seen: dict[str, Any] = {}
        called = {name: threading.Event() for name in ("result", "exception", "cancel")}

        def on(name: str, read: Callable[[Future[Any]], Any]) -> Callable[[Future[Any]], None]:
            def cb(f: Future[Any]) -> None:
                seen[name] = read(f)
                called[name].set()

            return cb

        with_result = pool1.submit(block_on, gate, 5)
        with_exception = pool1.submit(raise_os_error)
        to_cancel = pool1.submit(mul, 1, 1)
        with_result.add_done_callback(on("result", lambda f: f.result()))
        with_exception.add_done_callback(on("exception", lambda f: f.exception()))
        to_cancel.add_done_callback(on("cancel", lambda f: f.cancelled()))
        assert to_cancel.cancel()
        assert called["cancel"].is_set() and seen["cancel"] is True  # called by cancel() itself
        gate.send(None, timeout=WAIT)
        assert called["result"].wait(WAIT) and seen["result"] == 5
        assert called["exception"].wait(WAIT)
        assert isinstance(seen["exception"], OSError) and seen["exception"].args == (
            "remote failure",
        )


def test_a_callback_added_to_a_done_future_runs_at_once(pool: mpchan.Pool) -> None:
    """CPython: FutureTests.test_done_callback_already_successful,
    test_done_callback_already_failed, test_done_callback_already_cancelled."""
    succeeded = pool.submit(mul, 2, 3)
    failed = pool.submit(raise_os_error)
    futures.wait([succeeded, failed], timeout=WAIT)
    cancelled = cancelled_future(notified=False)
    got: list[tuple[str, Any]] = []
    succeeded.add_done_callback(lambda f: got.append(("result", f.result())))
    failed.add_done_callback(lambda f: got.append(("exception", type(f.exception()))))
    cancelled.add_done_callback(lambda f: got.append(("cancelled", f.cancelled())))
    # Called in this thread, before add_done_callback returned.
    assert got == [("result", 6), ("exception", OSError), ("cancelled", True)]


def test_a_raising_done_callback_is_logged_and_breaks_nothing(
    pool: mpchan.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """CPython: FutureTests.test_done_callback_raises and
    test_done_callback_raises_already_succeeded (here the callbacks run in the
    pool's thread that completes the future)."""
    with gated() as gate:
        caplog.set_level(logging.ERROR, logger="concurrent.futures")
        later_ran = threading.Event()

        def raising(_: Future[Any]) -> None:
            raise Exception("doh!")

        fut = pool.submit(block_on, gate, 5)
        fut.add_done_callback(raising)
        fut.add_done_callback(lambda _: later_ran.set())
        gate.send(None, timeout=WAIT)
        assert later_ran.wait(WAIT), "a raising callback stopped the next one"
        assert fut.result(timeout=WAIT) == 5
        fut.add_done_callback(raising)  # on a done future: logged here, not raised
        logged = [r for r in caplog.records if r.name == "concurrent.futures"]
        assert len(logged) == 2
        assert all("exception calling callback" in r.getMessage() for r in logged)
        assert all(r.exc_info and str(r.exc_info[1]) == "doh!" for r in logged)
        # A kept record's traceback reaches the frames of the pool's thread
        # that ran the callback (and so the pool's channels): let it go.
        del logged
        caplog.clear()
        # The pool goes on.
        assert pool.submit(mul, 6, 7).result(timeout=WAIT) == 42
        assert list(pool.map(abs, [-1, -2], timeout=WAIT)) == [1, 2]


@pytest.mark.timeout(15)
def test_completing_a_finished_future_raises_invalid_state(pool1: mpchan.Pool) -> None:
    """CPython: FutureTests.test_multiple_set_result, test_multiple_set_exception
    (on a pool's future: it was finished by the pool)."""
    done = pool1.submit(mul, 6, 7)
    assert done.result(timeout=WAIT) == 42
    with pytest.raises(InvalidStateError):
        done.set_result(1)
    with pytest.raises(InvalidStateError):
        done.set_exception(ValueError("late"))
    assert done.result(timeout=0) == 42 and done.exception(timeout=0) is None


# -- max_tasks_per_child -> max_tasks_per_worker --------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_max_tasks_per_worker_replaces_the_worker(method: str) -> None:
    """CPython: ProcessPoolExecutorTest.test_max_tasks_per_child (CPython refuses
    max_tasks_per_child with fork; mpchan supports every start method)."""
    with mpchan.Pool(1, start_method=method, max_tasks_per_worker=3) as p:
        pids = [p.submit(os.getpid).result(timeout=WAIT) for _ in range(4)]
        assert pids[0] == pids[1] == pids[2] != pids[3]
        assert len(worker_pids(p)) == 1


@pytest.mark.parametrize("method", METHODS)
def test_max_tasks_per_worker_then_shutdown(method: str) -> None:
    """CPython: ProcessPoolExecutorTest.test_max_tasks_early_shutdown."""
    p = mpchan.Pool(3, start_method=method, max_tasks_per_worker=1)
    fs = [p.submit(mul, i, i) for i in range(6)]
    p.shutdown()
    assert [f.result(timeout=0) for f in fs] == [i * i for i in range(6)]


# -- serialisation failures and crashes (deliberate differences) ----------------------


def test_a_call_that_cannot_be_pickled_fails_alone(pool: mpchan.Pool) -> None:
    """CPython: ExecutorDeadlockTest.test_error_at_task_pickle and
    test_shutdown_deadlock_pickle."""
    exc = pool.submit(id, ErrorAtPickle()).exception(timeout=WAIT)
    assert isinstance(exc, SerializationError) and isinstance(exc, pickle.PicklingError), repr(exc)
    assert exc.__cause__ is not None
    assert pool.submit(mul, 6, 7).result(timeout=WAIT) == 42
    late = pool.submit(id, ErrorAtPickle())
    pool.shutdown(wait=False)
    with pytest.raises(pickle.PicklingError):
        late.result(timeout=WAIT)


@pytest.mark.parametrize("cls", [ErrorAtPickle, ExitAtPickle], ids=["error", "sys.exit"])
def test_a_result_that_cannot_be_pickled_fails_alone(pool: mpchan.Pool, cls: type) -> None:
    """CPython: ExecutorDeadlockTest.test_error_during_result_pickle_on_worker,
    test_exit_during_result_pickle_on_worker (CPython: the SystemExit itself)."""
    exc = pool.submit(return_instance, cls).exception(timeout=WAIT)
    assert isinstance(exc, SerializationError) and isinstance(exc, pickle.PicklingError), repr(exc)
    assert exc.__cause__ is not None
    assert pool.submit(mul, 6, 7).result(timeout=WAIT) == 42


@pytest.mark.parametrize(
    ("where", "cls"),
    [
        ("call", ErrorAtUnpickle),
        ("call", ExitAtUnpickle),
        ("result", ErrorAtUnpickle),
        ("result", ExitAtUnpickle),
    ],
    ids=["call-error", "call-sys.exit", "result-error", "result-sys.exit"],
)
def test_what_cannot_be_unpickled_fails_alone(pool: mpchan.Pool, where: str, cls: type) -> None:
    """CPython: ExecutorDeadlockTest.test_error_at_task_unpickle,
    test_exit_at_task_unpickle, test_error_during_result_unpickle_in_result_handler,
    test_exit_during_result_unpickle_in_result_handler (CPython: BrokenProcessPool)."""
    fut = pool.submit(id, cls()) if where == "call" else pool.submit(return_instance, cls)
    exc = fut.exception(timeout=WAIT)
    assert isinstance(exc, SerializationError), repr(exc)
    assert not isinstance(exc, BrokenExecutor)
    assert exc.__cause__ is not None
    assert pool.submit(mul, 6, 7).result(timeout=WAIT) == 42


def _submit_doomed(pool: mpchan.Pool, where: str) -> Future[Any]:
    if where == "running":
        return pool.submit(segfault)
    if where == "call-unpickle":
        return pool.submit(id, CrashAtUnpickle())
    if where == "result-pickle":
        return pool.submit(return_instance, CrashAtPickle)
    assert where == "killed"
    started, gate = mpchan.Channel(1), mpchan.Channel(1)
    fut = pool.submit(announce_then_block, started, gate)
    os.kill(started.recv(timeout=WAIT), signal.SIGKILL)
    return fut


@pytest.mark.parametrize("where", ["running", "call-unpickle", "result-pickle", "killed"])
def test_a_worker_death_fails_only_its_task(pool: mpchan.Pool, where: str) -> None:
    """CPython: ExecutorDeadlockTest.test_crash_during_func_exec_on_worker,
    test_crash_at_task_unpickle, test_crash_during_result_pickle_on_worker and
    ProcessPoolExecutorTest.test_killed_child (CPython: the pool breaks and
    later submits raise BrokenProcessPool; mpchan replaces the worker)."""
    innocent = pool.submit(mul, 2, 3)
    exc = _submit_doomed(pool, where).exception(timeout=WAIT)
    assert isinstance(exc, WorkerCrashed) and isinstance(exc, BrokenProcessPool), repr(exc)
    assert exc.pid is not None
    assert innocent.result(timeout=WAIT) == 6
    assert pool.submit(mul, 6, 7).result(timeout=WAIT) == 42
    assert list(pool.map(abs, range(-3, 0), timeout=WAIT)) == [3, 2, 1]


def test_exceptions_raised_by_the_task_arrive_as_they_are(pool: mpchan.Pool) -> None:
    """CPython: ExecutorDeadlockTest.test_exit_during_func_exec_on_worker,
    test_error_during_func_exec_on_worker."""
    with pytest.raises(SystemExit) as info:
        pool.submit(exit_one).result(timeout=WAIT)
    assert info.value.code == 1
    with pytest.raises(RuntimeError):
        pool.submit(raise_runtime_error).result(timeout=WAIT)
    assert pool.submit(mul, 6, 7).result(timeout=WAIT) == 42


def test_a_crash_with_a_large_argument_in_flight(pool: mpchan.Pool) -> None:
    """CPython: ExecutorDeadlockTest.test_crash_big_data (an argument larger
    than a pipe's buffer)."""
    data = "a" * (4 * 1024 * 1024 + 1)
    with pytest.raises(BrokenProcessPool):
        list(pool.map(segfault, [data] * 4, timeout=WAIT))
    assert pool.submit(len, data).result(timeout=WAIT) == len(data)


def test_a_worker_dying_after_shutdown_began() -> None:
    """CPython: ExecutorDeadlockTest.test_shutdown_deadlock."""
    with gated() as gate:
        started = mpchan.Channel(1)
        with mpchan.Pool(2) as p:
            fut = p.submit(announce_then_crash, started, gate)
            started.recv(timeout=WAIT)
            p.shutdown(wait=False)
            gate.send(None, timeout=WAIT)
            p.shutdown(wait=True)
            assert isinstance(fut.exception(timeout=0), BrokenProcessPool)


MAIN_INITIALIZER = """
    import mpchan

    STATUS = "uninitialized"

    def init(x):
        global STATUS
        STATUS = x

    def get_status():
        return STATUS

    if __name__ == "__main__":
        with mpchan.Pool(2, initializer=init, initargs=("initialized",)) as pool:
            print(*[f.result(timeout=30) for f in [pool.submit(get_status) for _ in range(4)]])
"""


def test_functions_of_the_main_script_share_its_globals(tmp_path: Path) -> None:
    """CPython: InitializerMixin.test_initializer, with the initializer and the
    task defined in the program's own script (they go by reference, as with
    multiprocessing, so the global the initializer sets is the task's)."""
    proc = run_script(MAIN_INITIALIZER, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["initialized"] * 4
