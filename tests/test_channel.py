"""Channel semantics across processes (spec 2.2).

Synchronisation in these tests goes through channels and ``stats()`` (e.g.
"wait until a receiver is parked"), never through sleeps.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

import mpchan
from mpchan import (
    Channel,
    ChannelClosed,
    EndOfChannel,
    SerializationError,
    WouldBlock,
    _core,
)
from mpchan._compat import SHM_DIR

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "chan_scripts"))
import chan_workers as cw

METHODS = ["spawn", "forkserver", "fork"]


wait_for = cw.wait_for


class Procs:
    """Start processes; join (or kill) them all at the end."""

    def __init__(self, method: str = "fork") -> None:
        self.ctx = multiprocessing.get_context(method)
        self.procs: list[Any] = []

    def start(self, fn: Callable[..., Any], *args: Any) -> Any:
        p = self.ctx.Process(target=fn, args=args, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def join(self, timeout: float = 30) -> None:
        for p in self.procs:
            p.join(timeout)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(5)
                raise AssertionError(f"child {p.pid} did not finish")
        for p in self.procs:
            assert p.exitcode == 0, f"child {p.pid} exit code {p.exitcode}"

    def kill_all(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(5)


@pytest.fixture
def procs() -> Iterator[Callable[[str], Procs]]:
    made: list[Procs] = []

    def make(method: str = "fork") -> Procs:
        p = Procs(method)
        made.append(p)
        return p

    yield make
    for p in made:
        p.kill_all()


# ---------------------------------------------------------------- attach


@pytest.mark.parametrize("method", METHODS)
def test_attach_from_another_process(method: str, procs: Callable[[str], Procs]) -> None:
    inbox, outbox = Channel(4), Channel(0)
    ps = procs(method)
    ps.start(cw.echo, inbox, outbox)
    for v in [1, "two", b"three", (4, [5])]:
        inbox.send(v, timeout=10)
        assert outbox.recv(timeout=30) == v
    inbox.close()
    ps.join()


@pytest.mark.parametrize("method", METHODS)
def test_channel_of_channels_to_a_process_started_before(
    method: str, procs: Callable[[str], Procs]
) -> None:
    control = Channel(0)
    ps = procs(method)
    p = ps.start(cw.channel_of_channels_worker, control)
    for i in range(3):
        # made after the worker started: it can only learn them through control
        inbox, outbox = Channel(1), Channel(1)
        control.send((inbox, outbox), timeout=30)
        inbox.send(i, timeout=10)
        assert outbox.recv(timeout=30) == (p.pid, 2 * i)
    control.close()
    ps.join()


# ---------------------------------------------------------------- FIFO, blocking


@pytest.mark.parametrize("capacity", [0, 5])
def test_per_sender_fifo(capacity: int, procs: Callable[[str], Procs]) -> None:
    ch = Channel(capacity)
    n, senders = 300, 3
    ps = procs("fork")
    for s in range(senders):
        ps.start(cw.tagged_sender, ch, s, n)
    last = dict.fromkeys(range(senders), -1)
    for _ in range(n * senders):
        s, i = ch.recv(timeout=30)
        assert i == last[s] + 1, f"sender {s}: {i} after {last[s]}"
        last[s] = i
    ps.join()
    assert all(v == n - 1 for v in last.values())
    st = ch.stats()
    assert st["sent"] == st["received"] == n * senders


def test_recv_blocks_on_empty(procs: Callable[[str], Procs]) -> None:
    ch, out = Channel(2), Channel(1)
    with pytest.raises(TimeoutError):
        ch.recv(timeout=0.05)
    ps = procs("fork")
    ps.start(cw.recv_then_report, ch, out)
    wait_for(lambda: ch.stats()["blocked_receivers"] == 1, what="a parked receiver")
    with pytest.raises(WouldBlock):
        out.recv_nowait()  # still blocked
    ch.send("x")
    assert out.recv(timeout=10) == ("value", "x")
    ps.join()


def test_send_blocks_on_full(procs: Callable[[str], Procs]) -> None:
    ch, done = Channel(2), Channel(1)
    ch.send(1)
    ch.send(2)
    with pytest.raises(TimeoutError):
        ch.send(3, timeout=0.05)
    ps = procs("fork")
    ps.start(cw.send_then_report, ch, 3, done)
    wait_for(lambda: ch.stats()["blocked_senders"] == 1, what="a parked sender")
    with pytest.raises(WouldBlock):
        done.recv_nowait()
    assert ch.recv(timeout=5) == 1
    assert done.recv(timeout=10) == "sent"
    assert [ch.recv(timeout=5), ch.recv(timeout=5)] == [2, 3]
    ps.join()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_unbuffered_send_completes_only_when_taken(
    method: str, procs: Callable[[str], Procs]
) -> None:
    ch, done = Channel(0), Channel(1)
    ps = procs(method)
    ps.start(cw.send_then_report, ch, "v", done)
    wait_for(lambda: ch.stats()["blocked_senders"] == 1, timeout=30, what="a staged sender")
    assert len(ch) == 0 and ch.stats()["len"] == 0
    with pytest.raises(WouldBlock):
        done.recv_nowait()
    assert ch.recv(timeout=5) == "v"
    assert done.recv(timeout=10) == "sent"
    ps.join()


def test_unbuffered_send_timeout_withdraws() -> None:
    ch = Channel(0)
    with pytest.raises(TimeoutError):
        ch.send("lost", timeout=0.05)
    with pytest.raises(WouldBlock):
        ch.recv_nowait()
    st = ch.stats()
    assert st["sent"] == 0 and st["blocked_senders"] == 0
    assert ch._core.waiters() == []


# ---------------------------------------------------------------- nowait


def test_nowait_variants(procs: Callable[[str], Procs]) -> None:
    ch = Channel(1)
    with pytest.raises(WouldBlock):
        ch.recv_nowait()
    ch.send_nowait(1)
    with pytest.raises(WouldBlock):
        ch.send_nowait(2)
    assert ch.recv_nowait() == 1
    ch.send_nowait(3)
    ch.close()
    with pytest.raises(ChannelClosed):
        ch.send_nowait(4)
    assert ch.recv_nowait() == 3  # closed but not drained
    with pytest.raises(EndOfChannel):
        ch.recv_nowait()

    u, out = Channel(0), Channel(1)
    with pytest.raises(WouldBlock):
        u.send_nowait("nobody")  # no receiver waiting
    with pytest.raises(WouldBlock):
        u.recv_nowait()
    ps = procs("fork")
    ps.start(cw.recv_then_report, u, out)
    wait_for(lambda: u.stats()["blocked_receivers"] == 1, what="a parked receiver")
    u.send_nowait("somebody")
    assert out.recv(timeout=10) == ("value", "somebody")
    ps.join()
    u.close()
    with pytest.raises(EndOfChannel):
        u.recv_nowait()


# ---------------------------------------------------------------- close


def test_close_drains_then_ends_and_wakes_everyone(procs: Callable[[str], Procs]) -> None:
    ch = Channel(3)
    for v in range(3):
        ch.send(v)
    ch.close()
    ch.close()  # idempotent
    assert ch.closed
    with pytest.raises(ChannelClosed):
        ch.send(9)
    assert list(ch) == [0, 1, 2]
    with pytest.raises(EndOfChannel):
        ch.recv(timeout=1)

    rx, tx, out = Channel(0), Channel(0), Channel(10)
    ps = procs("fork")
    for _ in range(3):
        ps.start(cw.recv_then_report, rx, out)
    for _ in range(2):
        ps.start(cw.send_until_closed, tx, "x", out)
    wait_for(lambda: rx.stats()["blocked_receivers"] == 3, what="3 parked receivers")
    wait_for(lambda: tx.stats()["blocked_senders"] == 2, what="2 parked senders")
    t0 = time.monotonic()
    rx.close()
    tx.close()
    got = Counter(out.recv(timeout=5) for _ in range(5))
    assert time.monotonic() - t0 < 2
    assert got == {("end", None): 3, ("closed", "ChannelClosed"): 2}
    ps.join()
    assert rx.stats()["blocked_receivers"] == 0
    assert tx.stats()["blocked_senders"] == 0


def test_iteration_ends_on_close_in_other_process(procs: Callable[[str], Procs]) -> None:
    ch = Channel(4)
    ps = procs("fork")
    ps.start(cw.wrap_sender, ch, [10, 20], 5)  # closes when done
    got = list(ch)
    assert len(got) == 10
    ps.join()


# ---------------------------------------------------------------- MPMC


@pytest.mark.parametrize("capacity", [0, 16])
def test_mpmc_4x4_conservation(capacity: int, procs: Callable[[str], Procs]) -> None:
    n = 200 if capacity == 0 else 1500
    ch, out = Channel(capacity), Channel(4)
    senders = procs("fork")
    receivers = procs("fork")
    for _ in range(4):
        receivers.start(cw.collector, ch, out)
    for s in range(4):
        if s % 2:
            senders.start(cw.tagged_sender, ch, s, n)
        else:
            senders.start(cw.tagged_sender_many, ch, s, n, 7)
    senders.join(60)
    ch.close()
    lists = [out.recv(timeout=60) for _ in range(4)]
    receivers.join(60)
    allv = [v for lst in lists for v in lst]
    assert len(allv) == 4 * n
    assert set(allv) == {(s, i) for s in range(4) for i in range(n)}  # none lost, no duplicate
    for lst in lists:  # per-sender order within each receiver
        last: dict[int, int] = {}
        for s, i in lst:
            assert i > last.get(s, -1)
            last[s] = i
    st = ch.stats()
    assert st["sent"] == st["received"] == 4 * n


def test_threads_and_processes_together(procs: Callable[[str], Procs]) -> None:
    ch = Channel(8)
    n = 400
    ps = procs("fork")
    ps.start(cw.tagged_sender, ch, 0, n)
    got: list[Any] = []
    lock = threading.Lock()

    def rx() -> None:
        while True:
            try:
                v = ch.recv(timeout=30)
            except EndOfChannel:
                return
            with lock:
                got.append(v)

    ts = [threading.Thread(target=rx) for _ in range(3)]
    for t in ts:
        t.start()
    tsend = threading.Thread(target=cw.tagged_sender, args=(ch, 1, n))
    tsend.start()
    tsend.join(30)
    ps.join()
    ch.close()
    for t in ts:
        t.join(30)
    assert sorted(got) == sorted((s, i) for s in range(2) for i in range(n))


# ---------------------------------------------------------------- sizes


def _wrap_spans(ring: int, inline: int) -> list[int]:
    """Record spans (header + payload, 8-aligned) of in-ring records that end
    exactly at the ring's end, leave exactly one record header there, leave
    less than a header (the implicit gap), and leave room for a PAD record."""
    rec = _core.REC_SIZE
    limit = (inline + rec) // 8 * 8
    cands = range(limit, rec, -8)
    exact = next(s for s in cands if ring % s == 0)
    one_header = next(s for s in cands if ring % s == rec)
    gap = next(s for s in cands if 0 < ring % s < rec)
    pad = next(s for s in cands if ring % s > rec)
    return [exact, one_header, gap, pad]


def _wrap_sizes(ch: Channel) -> list[int]:
    """Payload sizes (bytes values travel raw) for the spans above, small
    ones, out-of-band ones and two larger than the whole ring."""
    ring, inline = ch._core.ring_size(), ch._inline
    spans = _wrap_spans(ring, inline)
    sizes = [s - _core.REC_SIZE for s in spans] + [0, 1, 7, 9, inline + 1, ring + 1, 3 * ring]
    assert all(s <= inline for s in sizes[:4])
    return sizes


@pytest.mark.parametrize("capacity", [0, 1, 2, 7, 64])
def test_capacity_sweep_wraparound(capacity: int, procs: Callable[[str], Procs]) -> None:
    ch = Channel(capacity)
    sizes = _wrap_sizes(ch)
    rounds = 3 if capacity else 2
    ps = procs("fork")
    ps.start(cw.wrap_sender, ch, sizes, rounds)
    seq = 0
    for v in ch:
        assert v == cw.stamped(seq, sizes[seq % len(sizes)]), f"message {seq} corrupted"
        seq += 1
    assert seq == rounds * len(sizes)
    ps.join()


@pytest.mark.parametrize("capacity", [1, 2, 7, 64])
def test_wraparound_exact_single_process(capacity: int) -> None:
    """Keep the ring non-empty so records really wrap (an empty ring restarts at 0)."""
    ch = Channel(capacity)
    ring = ch._core.ring_size()
    rec = _core.REC_SIZE
    for span in _wrap_spans(ring, ch._inline):
        size = span - rec
        keep = min(capacity - 1, 3, ring // span - 1)
        seq = 0
        expect = 0
        for _ in range(keep):
            ch.send(cw.stamped(seq, size), timeout=1)
            seq += 1
        for _ in range(4 * (ring // span)):
            ch.send(cw.stamped(seq, size), timeout=1)
            seq += 1
            assert ch.recv(timeout=1) == cw.stamped(expect, size)
            expect += 1
        while expect < seq:
            assert ch.recv(timeout=1) == cw.stamped(expect, size)
            expect += 1
        assert len(ch) == 0


@pytest.mark.parametrize(("capacity", "extra"), [(10, 0), (10, 64 * 1024), (100, 0), (64, 1 << 20)])
def test_medium_records_never_take_the_room_of_the_capacity(capacity: int, extra: int) -> None:
    """Records bigger than the ring's share per message stay inline only while
    every message the capacity still allows keeps its room, so a buffered
    channel holding them still accepts exactly its capacity."""
    ch = Channel(capacity, _ring_extra=extra)
    ring = ch._core.ring_size()
    share = (ring - extra) // (capacity + 1) // 8 * 8
    medium = min(ch._inline, 3 * share)
    small = share - _core.REC_SIZE
    assert medium > share > small > 8
    sent = []
    for i in range(capacity):
        v = cw.stamped(i, medium if i < capacity // 2 else small)
        ch.send_nowait(v)
        sent.append(v)
    with pytest.raises(WouldBlock):
        ch.send_nowait(b"x")
    if extra:
        # the room beyond the capacity's share carries some medium records inline
        assert len(ch._core.blobs()) < capacity // 2
    assert [ch.recv_nowait() for _ in range(capacity)] == sent
    with pytest.raises(WouldBlock):
        ch.recv_nowait()


def test_numpy_and_big_values_roundtrip(procs: Callable[[str], Procs]) -> None:
    np = pytest.importorskip("numpy")
    inbox, outbox = Channel(2), Channel(2)
    ps = procs("fork")
    ps.start(cw.echo, inbox, outbox)
    values: list[Any] = [
        np.arange(1 << 20, dtype=np.float64),
        np.zeros((3, 0)),
        {"big": bytes(300_000), "arr": np.ones(100_000, dtype=np.int32)},
        bytearray(b"z" * 200_000),
        memoryview(b"q" * 100_000),
        list(range(50_000)),
    ]
    for v in values:
        inbox.send(v, timeout=10)
        r = outbox.recv(timeout=30)
        if isinstance(v, np.ndarray):
            assert r.dtype == v.dtype and r.shape == v.shape and (r == v).all()
        elif isinstance(v, dict):
            assert r["big"] == v["big"] and (r["arr"] == v["arr"]).all()
        elif isinstance(v, memoryview):
            assert bytes(r) == bytes(v)
        else:
            assert r == v and type(r) is type(v)
    inbox.close()
    ps.join()


# ---------------------------------------------------------------- send_many / recv_many


def test_send_many_recv_many() -> None:
    ch = Channel(10)
    ch.send_many(range(7))
    assert ch.recv_many(3) == [0, 1, 2]
    assert ch.recv_many(100) == [3, 4, 5, 6]
    with pytest.raises(TimeoutError):
        ch.recv_many(5, timeout=0.05)
    with pytest.raises(ValueError):
        ch.recv_many(0)
    ch.send_many([b"x" * 100_000, 1, "s"])  # mixed in-band and out-of-band
    assert ch.recv_many(5) == [b"x" * 100_000, 1, "s"]
    ch.close()
    with pytest.raises(EndOfChannel):
        ch.recv_many(3)


def test_send_many_larger_than_capacity(procs: Callable[[str], Procs]) -> None:
    ch, out = Channel(4), Channel(1)
    ps = procs("fork")
    ps.start(cw.collector, ch, out)
    ch.send_many(range(1000), timeout=30)
    ch.close()
    assert out.recv(timeout=30) == list(range(1000))
    ps.join()


# ---------------------------------------------------------------- serialization


class _BadLoad:
    def __reduce__(self) -> Any:
        return (_explode, ())


def _explode() -> None:
    raise RuntimeError("cannot rebuild")


@pytest.mark.parametrize("capacity", [0, 2])
def test_unpicklable_value(capacity: int) -> None:
    ch = Channel(capacity)
    with pytest.raises(SerializationError) as ei:
        ch.send(threading.Lock(), timeout=1)
    assert ei.value.__cause__ is not None
    del ei  # its traceback holds this frame: a cycle that would keep ``ch`` alive
    with pytest.raises(SerializationError):
        ch.send_nowait([1, threading.Lock()])
    assert ch.stats()["sent"] == 0
    assert ch._core.waiters() == []
    if capacity:
        ch.send(lambda: 42)  # cloudpickle fallback
        assert ch.recv(timeout=1)() == 42
        ch.send(1)
        assert ch.recv(timeout=1) == 1


def test_unloadable_value_raises_in_receiver() -> None:
    ch = Channel(2)
    ch.send(_BadLoad())
    ch.send("next")
    with pytest.raises(SerializationError) as ei:
        ch.recv(timeout=1)
    assert isinstance(ei.value.__cause__, RuntimeError)
    del ei
    assert ch.recv(timeout=1) == "next"


# ---------------------------------------------------------------- misc API


def test_bad_arguments_and_repr() -> None:
    with pytest.raises(ValueError):
        Channel(-1)
    with pytest.raises(TypeError):
        Channel(1.5)  # type: ignore[arg-type]
    ch = Channel(3)
    ch.send(1)
    assert len(ch) == 1 and ch.capacity == 3 and not ch.closed
    assert "capacity=3" in repr(ch)
    st = ch.stats()
    assert set(st) == {
        "len",
        "capacity",
        "sent",
        "received",
        "blocked_senders",
        "blocked_receivers",
        "closed",
    }


def test_ctx_cancels_blocked_recv() -> None:
    ctx, cancel = mpchan.with_cancel(mpchan.background())
    ch = Channel(1)
    t = threading.Timer(0.05, cancel)
    t.start()
    try:
        with pytest.raises(mpchan.Cancelled):
            ch.recv(ctx=ctx, timeout=10)
    finally:
        t.join()
    assert ch._core.waiters() == []


def test_pickled_handle_is_small() -> None:
    ch = Channel(1)
    data = pickle.dumps(ch)
    assert len(data) < 200
    ch2 = pickle.loads(data)
    ch2.send(5)
    assert ch.recv(timeout=1) == 5


# ---------------------------------------------------------------- CPU and resources


def test_blocked_receiver_uses_no_cpu(procs: Callable[[str], Procs]) -> None:
    ch = Channel(1)
    ps = procs("fork")
    p = ps.start(cw.blocked_recv, ch)
    wait_for(lambda: ch.stats()["blocked_receivers"] == 1, what="a parked receiver")
    proc = psutil.Process(p.pid)
    c0 = proc.cpu_times()
    t0 = time.monotonic()
    time.sleep(2.0)  # a measurement window, not synchronisation
    c1 = proc.cpu_times()
    used = (c1.user + c1.system) - (c0.user + c0.system)
    elapsed = time.monotonic() - t0
    ch.close()
    ps.join()
    assert used / elapsed < 0.01, f"blocked receiver used {used / elapsed:.2%} CPU"


def _session_files() -> set[str]:
    prefix = f"mpchan-{mpchan._shm.session_token()}-"
    return {n for n in os.listdir(SHM_DIR) if n.startswith(prefix)}


@pytest.mark.timeout(120)
def test_no_fd_or_segment_growth() -> None:
    np = pytest.importorskip("numpy")

    def cycle(i: int) -> None:
        ch = Channel(i % 3)
        if ch.capacity:
            ch.send(i)
            assert ch.recv(timeout=1) == i
            if i % 50 == 0:
                ch.send(np.ones(200_000))  # payload slot
                ch.recv(timeout=1)
        ch.close()
        clone = pickle.loads(pickle.dumps(ch))
        del clone

    for i in range(50):  # warm-up: waiter sockets, caches
        cycle(i)
    gc.collect()
    fds0 = len(os.listdir("/proc/self/fd"))
    files0 = _session_files()
    for i in range(3000):
        cycle(i)
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= fds0
    assert _session_files() <= files0
