"""WaitGroup across processes (spec 2.5)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
import threading
from typing import Any

import pytest

import mpchan
from mpchan import Channel, WaitGroup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "chan_scripts"))
import chan_workers as cw


def start(fn: Any, *args: Any, method: str = "fork") -> Any:
    p = multiprocessing.get_context(method).Process(target=fn, args=args, daemon=True)
    p.start()
    return p


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_waitgroup_across_processes(method: str) -> None:
    wg, gate, out = WaitGroup(), Channel(0), Channel(3)
    wg.add(3)
    ps = [start(cw.wg_worker, wg, gate, out, method=method) for _ in range(3)]
    with pytest.raises(TimeoutError):
        wg.wait(timeout=0.05)
    for _ in range(3):
        gate.send("go", timeout=30)
    wg.wait(timeout=30)
    assert wg.count == 0
    assert {out.recv(timeout=5) for _ in range(3)} == {p.pid for p in ps}
    for p in ps:
        p.join(10)
        assert p.exitcode == 0


def test_many_waiters_in_other_processes_all_wake() -> None:
    wg, out = WaitGroup(), Channel(3)
    wg.add(1)
    ps = [start(cw.wg_waiter, wg, out) for _ in range(3)]
    # each waiter parks (or has not started yet; either way it must return)
    wg.done()
    for _ in range(3):
        assert out.recv(timeout=10) < 10
    for p in ps:
        p.join(10)


def test_negative_counter_raises_value_error() -> None:
    wg = WaitGroup()
    with pytest.raises(ValueError):
        wg.done()
    wg.add(2)
    with pytest.raises(ValueError):
        wg.add(-3)
    assert wg.count == 2  # unchanged
    with pytest.raises(TypeError):
        wg.add(1.0)  # type: ignore[arg-type]
    wg.add(-2)
    wg.wait(timeout=1)


def test_negative_counter_in_another_process() -> None:
    wg, out = WaitGroup(), Channel(1)
    p = start(cw.wg_negative, wg, out)
    kind, _msg = out.recv(timeout=10)
    assert kind == "ValueError"
    p.join(5)


def test_wait_with_threads_and_ctx() -> None:
    wg = WaitGroup()
    wg.add(4)
    ts = [threading.Thread(target=wg.done) for _ in range(4)]
    for t in ts:
        t.start()
    wg.wait(timeout=10)
    for t in ts:
        t.join()
    ctx, cancel = mpchan.with_cancel(mpchan.background())
    wg.add(1)
    cancel()
    with pytest.raises(mpchan.Cancelled):
        wg.wait(ctx=ctx, timeout=5)
    wg.done()


def test_waitgroup_pickles_to_a_handle() -> None:
    wg = WaitGroup()
    wg2 = pickle.loads(pickle.dumps(wg))
    wg.add(1)
    assert wg2.count == 1
    wg2.done()
    wg.wait(timeout=1)
