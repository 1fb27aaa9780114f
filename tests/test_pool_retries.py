"""Pool ``retries``: one meaning with stream stages and ``mpchan run``.

A task that failed -- its call raised, it ran past ``task_timeout``, or its
worker died running it -- runs again, up to ``retries`` more times, and the
last failure is its result. Each call leaves a line in a file, so the tests
count the calls that really happened (in whatever process).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from mpchan._errors import TaskTimeout
from mpchan._pool import Pool

cloudpickle.register_pickle_by_value(sys.modules[__name__])

WAIT = 30


class Flaky(Exception):
    pass


def _calls(log: Path, key: object) -> int:
    """Record one call of ``key``; how many calls of it there were, this one included."""
    with open(log, "a") as fh:
        fh.write(f"{key}\n")
    return log.read_text().splitlines().count(str(key))


def fail_first(log: str, key: object, failures: int) -> str:
    if _calls(Path(log), key) <= failures:
        raise Flaky(f"call of {key} failed")
    return f"ok {key}"


def map_item(log: str, x: int) -> int:
    # Item 3 fails on its first call only; every other item never fails.
    if _calls(Path(log), x) == 1 and x == 3:
        raise Flaky("item 3")
    return x * 10


def slow_first(log: str) -> str:
    if _calls(Path(log), "slow") == 1:
        time.sleep(30)
    return "fast the second time"


def calls_of(log: Path, key: object) -> int:
    return log.read_text().splitlines().count(str(key)) if log.exists() else 0


@pytest.mark.parametrize("retries", [0, 1, 2])
def test_a_raising_call_runs_retries_more_times_then_fails(tmp_path: Path, retries: int) -> None:
    log = tmp_path / "calls"
    with Pool(2, retries=retries) as p:
        exc = p.submit(fail_first, str(log), "a", 99).exception(timeout=WAIT)
        assert isinstance(exc, Flaky)
        assert calls_of(log, "a") == retries + 1
        assert p.stats()["retried"] == retries


def test_a_call_that_fails_once_succeeds_on_its_retry(tmp_path: Path) -> None:
    log = tmp_path / "calls"
    with Pool(2, retries=2) as p:
        futs = [p.submit(fail_first, str(log), k, 1) for k in range(6)]
        assert [f.result(timeout=WAIT) for f in futs] == [f"ok {k}" for k in range(6)]
        assert all(calls_of(log, k) == 2 for k in range(6))
        assert p.stats()["retried"] == 6


def test_map_calls_only_the_failed_item_again(tmp_path: Path) -> None:
    log = tmp_path / "calls"
    with Pool(2, retries=1) as p:
        out = list(p.map(map_item, [str(log)] * 20, range(20), chunksize=5, timeout=WAIT))
    assert out == [x * 10 for x in range(20)]
    assert calls_of(log, 3) == 2
    assert all(calls_of(log, x) == 1 for x in range(20) if x != 3)


def test_map_without_retries_raises_the_items_exception(tmp_path: Path) -> None:
    log = tmp_path / "calls"
    with Pool(2) as p, pytest.raises(Flaky, match="item 3"):
        list(p.map(map_item, [str(log)] * 20, range(20), chunksize=5, timeout=WAIT))
    assert calls_of(log, 3) == 1


def test_a_task_past_its_timeout_runs_again(tmp_path: Path) -> None:
    log = tmp_path / "calls"
    with Pool(1, task_timeout=0.5, retries=1) as p:
        assert p.submit(slow_first, str(log)).result(timeout=WAIT) == "fast the second time"
        assert calls_of(log, "slow") == 2
        stats = p.stats()
        assert stats["retried"] == 1
        assert stats["timed_out"] == 0  # it did not fail in the end


def test_the_timeout_stands_once_retries_are_spent(tmp_path: Path) -> None:
    log = tmp_path / "calls"
    with Pool(1, task_timeout=0.3, retries=0) as p:
        assert isinstance(p.submit(slow_first, str(log)).exception(timeout=WAIT), TaskTimeout)
        assert calls_of(log, "slow") == 1


def test_a_retried_call_keeps_its_future_running_and_other_work_goes_on(tmp_path: Path) -> None:
    log = tmp_path / "calls"
    with Pool(2, retries=3) as p:
        flaky = p.submit(fail_first, str(log), "f", 3)
        others = [p.submit(os.getpid) for _ in range(20)]
        assert flaky.result(timeout=WAIT) == "ok f"
        assert all(isinstance(f.result(timeout=WAIT), int) for f in others)
        assert calls_of(log, "f") == 4


def interrupt(log: str, key: object) -> None:
    _calls(Path(log), key)
    raise KeyboardInterrupt(f"stop {key}")


def test_a_keyboard_interrupt_is_a_stop_not_run_again(tmp_path: Path) -> None:
    # The same meaning for a single call (queued again by the parent) and
    # for a map item (called again in its worker): an exception or
    # sys.exit() runs again, a KeyboardInterrupt does not.
    log = tmp_path / "calls"
    with Pool(2, retries=2) as p:
        exc = p.submit(interrupt, str(log), "call").exception(timeout=WAIT)
        assert isinstance(exc, KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            list(p.map(interrupt, [str(log)], ["item"], timeout=WAIT))
        assert p.stats()["retried"] == 0
    assert calls_of(log, "call") == 1
    assert calls_of(log, "item") == 1


def exits_first(log: str, key: object) -> str:
    if _calls(Path(log), key) == 1:
        sys.exit(3)
    return f"ok {key}"


def test_sys_exit_in_a_call_runs_again(tmp_path: Path) -> None:
    log = tmp_path / "calls"
    with Pool(2, retries=1) as p:
        assert p.submit(exits_first, str(log), "call").result(timeout=WAIT) == "ok call"
        assert list(p.map(exits_first, [str(log)], ["item"], timeout=WAIT)) == ["ok item"]
    assert calls_of(log, "call") == 2
    assert calls_of(log, "item") == 2
