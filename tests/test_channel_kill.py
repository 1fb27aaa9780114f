"""Processes SIGKILLed inside channel operations never freeze a channel (spec 2.2)."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from mpchan import Channel, WouldBlock
from mpchan._compat import SHM_DIR

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "chan_scripts"))
import chan_workers as cw

_fork = multiprocessing.get_context("fork")


wait_for = cw.wait_for


def start(fn: Any, *args: Any) -> Any:
    p = _fork.Process(target=fn, args=args, daemon=True)
    p.start()
    return p


def kill(p: Any) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.join(5)
    assert p.exitcode == -signal.SIGKILL


def test_kill_blocked_sender() -> None:
    ch, done = Channel(1), Channel(1)
    ch.send("first")
    p = start(cw.send_then_report, ch, "second", done)
    wait_for(lambda: ch.stats()["blocked_senders"] == 1, what="a parked sender")
    kill(p)
    t0 = time.monotonic()
    assert ch.recv(timeout=1) == "first"
    ch.send("third", timeout=1)
    assert ch.recv(timeout=1) == "third"
    assert time.monotonic() - t0 < 1
    wait_for(lambda: ch.stats()["blocked_senders"] == 0, what="the dead sender's entry to go")


def test_kill_blocked_unbuffered_sender() -> None:
    ch, done = Channel(0), Channel(1)
    p = start(cw.send_then_report, ch, "staged", done)
    wait_for(lambda: ch.stats()["blocked_senders"] == 1, what="a staged sender")
    kill(p)
    # its staged value may be delivered (it was complete) or not; the
    # channel must go on either way
    q = start(cw.send_then_report, ch, "live", done)
    first = ch.recv(timeout=1)
    if first == "staged":
        first = ch.recv(timeout=1)
    assert first == "live"
    assert done.recv(timeout=5) == "sent"
    q.join(5)


def test_kill_blocked_receiver() -> None:
    ch, out = Channel(2), Channel(2)
    p = start(cw.recv_then_report, ch, out)
    wait_for(lambda: ch.stats()["blocked_receivers"] == 1, what="a parked receiver")
    q = start(cw.recv_then_report, ch, out)
    wait_for(lambda: ch.stats()["blocked_receivers"] == 2, what="two parked receivers")
    kill(p)
    t0 = time.monotonic()
    ch.send("to the living")
    assert out.recv(timeout=1) == ("value", "to the living")
    assert time.monotonic() - t0 < 1
    q.join(5)
    assert q.exitcode == 0


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_kill_while_holding_the_lock(mode: int) -> None:
    """Robust mutex: the next locker recovers; a record written but not
    committed (modes 1, 2) is never delivered."""
    ch = Channel(4)
    ch.send("a")
    rec0 = ch._core.stats()[7]
    p = start(cw.die_holding_lock, ch, mode)
    p.join(5)
    assert p.exitcode == 9
    t0 = time.monotonic()
    ch.send("b", timeout=1)
    assert ch.recv(timeout=1) == "a"
    assert ch.recv(timeout=1) == "b"
    with pytest.raises(WouldBlock):
        ch.recv_nowait()
    assert time.monotonic() - t0 < 1
    assert ch._core.stats()[7] == rec0 + 1
    st = ch.stats()
    assert (st["len"], st["sent"], st["received"]) == (0, 2, 2)


@pytest.mark.timeout(120)
def test_kill_in_the_middle_of_large_writes() -> None:
    np = pytest.importorskip("numpy")
    ch = Channel(2)
    nbytes = 8 << 20
    rng = random.Random(7)
    seen = 0
    start_seq = 0
    for _ in range(8):
        p = start(cw.array_sender, ch, nbytes, start_seq)
        a = ch.recv(timeout=30)  # it is sending
        # kill it at a random moment of its next writes
        time.sleep(rng.uniform(0, 0.03))  # a random kill time, not synchronisation
        kill(p)
        got = [a]
        while True:
            try:
                got.append(ch.recv_nowait())
            except WouldBlock:
                break
        for arr in got:
            assert arr.nbytes == nbytes
            v = int(arr[0])
            assert v >= start_seq
            assert (arr == v).all(), "a half-written array was delivered"
            start_seq = v + 1
            seen += 1
    # and the channel works afterwards
    ch.send(np.full(nbytes // 8, -1, dtype=np.int64), timeout=1)
    assert int(ch.recv(timeout=1)[-1]) == -1
    assert seen >= 8


@pytest.mark.timeout(120)
def test_many_kills_during_heavy_traffic() -> None:
    """Kill senders at random moments of heavy traffic: each sender's
    messages arrive in order with no gap and no duplicate (only the in-flight
    one of a killed sender may be lost), and the counters add up."""
    ch = Channel(8)
    rng = random.Random(3)
    next_seq: dict[int, int] = {}
    senders = {s: start(cw.busy_sender, ch, s, 0) for s in (0, 1)}
    new_id = 2

    def take(s: int, i: int) -> None:
        assert i == next_seq.get(s, 0), f"sender {s}: got {i}, expected {next_seq.get(s, 0)}"
        next_seq[s] = i + 1

    for _round in range(20):
        for _ in range(rng.randint(1, 200)):
            take(*ch.recv(timeout=5))
        victim = rng.choice(sorted(senders))
        kill(senders.pop(victim))
        senders[new_id] = start(cw.busy_sender, ch, new_id, 0)
        new_id += 1
    for p in senders.values():
        kill(p)
    while True:
        try:
            take(*ch.recv_nowait())
        except WouldBlock:
            break
    st = ch.stats()
    assert st["sent"] == st["received"]
    assert st["len"] == 0
    ch.send("alive", timeout=1)
    assert ch.recv(timeout=1) == "alive"


_KILL_ALL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chan_scripts", "kill_all.py")


@pytest.mark.timeout(60)
def test_shm_freed_after_sigkill_of_every_process() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MPCHAN_SESSION"}
    proc = subprocess.Popen([sys.executable, _KILL_ALL], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        session, *pids = line.split()
        prefix = f"mpchan-{session}-"
        assert any(n.startswith(prefix) for n in os.listdir(SHM_DIR))
        for pid in [*map(int, pids), proc.pid]:
            os.kill(pid, signal.SIGKILL)
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    end = time.monotonic() + 4
    left = [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]
    while left and time.monotonic() < end:
        time.sleep(0.05)
        left = [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]
    assert not left, f"left behind: {left}"
