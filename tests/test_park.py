"""Parking: the one wait primitive (register, re-check, park, unregister)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
import threading
import time
from typing import Any

import pytest

import mpchan
from mpchan import Channel, _core
from mpchan._park import SLICE, Parking
from mpchan._wake import wake

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "chan_scripts"))
import chan_workers as cw

bg = mpchan.background


def registered(core: Any, key: int) -> bool:
    return any(w[0] == key for w in core.waiters())


def later(seconds: float, fn: Any, *args: Any) -> threading.Thread:
    """Run ``fn(*args)`` in a thread after ``seconds``."""

    def run() -> None:
        time.sleep(seconds)
        fn(*args)

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_event_loop_waits_on_the_descriptor_of_a_recv_registration(method: str) -> None:
    """An asyncio loop waits for a channel with loop.add_reader on the
    parking's descriptor -- no polling -- and a send from another process
    wakes it."""
    gate, ch = Channel(1), Channel(1)
    child = multiprocessing.get_context(method).Process(target=cw.echo, args=(gate, ch))
    child.start()
    try:

        async def receive() -> tuple[Any, int]:
            loop = asyncio.get_running_loop()
            calls = 0
            with Parking(dedicated=True) as p:
                core = ch.sel_core()
                p.add(core, _core.W_RECV)
                assert len(ch) == 0  # the re-check: nothing there yet
                fut: asyncio.Future[None] = loop.create_future()

                def readable() -> None:
                    nonlocal calls
                    calls += 1
                    loop.remove_reader(p.fileno())  # one-shot
                    fut.set_result(None)

                loop.add_reader(p.fileno(), readable)
                try:
                    gate.send_nowait("ping")  # the child sends it back on ch
                    await asyncio.wait_for(fut, 30)  # a safety net, not a poll
                finally:
                    loop.remove_reader(p.fileno())
                assert p.wait(0)  # the wake-up is there; this consumes it
                assert registered(core, p.key)
            assert not registered(core, p.key)
            return ch.recv_nowait(), calls

        value, calls = asyncio.run(receive())
        assert value == "ping"
        assert calls == 1
    finally:
        gate.close()
        child.join(10)
    assert child.exitcode == 0
    assert ch.sel_core().waiters() == []


def test_wait_async_is_woken_by_a_send() -> None:
    ch = Channel(1)

    async def receive() -> Any:
        with Parking(dedicated=True) as p:
            while True:
                p.track(ch.sel_core())
                try:
                    return ch.recv_nowait()
                except mpchan.WouldBlock:
                    pass
                p.add(ch.sel_core(), _core.W_RECV)
                if len(ch) == 0:
                    await p.wait_async(None)
                p.release()

    t = later(0.05, ch.send, "hello")
    start = time.monotonic()
    assert asyncio.run(receive()) == "hello"
    t.join()
    assert time.monotonic() - start < SLICE  # woken, not timed out
    assert ch.sel_core().waiters() == []


def test_wait_async_needs_a_dedicated_parking() -> None:
    async def run() -> None:
        with Parking() as p:
            await p.wait_async(0)

    with pytest.raises(RuntimeError, match="dedicated"):
        asyncio.run(run())


def test_dedicated_parking_has_its_own_descriptor_and_gives_it_back() -> None:
    with Parking() as shared, Parking(dedicated=True) as own:
        assert own.fileno() != shared.fileno()
        assert own.key != shared.key
        with Parking(dedicated=True) as other:  # two waits at once: two waiters
            assert other.key != own.key
        waiter = own.waiter
        wake([waiter.key])  # a wake-up still pending when the wait ends
    with Parking(dedicated=True) as next_one:
        assert next_one.waiter is waiter  # lent again, not made anew
        assert not next_one.wait(0)  # the old wait's wake-up was dropped
    with Parking() as again:
        assert again.fileno() == shared.fileno()  # the thread's waiter lives on


@pytest.mark.parametrize("exc", [None, ValueError, KeyboardInterrupt])
def test_every_registration_goes_however_the_block_ends(exc: type[BaseException] | None) -> None:
    a, b = Channel(1), Channel(0)
    ctx, cancel = mpchan.with_cancel(bg())
    node = ctx.wait_cores()[0]
    try:
        with Parking(ctx=ctx) as p:
            p.add(a.sel_core(), _core.W_RECV)
            p.add(a.sel_core(), _core.W_SEND)  # one core, two kinds
            p.track(b.sel_core())
            st, _d, _t, _b, _w = b.sel_core().recv(0, 0, p.key)  # registers: empty
            assert st == _core.EMPTY
            p.wait(0)  # registers on the context too
            assert registered(a.sel_core(), p.key)
            assert registered(b.sel_core(), p.key)
            assert registered(node, p.key)
            if exc is not None:
                raise exc
    except (ValueError, KeyboardInterrupt):
        pass
    for core in (a.sel_core(), b.sel_core(), node):
        assert core.waiters() == []
    cancel()


def test_release_keeps_the_context_registrations() -> None:
    ch = Channel(1)
    ctx, cancel = mpchan.with_cancel(bg())
    node = ctx.wait_cores()[0]
    with Parking(ctx=ctx) as p:
        p.add(ch.sel_core(), _core.W_RECV)
        p.wait(0)
        p.release()
        assert ch.sel_core().waiters() == []
        assert registered(node, p.key)
    assert node.waiters() == []
    cancel()


def test_wait_raises_timeout_only_before_parking() -> None:
    with Parking(0.05) as p:
        start = time.monotonic()
        assert p.wait(None) is False  # parks up to the deadline, then returns
        assert time.monotonic() - start >= 0.04
        with pytest.raises(TimeoutError):
            p.wait(None)  # the deadline passed: raises, does not park
    with Parking() as p:
        assert p.wait(0.01) is False  # no deadline: never raises


def test_wait_without_a_timeout_parks_one_slice_at_most() -> None:
    with Parking() as p:
        start = time.monotonic()
        assert p.wait() is False
        assert SLICE * 0.8 <= time.monotonic() - start < SLICE * 4


def test_cancel_wakes_the_parking_and_the_next_wait_raises() -> None:
    ctx, cancel = mpchan.with_cancel(bg())
    t = later(0.05, cancel, "stop")
    with Parking(ctx=ctx) as p:
        start = time.monotonic()
        while p.wait(None) is False:  # woken by the cancel, not by a slice
            pass
        assert time.monotonic() - start < SLICE
        with pytest.raises(mpchan.Cancelled):
            p.wait()
    t.join()
    assert ctx.wait_cores()[0].waiters() == []


def test_a_context_deadline_raises_deadline_exceeded() -> None:
    ctx, cancel = mpchan.with_timeout(bg(), 0.05)
    with Parking(10, ctx) as p, pytest.raises(mpchan.DeadlineExceeded):
        while True:
            p.wait()
    cancel()


def test_blocking_calls_leave_no_registration() -> None:
    """Every converted wait, timed out, leaves the waiter tables empty."""
    buffered, unbuffered = Channel(1), Channel(0)
    ctx, cancel = mpchan.with_cancel(bg())
    wg = mpchan.WaitGroup()
    wg.add(1)
    buffered.send(1)
    with pytest.raises(TimeoutError):
        buffered.send(2, timeout=0.02, ctx=ctx)  # full
    with pytest.raises(TimeoutError):
        buffered.send_many([2, 3], timeout=0.02, ctx=ctx)
    buffered.recv()
    with pytest.raises(TimeoutError):
        buffered.recv(timeout=0.02, ctx=ctx)  # empty
    with pytest.raises(TimeoutError):
        unbuffered.send(1, timeout=0.02, ctx=ctx)  # staged, withdrawn
    with pytest.raises(TimeoutError):
        wg.wait(0.02, ctx=ctx)
    with pytest.raises(TimeoutError):
        mpchan.select(buffered, (unbuffered, 1), ctx.done(), mpchan.after(5), timeout=0.02)
    with pytest.raises(TimeoutError):
        ctx.drain_requested().recv(timeout=0.02)
    with pytest.raises(TimeoutError):
        mpchan.after(5).recv(timeout=0.02)
    assert ctx.wait(0.02) is False
    buffered.wait_readable(0.02)
    node = ctx.wait_cores()[0]
    for core in (buffered.sel_core(), unbuffered.sel_core(), node, wg._core):
        assert core.waiters() == []
    assert unbuffered.stats()["sent"] == 0
    wg.done()
    cancel()
