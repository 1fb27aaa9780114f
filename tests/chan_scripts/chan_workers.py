"""Functions run in child processes by the channel tests.

They live in a plain module (not in a test file) so that spawn and
forkserver children import only this and mpchan, not pytest.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import mpchan
from mpchan import Channel, EndOfChannel


def echo(ch_in: Channel, ch_out: Channel) -> None:
    """Receive values and send each back (until the input ends)."""
    for v in ch_in:
        ch_out.send(v)


def send_values(ch: Channel, values: list[Any]) -> None:
    for v in values:
        ch.send(v, timeout=30)


def send_then_report(ch: Channel, value: Any, done: Channel) -> None:
    """Send one value, then say so on ``done``."""
    ch.send(value, timeout=30)
    done.send("sent", timeout=30)


def recv_then_report(ch: Channel, out: Channel) -> None:
    """Receive one value (or the end) and report what happened."""
    try:
        out.send(("value", ch.recv(timeout=30)), timeout=30)
    except EndOfChannel:
        out.send(("end", None), timeout=30)


def send_until_closed(ch: Channel, value: Any, out: Channel) -> None:
    """Block in send; report the error that ended it."""
    try:
        ch.send(value, timeout=30)
        out.send(("sent", None), timeout=30)
    except mpchan.ChannelClosed as exc:
        out.send(("closed", type(exc).__name__), timeout=30)


def tagged_sender(ch: Channel, sender: int, n: int) -> None:
    """Send (sender, seq) for seq in 0..n-1."""
    for i in range(n):
        ch.send((sender, i), timeout=60)


def tagged_sender_many(ch: Channel, sender: int, n: int, batch: int) -> None:
    for start in range(0, n, batch):
        ch.send_many([(sender, i) for i in range(start, min(n, start + batch))], timeout=60)


def collector(ch: Channel, out: Channel) -> None:
    """Receive until the end; send the whole list back."""
    got = list(ch)
    out.send(got, timeout=60)


def channel_of_channels_worker(control: Channel) -> None:
    """Get channels through ``control`` (made after this process started) and
    answer on each: (pid, value*2) for every value received on it."""
    for item in control:
        inbox, outbox = item
        v = inbox.recv(timeout=30)
        outbox.send((os.getpid(), v * 2), timeout=30)


def blocked_recv(ch: Channel) -> None:
    """Block in recv until a value or the end arrives (CPU test)."""
    with contextlib.suppress(EndOfChannel):
        ch.recv(timeout=60)


def wrap_sender(ch: Channel, sizes: list[int], rounds: int) -> None:
    """Send payloads of the given sizes, each stamped with its sequence
    number and filled with a byte pattern derived from it."""
    seq = 0
    for _ in range(rounds):
        for size in sizes:
            ch.send(stamped(seq, size), timeout=60)
            seq += 1
    ch.close()


def wait_for(pred: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``pred`` (a state check, not a sleep-for-synchronisation) until it holds."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def stamped(seq: int, size: int) -> bytes:
    """``size`` bytes: the sequence number then a fill derived from it."""
    head = seq.to_bytes(8, "little")
    if size <= 8:
        return head[:size]
    return head + bytes([seq % 251]) * (size - 8)


def array_sender(ch: Channel, nbytes: int, start: int) -> None:
    """Send arrays forever, each filled with its sequence number."""
    import numpy as np

    seq = start
    while True:
        a = np.full(nbytes // 8, seq, dtype=np.int64)
        ch.send(a, timeout=60)
        seq += 1


def busy_sender(ch: Channel, sender: int, start: int) -> None:
    """Send (sender, seq) forever (killed from outside)."""
    seq = start
    while True:
        ch.send((sender, seq), timeout=60)
        seq += 1


def wg_worker(wg: mpchan.WaitGroup, gate: Channel, out: Channel) -> None:
    """Wait for the gate, then mark one unit done."""
    gate.recv(timeout=30)
    wg.done()
    out.send(os.getpid(), timeout=30)


def wg_waiter(wg: mpchan.WaitGroup, out: Channel) -> None:
    t0 = time.monotonic()
    wg.wait(timeout=30)
    out.send(time.monotonic() - t0, timeout=30)


def wg_negative(wg: mpchan.WaitGroup, out: Channel) -> None:
    try:
        wg.done()
    except ValueError as exc:
        out.send(("ValueError", str(exc)), timeout=30)
    else:
        out.send(("ok", None), timeout=30)


def select_sender(a: Channel, b: Channel, n: int, out: Channel) -> None:
    """n selects that each send on a or b; report which fired each time."""
    fired = []
    for i in range(n):
        idx, _v, _ok = mpchan.select((a, ("a", i)), (b, ("b", i)), timeout=30)
        fired.append(idx)
    out.send(fired, timeout=30)


def select_receiver(a: Channel, b: Channel, out: Channel) -> None:
    """Select-receive on a and b until both are closed; send back what came."""
    got = []
    open_ = {0: a, 1: b}
    while open_:
        cases = list(open_.values())
        keys = list(open_.keys())
        idx, v, ok = mpchan.select(*cases, timeout=30)
        if not ok:
            del open_[keys[idx]]
            continue
        got.append(v)
    out.send(got, timeout=30)


def die_holding_lock(ch: Channel, mode: int) -> None:
    """Take the channel's lock and die with it held (test hook in the core)."""
    ch._core._die_locked(mode)
