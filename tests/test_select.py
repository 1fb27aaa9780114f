"""select across processes (spec 2.3)."""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections import Counter
from typing import Any

import pytest

import mpchan
from mpchan import Channel, ChannelClosed, select

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "chan_scripts"))
import chan_workers as cw

wait_for = cw.wait_for


def start(fn: Any, *args: Any, method: str = "fork") -> Any:
    p = multiprocessing.get_context(method).Process(target=fn, args=args, daemon=True)
    p.start()
    return p


def no_registrations(*chs: Channel) -> bool:
    return all(ch._core.waiters() == [] for ch in chs)


def test_fairness_among_ready_cases() -> None:
    chs = [Channel(4) for _ in range(3)]
    n = 3000
    counts: Counter[int] = Counter()
    for _ in range(n):
        for ch in chs:
            while len(ch) < 2:
                ch.send(1)
        i, v, ok = select(*chs, timeout=1)
        assert ok and v == 1
        counts[i] += 1
    expected = n / 3
    chi2 = sum((counts[i] - expected) ** 2 / expected for i in range(3))
    assert chi2 < 13.8, f"not uniform: {counts}"  # p = 0.001 with 2 degrees of freedom


def test_fairness_send_and_receive_mixed() -> None:
    a, b = Channel(1000), Channel(1000)
    b.send_many(range(1000))
    counts: Counter[int] = Counter()
    for _ in range(600):
        i, _v, _ok = select((a, "x"), b, timeout=1)
        counts[i] += 1
    chi2 = sum((counts[i] - 300) ** 2 / 300 for i in range(2))
    assert chi2 < 10.8, counts


def test_default_only_when_nothing_ready() -> None:
    a, b, u = Channel(1), Channel(1), Channel(0)
    assert select(a, b, default=True) == (-1, None, False)
    assert select(a, (u, 1), default=True) == (-1, None, False)  # no receiver on u
    b.send("b")
    assert select(a, b, default=True) == (1, "b", True)
    a.send("full")
    assert select((a, "more"), default=True) == (-1, None, False)
    assert select((a, "more"), b, default=True) == (-1, None, False)
    assert no_registrations(a, b, u)


def test_default_sends_to_a_waiting_receiver_in_another_process() -> None:
    u, out = Channel(0), Channel(1)
    p = start(cw.recv_then_report, u, out)
    wait_for(lambda: u.stats()["blocked_receivers"] == 1, what="a parked receiver")
    assert select((u, "hi"), default=True) == (0, None, True)
    assert out.recv(timeout=5) == ("value", "hi")
    p.join(5)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_select_wakes_on_send_from_another_process(method: str) -> None:
    a, b, done = Channel(0), Channel(1), Channel(1)
    p = start(cw.send_then_report, b, "from child", done, method=method)
    i, v, ok = select(a, b, timeout=30)
    assert (i, v, ok) == (1, "from child", True)
    assert done.recv(timeout=10) == "sent"
    p.join(10)
    assert no_registrations(a, b)


def test_no_stale_registration() -> None:
    a, b, c = Channel(0), Channel(2), Channel(0)
    # fired by another process while parked
    done = Channel(1)
    p = start(cw.send_then_report, a, 1, done)
    assert select(a, b, (c, "x"), timeout=10)[0] == 0
    assert done.recv(timeout=5) == "sent"
    p.join(5)
    assert no_registrations(a, b, c)
    # timed out
    with pytest.raises(TimeoutError):
        select(a, b, (c, "x"), timeout=0.05)
    assert no_registrations(a, b, c)
    assert c.stats()["sent"] == 0  # the staged send was withdrawn
    # default
    select(a, (c, "x"), default=True)
    assert no_registrations(a, b, c)
    st = c.stats()
    assert st["blocked_senders"] == 0 and st["blocked_receivers"] == 0


def test_duplicate_channel() -> None:
    ch = Channel(10)
    seen: Counter[int] = Counter()
    for i in range(200):
        ch.send(i)
        idx, v, ok = select(ch, ch, timeout=1)
        assert ok and v == i
        seen[idx] += 1
    assert seen[0] > 40 and seen[1] > 40
    assert select((ch, 1), (ch, 2), timeout=1)[0] in (0, 1)
    assert len(ch) == 1
    assert no_registrations(ch)
    u = Channel(0)
    with pytest.raises(TimeoutError):
        select(u, u, (u, 5), (u, 6), timeout=0.1)
    assert no_registrations(u)
    assert u.stats()["sent"] == 0


def test_self_select_never_pairs_with_itself() -> None:
    u = Channel(0)
    for _ in range(5):
        with pytest.raises(TimeoutError):
            select((u, "me"), u, timeout=0.05)
    assert no_registrations(u)
    assert u.stats()["sent"] == 0 and u.stats()["received"] == 0


def test_self_select_pairs_with_another_process() -> None:
    u, out = Channel(0), Channel(1)
    p = start(cw.recv_then_report, u, out)
    i, v, ok = select((u, "to child"), u, timeout=10)
    assert (i, v, ok) == (0, None, True)
    assert out.recv(timeout=5) == ("value", "to child")
    p.join(5)


def test_unbuffered_select_sends_exactly_once() -> None:
    """Two unbuffered send cases, a select-receiver elsewhere: every select
    fires exactly one case, and every value arrives exactly once."""
    a, b, out, fired = Channel(0), Channel(0), Channel(1), Channel(1)
    n = 200
    rx = start(cw.select_receiver, a, b, out)
    tx = start(cw.select_sender, a, b, n, fired)
    idxs = fired.recv(timeout=60)
    tx.join(10)
    a.close()
    b.close()
    got = out.recv(timeout=30)
    rx.join(10)
    assert len(idxs) == n
    assert sorted(i for _, i in got) == list(range(n))
    assert [("a", "b")[k] for k in idxs] == [name for name, _ in sorted(got, key=lambda t: t[1])]


def test_closed_channels_are_ready() -> None:
    a, b = Channel(1), Channel(0)
    a.close()
    assert select(a, b, timeout=1) == (0, None, False)
    b.close()
    with pytest.raises(ChannelClosed):
        select((b, 1), timeout=1)
    c = Channel(0)
    with pytest.raises(ChannelClosed):
        select(c, (b, 1), timeout=1)
    assert no_registrations(a, b, c)


def test_close_wakes_a_parked_select() -> None:
    a, b = Channel(0), Channel(0)
    t0 = time.monotonic()
    closer = start(_close_when_parked, a)
    assert select(a, b, timeout=10) == (0, None, False)
    closer.join(5)
    assert time.monotonic() - t0 < 10


def _close_when_parked(ch: Channel) -> None:
    end = time.monotonic() + 10
    while ch.stats()["blocked_receivers"] == 0 and time.monotonic() < end:
        time.sleep(0.002)
    ch.close()


def test_select_with_timer_and_timeout() -> None:
    a = Channel(1)
    t0 = time.monotonic()
    i, v, ok = select(a, mpchan.after(0.05), timeout=5)
    assert i == 1 and ok and isinstance(v, float)
    assert time.monotonic() - t0 >= 0.05
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        select(a, timeout=0.05)
    assert 0.04 <= time.monotonic() - t0 < 2
    assert no_registrations(a)


def test_select_ctx_done() -> None:
    ctx, cancel = mpchan.with_cancel(mpchan.background())
    a = Channel(0)
    assert select(a, ctx.done(), default=True) == (-1, None, False)
    cancel()
    assert select(a, ctx.done(), timeout=1) == (1, None, False)


def test_bad_cases() -> None:
    with pytest.raises(TypeError):
        select(42)
    with pytest.raises(TypeError):
        select((1, 2))


def test_select_send_unpicklable() -> None:
    import threading

    a = Channel(1)
    with pytest.raises(mpchan.SerializationError):
        select((a, threading.Lock()), timeout=1)
    assert no_registrations(a)
    assert a.stats()["sent"] == 0


def test_select_big_send_case_that_loses_releases_payload() -> None:
    a, b = Channel(1), Channel(1)
    b.send("ready")
    for _ in range(30):
        i, _v, _ok = select((a, bytes(500_000)), b, timeout=1)
        if i == 0:
            assert a.recv(timeout=1) == bytes(500_000)
        else:
            b.send("ready")
    assert no_registrations(a, b)


def _select_into(out: list[Any], *cases: Any) -> None:
    out.append(select(*cases, timeout=10))


def test_a_blocking_receiver_wakes_a_select_waiting_to_send() -> None:
    """A select with two unbuffered send cases stages one value and waits to
    be told that a receiver came for the other; a plain blocking recv on
    that one tells it at once (not after the select's safety slice)."""
    latencies = []
    for _ in range(3):
        u1, u2 = Channel(0), Channel(0)
        out: list[Any] = []
        t = threading.Thread(target=_select_into, args=(out, (u1, 1), (u2, 2)))
        t.start()
        wait_for(
            lambda a=u1, b=u2: all(ch.stats()["blocked_senders"] == 1 for ch in (a, b)),
            what="a select registered on both channels",
        )
        # the staged case's registration carries its ticket (key, kind, token, ticket, ...)
        staged, other = (u1, u2) if u1._core.waiters()[0][3] else (u2, u1)
        assert other._core.waiters()[0][3] == 0
        start = time.monotonic()
        value = other.recv(timeout=10)
        latencies.append(time.monotonic() - start)
        t.join(10)
        assert out == [(0 if other is u1 else 1, None, True)]
        assert value == (1 if other is u1 else 2)
        assert staged.stats()["sent"] == 0  # withdrawn
        assert no_registrations(u1, u2)
    assert min(latencies) < 0.1, latencies


def test_a_value_a_select_sent_into_a_buffer_is_received_by_its_own_next_select() -> None:
    """Only a staged (unbuffered) value is kept from its own select; once in a
    buffer it is sent, and the thread's next select may receive it."""
    buf, other = Channel(1), Channel(0)
    assert select((buf, 5), other, timeout=1) == (0, None, True)
    assert select(buf, other, timeout=1) == (0, 5, True)
    assert select((buf, 6), (other, 0), timeout=1) == (0, None, True)
    assert select(buf, default=True) == (0, 6, True)
