"""Group (errgroup): first error, ctx cancelled, limit never exceeded, try_go."""

from __future__ import annotations

import concurrent.futures
import gc
import os
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
from mpchan._context import Context

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def sup() -> Iterator[_supervisor.Supervisor]:
    """The program's supervisor for this module, stopped at its end."""
    with own_supervisor() as supervisor:
        yield supervisor


@pytest.fixture(autouse=True)
def _collect_cycles() -> Iterator[None]:
    """Exceptions kept by ``pytest.raises`` hold contexts in cycles; free them
    before the leak check looks at shared memory."""
    yield
    gc.collect()


def square(x: int) -> int:
    return x * x


def fail(message: str, delay: float = 0.0) -> None:
    time.sleep(delay)
    raise ValueError(message)


def wait_for_cancel(ctx: Context, timeout: float) -> str:
    """Block until the group's context is cancelled; report what stopped it."""
    if not ctx.wait(timeout):
        return "not cancelled"
    return f"cancelled: {ctx.cause()}"


def recv_until_cancelled(ctx: Context, ch: mpchan.Channel) -> Any:
    return ch.recv(ctx=ctx)  # raises Cancelled once the group fails


def interval(delay: float) -> tuple[float, float, int]:
    start = time.monotonic()
    time.sleep(delay)
    return start, time.monotonic(), os.getpid()


def test_results_in_go_order() -> None:
    with mpchan.Group() as g:
        futures = [g.go(square, i) for i in range(6)]
    assert g.results() == [i * i for i in range(6)]
    assert g.wait() == [i * i for i in range(6)]
    assert all(isinstance(f, concurrent.futures.Future) for f in futures)
    assert [f.result() for f in futures] == [i * i for i in range(6)]
    assert g.ctx.cancelled  # cancelled on exit, like errgroup's Wait
    assert g.errors == []


def test_first_error_cancels_ctx_and_is_raised() -> None:
    g = mpchan.Group()
    waiter = g.go(wait_for_cancel, g.ctx, 30)
    failing = g.go(fail, "first")
    with pytest.raises(ValueError, match="first") as info:
        g.wait()
    assert waiter.result() == "cancelled: first"
    assert isinstance(failing.exception(), ValueError)
    assert g.ctx.cancelled
    assert isinstance(g.ctx.cause(), ValueError)
    # the remote traceback and the worker note arrive with it
    assert info.value.__cause__ is not None
    assert any("raised in mpchan worker" in n for n in info.value.__notes__)


def test_blocked_function_wakes_when_another_fails() -> None:
    ch = mpchan.Channel(1)
    g = mpchan.Group()
    blocked = g.go(recv_until_cancelled, g.ctx, ch)
    g.go(fail, "boom", 0.1)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="boom"):
        g.wait(timeout=30)
    assert time.monotonic() - t0 < 10
    exc = blocked.exception()
    assert isinstance(exc, mpchan.Cancelled)
    assert len(ch) == 0


def test_other_errors_are_never_dropped() -> None:
    g = mpchan.Group()
    g.go(fail, "first")
    g.go(fail, "second", 0.5)
    g.go(fail, "third", 0.5)
    with pytest.raises(ValueError, match="first") as info:
        g.wait()
    notes = "\n".join(info.value.__notes__)
    assert "second" in notes and "third" in notes
    assert str(g.errors[0]) == "first"
    assert sorted(str(e) for e in g.errors[1:]) == ["second", "third"]


def test_context_manager_reraises_first_error() -> None:
    with pytest.raises(ValueError, match="only"), mpchan.Group() as g:
        g.go(square, 3)
        g.go(fail, "only")
    assert g.ctx.cancelled


def test_body_exception_cancels_and_propagates_with_group_errors() -> None:
    with pytest.raises(KeyError) as info, mpchan.Group() as g:
        waiter = g.go(wait_for_cancel, g.ctx, 30)
        g.go(fail, "in a function")
        raise KeyError("in the body")
    assert waiter.result().startswith("cancelled")
    assert any("in a function" in n for n in info.value.__notes__)


def test_parent_ctx_cancels_group_ctx() -> None:
    parent, cancel = mpchan.with_cancel(mpchan.background())
    g = mpchan.Group(parent)
    g.go(wait_for_cancel, g.ctx, 30)
    cancel("parent")
    assert g.wait() == ["cancelled: parent"]


@pytest.mark.parametrize("limit", [1, 2])
def test_limit_is_never_exceeded(limit: int) -> None:
    with mpchan.Group(limit=limit) as g:
        for _ in range(limit * 3):
            g.go(interval, 0.05)
    spans = g.results()
    events = sorted([(s, 1) for s, _, _ in spans] + [(e, -1) for _, e, _ in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert 1 <= peak <= limit


def test_go_blocks_at_the_limit_and_try_go_returns_false() -> None:
    ch = mpchan.Channel(1)
    g = mpchan.Group(limit=1)
    first = g.go(recv_until_cancelled, g.ctx, ch)
    assert g.try_go(square, 2) is False
    started = threading.Event()

    def go_more() -> None:
        g.go(square, 4)
        started.set()

    t = threading.Thread(target=go_more)
    t.start()
    assert not started.wait(0.3)  # go blocks while the slot is taken
    ch.send("release")
    assert started.wait(30)
    t.join()
    assert first.result(timeout=30) == "release"
    assert g.wait() == ["release", 16]
    assert g.try_go(square, 5) is True  # a slot is free again
    assert g.wait() == ["release", 16, 25]


def test_try_go_without_limit_always_starts() -> None:
    g = mpchan.Group()
    assert all(g.try_go(square, i) for i in range(3))
    assert g.wait() == [0, 1, 4]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        mpchan.Group(limit=0)
    g = mpchan.Group(limit=1)
    with pytest.raises(mpchan.SerializationError):
        g.go(square, threading.Lock())  # type: ignore[arg-type]
    assert g.try_go(square, 1)  # the failed go gave its slot back
    assert g.wait() == [1]
    with pytest.raises(TypeError):
        cloudpickle.dumps(g)


def test_wait_timeout() -> None:
    ch = mpchan.Channel(1)
    g = mpchan.Group()
    g.go(recv_until_cancelled, g.ctx, ch)
    with pytest.raises(TimeoutError):
        g.wait(timeout=0.1)
    assert not g.ctx.cancelled
    ch.send(1)
    assert g.wait(timeout=30) == [1]
