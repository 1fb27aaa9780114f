"""after / tick (spec 2.3)."""

from __future__ import annotations

import time

import pytest

import mpchan
from mpchan import Channel, WouldBlock, after, select, tick


def test_after_fires_once() -> None:
    t0 = time.time()
    m0 = time.monotonic()
    t = after(0.05)
    with pytest.raises(WouldBlock):
        t.recv_nowait()
    fired = t.recv(timeout=5)
    assert time.monotonic() - m0 >= 0.05
    assert t0 + 0.04 <= fired <= time.time() + 0.01  # unix time of firing
    with pytest.raises(WouldBlock):
        t.recv_nowait()  # only once
    with pytest.raises(TimeoutError):
        t.recv(timeout=0.05)


def test_after_zero_is_ready() -> None:
    assert select(after(0), timeout=1)[0] == 0
    assert isinstance(after(0).recv_nowait(), float)


def test_tick_fires_repeatedly_and_drops_late_ticks() -> None:
    t = tick(0.02)
    m0 = time.monotonic()
    times = [t.recv(timeout=2) for _ in range(3)]
    assert times == sorted(times)
    assert time.monotonic() - m0 >= 0.05
    time.sleep(0.1)  # be a slow receiver: five periods pass
    t.recv(timeout=1)
    with pytest.raises(WouldBlock):
        t.recv_nowait()  # missed ticks are dropped, not queued


def test_timer_in_select_against_channel() -> None:
    ch = Channel(1)
    i, _v, ok = select(ch, after(0.03), timeout=5)
    assert i == 1 and ok
    ch.send(1)
    assert select(ch, after(5), timeout=5) == (0, 1, True)


def test_bad_timer_arguments() -> None:
    with pytest.raises(ValueError):
        after(-1)
    with pytest.raises(ValueError):
        tick(0)


def test_iterate_tick() -> None:
    n = 0
    for _fired in mpchan.tick(0.01):
        n += 1
        if n == 3:
            break
    assert n == 3
