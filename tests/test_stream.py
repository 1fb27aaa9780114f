"""Streams: order, bounded memory, errors and cancellation across stages, stats."""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import psutil
import pytest

import mpchan
from mpchan._stream import failed_items, indexed_results, trace_records

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x: int) -> int:
    return x * x


def jitter_square(x: int) -> int:
    # uneven cost, so that workers finish out of order
    if x % 7 == 0:
        time.sleep(0.002)
    return x * x


def is_even(x: int) -> bool:
    return x % 2 == 0


def twice(x: int) -> list[int]:
    return [x, x]


def fail_on_13(x: int) -> int:
    if x == 13**4:
        raise ValueError(f"unlucky {x}")
    return x


def fail_odd(x: int) -> int:
    if x % 2:
        raise KeyError(x)
    return x


def die(x: int) -> int:
    if x == 5:
        os._exit(3)
    return x


def sleepy(x: int) -> int:
    time.sleep(5)
    return x


class Flaky:
    """Fails the first ``n`` calls in each process."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls = 0

    def __call__(self, x: int) -> int:
        self.calls += 1
        if self.calls <= self.n:
            raise RuntimeError("flaky")
        return x


class Counting:
    """An endless source that counts how many items were taken from it."""

    def __init__(self) -> None:
        self.taken = 0

    def __iter__(self) -> Iterator[int]:
        for i in itertools.count():
            self.taken = i + 1
            yield i


def test_ordered_multi_stage() -> None:
    s = (
        mpchan.stream(range(500))
        .map(jitter_square, workers=3, capacity=4, ordered=True)
        .filter(is_even, workers=2)
        .flat_map(twice, workers=2)
    )
    expected = [v for x in range(500) for v in twice(x * x) if (x * x) % 2 == 0]
    assert s.collect() == expected


def test_unordered_delivers_everything_once() -> None:
    out = mpchan.stream(range(300)).map(jitter_square, workers=3).collect()
    assert sorted(out) == [x * x for x in range(300)]


@pytest.mark.parametrize("ordered", [True, False])
def test_batch(ordered: bool) -> None:
    s = mpchan.stream(range(23), chunksize=4).map(square, workers=2, ordered=ordered).batch(5)
    out = s.collect()
    assert [len(b) for b in out] == [5, 5, 5, 5, 3]
    flat = [v for b in out for v in b]
    if ordered:
        assert flat == [x * x for x in range(23)]
    else:
        assert sorted(flat) == [x * x for x in range(23)]


def test_chunksize_keeps_order() -> None:
    out = mpchan.stream(range(1000), chunksize=16).map(jitter_square, workers=2, ordered=True)
    assert out.collect() == [x * x for x in range(1000)]


def test_run_calls_sink_and_counts() -> None:
    got: list[int] = []
    assert mpchan.stream(range(10)).map(square).run(got.append) == 10
    assert sorted(got) == [x * x for x in range(10)]


@pytest.mark.parametrize("chunksize", [1, None])
def test_memory_stays_bounded_on_endless_source(chunksize: int | None) -> None:
    src = Counting()
    s = (
        mpchan.stream(src, chunksize=chunksize)
        .map(square, workers=2, capacity=2)
        .map(square, workers=2, capacity=2, ordered=True)
    )
    # in flight at most: three channels of 2, a few items held by each of the four
    # workers, the feeder and the consumer (chunks of one item)
    # (chunks of up to 16 items when adaptive)
    bound = (3 * 2 + 4 * 3 + 4) * (chunksize or 16)
    n = 0
    with s:
        for value in s:
            n += 1
            assert value == (n - 1) ** 4
            assert src.taken - n <= bound, (src.taken, n)
            if n == 3000:
                break


def test_error_in_stage_three_cancels_stages_one_and_two() -> None:
    # an endless source: the run can only end if the error stops stages 1 and 2
    s = (
        mpchan.stream(itertools.count())
        .map(square, workers=2)
        .map(square, workers=2)
        .map(fail_on_13, workers=2)
    )
    with pytest.raises(ValueError, match="unlucky") as info:
        s.collect()
    # remote traceback as __cause__, and a note naming the worker
    assert "fail_on_13" in str(info.value.__cause__)
    assert any("raised in mpchan worker" in n for n in info.value.__notes__)
    del info  # its traceback holds the stream (and so its shared memory) in a cycle


def test_ctx_cancel_stops_every_stage_and_ends_iteration() -> None:
    ctx, cancel = mpchan.with_cancel(mpchan.background())
    s = mpchan.stream(itertools.count(), ctx=ctx).map(square, workers=2).map(square)
    n = 0
    for _ in s:
        n += 1
        if n == 20:
            cancel()
    assert n >= 20
    assert ctx.err() is not None


def test_ctx_cancel_kills_busy_stage() -> None:
    ctx, cancel = mpchan.with_cancel(mpchan.background())
    s = mpchan.stream(range(100), ctx=ctx).map(square).map(sleepy, workers=2)
    cancel()
    t = time.monotonic()
    assert s.collect() == []
    assert time.monotonic() - t < 4


def test_drain_finishes_what_was_read() -> None:
    ctx, cancel = mpchan.with_cancel(mpchan.background())
    s = mpchan.stream(itertools.count(), ctx=ctx).map(square, workers=3, ordered=True)
    out = []
    for v in s:
        out.append(v)
        if len(out) == 10:
            ctx.request_drain()
    cancel()
    assert len(out) >= 10
    assert out == [x * x for x in range(len(out))]


def test_early_break_leaves_nothing_behind() -> None:
    s = mpchan.stream(itertools.count()).map(square, workers=2).map(square, workers=2)
    for i, _v in enumerate(s):
        if i == 100:
            break
    s.close()


def test_close_from_generator_exit() -> None:
    it = iter(mpchan.stream(itertools.count()).map(square, workers=2))
    assert next(it) in {x * x for x in range(100)}
    it.close()  # type: ignore[attr-defined]


def test_stats_add_up() -> None:
    s = (
        mpchan.stream(range(200))
        .map(square, workers=2)
        .filter(is_even, workers=2)
        .flat_map(twice)
        .batch(7)
    )
    out = s.collect()
    st = s.stats()
    assert [x["kind"] for x in st] == ["map", "filter", "flat_map", "batch"]
    assert st[0]["items_in"] == 200
    for a, b in itertools.pairwise(st):
        assert a["items_out"] == b["items_in"]
    assert st[1]["items_out"] == 100
    assert st[2]["items_out"] == 200
    assert st[-1]["items_out"] == len(out) == 29
    for x in st:
        assert x["busy_s"] >= 0 and x["blocked_in_s"] >= 0 and x["blocked_out_s"] >= 0


def test_on_error_skip_collects_failures() -> None:
    s = mpchan.stream(range(20)).map(fail_odd, workers=2, on_error="skip")
    assert sorted(s.collect()) == list(range(0, 20, 2))
    assert s.stats()[0]["failed"] == 10
    failures = s.failures()
    assert len(failures) == 10
    assert all(err.startswith("KeyError") for _item, err in failures)


def test_retries() -> None:
    assert mpchan.stream(range(3)).map(Flaky(2), retries=2).collect() == [0, 1, 2]


def test_timeout_per_item() -> None:
    with pytest.raises(mpchan.TaskTimeout):
        mpchan.stream(range(3)).map(sleepy, timeout=0.2).collect()


def test_crashed_worker_fails_the_stream() -> None:
    with pytest.raises(mpchan.WorkerCrashed):
        mpchan.stream(range(100)).map(die, workers=2).collect()


def test_source_error_reaches_consumer() -> None:
    def source() -> Iterator[int]:
        yield 1
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        mpchan.stream(source()).map(square).collect()


def test_runs_once_and_validates() -> None:
    s = mpchan.stream(range(3)).map(square)
    assert sorted(s) == [0, 1, 4]
    with pytest.raises(RuntimeError):
        list(s)
    with pytest.raises(ValueError):
        mpchan.stream(range(3)).map(square, workers=0)
    with pytest.raises(ValueError):
        mpchan.stream(range(3)).map(square, capacity=-1)
    with pytest.raises(ValueError):
        mpchan.stream(range(3)).map(square, on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        mpchan.stream(range(3)).batch(0)
    with pytest.raises(ValueError):
        list(mpchan.stream(range(3)))


def unpicklable(x: int) -> object:
    return threading.Lock()  # cannot be pickled: fails when sent to the next stage


def test_unpicklable_result_fails_the_stream() -> None:
    s = mpchan.stream(itertools.count()).map(unpicklable, workers=2).map(square)
    with pytest.raises(mpchan.SerializationError):
        s.collect()


def test_trace_records_every_item_also_when_the_run_fails() -> None:
    plain = mpchan.stream(range(5)).map(square)
    assert sorted(plain.collect()) == [0, 1, 4, 9, 16]
    assert trace_records(plain) == []  # not asked for: nothing recorded

    before = time.monotonic()
    s = (
        mpchan.stream(range(40), chunksize=1, _trace=True)
        .map(square, workers=2)
        .map(square)
        .map(fail_on_13)
    )
    with pytest.raises(ValueError, match="unlucky"):
        s.collect()
    records = trace_records(s)
    assert {r["stage"] for r in records} <= {0, 1, 2}
    assert all(r["pid"] != os.getpid() and r["dropped"] == 0 for r in records)
    events = [(r["stage"], *e) for r in records for e in r["events"]]
    assert all(before <= t0 <= t1 <= time.monotonic() for _s, t0, t1, _o, _e in events)
    # the failing worker reported too: its last item is the error that stopped the run
    errors = [(st, o, e) for st, _t0, _t1, o, e in events if o != "ok"]
    assert errors == [(2, "error", f"ValueError: unlucky {13**4}")]
    assert sum(st == 0 for st, *_rest in events) >= 14  # 0..13 at least went through stage 0


# --------------------------------------------------------------------------- failures
#
# A failed item: the results before it first (in order when ordered), then
# its exception, naming the item. A worker that dies running an item: the item
# runs again on a new worker while ``retries`` allow, else it fails like any.

FAIL_AT = 37


def fail_at(x: int) -> int:
    if x == FAIL_AT:
        raise ValueError(f"bad input: {x}")
    return x


def _note_call(where: str, x: int) -> None:
    # one file a call, so a test can count them
    with open(os.path.join(where, f"call-{x}-{os.getpid()}-{time.monotonic_ns()}"), "w"):
        pass


class Kill:
    """SIGKILLs its own worker at FAIL_AT: the first ``times`` calls of it
    (counted in files under ``where``), or every time."""

    def __init__(self, where: str, times: int | None = None) -> None:
        self.where = where
        self.times = times

    def __call__(self, x: int) -> int:
        _note_call(self.where, x)
        if x == FAIL_AT:
            done = sum(1 for f in os.listdir(self.where) if f.startswith(f"call-{x}-"))
            if self.times is None or done <= self.times:
                os.kill(os.getpid(), signal.SIGKILL)
        return x


def _calls(where: str, x: int) -> int:
    return sum(1 for f in os.listdir(where) if f.startswith(f"call-{x}-"))


def _until_error(s: mpchan.Stream) -> tuple[list[int], BaseException]:
    got: list[int] = []
    try:
        for v in s:
            got.append(v)
    except Exception as exc:
        return got, exc
    raise AssertionError(f"no error; got {got}")


@pytest.mark.parametrize("chunksize", [1, 16, None])
def test_results_before_a_failure_come_first_in_order(chunksize: int | None) -> None:
    s = mpchan.stream(range(50), chunksize=chunksize).map(fail_at, workers=3, ordered=True)
    got, exc = _until_error(s)
    assert got == list(range(FAIL_AT))
    assert isinstance(exc, ValueError) and str(exc) == "bad input: 37"
    assert any("on input item 37" in n for n in exc.__notes__)
    # the remote traceback is the function's: no frame of mpchan's
    cause = str(exc.__cause__)
    assert "in fail_at" in cause and "_stage_main" not in cause and "_call" not in cause


def test_unordered_delivers_every_item_before_the_failure() -> None:
    s = mpchan.stream(range(200), chunksize=2).map(fail_at, workers=3).map(abs, workers=2)
    got, exc = _until_error(s)
    assert isinstance(exc, ValueError)
    # what was in flight finished too: a superset of the items before it, once each
    assert set(range(FAIL_AT)) <= set(got) and FAIL_AT not in got
    assert len(got) == len(set(got))


def test_results_before_a_failure_in_a_later_stage() -> None:
    s = mpchan.stream(range(50)).map(abs, workers=2).map(fail_at, workers=2, ordered=True)
    got, exc = _until_error(s)
    assert got == list(range(FAIL_AT))
    assert any("stage 1 map(fail_at), on input item 37" in n for n in exc.__notes__)


def test_source_error_comes_after_every_item_read_before() -> None:
    def source() -> Iterator[int]:
        yield from range(20)
        raise OSError("disk on fire")

    got, exc = _until_error(mpchan.stream(source()).map(square, workers=2, ordered=True))
    assert got == [x * x for x in range(20)]
    assert isinstance(exc, OSError)
    del exc  # its traceback holds the stream (and so its shared memory) in a cycle


def test_unpicklable_result_is_skipped_with_on_error_skip() -> None:
    s = mpchan.stream(range(10)).map(unpicklable, workers=2, on_error="skip").map(square)
    assert s.collect() == []
    assert s.stats()[0]["failed"] == 10
    assert all(err.startswith("PicklingError: cannot pickle") for _i, err in s.failures())


def test_enumerate_gives_each_result_its_source_index() -> None:
    s = mpchan.stream(range(20), chunksize=4).map(fail_odd, on_error="skip").flat_map(twice)
    pairs = sorted(indexed_results(s))
    assert pairs == sorted((x, x) for x in range(0, 20, 2) for _ in range(2))
    assert sorted(r.source_index for r in failed_items(s)) == list(range(1, 20, 2))


def test_killed_worker_runs_its_item_again_with_retries(tmp_path: Path) -> None:
    s = mpchan.stream(range(50), chunksize=8).map(
        Kill(str(tmp_path), times=1), workers=2, ordered=True, retries=1
    )
    assert s.collect() == list(range(50))
    assert _calls(str(tmp_path), FAIL_AT) == 2
    # the items of its chunk (32..39) that had finished ran again, no other
    assert all(_calls(str(tmp_path), x) == 1 for x in [*range(32), *range(40, 50)])


def test_killed_worker_in_a_later_stage_with_retries(tmp_path: Path) -> None:
    s = (
        mpchan.stream(range(50))
        .map(abs, workers=2)
        .map(Kill(str(tmp_path), times=1), workers=2, retries=1)
    )
    assert sorted(s.collect()) == list(range(50))


def test_killed_worker_without_retries_fails_naming_the_item(tmp_path: Path) -> None:
    s = mpchan.stream(range(50), chunksize=4).map(Kill(str(tmp_path)), workers=2, ordered=True)
    got, exc = _until_error(s)
    assert got == list(range(FAIL_AT))  # 36 came with 37: it ran again, on the new worker
    assert isinstance(exc, mpchan.WorkerCrashed)
    assert exc.signal == "SIGKILL" and exc.pid is not None
    assert f"(pid {exc.pid})" in str(exc) and "killed by SIGKILL" in str(exc)
    assert any("on input item 37" in n for n in exc.__notes__)
    assert _calls(str(tmp_path), FAIL_AT) == 1


def test_item_that_always_kills_runs_retries_plus_one_times(tmp_path: Path) -> None:
    s = mpchan.stream(range(50)).map(Kill(str(tmp_path)), workers=2, retries=2)
    with pytest.raises(mpchan.WorkerCrashed):
        s.collect()
    assert _calls(str(tmp_path), FAIL_AT) == 3


def test_killed_worker_with_on_error_skip_skips_the_item(tmp_path: Path) -> None:
    s = mpchan.stream(range(50)).map(Kill(str(tmp_path)), workers=2, on_error="skip")
    assert sorted(s.collect()) == [x for x in range(50) if x != FAIL_AT]
    assert s.stats()[0]["failed"] == 1
    [(item, error)] = s.failures()
    assert item == "37" and error.startswith("WorkerCrashed: the worker (pid ")


def my_pid(_x: int) -> int:
    return os.getpid()


def test_worker_killed_outside_an_item_ends_the_run() -> None:
    more = threading.Event()

    def source() -> Iterator[int]:
        yield 0
        more.wait(30)  # the worker waits for input meanwhile
        yield 1

    s = mpchan.stream(source()).map(my_pid)
    it = iter(s)
    worker = psutil.Process(next(it))
    worker.kill()
    worker.wait(timeout=10)
    more.set()
    with pytest.raises(mpchan.WorkerCrashed, match="ran no item"):
        next(it)
