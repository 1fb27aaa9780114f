"""Pool object lifetimes, shutdown, cancellation and kill, futures, errors, initargs.

What a user switching from ``ProcessPoolExecutor`` relies on: nothing kept
alive that should not be, ``shutdown`` that waits for the processes, cancel
that really cancels, futures that behave, and errors of the right type.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import psutil
import pytest

import mpchan
from mpchan import PicklingError, SerializationError, UnpicklingError
from mpchan._pool import Pool
from mpchan._pool.task import PoolFuture

WAIT = 60


# -- task functions (importable: they go by reference) ----------------------------


def identity(x: Any) -> Any:
    return x


def add_one(x: int) -> int:
    return x + 1


def sleep_mark(seconds: float, marks: str, i: int) -> int:
    os.close(os.open(os.path.join(marks, str(i)), os.O_CREAT | os.O_WRONLY))
    time.sleep(seconds)
    return i


def wait_for_file(path: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)
    return path


def touch_then_block(path: str) -> None:
    Path(path).touch()
    threading.Event().wait()


def make_channel() -> mpchan.Channel:
    ch = mpchan.Channel(2)
    ch.send("hello")
    return ch


class Payload:
    """Something the parent watches with a weak reference."""

    def method(self) -> int:
        return 1


class Big:
    """A result whose parent copy the test watches."""

    def __init__(self, i: int) -> None:
        self.i = i


def make_big(i: int) -> Big:
    return Big(i)


def _session_segments() -> set[str]:
    from mpchan import _shm

    prefix = f"mpchan-{_shm.session_token()}-"
    return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}


def _wait_until(predicate: Any, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        gc.collect()
        time.sleep(0.01)
    return True


@pytest.fixture
def pool() -> Iterator[Pool]:
    with Pool(2) as p:
        yield p


# -- lifetimes ---------------------------------------------------------------------


def test_submit_keeps_no_reference_to_the_callable_or_arguments(pool: Pool) -> None:
    obj, arg = Payload(), Payload()
    watch_obj, watch_arg = weakref.ref(obj), weakref.ref(arg)
    fut = pool.submit(obj.method)
    fut2 = pool.submit(identity, arg)
    assert fut.result(timeout=WAIT) == 1
    assert fut2.result(timeout=WAIT) is not arg  # a copy came back
    del obj, arg
    # The futures are still held: they must not hold the call.
    assert _wait_until(lambda: watch_obj() is None and watch_arg() is None, 10)


def test_a_discarded_future_keeps_nothing_alive(pool: Pool) -> None:
    obj = Payload()
    collected = threading.Event()
    watch = weakref.ref(obj, lambda _: collected.set())
    pool.submit(obj.method)  # the future is dropped at once
    del obj
    assert watch is not None
    assert _wait_until(collected.is_set, 10)


def test_map_lets_go_of_each_result_as_it_is_yielded(pool: Pool) -> None:
    it = pool.map(make_big, range(200), chunksize=50)
    first = next(it)
    watch = weakref.ref(first)
    del first
    gc.collect()
    # The rest of its chunk is still being read: the yielded one is gone.
    assert watch() is None
    assert [b.i for b in it] == list(range(1, 200))


def test_a_pool_dropped_without_shutdown_is_shut_down_when_collected() -> None:
    p = Pool(2)
    pids = set(p.stats()["workers"])
    assert p.submit(add_one, 1).result(timeout=WAIT) == 2
    watch = weakref.ref(p)
    del p
    gc.collect()
    assert watch() is None
    assert _wait_until(lambda: not any(psutil.pid_exists(pid) for pid in pids), 10)


@pytest.mark.parametrize("method", ["forkserver", "fork"])
def test_a_channel_made_in_a_worker_leaves_no_segment(method: str) -> None:
    before = _session_segments()
    with Pool(2, start_method=method) as p:
        ch = p.submit(make_channel).result(timeout=WAIT)
        assert ch.recv(timeout=WAIT) == "hello"
        del ch
    with mpchan.Supervisor(method):
        h = mpchan.go(make_channel)
        ch = h.result(timeout=WAIT)
        assert ch.recv(timeout=WAIT) == "hello"
        del ch, h
    mpchan.shutdown()
    assert _wait_until(lambda: _session_segments() <= before, 10), _session_segments() - before


# -- shutdown, cancel, kill -----------------------------------------------------------


def test_shutdown_returns_after_the_workers_exited() -> None:
    p = Pool(2)
    pids = set(p.stats()["workers"])
    assert len(pids) == 2
    assert p.submit(add_one, 1).result(timeout=WAIT) == 2
    p.shutdown(wait=True)
    assert not any(psutil.pid_exists(pid) for pid in pids)
    with Pool(2) as q:
        pids = set(q.stats()["workers"])
    assert not any(psutil.pid_exists(pid) for pid in pids)


def _prime(p: Pool) -> None:
    # Tiny tasks first: the pool then queues many tasks at each worker.
    assert sum(p.map(add_one, range(20000))) == sum(range(1, 20001))
    for f in [p.submit(add_one, i) for i in range(2000)]:
        f.result(timeout=WAIT)


@pytest.mark.timeout(120)
def test_cancel_takes_back_tasks_queued_at_a_worker(tmp_path: Path) -> None:
    with Pool(2) as p:
        _prime(p)
        futs = [p.submit(sleep_mark, 0.2, str(tmp_path), i) for i in range(40)]
        time.sleep(0.3)
        cancelled = [i for i, f in enumerate(futs) if f.cancel()]
        assert len(cancelled) > 15
        for i, f in enumerate(futs):
            if i in cancelled:
                assert f.cancelled()
                with pytest.raises(futures.CancelledError):
                    f.result(timeout=WAIT)
            else:
                assert f.result(timeout=WAIT) == i
    ran = {int(name) for name in os.listdir(tmp_path)}
    assert not ran & set(cancelled), "a cancelled task ran"


@pytest.mark.timeout(120)
def test_shutdown_cancel_futures_cancels_tasks_queued_at_a_worker(tmp_path: Path) -> None:
    p = Pool(2)
    _prime(p)
    futs = [p.submit(sleep_mark, 0.2, str(tmp_path), i) for i in range(40)]
    time.sleep(0.3)
    p.shutdown(wait=True, cancel_futures=True)
    cancelled = {i for i, f in enumerate(futs) if f.cancelled()}
    assert len(cancelled) > 15
    assert all(f.done() for f in futs)
    ran = {int(name) for name in os.listdir(tmp_path)}
    assert not ran & cancelled


def test_cancel_wakes_as_completed_and_wait(pool: Pool, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    blockers = [pool.submit(wait_for_file, str(gate), WAIT) for _ in range(2)]
    queued = [pool.submit(add_one, i) for i in range(5)]
    assert all(f.cancel() for f in queued)
    done, not_done = futures.wait(queued, timeout=5)
    assert done == set(queued) and not not_done
    assert set(futures.as_completed(queued, timeout=5)) == set(queued)
    gate.touch()
    assert [f.result(timeout=WAIT) for f in blockers] == [str(gate)] * 2


def test_kill_stops_a_running_task_and_the_pool_goes_on(pool: Pool, tmp_path: Path) -> None:
    started = tmp_path / "started"
    fut = pool.submit(touch_then_block, str(started))
    assert isinstance(fut, PoolFuture)
    wait_for_file(str(started), WAIT)
    assert fut.running()
    assert not fut.cancel()  # running: cancel does not touch it
    assert fut.kill()
    assert fut.cancelled()
    with pytest.raises(futures.CancelledError):
        fut.result(timeout=WAIT)
    # The other worker and the replacement serve the rest.
    assert [f.result(timeout=WAIT) for f in [pool.submit(add_one, i) for i in range(20)]] == [
        i + 1 for i in range(20)
    ]
    assert pool.stats()["killed"] == 1


def test_kill_of_a_finished_future_returns_false(pool: Pool) -> None:
    fut = pool.submit(add_one, 1)
    assert fut.result(timeout=WAIT) == 2
    assert not fut.kill()
    assert fut.result() == 2


# -- futures ------------------------------------------------------------------------


def test_completing_a_finished_future_raises_invalid_state(pool: Pool) -> None:
    fut = pool.submit(add_one, 1)
    assert fut.result(timeout=WAIT) == 2
    with pytest.raises(futures.InvalidStateError):
        fut.set_result(3)
    with pytest.raises(futures.InvalidStateError):
        fut.set_exception(ValueError())
    # Nothing was left locked: every later future operation works.
    assert "finished" in repr(fut)
    assert pool.submit(add_one, 2).result(timeout=WAIT) == 3
    cancelled: PoolFuture[int] = PoolFuture()
    assert cancelled.cancel()
    with pytest.raises(futures.InvalidStateError):
        cancelled.set_result(1)


def test_repr_takes_no_lock(pool: Pool) -> None:
    fut = pool.submit(add_one, 1)
    fut.result(timeout=WAIT)
    with fut._condition:
        text: list[str] = []
        t = threading.Thread(target=lambda: text.append(repr(fut)))
        t.start()
        t.join(5)
        assert text and "state=finished returned int" in text[0]


@pytest.mark.parametrize("raised", [ValueError, SystemExit, KeyboardInterrupt, GeneratorExit])
def test_a_raising_done_callback_is_logged_and_breaks_nothing(
    pool: Pool, raised: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    def callback(_f: Any) -> None:
        raise raised("from a callback")

    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        futs = [pool.submit(add_one, i) for i in range(20)]
        for f in futs:
            f.add_done_callback(callback)
        assert [f.result(timeout=WAIT) for f in futs] == list(range(1, 21))
        assert _wait_until(lambda: len(caplog.records) >= 20, 10)
    assert all("exception calling callback" in r.getMessage() for r in caplog.records)
    assert all(r.exc_info and r.exc_info[0] is raised for r in caplog.records)
    # The collector lives on.
    assert pool.submit(add_one, 5).result(timeout=WAIT) == 6
    assert not pool.stats()["broken"]
    # A kept record's traceback holds the frames of the thread that ran the
    # callback (the pool's, as with concurrent.futures): let them go.
    caplog.clear()


# -- errors -------------------------------------------------------------------------


class RaiseOnPickle:
    def __init__(self, exc: type[BaseException]) -> None:
        self.exc = exc

    def __reduce__(self) -> Any:
        raise self.exc("while pickling")


def _raise(exc: type[BaseException]) -> None:
    raise exc("while unpickling")


class RaiseOnUnpickle:
    def __init__(self, exc: type[BaseException]) -> None:
        self.exc = exc

    def __reduce__(self) -> Any:
        return (_raise, (self.exc,))


def return_raise_on_pickle(exc: type[BaseException]) -> RaiseOnPickle:
    return RaiseOnPickle(exc)


def return_raise_on_unpickle(exc: type[BaseException]) -> RaiseOnUnpickle:
    return RaiseOnUnpickle(exc)


EXCS = [ValueError, SystemExit, KeyboardInterrupt, GeneratorExit]


@pytest.mark.parametrize("exc", EXCS, ids=lambda e: e.__name__)
def test_pickling_the_call_fails_only_that_task(pool: Pool, exc: type[BaseException]) -> None:
    fut = pool.submit(identity, RaiseOnPickle(exc))
    err = fut.exception(timeout=WAIT)
    assert isinstance(err, PicklingError)
    assert isinstance(err, pickle.PicklingError) and isinstance(err, SerializationError)
    assert isinstance(err.__cause__, exc)
    it = pool.map(identity, [1, RaiseOnPickle(exc), 3], chunksize=1)
    assert next(it) == 1
    with pytest.raises(PicklingError):
        next(it)
    assert pool.submit(add_one, 1).result(timeout=WAIT) == 2


@pytest.mark.parametrize("exc", EXCS, ids=lambda e: e.__name__)
def test_unpickling_the_call_in_the_worker_fails_only_that_task(
    pool: Pool, exc: type[BaseException]
) -> None:
    err = pool.submit(identity, RaiseOnUnpickle(exc)).exception(timeout=WAIT)
    assert isinstance(err, UnpicklingError) and isinstance(err, pickle.UnpicklingError)
    with pytest.raises(UnpicklingError):
        list(pool.map(identity, [1, RaiseOnUnpickle(exc)], chunksize=2))
    assert pool.submit(add_one, 1).result(timeout=WAIT) == 2


@pytest.mark.parametrize("exc", EXCS, ids=lambda e: e.__name__)
def test_pickling_the_result_in_the_worker_fails_only_that_task(
    pool: Pool, exc: type[BaseException]
) -> None:
    err = pool.submit(return_raise_on_pickle, exc).exception(timeout=WAIT)
    assert isinstance(err, PicklingError) and isinstance(err, pickle.PicklingError)
    with pytest.raises(PicklingError):
        list(pool.map(return_raise_on_pickle, [exc]))
    assert pool.submit(add_one, 1).result(timeout=WAIT) == 2


@pytest.mark.parametrize("exc", EXCS, ids=lambda e: e.__name__)
def test_unpickling_the_result_in_the_parent_fails_only_that_task(
    pool: Pool, exc: type[BaseException]
) -> None:
    err = pool.submit(return_raise_on_unpickle, exc).exception(timeout=WAIT)
    assert isinstance(err, UnpicklingError) and isinstance(err.__cause__, exc)
    it = pool.map(return_raise_on_unpickle, [exc, exc], chunksize=1)
    with pytest.raises(UnpicklingError):
        next(it)
    assert pool.submit(add_one, 1).result(timeout=WAIT) == 2
    assert not pool.stats()["broken"]


# -- functions by value ----------------------------------------------------------------


class Counted:
    """Counts its pickles (in the parent) and unpickles (in a file per worker)."""

    pickles = 0

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        Counted.pickles += 1
        return (_note_unpickle, (self.path,))


def _note_unpickle(path: str) -> Counted:
    with open(path, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    return Counted.__new__(Counted)


def test_a_function_by_value_is_pickled_once_and_sent_once_per_worker(tmp_path: Path) -> None:
    log = tmp_path / "unpickled"
    captured = Counted(str(log))

    def by_value(x: int) -> int:  # a closure: no worker can import it by name
        assert captured is not None
        return x * 2

    Counted.pickles = 0
    with Pool(2) as p:
        assert [f.result(timeout=WAIT) for f in [p.submit(by_value, i) for i in range(40)]] == [
            2 * i for i in range(40)
        ]
        assert list(p.map(by_value, range(300), chunksize=7)) == [2 * i for i in range(300)]
        pids = set(p.stats()["workers"])
    assert Counted.pickles == 1
    unpickled_by = log.read_text().split()
    assert len(unpickled_by) == len(set(unpickled_by)) <= 2
    assert {int(pid) for pid in unpickled_by} <= pids


# -- initargs that only a starting process may get ------------------------------------


def _init_sync(q: Any, lock: Any, event: Any, value: Any) -> None:
    global _SYNC
    _SYNC = (q, lock, event, value)


_SYNC: Any = None


def use_sync(i: int) -> int:
    q, lock, event, value = _SYNC
    with lock:
        value.value += 1
    q.put(i)
    return int(event.is_set())


@pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"])
def test_initargs_may_hold_multiprocessing_queues_locks_events_values(method: str) -> None:
    ctx = multiprocessing.get_context(method)
    q, lock, event, value = ctx.Queue(), ctx.Lock(), ctx.Event(), ctx.Value("i", 0)
    event.set()
    initargs = (q, lock, event, value)
    with Pool(2, start_method=method, initializer=_init_sync, initargs=initargs) as p:
        futs = [p.submit(use_sync, i) for i in range(10)]
        assert [f.result(timeout=WAIT) for f in futs] == [1] * 10
    assert sorted(q.get(timeout=WAIT) for _ in range(10)) == list(range(10))
    assert value.value == 10
    q.close()
    q.join_thread()


def test_a_dropped_result_holding_a_channel_leaves_no_segment() -> None:
    before = _session_segments()
    h = mpchan.go(make_channel)
    h.join(timeout=WAIT)
    del h  # never read: the channel in its result must not stay pinned
    with Pool(2) as p:
        it = p.map(make_channel_for, range(8), chunksize=1)
        next(it)
        it.close()  # the rest is never read
    mpchan.shutdown()
    assert _wait_until(lambda: _session_segments() <= before, 10), _session_segments() - before


def make_channel_for(_: int) -> mpchan.Channel:
    return make_channel()


EXIT_WITH_ERROR = """
import sys, time
sys.path.insert(0, {root!r})
import mpchan

def nap(s):
    time.sleep(s)

if __name__ == "__main__":
    pool = mpchan.Pool(2)
    futs = [pool.submit(nap, 30) for _ in range(10)]
    print(*pool.stats()["workers"], flush=True)
    raise KeyboardInterrupt
"""


@pytest.mark.timeout(60)
def test_a_program_ending_with_an_error_does_not_wait_for_its_tasks(tmp_path: Path) -> None:
    # At a normal exit what was submitted finishes (as concurrent.futures);
    # an unhandled exception (here Ctrl-C's) cancels it and stops the workers.
    script = tmp_path / "fails.py"
    script.write_text(EXIT_WITH_ERROR.format(root=str(Path(__file__).resolve().parent.parent)))
    env = {k: v for k, v in os.environ.items() if k != "MPCHAN_SESSION"}
    with subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        raised = time.monotonic()  # the script raises right after that line
        proc.wait(timeout=50)
        elapsed = time.monotonic() - raised
        stderr = proc.stderr.read()
    assert len(pids) == 2
    assert proc.returncode != 0 and "KeyboardInterrupt" in stderr
    # Running tasks get a second (not the 5 s of a normal exit's grace).
    assert elapsed < 3.5, elapsed
    assert _wait_until(lambda: not any(psutil.pid_exists(p) for p in pids), 5)


def test_a_running_map_does_not_keep_its_pool_alive() -> None:
    # As with concurrent.futures: the map's iterator does not hold the pool;
    # the pool dropped meanwhile shuts down, and the map still yields all.
    p = Pool(2)
    pids = set(p.stats()["workers"])
    results = p.map(add_one, range(500), chunksize=10)
    watch = weakref.ref(p)
    del p
    gc.collect()
    assert watch() is None
    assert list(results) == list(range(1, 501))
    assert _wait_until(lambda: not any(psutil.pid_exists(pid) for pid in pids), 10)
