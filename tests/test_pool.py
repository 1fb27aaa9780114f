"""Pool: lazy map, recycling, initializer, contexts, drain, progress, stats, parent death."""

from __future__ import annotations

import itertools
import operator
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest
from scripts.procs import wait_until

import mpchan
from mpchan._errors import Cancelled, ShutdownError, WorkerCrashed
from mpchan._pool import Pool

cloudpickle.register_pickle_by_value(sys.modules[__name__])

WAIT = 30
ROOT = Path(__file__).resolve().parent.parent


def square(x: int) -> int:
    return x * x


def pid_of(_: Any = None) -> int:
    return os.getpid()


def sleep_and_return(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def gated(x: int, gate: mpchan.Channel) -> int:
    if x == 0:
        gate.recv(timeout=WAIT)  # the first item waits until the test opens the gate
    return x


def hold_until_opened(started: mpchan.Channel, gate: mpchan.Channel) -> str:
    started.send(os.getpid(), timeout=WAIT)
    gate.recv(timeout=WAIT)
    return "held"


def hoard(nbytes: int) -> int:
    # Keeps memory alive in the worker (on a module object that stays), so its RSS grows.
    block = bytearray(b"x" * nbytes)
    os.__dict__.setdefault("_mpchan_test_hoard", []).append(block)
    return os.getpid()


def init(value: int) -> None:
    # State kept in the process (functions of this module are pickled by
    # value, so their module globals are not shared between them).
    count = int(os.environ.get("MPCHAN_TEST_INIT", "0"))
    os.environ["MPCHAN_TEST_INIT"] = str(count + value)


def init_count(_: Any = None) -> tuple[int, int]:
    return os.getpid(), int(os.environ.get("MPCHAN_TEST_INIT", "0"))


def init_fails() -> None:
    raise OSError("no database")


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_start_methods(method: str) -> None:
    with Pool(2, start_method=method) as pool:
        assert pool.submit(square, 7).result(timeout=WAIT) == 49
        assert list(pool.map(square, range(100), timeout=WAIT)) == [i * i for i in range(100)]


def test_endless_input_in_flat_memory() -> None:
    pulled = 0

    def source() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    with Pool(2) as pool:
        it = pool.map(square, source(), buffersize=64, timeout=WAIT)
        for n, value in enumerate(it):
            assert value == n * n
            assert pulled - n <= 64 + 1, "map must read its input lazily"
            if n == 20_000:
                break
        it.close()  # type: ignore[attr-defined]  # cancels what was not started


def test_endless_input_unordered_default_window() -> None:
    with Pool(2) as pool:
        src = itertools.count()
        for got, _ in enumerate(pool.imap_unordered(square, src, timeout=WAIT), 1):
            if got == 5000:
                break
        # the window is bounded: far fewer than "everything" was read
        assert next(src) < 5000 + 2 * 16 * 65536


def test_automatic_chunks_spread_long_tasks() -> None:
    with Pool(2) as pool:
        started = time.monotonic()
        pids = list(pool.map(sleep_and_return, [0.2] * 6, [None] * 6, timeout=WAIT))
        # 6 tasks of 0.2 s on 2 workers: 0.6 s when spread, 1.2 s if chunked together
        assert time.monotonic() - started < 1.1
        assert pids == [None] * 6


@pytest.mark.parametrize(
    "make", [list, tuple, lambda r: r, iter], ids=["list", "tuple", "range", "iterator"]
)
def test_map_reads_lists_tuples_ranges_and_iterators_alike(make: Any) -> None:
    # Lists, tuples and ranges are sliced into chunks, other inputs read item by item.
    with Pool(2) as pool:
        got = list(pool.map(square, make(range(5000)), timeout=WAIT))
        assert got == [i * i for i in range(5000)]


def test_map_iterator_length_hint_counts_down() -> None:
    with Pool(2) as pool:
        it = pool.map(square, list(range(1000)), timeout=WAIT)
        assert operator.length_hint(it) == 1000  # list() of it allocates once
        for _ in range(10):
            next(it)
        assert operator.length_hint(it) == 990
        assert len(list(it)) == 990
        assert operator.length_hint(it) == 0
        unknown = pool.map(square, (i for i in range(10)), timeout=WAIT)
        assert operator.length_hint(unknown, -7) == -7  # no length: no hint
        assert sum(1 for _ in unknown) == 10


def test_short_tasks_are_not_queued_behind_a_long_running_one() -> None:
    """Calls submitted while one worker runs a long task all finish on the
    other worker: none is queued behind the long one."""
    started, gate = mpchan.Channel(1), mpchan.Channel(1)
    with Pool(2) as pool:
        for f in [pool.submit(square, i) for i in range(20)]:  # the pool learns: calls are short
            f.result(timeout=WAIT)
        long = pool.submit(hold_until_opened, started, gate)
        started.recv(timeout=WAIT)
        # The premise, not a synchronisation: the running task is now far
        # longer than the calls before it (a stuck task looks the same).
        time.sleep(0.1)
        short = [pool.submit(square, i) for i in range(200)]
        assert [f.result(timeout=WAIT) for f in short] == [i * i for i in range(200)]
        assert not long.done()
        gate.send(None, timeout=WAIT)
        assert long.result(timeout=WAIT) == "held"


def test_max_tasks_per_worker_recycles() -> None:
    with Pool(1, max_tasks_per_worker=2) as pool:
        pids = [pool.submit(pid_of).result(timeout=WAIT) for _ in range(6)]
    assert len(set(pids)) == 3
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5]


def test_max_memory_per_worker_recycles() -> None:
    with Pool(1, max_memory_per_worker=200 * 2**20) as pool:
        first = pool.submit(hoard, 300 * 2**20).result(timeout=WAIT)
        second = pool.submit(pid_of).result(timeout=WAIT)
    assert first != second


def test_initializer_runs_once_per_worker() -> None:
    with Pool(2, initializer=init, initargs=(1,)) as pool:
        seen = list(pool.map(init_count, range(200), chunksize=1, timeout=WAIT))
    assert {count for _, count in seen} == {1}


def test_initializer_failure_breaks_the_pool() -> None:
    with Pool(1, initializer=init_fails) as pool:
        exc = pool.submit(square, 2).exception(timeout=WAIT)
        assert isinstance(exc, WorkerCrashed)
        assert "no database" in str(exc) or isinstance(exc.__cause__, OSError)
        with pytest.raises(WorkerCrashed):
            pool.submit(square, 3)


def test_ctx_cancel_stops_everything() -> None:
    ctx, cancel = mpchan.with_cancel(mpchan.background())
    pool = Pool(2, ctx=ctx)
    try:
        running = [pool.submit(sleep_and_return, 30) for _ in range(4)]
        time.sleep(0.3)
        pids = list(pool.stats()["workers"])
        started = time.monotonic()
        cancel("stop")
        for fut in running:
            exc = fut.exception(timeout=WAIT)
            assert isinstance(exc, Cancelled)
            assert exc.cause == "stop"
        assert time.monotonic() - started < 2.0
        with pytest.raises(Cancelled):
            pool.submit(square, 1)
        assert wait_until(lambda: not any(psutil.pid_exists(p) for p in pids), 5)
    finally:
        pool.shutdown()
        cancel()


def test_ordered_map_feeds_workers_behind_a_slow_first_item_within_bounds() -> None:
    """While the item to yield next is still running, finished chunks behind
    it free their workers for new ones (ordered output does not idle the
    pool), but what is read ahead stays bounded (two windows of chunks)."""
    gate = mpchan.Channel(1)
    with Pool(2) as pool:
        it = pool.map(gated, range(1000), itertools.repeat(gate), chunksize=1, timeout=WAIT)
        first: list[int] = []
        t = threading.Thread(target=lambda: first.append(next(it)))
        t.start()
        window = 4 * 2  # chunks at the workers: 4 per worker
        done = lambda: pool.stats()["completed"]  # noqa: E731
        deadline = time.monotonic() + WAIT
        # one worker holds item 0; the other runs more than a window of items
        while done() < window + 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert done() >= window + 4, "the other worker starved behind the first item"
        submitted = pool.stats()["submitted"]
        assert submitted <= 2 * window + 1  # bounded read-ahead (+1 warm-up free)
        gate.send(None)
        t.join(WAIT)
        assert first == [0]
        assert list(it) == list(range(1, 1000))


def test_ctx_drain_finishes_in_flight_and_ends_map() -> None:
    ctx, cancel = mpchan.with_cancel(mpchan.background())
    try:
        with Pool(2, ctx=ctx) as pool:
            out = []
            for n, value in enumerate(
                pool.map(sleep_and_return, itertools.repeat(0.01), itertools.count(), chunksize=1)
            ):
                out.append(value)
                if n == 10:
                    ctx.request_drain()
            assert out == list(range(len(out)))  # in order, nothing lost, then the end
            assert len(out) < 200
            with pytest.raises(ShutdownError):
                pool.submit(square, 1)
    finally:
        cancel()


def test_drain_finishes_queued_work() -> None:
    pool = Pool(1)
    futs = [pool.submit(sleep_and_return, 0.05, i) for i in range(5)]
    pool.drain(timeout=WAIT)
    assert [f.result(timeout=0) for f in futs] == list(range(5))
    with pytest.raises(ShutdownError):
        pool.submit(square, 1)


def test_progress_bar_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    with Pool(2) as pool:
        assert list(pool.map(square, range(50), progress=True, timeout=WAIT))[-1] == 49 * 49
    err = capsys.readouterr().err
    assert "50/50" in err


def test_stats() -> None:
    with Pool(2) as pool:
        pool.submit(sleep_and_return, 0.3)
        assert pool.submit(square, 3).result(timeout=WAIT) == 9
        stats = pool.stats()
        assert len(stats["workers"]) == 2
        for pid, row in stats["workers"].items():
            assert psutil.pid_exists(pid)
            assert row["state"] in ("idle", "busy", "starting")
            assert row["rss"] > 0
            assert set(row) >= {"state", "tasks_done", "rss", "cpu_percent"}
        assert "queue_depth" in stats and stats["submitted"] == 2


PARENT = textwrap.dedent(
    """
    import itertools, os, sys, time
    sys.path.insert(0, {root!r})
    import mpchan
    from mpchan import _shm

    def slow(x):
        time.sleep(0.05)
        return x

    if __name__ == "__main__":
        pool = mpchan.Pool(2)
        it = pool.map(slow, itertools.count(), chunksize=1)
        next(it)
        pids = list(pool.stats()["workers"])
        print(_shm.session_token(), *pids, flush=True)
        for _ in it:
            pass
    """
)


def test_parent_sigkilled_mid_map_leaves_nothing(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        token, pids = line[0], [int(p) for p in line[1:]]
        assert len(pids) == 2
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert wait_until(lambda: not any(_alive(p) for p in pids), 5), "orphaned workers"
    shm = "/dev/shm"
    assert wait_until(lambda: not [n for n in os.listdir(shm) if token in n], 10), "segments left"


LEFT_OPEN = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    import mpchan
    from mpchan import _shm

    def inc(x):
        return x + 1

    def main():
        pool = mpchan.Pool(2)  # never shut down: the program's exit does it
        assert sum(pool.map(inc, range(20_000))) == 20_000 * 20_001 // 2
        print(_shm.session_token(), *pool.stats()["workers"], flush=True)
        if sys.argv[1] == "raise":
            raise RuntimeError("the program fails")

    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.parametrize("how", ["return", "raise"])
def test_pool_left_open_at_exit_ends_quietly(tmp_path: Path, how: str) -> None:
    """A pool nobody shut down is stopped at exit before its channels go:
    no traceback from its threads, no worker and no segment left."""
    script = tmp_path / "left_open.py"
    script.write_text(LEFT_OPEN.format(root=str(ROOT)))
    proc = subprocess.run(
        [sys.executable, str(script), how], capture_output=True, text=True, timeout=WAIT
    )
    line = proc.stdout.split()
    token, pids = line[0], [int(p) for p in line[1:]]
    if how == "raise":
        assert proc.returncode == 1
        assert proc.stderr.count("Traceback") == 1 and "the program fails" in proc.stderr
    else:
        assert proc.returncode == 0 and proc.stderr == ""
    assert "Exception in thread" not in proc.stderr
    assert wait_until(lambda: not any(_alive(p) for p in pids), 5), "orphaned workers"
    assert wait_until(lambda: not [n for n in os.listdir("/dev/shm") if token in n], 10)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
