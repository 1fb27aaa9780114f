"""Context: Go's context semantics, in one process and across processes."""

from __future__ import annotations

import gc
import multiprocessing
import os
import random
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest
from scripts.procs import own_supervisor

import mpchan
from mpchan import _supervisor
from mpchan._context import CancelFunc, Context

# Workers need not be able to import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

bg = mpchan.background


@pytest.fixture(autouse=True)
def _collect_cycles() -> Iterator[None]:
    """``pytest.raises(...) as info`` makes a cycle (info -> traceback -> this
    frame -> info) that keeps contexts, and so their segments, alive until the
    next garbage collection; run it before the leak check looks."""
    yield
    gc.collect()


@pytest.fixture(scope="module")
def sup() -> Iterator[_supervisor.Supervisor]:
    """The program's supervisor for the cross-process tests of this module."""
    with own_supervisor() as supervisor:
        yield supervisor


def start_thread(fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn(*args)`` in a thread; the list gets its result or exception."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn(*args))
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def wait_blocked(ch: mpchan.Channel, *, receivers: int = 0, senders: int = 0) -> None:
    """Wait until the channel reports that many blocked callers (no sleeps)."""
    deadline = time.monotonic() + 30
    while True:
        st = ch.stats()
        if st["blocked_receivers"] >= receivers and st["blocked_senders"] >= senders:
            return
        assert time.monotonic() < deadline, st
        time.sleep(0.002)


# -- one process ------------------------------------------------------------------------


def test_background_is_never_done() -> None:
    ctx = bg()
    assert ctx is bg()
    assert not ctx.cancelled
    assert ctx.err() is None and ctx.cause() is None
    assert ctx.deadline() is None
    assert ctx.value("anything") is None
    assert not ctx.draining
    ctx.check()
    assert ctx.wait(0.01) is False
    with ctx:
        pass
    assert not ctx.cancelled
    with pytest.raises(TimeoutError):
        ctx.done().recv(timeout=0.01)


def test_cancel_propagates_down_never_up() -> None:
    root, cancel_root = mpchan.with_cancel(bg())
    mid, cancel_mid = mpchan.with_cancel(root)
    leaf, cancel_leaf = mpchan.with_cancel(mid)
    sibling, cancel_sibling = mpchan.with_cancel(root)
    valued = mpchan.with_value(mid, "k", 1)

    cancel_mid()
    assert mid.cancelled and leaf.cancelled and valued.cancelled
    assert not root.cancelled and not sibling.cancelled
    assert isinstance(leaf.err(), mpchan.Cancelled)

    cancel_leaf()  # a child's cancel never reaches up
    assert not root.cancelled
    cancel_root()
    assert sibling.cancelled
    cancel_sibling()


def test_child_of_cancelled_parent_is_born_done() -> None:
    parent, cancel = mpchan.with_cancel(bg())
    cancel("gone")
    child, cancel_child = mpchan.with_cancel(parent)
    timed, cancel_timed = mpchan.with_timeout(parent, 100)
    valued = mpchan.with_value(parent, "k", "v")
    for ctx in (child, timed, valued):
        assert ctx.cancelled
        assert ctx.cause() == "gone"
        assert not isinstance(ctx.err(), mpchan.DeadlineExceeded)
        with pytest.raises(mpchan.Cancelled):
            ctx.check()
    assert child.wait(0) is True
    cancel_child()
    cancel_timed()


def test_deadline_is_earliest_of_chain() -> None:
    now = time.time()
    parent, cancel_parent = mpchan.with_deadline(bg(), now + 10)
    later, cancel_later = mpchan.with_deadline(parent, now + 100)
    sooner, cancel_sooner = mpchan.with_timeout(parent, 5)
    valued = mpchan.with_value(sooner, "k", 1)
    plain, cancel_plain = mpchan.with_cancel(sooner)
    assert parent.deadline() == pytest.approx(now + 10, abs=0.05)
    assert later.deadline() == pytest.approx(now + 10, abs=0.05)  # the parent's is earlier
    assert sooner.deadline() == pytest.approx(now + 5, abs=0.05)
    assert valued.deadline() == pytest.approx(sooner.deadline(), abs=1e-3)
    assert plain.deadline() == pytest.approx(sooner.deadline(), abs=1e-3)
    assert bg().deadline() is None
    for cancel in (cancel_parent, cancel_later, cancel_sooner, cancel_plain):
        cancel()


def test_parent_deadline_fires_in_child() -> None:
    parent, cancel_parent = mpchan.with_timeout(bg(), 0.1)
    child, cancel_child = mpchan.with_timeout(parent, 100)
    t0 = time.monotonic()
    assert child.wait(5) is True
    assert time.monotonic() - t0 < 2
    assert isinstance(child.err(), mpchan.DeadlineExceeded)
    cancel_child()
    cancel_parent()


def test_past_deadline_is_born_done() -> None:
    ctx, cancel = mpchan.with_deadline(bg(), time.time() - 1)
    assert ctx.cancelled
    with pytest.raises(mpchan.DeadlineExceeded):
        ctx.check()
    cancel()


def test_cancelled_vs_deadline_exceeded() -> None:
    cancelled, cancel = mpchan.with_cancel(bg())
    cancel()
    err = cancelled.err()
    assert type(err) is mpchan.Cancelled
    assert not isinstance(err, TimeoutError)

    timed, cancel_timed = mpchan.with_timeout(bg(), 0.05)
    assert timed.err() is None
    assert timed.wait(5)
    err = timed.err()
    assert isinstance(err, mpchan.DeadlineExceeded)
    assert isinstance(err, mpchan.Cancelled) and isinstance(err, TimeoutError)
    assert timed.cause() is err or isinstance(timed.cause(), mpchan.DeadlineExceeded)
    # a cancel after the deadline does not change what happened first
    cancel_timed("too late")
    assert isinstance(timed.err(), mpchan.DeadlineExceeded)

    # a cancel before the deadline wins over the deadline
    early, cancel_early = mpchan.with_timeout(bg(), 0.05)
    cancel_early("early")
    time.sleep(0.06)
    assert type(early.err()) is mpchan.Cancelled
    assert early.cause() == "early"

    ch = mpchan.Channel(1)
    with pytest.raises(mpchan.DeadlineExceeded):
        ch.recv(ctx=mpchan.with_timeout(bg(), 0.05)[0])
    with pytest.raises(mpchan.Cancelled) as info:
        ch.recv(ctx=cancelled)
    assert not isinstance(info.value, mpchan.DeadlineExceeded)
    # a plain timeout stays a plain TimeoutError
    with pytest.raises(TimeoutError) as tinfo:
        ch.recv(timeout=0.01, ctx=mpchan.with_timeout(bg(), 100)[0])
    assert not isinstance(tinfo.value, mpchan.Cancelled)


def test_cause_first_cancel_wins() -> None:
    ctx, cancel = mpchan.with_cancel(bg())
    cancel(ValueError("first"))
    cancel(ValueError("second"))
    cause = ctx.cause()
    assert isinstance(cause, ValueError) and str(cause) == "first"
    err = ctx.err()
    assert isinstance(err, mpchan.Cancelled) and isinstance(err.cause, ValueError)
    assert str(err.cause) == "first"

    # no cause: cause() is err()
    plain, cancel_plain = mpchan.with_cancel(bg())
    cancel_plain()
    assert isinstance(plain.cause(), mpchan.Cancelled)
    assert plain.err() is not None and plain.err().cause is None  # type: ignore[union-attr]

    # the parent was cancelled first: the child reports the parent's cause
    parent, cancel_parent = mpchan.with_cancel(bg())
    child, cancel_child = mpchan.with_cancel(parent)
    cancel_parent("parent")
    cancel_child("child")
    assert child.cause() == "parent"
    # the child was cancelled first: it keeps its own cause
    parent2, cancel_parent2 = mpchan.with_cancel(bg())
    child2, cancel_child2 = mpchan.with_cancel(parent2)
    cancel_child2("child")
    cancel_parent2("parent")
    assert child2.cause() == "child" and parent2.cause() == "parent"


def test_cause_that_cannot_travel_whole() -> None:
    ctx, cancel = mpchan.with_cancel(bg())
    cancel(threading.Lock())  # cannot be pickled: its repr stands in
    assert "lock" in str(ctx.cause()).lower()
    big, cancel_big = mpchan.with_cancel(bg())
    cancel_big("x" * 100_000)  # larger than a node holds
    assert big.cancelled and str(big.cause()).startswith("'xxx")


def test_value_lookup() -> None:
    a = mpchan.with_value(bg(), "k", 1)
    b = mpchan.with_value(a, "other", 2)
    c, cancel = mpchan.with_cancel(b)
    d = mpchan.with_value(c, "k", 3)
    assert a.value("k") == 1 and b.value("k") == 1 and c.value("k") == 1
    assert d.value("k") == 3 and d.value("other") == 2
    assert a.value("other") is None
    assert d.value("missing") is None
    with pytest.raises(TypeError):
        mpchan.with_value(bg(), None, 1)
    with pytest.raises(TypeError):
        mpchan.with_value(bg(), ["unhashable"], 1)
    with pytest.raises(TypeError):
        mpchan.with_cancel("not a context")  # type: ignore[arg-type]
    cancel()


def test_cancel_is_idempotent() -> None:
    ctx, cancel = mpchan.with_cancel(bg())
    for _ in range(5):
        cancel()
    assert ctx.cancelled
    with ctx:
        pass
    cancel("later")
    assert isinstance(ctx.cause(), mpchan.Cancelled)  # still the first (no cause)


def test_with_block_cancels() -> None:
    with mpchan.with_cancel(bg())[0] as ctx:
        assert not ctx.cancelled
        inner = mpchan.with_value(ctx, "k", 1)
        with inner:  # no node of its own: leaving it must not cancel the parent
            pass
        assert not ctx.cancelled
    assert ctx.cancelled and inner.cancelled
    with pytest.raises(RuntimeError), mpchan.with_timeout(bg(), 100)[0] as timed:
        raise RuntimeError("boom")
    assert timed.cancelled


def test_deadlines_use_the_monotonic_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    ctx, cancel = mpchan.with_timeout(bg(), 0.3)
    real_time = time.time
    # the wall clock jumps an hour ahead: the deadline does not fire early
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    assert not ctx.cancelled
    assert ctx.wait(0.05) is False
    # ... and back two hours: it does not fire late either
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600)
    t0 = time.monotonic()
    assert ctx.wait(5) is True
    assert time.monotonic() - t0 < 1.0
    cancel()


def test_done_and_drain_are_selectable() -> None:
    ch = mpchan.Channel(1)
    ctx, cancel = mpchan.with_cancel(bg())
    child, cancel_child = mpchan.with_cancel(ctx)
    assert mpchan.select(ch, ctx.done(), default=True) == (-1, None, False)
    ctx.request_drain()
    assert ctx.draining and child.draining and not child.cancelled
    assert mpchan.select(ch, child.drain_requested(), timeout=5) == (1, None, False)
    t = threading.Timer(0.05, cancel)
    t.start()
    assert mpchan.select(ch, child.done(), timeout=5) == (1, None, False)
    t.join()
    child.done().recv(timeout=1)
    cancel_child()


def test_wait_returns_false_on_timeout_then_true() -> None:
    ctx, cancel = mpchan.with_cancel(bg())
    assert ctx.wait(0.01) is False
    t = threading.Timer(0.05, cancel)
    t.start()
    assert ctx.wait(5) is True
    t.join()


def test_adone_is_woken_by_a_cancel_and_leaves_no_registration() -> None:
    import asyncio

    ctx, cancel = mpchan.with_cancel(bg())
    node = ctx.wait_cores()[0]

    async def main() -> float:
        waiting = asyncio.ensure_future(ctx.adone())
        while not node.waiters():  # the task registered and awaits its descriptor
            await asyncio.sleep(0.001)
        t = threading.Timer(0.05, cancel)
        t0 = time.monotonic()
        t.start()
        await asyncio.wait_for(waiting, 5)
        t.join()
        return time.monotonic() - t0

    assert asyncio.run(main()) < 0.2  # woken (a slice is 0.25 s), not polled
    assert node.waiters() == []
    # a cancelled task removes its registration too
    other, cancel_other = mpchan.with_cancel(bg())

    async def abandon() -> None:
        task = asyncio.ensure_future(other.adone())
        while not other.wait_cores()[0].waiters():
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(abandon())
    assert other.wait_cores()[0].waiters() == []
    cancel_other()


def test_blocked_recv_wakes_with_cancelled_and_consumes_nothing() -> None:
    ch = mpchan.Channel(1)
    ctx, cancel = mpchan.with_cancel(bg())
    t, out = start_thread(lambda: ch.recv(ctx=ctx))
    wait_blocked(ch, receivers=1)
    t0 = time.monotonic()
    cancel("stop")
    t.join(5)
    assert time.monotonic() - t0 < 0.2
    assert isinstance(out[0], mpchan.Cancelled) and out[0].cause == "stop"
    ch.send("kept")
    with pytest.raises(mpchan.Cancelled):  # level-triggered
        ch.recv(ctx=ctx)
    assert ch.recv_nowait() == "kept"


@pytest.mark.parametrize("capacity", [0, 1])
def test_cancelled_send_enqueues_nothing(capacity: int) -> None:
    ch = mpchan.Channel(capacity)
    if capacity:
        ch.send("first")
    ctx, cancel = mpchan.with_cancel(bg())
    t, out = start_thread(lambda: ch.send("never", ctx=ctx))
    wait_blocked(ch, senders=1)
    cancel()
    t.join(5)
    assert isinstance(out[0], mpchan.Cancelled)
    if capacity:
        assert ch.recv_nowait() == "first"
    with pytest.raises(mpchan.WouldBlock):
        ch.recv_nowait()
    assert ch.stats()["sent"] == capacity


def test_batch_calls_take_ctx() -> None:
    ch = mpchan.Channel(2)
    ctx, cancel = mpchan.with_cancel(bg())
    t, out = start_thread(lambda: ch.recv_many(10, ctx=ctx))
    wait_blocked(ch, receivers=1)
    cancel()
    t.join(5)
    assert isinstance(out[0], mpchan.Cancelled)
    with pytest.raises(mpchan.Cancelled):
        ch.send_many([1, 2, 3], ctx=ctx)
    assert len(ch) == 0  # nothing half done


def test_waitgroup_wait_takes_ctx() -> None:
    wg = mpchan.WaitGroup()
    wg.add(1)
    ctx, cancel = mpchan.with_timeout(bg(), 0.05)
    with pytest.raises(mpchan.DeadlineExceeded):
        wg.wait(ctx=ctx)
    wg.done()
    cancel()


def _tree(n: int) -> tuple[list[Context], list[CancelFunc], list[int]]:
    """A random tree of ``n`` cancellable contexts; parents[i] < i (-1: root)."""
    rng = random.Random(n)
    ctxs: list[Context] = []
    cancels: list[CancelFunc] = []
    parents: list[int] = []
    for i in range(n):
        p = rng.randrange(-1, i)
        ctx, cancel = mpchan.with_cancel(bg() if p < 0 else ctxs[p])
        ctxs.append(ctx)
        cancels.append(cancel)
        parents.append(p)
    return ctxs, cancels, parents


def _ancestors(i: int, parents: list[int]) -> set[int]:
    out = set()
    while i >= 0:
        out.add(i)
        i = parents[i]
    return out


def test_tree_of_100_cancelled_concurrently() -> None:
    ctxs, cancels, parents = _tree(100)
    waiters = [start_thread(ctxs[i].wait, 30) for i in (0, 50, 99)]
    barrier = threading.Barrier(8)

    def cancel_some(k: int) -> None:
        barrier.wait()
        for i in range(k, 100, 8):
            cancels[i](i)

    threads = [threading.Thread(target=cancel_some, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
        assert not th.is_alive()
    for th, out in waiters:
        th.join(30)
        assert out == [True]
    for i, ctx in enumerate(ctxs):
        assert ctx.cancelled
        assert ctx.cause() in _ancestors(i, parents)


# -- across processes -------------------------------------------------------------------


def remote_state(ctx: Context) -> tuple[bool, Any, float | None, Any]:
    return ctx.cancelled, ctx.cause(), ctx.deadline(), ctx.value("k")


def remote_recv(ch: mpchan.Channel, ctx: Context, ready: mpchan.Channel) -> Any:
    ready.send(os.getpid())
    try:
        return ("value", ch.recv(ctx=ctx))
    except mpchan.Cancelled as e:
        return (type(e).__name__, e.cause, time.monotonic())


def remote_cancel(cancel: CancelFunc, cause: Any) -> None:
    cancel(cause)


def remote_child(ctx: Context) -> tuple[Context, CancelFunc]:
    return mpchan.with_cancel(ctx)


def remote_wait(ctx: Context, timeout: float) -> tuple[bool, Any]:
    return ctx.wait(timeout), ctx.cause()


def remote_cancel_many(cancels: list[CancelFunc], start: int, step: int) -> int:
    for i in range(start, len(cancels), step):
        cancels[i](i)
    return os.getpid()


def test_ctx_crosses_to_a_worker(sup: _supervisor.Supervisor) -> None:
    parent, cancel_parent = mpchan.with_timeout(bg(), 60)
    ctx = mpchan.with_value(parent, "k", {"v": 1})
    cancelled, cause, deadline, value = mpchan.go(remote_state, ctx).result(timeout=30)
    assert not cancelled and cause is None and value == {"v": 1}
    assert deadline == pytest.approx(parent.deadline(), abs=0.01)
    cancel_parent("stop")
    assert mpchan.go(remote_state, ctx).result(timeout=30)[:2] == (True, "stop")


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_worker_blocked_in_recv_wakes_promptly(method: str) -> None:
    supervisor = _supervisor.Supervisor(method)
    previous = _supervisor.set_supervisor(supervisor)
    try:
        ch, ready = mpchan.Channel(1), mpchan.Channel(1)
        ctx, cancel = mpchan.with_cancel(bg())
        h = mpchan.go(remote_recv, ch, ctx, ready)
        ready.recv(timeout=30)
        wait_blocked(ch, receivers=1)
        t0 = time.monotonic()
        cancel("stop")
        kind, cause, woke = h.result(timeout=30)
        assert kind == "Cancelled" and cause == "stop"
        assert woke - t0 < 0.2  # the monotonic clock is system-wide
        ch.send("kept")  # the cancelled recv consumed nothing
        assert ch.recv_nowait() == "kept"
    finally:
        supervisor.shutdown(timeout=2)
        _supervisor.set_supervisor(previous)


def test_deadline_reaches_a_blocked_worker(sup: _supervisor.Supervisor) -> None:
    ch, ready = mpchan.Channel(1), mpchan.Channel(1)
    ctx, cancel = mpchan.with_timeout(bg(), 0.3)
    kind, cause, _ = mpchan.go(remote_recv, ch, ctx, ready).result(timeout=30)
    assert kind == "DeadlineExceeded"
    assert isinstance(cause, mpchan.DeadlineExceeded) or cause is None
    cancel()


def test_cancel_from_a_worker(sup: _supervisor.Supervisor) -> None:
    grand, cancel_grand = mpchan.with_cancel(bg())
    ctx, cancel = mpchan.with_cancel(grand)
    child, cancel_child = mpchan.with_cancel(ctx)
    waiter, out = start_thread(child.wait, 30)
    mpchan.go(remote_cancel, cancel, "from worker").result(timeout=30)
    waiter.join(30)
    assert out == [True]
    assert ctx.cause() == "from worker" and child.cause() == "from worker"
    assert not grand.cancelled  # never up
    cancel_child()
    cancel_grand()


def test_child_made_in_a_worker_stays_linked(sup: _supervisor.Supervisor) -> None:
    ctx, cancel = mpchan.with_cancel(bg())
    child, cancel_child = mpchan.go(remote_child, ctx).result(timeout=30)
    cancel_child("child only")  # down, never up
    assert child.cause() == "child only" and not ctx.cancelled
    other, cancel_other = mpchan.go(remote_child, ctx).result(timeout=30)
    h = mpchan.go(remote_wait, other, 30)
    cancel("parent")
    assert h.result(timeout=30) == (True, "parent")
    assert other.cause() == "parent"
    cancel_other()


def test_tree_of_100_cancelled_concurrently_across_processes(
    sup: _supervisor.Supervisor,
) -> None:
    ctxs, cancels, parents = _tree(100)
    waiter = mpchan.go(remote_wait, ctxs[99], 30)
    handles = [mpchan.go(remote_cancel_many, cancels, k, 4) for k in range(1, 4)]
    remote_cancel_many(cancels, 0, 4)
    for h in handles:
        h.result(timeout=30)
    assert waiter.result(timeout=30)[0] is True
    for i, ctx in enumerate(ctxs):
        assert ctx.cancelled
        assert ctx.cause() in _ancestors(i, parents)


def _mp_child(ctx: Context, cancel: CancelFunc, ch: mpchan.Channel, out: mpchan.Channel) -> None:
    try:
        ch.recv(ctx=ctx)
        out.send("received")
    except mpchan.Cancelled as e:
        out.send(("cancelled", e.cause))
    cancel("child done")  # idempotent: the first cause stays


def test_ctx_and_cancel_through_multiprocessing() -> None:
    mp = multiprocessing.get_context("spawn")
    ctx, cancel = mpchan.with_cancel(bg())
    child, cancel_child = mpchan.with_cancel(ctx)
    ch, out = mpchan.Channel(1), mpchan.Channel(1)
    proc = mp.Process(target=_mp_child, args=(child, cancel, ch, out))
    proc.start()
    try:
        wait_blocked(ch, receivers=1)
        cancel("from parent")
        assert out.recv(timeout=30) == ("cancelled", "from parent")
        proc.join(30)
        assert proc.exitcode == 0
        assert ctx.cause() == "from parent"
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    cancel_child()


def _mp_canceller(cancel: CancelFunc) -> None:
    cancel("from mp child")


def test_cancel_from_a_multiprocessing_child() -> None:
    mp = multiprocessing.get_context("spawn")
    ctx, cancel = mpchan.with_cancel(bg())
    child, cancel_child = mpchan.with_cancel(ctx)
    proc = mp.Process(target=_mp_canceller, args=(cancel,))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    assert child.wait(5) and child.cause() == "from mp child"
    cancel_child()
