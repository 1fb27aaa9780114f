"""asyncio: awaited channels, select, contexts and go handles.

Each test runs a real event loop beside real worker processes: the loop
must keep running (a 10 ms ticker measures it), awaiting must cost no CPU,
and a cancelled await must neither lose nor duplicate a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from typing import Any

import cloudpickle
import pytest

import mpchan
from mpchan import Channel, EndOfChannel

# Workers need not be able to import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(60)


# -- run in worker processes --------------------------------------------------


def feed(chans: list[Channel], rounds: int, pause: float) -> int:
    for r in range(rounds):
        for i, ch in enumerate(chans):
            ch.send((i, r))
        time.sleep(pause)
    return rounds * len(chans)


def echo(inbox: Channel, outbox: Channel) -> None:
    for v in inbox:
        outbox.send(v)
    outbox.close()


def produce(ch: Channel, who: int, n: int) -> None:
    for i in range(n):
        ch.send((who, i))


def take_all(ch: Channel) -> list[Any]:
    return list(ch)


def cancel_later(cancel: mpchan.CancelFunc, delay: float) -> None:
    time.sleep(delay)
    cancel("from a worker")


def slow_double(x: int, delay: float) -> int:
    time.sleep(delay)
    return 2 * x


# -- helpers ------------------------------------------------------------------


class Ticker:
    """A 10 ms ticker on the loop: the longest gap between its ticks says how
    long the loop was blocked."""

    def __init__(self) -> None:
        self.ticks = 0
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.longest = max(self.longest, now - last)
            self.ticks += 1
            last = now

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def no_registrations(*chans: Channel) -> bool:
    return all(ch.sel_core().waiters() == [] for ch in chans)


# -- channels -----------------------------------------------------------------


def test_ticker_keeps_ticking_while_coroutines_await_channels_fed_by_processes() -> None:
    chans = [Channel(0) for _ in range(4)]

    async def main() -> tuple[list[Any], Ticker]:
        with Ticker() as ticker:
            h = mpchan.go(feed, chans, 10, 0.03)  # ~0.3 s of sends
            got = await asyncio.gather(*(_recv_n(ch, 10) for ch in chans))
            assert await h == 40
        return got, ticker

    got, ticker = asyncio.run(main())
    assert got == [[(i, r) for r in range(10)] for i in range(4)]
    assert ticker.ticks >= 15
    # a blocking receive would stall the loop for the 30 ms between sends
    assert ticker.longest < 0.2, f"loop blocked for {ticker.longest:.3f} s"
    assert no_registrations(*chans)


async def _recv_n(ch: Channel, n: int) -> list[Any]:
    return [await ch.arecv(timeout=10) for _ in range(n)]


def test_a_hundred_coroutines_await_a_hundred_channels() -> None:
    chans = [Channel(random.choice([0, 1, 4])) for _ in range(100)]

    async def main() -> list[list[Any]]:
        halves = [mpchan.go(feed, chans[:50], 3, 0.0), mpchan.go(feed, chans[50:], 3, 0.0)]
        got = await asyncio.gather(*(_recv_n(ch, 3) for ch in chans))
        assert [await h for h in halves] == [150, 150]
        return got

    got = asyncio.run(main())
    assert got == [[(i % 50, r) for r in range(3)] for i in range(100)]
    assert no_registrations(*chans)


@pytest.mark.parametrize("capacity", [0, 8])
def test_async_for_receives_until_closed_and_asend_reaches_a_process(capacity: int) -> None:
    inbox, outbox = Channel(capacity), Channel(capacity)

    async def main() -> list[Any]:
        h = mpchan.go(echo, inbox, outbox)

        async def send_all() -> None:
            for i in range(200):
                await inbox.asend(i)
            inbox.close()

        sender = asyncio.create_task(send_all())
        got = [v async for v in outbox]
        await sender
        await h
        return got

    assert asyncio.run(main()) == list(range(200))


def test_arecv_timeout_context_and_end_of_channel() -> None:
    ch = Channel(1)

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await ch.arecv(timeout=0.05)
        ctx, cancel = mpchan.with_cancel(mpchan.background())
        asyncio.get_running_loop().call_later(0.05, cancel)
        with pytest.raises(mpchan.Cancelled):
            await ch.arecv(ctx=ctx)
        with pytest.raises(mpchan.Cancelled):
            await ch.asend(1, ctx=ctx)  # already done: nothing sent
        assert len(ch) == 0
        await ch.asend("last")
        with pytest.raises(TimeoutError):
            await ch.asend("full", timeout=0.05)
        ch.close()
        with pytest.raises(mpchan.ChannelClosed):
            await ch.asend("closed")
        assert await ch.arecv() == "last"
        with pytest.raises(EndOfChannel):
            await ch.arecv()

    asyncio.run(main())
    assert no_registrations(ch)


@pytest.mark.parametrize("capacity", [0, 2])
def test_cancelled_asend_either_sent_or_left_nothing(capacity: int) -> None:
    ch = Channel(capacity)
    n = 300

    async def main() -> tuple[list[int], list[Any]]:
        taker = mpchan.go(take_all, ch)
        sent: list[int] = []
        rng = random.Random(7)
        i = 0
        while i < n:
            task = asyncio.create_task(ch.asend(i))
            await asyncio.sleep(0 if rng.random() < 0.5 else 0.0005)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                continue  # not sent: send it again
            sent.append(i)
            i += 1
        ch.close()
        return sent, await taker

    sent, received = asyncio.run(main())
    assert sent == list(range(n))
    assert received == sent  # nothing lost, nothing twice, in order


def test_cancelled_arecv_consumes_nothing() -> None:
    ch = Channel(0)
    producers = 2
    n = 200

    async def main() -> list[Any]:
        handles = [mpchan.go(produce, ch, who, n) for who in range(producers)]
        got: list[Any] = []
        rng = random.Random(3)
        while len(got) < producers * n:
            task = asyncio.create_task(ch.arecv(timeout=10))
            await asyncio.sleep(0 if rng.random() < 0.5 else 0.0003)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                got.append(await task)
        for h in handles:
            await h
        return got

    got = asyncio.run(main())
    assert sorted(got) == sorted((w, i) for w in range(producers) for i in range(n))
    for w in range(producers):  # each sender's values in its order
        assert [i for who, i in got if who == w] == list(range(n))
    assert no_registrations(ch)


def test_many_waits_share_the_loop_thread_each_with_its_own_descriptor() -> None:
    a, b = Channel(0), Channel(0)

    async def main() -> tuple[Any, Any]:
        ra = asyncio.create_task(a.arecv(timeout=5))
        rb = asyncio.create_task(b.arecv(timeout=5))
        await asyncio.sleep(0.02)  # both parked now, on one thread
        await b.asend("to b")
        await a.asend("to a")
        return await ra, await rb

    assert asyncio.run(main()) == ("to a", "to b")


# -- select -------------------------------------------------------------------


def test_aselect_receives_sends_times_out_and_defaults() -> None:
    a, b = Channel(1), Channel(0)

    async def main() -> None:
        h = mpchan.go(feed, [b], 1, 0.0)
        assert await mpchan.aselect(a, b, timeout=10) == (1, (0, 0), True)
        await h
        assert await mpchan.aselect((a, 5), b) == (0, None, True)
        assert await mpchan.aselect(a, b, default=True) == (0, 5, True)
        assert await mpchan.aselect(a, b, default=True) == (-1, None, False)
        with pytest.raises(TimeoutError):
            await mpchan.aselect(a, b, timeout=0.05)
        fired = await mpchan.aselect(a, mpchan.after(0.02))
        assert fired[0] == 1
        ctx, cancel = mpchan.with_cancel(mpchan.background())
        asyncio.get_running_loop().call_later(0.02, cancel)
        assert (await mpchan.aselect(a, ctx.done()))[0] == 1
        with pytest.raises(mpchan.Cancelled):
            await mpchan.aselect(a, ctx=ctx)

    asyncio.run(main())
    assert no_registrations(a, b)


def test_cancelled_aselect_send_fires_or_withdraws() -> None:
    ch = Channel(0)
    n = 200

    async def main() -> tuple[list[int], list[Any]]:
        taker = mpchan.go(take_all, ch)
        other = Channel(0)
        sent: list[int] = []
        i = 0
        rng = random.Random(11)
        while i < n:
            task = asyncio.create_task(mpchan.aselect((ch, i), other))
            await asyncio.sleep(0 if rng.random() < 0.5 else 0.0005)
            task.cancel()
            try:
                assert await task == (0, None, True)
            except asyncio.CancelledError:
                continue
            sent.append(i)
            i += 1
        ch.close()
        return sent, await taker

    sent, received = asyncio.run(main())
    assert received == sent == list(range(n))


# -- contexts and go handles --------------------------------------------------


def test_adone_waits_a_second_on_almost_no_cpu() -> None:
    ctx, cancel = mpchan.with_cancel(mpchan.background())

    async def main() -> tuple[float, float]:
        h = mpchan.go(cancel_later, cancel, 1.0)
        cpu0, t0 = time.process_time(), time.monotonic()
        await ctx.adone()
        cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
        await h
        return cpu, wall

    cpu, wall = asyncio.run(main())
    assert ctx.cause() == "from a worker"
    assert 0.9 < wall < 5
    assert cpu < 0.05 * wall, f"{cpu:.3f} s of CPU in {wall:.2f} s"


def test_adone_ends_at_the_deadline_and_cancelling_the_task_stops_it() -> None:
    async def main() -> None:
        ctx, _ = mpchan.with_timeout(mpchan.background(), 0.05)
        t0 = time.monotonic()
        await ctx.adone()
        assert 0.04 < time.monotonic() - t0 < 1
        live, cancel = mpchan.with_cancel(mpchan.background())
        task = asyncio.create_task(live.adone())
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancel()

    asyncio.run(main())


def test_await_go_handles_and_cancel_only_the_wait() -> None:
    async def main() -> None:
        with Ticker() as ticker:
            handles = [mpchan.go(slow_double, i, 0.1) for i in range(3)]
            assert [await h for h in handles] == [0, 2, 4]
        assert ticker.longest < 0.2
        h = mpchan.go(slow_double, 21, 0.2)
        waiting = asyncio.create_task(_await(h))
        await asyncio.sleep(0.02)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert await h == 42  # the goroutine ran on
        with pytest.raises(ZeroDivisionError):
            await mpchan.go(divmod, 1, 0)

    asyncio.run(main())


async def _await(h: mpchan.GoHandle[Any]) -> Any:
    return await h


def test_pool_futures_are_awaitable_through_wrap_future() -> None:
    async def main() -> list[int]:
        with mpchan.Pool(2) as pool:
            futs = [asyncio.wrap_future(pool.submit(slow_double, i, 0.01)) for i in range(4)]
            return list(await asyncio.gather(*futs))

    assert asyncio.run(main()) == [0, 2, 4, 6]
