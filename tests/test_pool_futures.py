"""Pool as a concurrent.futures.Executor: the behaviours CPython's
``Lib/test/test_concurrent_futures/`` checks for every executor."""

from __future__ import annotations

import asyncio
import gc
import operator
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import cloudpickle
import pytest

import mpchan
from mpchan._errors import ShutdownError
from mpchan._pool import Pool

cloudpickle.register_pickle_by_value(sys.modules[__name__])

WAIT = 30


def mul(x: int, y: int) -> int:
    return x * y


def sleep_and_return(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def raise_value_error(x: int) -> int:
    if x == 5:
        raise ValueError(f"bad {x}")
    return x


def echo(x: Any) -> Any:
    return x


class Payload:
    """An object the parent can watch with a weak reference."""


@pytest.fixture
def pool() -> Iterator[Pool]:
    with Pool(2) as p:
        yield p


def test_is_an_executor(pool: Pool) -> None:
    assert isinstance(pool, futures.Executor)
    assert isinstance(mpchan.Pool, type) and mpchan.Pool is Pool
    fut = pool.submit(mul, 6, 7)
    assert isinstance(fut, futures.Future)
    assert fut.result(timeout=WAIT) == 42


def test_submit_keyword(pool: Pool) -> None:
    assert pool.submit(mul, 2, y=8).result(timeout=WAIT) == 16
    assert pool.submit(sorted, [3, 1, 2], reverse=True).result(timeout=WAIT) == [3, 2, 1]


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Pool(0)
    with pytest.raises(ValueError):
        Pool(-1)


def test_submit_after_shutdown_raises(pool: Pool) -> None:
    pool.shutdown()
    with pytest.raises(ShutdownError) as info:
        pool.submit(mul, 1, 2)
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(ShutdownError):
        pool.map(echo, [1])


@pytest.mark.parametrize("chunksize", [None, 1, 2, 3, 7, 100])
def test_map_order_several_iterables(pool: Pool, chunksize: int | None) -> None:
    a = list(range(50))
    b = list(range(100, 130))  # shorter: zip semantics
    got = list(pool.map(mul, a, b, chunksize=chunksize, timeout=WAIT))
    assert got == list(map(mul, a, b))


def test_map_empty_and_builtin(pool: Pool) -> None:
    assert list(pool.map(echo, [], timeout=WAIT)) == []
    assert list(pool.map(operator.neg, range(5), timeout=WAIT)) == [0, -1, -2, -3, -4]


@pytest.mark.parametrize("chunksize", [None, 1, 4])
def test_map_exception_raised_lazily(pool: Pool, chunksize: int | None) -> None:
    it = pool.map(raise_value_error, range(10), chunksize=chunksize, timeout=WAIT)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="bad 5"):
        next(it)


def test_map_timeout_counts_from_the_call(pool: Pool) -> None:
    started = time.monotonic()
    it = pool.map(sleep_and_return, [0.01, 0.01, 5.0], timeout=0.6)
    time.sleep(0.3)  # time spent before iterating counts
    results = []
    with pytest.raises(TimeoutError):
        for r in it:
            results.append(r)
    assert results == [None, None]
    assert time.monotonic() - started < 3.0


def test_imap_unordered_yields_as_finished(pool: Pool) -> None:
    got = list(pool.imap_unordered(sleep_and_return, [0.5, 0.0, 0.0], chunksize=1, timeout=WAIT))
    assert len(got) == 3 and got[-1] is None
    values = list(pool.map(mul, range(20), range(20), ordered=False, timeout=WAIT))
    assert sorted(values) == [i * i for i in range(20)]


def test_shutdown_wait_finishes_queued_work() -> None:
    pool = Pool(1)
    futs = [pool.submit(sleep_and_return, 0.05, i) for i in range(5)]
    pool.shutdown(wait=True)
    assert [f.result(timeout=0) for f in futs] == list(range(5))
    assert not any(t.name.startswith("mpchan-pool") for t in threading.enumerate())


def test_shutdown_no_wait_returns_at_once() -> None:
    pool = Pool(1)
    futs = [pool.submit(sleep_and_return, 0.2, i) for i in range(3)]
    started = time.monotonic()
    pool.shutdown(wait=False)
    assert time.monotonic() - started < 0.15
    assert [f.result(timeout=WAIT) for f in futs] == [0, 1, 2]
    pool._d.wait_stopped(WAIT)


def test_shutdown_cancel_futures() -> None:
    pool = Pool(1)
    # Long tasks are not queued at a busy worker: the rest stays pending.
    futs = [pool.submit(sleep_and_return, 0.3, i) for i in range(10)]
    time.sleep(0.1)
    pool.shutdown(wait=True, cancel_futures=True)
    cancelled = [f for f in futs if f.cancelled()]
    done = [f for f in futs if not f.cancelled()]
    assert cancelled, "pending futures must be cancelled"
    assert futs[0] in done and futs[0].result() == 0
    for f in done:
        assert f.done()


def test_future_cancel_before_dispatch() -> None:
    with Pool(1) as pool:
        blocker = pool.submit(sleep_and_return, 0.3)
        queued = [pool.submit(sleep_and_return, 0.0, i) for i in range(6)]
        assert queued[-1].cancel()
        assert blocker.result(timeout=WAIT) is None
        assert [f.result(timeout=WAIT) for f in queued[:-1]] == list(range(5))
        assert queued[-1].cancelled()


def test_wait_first_completed(pool: Pool) -> None:
    slow = pool.submit(sleep_and_return, 1.0)
    fast = pool.submit(sleep_and_return, 0.0, 1)
    done, not_done = futures.wait([slow, fast], timeout=WAIT, return_when=futures.FIRST_COMPLETED)
    assert fast in done and slow in not_done


def test_wait_first_exception(pool: Pool) -> None:
    slow = pool.submit(sleep_and_return, 1.5)
    bad = pool.submit(raise_value_error, 5)
    done, not_done = futures.wait([slow, bad], timeout=WAIT, return_when=futures.FIRST_EXCEPTION)
    assert bad in done and slow in not_done
    assert isinstance(bad.exception(), ValueError)


def test_wait_all_completed(pool: Pool) -> None:
    futs = [pool.submit(mul, i, i) for i in range(10)]
    done, not_done = futures.wait(futs, timeout=WAIT)
    assert not not_done and len(done) == 10


def test_as_completed(pool: Pool) -> None:
    futs = [pool.submit(sleep_and_return, 1.0, "slow")]
    futs += [pool.submit(sleep_and_return, 0.0, i) for i in range(4)]
    order = [f.result() for f in futures.as_completed(futs, timeout=WAIT)]
    assert sorted(order, key=str) == [0, 1, 2, 3, "slow"]
    assert order[0] != "slow"


def test_as_completed_timeout(pool: Pool) -> None:
    fut = pool.submit(sleep_and_return, 2.0)
    with pytest.raises(TimeoutError):
        for _ in futures.as_completed([fut], timeout=0.1):
            pass


def test_asyncio_wrap_future(pool: Pool) -> None:
    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        a = asyncio.wrap_future(pool.submit(mul, 3, 4))
        b = loop.run_in_executor(pool, mul, 5, 6)
        return list(await asyncio.gather(a, b))

    assert asyncio.run(main()) == [12, 30]


def test_no_stale_references(pool: Pool) -> None:
    obj = Payload()
    ref = weakref.ref(obj)
    fut = pool.submit(echo, obj)
    fut.result(timeout=WAIT)
    del obj, fut
    gc.collect()
    assert ref() is None


def test_done_callback_runs(pool: Pool) -> None:
    seen: list[Any] = []
    got = threading.Event()

    def cb(f: futures.Future[Any]) -> None:
        seen.append(f.result())
        got.set()

    pool.submit(mul, 2, 21).add_done_callback(cb)
    assert got.wait(WAIT)
    assert seen == [42]


def test_context_manager_shuts_down() -> None:
    with Pool(1) as pool:
        fut = pool.submit(sleep_and_return, 0.1, "x")
    assert fut.done() and fut.result() == "x"
    with pytest.raises(ShutdownError):
        pool.submit(echo, 1)
