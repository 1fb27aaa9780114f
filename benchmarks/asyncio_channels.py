"""asyncio scenarios: awaited channel calls across processes, against the usual workaround.

An asyncio service that reads from another process today either blocks its loop or hands
each blocking call to a thread (``await loop.run_in_executor(None, ch.recv)``). Both
scenarios run the awaited calls (``await ch.asend`` / ``await ch.arecv``, which park the
task on the wait's own descriptor) against that workaround on the same channel, in the
same run, with a blocking loop without asyncio as the floor (reference row):

- ``async_pingpong``: one process runs an event loop and plays ping (send i, await i + 1);
  the other answers with plain blocking calls. Median round trip in µs.
- ``async_fanin``: four producer processes send ints into one channel; one process's event
  loop receives them all. Messages per second.

The ratio on a reference row is the fraction of the blocking floor the awaited calls
reach (latency: floor ÷ mpchan).
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from benchmarks._proc import FORK, run_processes
from benchmarks.channels import CAPACITY, WARMUP, VerificationError, _mpchan_available
from benchmarks.harness import Contender, Scenario

GROUP = "asyncio"
PRODUCERS = 4

# How a process waits on the channel: an awaitable factory per call.
Wait = Callable[[Any], Coroutine[Any, Any, Any]]


def _awaited_recv(ch: Any) -> Coroutine[Any, Any, Any]:
    return ch.arecv()  # type: ignore[no-any-return]


def _awaited_send(ch: Any, value: Any) -> Coroutine[Any, Any, None]:
    return ch.asend(value)  # type: ignore[no-any-return]


async def _executor_recv(ch: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, ch.recv)


async def _executor_send(ch: Any, value: Any) -> None:
    await asyncio.get_running_loop().run_in_executor(None, ch.send, value)


STYLES: dict[str, tuple[Any, Any]] = {
    "awaited": (_awaited_send, _awaited_recv),
    "executor": (_executor_send, _executor_recv),
}


# ------------------------------------------------------------------- process bodies


def _async_ping(there: Any, back: Any, barrier: Any, rounds: int, style: str) -> float:
    """Send i, await i + 1, ``rounds`` times on an event loop; median round trip in µs."""
    send, recv = STYLES[style]

    async def main() -> float:
        barrier.wait()
        for i in range(WARMUP):
            await send(there, i)
            if await recv(back) != i + 1:
                raise VerificationError("wrong reply during warm-up")
        clock = time.perf_counter
        rtts = []
        for i in range(rounds):
            t0 = clock()
            await send(there, i)
            reply = await recv(back)
            rtts.append(clock() - t0)
            if reply != i + 1:
                raise VerificationError(f"round {i}: got {reply!r}, expected {i + 1}")
        rtts.sort()
        return rtts[len(rtts) // 2] * 1e6

    return asyncio.run(main())


def _blocking_ping(there: Any, back: Any, barrier: Any, rounds: int, style: str) -> float:
    """The floor: the same ping with blocking calls and no event loop."""
    barrier.wait()
    for i in range(WARMUP):
        there.send(i)
        back.recv()
    clock = time.perf_counter
    rtts = []
    for i in range(rounds):
        t0 = clock()
        there.send(i)
        reply = back.recv()
        rtts.append(clock() - t0)
        if reply != i + 1:
            raise VerificationError(f"round {i}: got {reply!r}, expected {i + 1}")
    rtts.sort()
    return rtts[len(rtts) // 2] * 1e6


def _pong(inbound: Any, reply: Any, barrier: Any, rounds: int) -> int:
    """Answer every value v with v + 1 (blocking calls); return how many were answered."""
    barrier.wait()
    for _ in range(rounds):
        reply.send(inbound.recv() + 1)
    return rounds


def _produce(ch: Any, barrier: Any, values: range) -> float:
    """Send ``values`` then one None; return the start time."""
    barrier.wait()
    start = time.perf_counter()
    for v in values:
        ch.send(v)
    ch.send(None)
    return start


class _Tally:
    """What a fan-in consumer received: values, their sum, and the producers' Nones."""

    def __init__(self, producers: int) -> None:
        self.left = producers
        self.count = self.total = 0

    def add(self, v: Any) -> None:
        if v is None:
            self.left -= 1
        else:
            self.count += 1
            self.total += v

    def report(self) -> tuple[float, int, int]:
        return time.perf_counter(), self.count, self.total


def _async_consume(ch: Any, barrier: Any, producers: int, style: str) -> tuple[float, int, int]:
    """Receive on an event loop until every producer's None; (end, count, checksum)."""
    recv = STYLES[style][1]

    async def main() -> tuple[float, int, int]:
        barrier.wait()
        tally = _Tally(producers)
        while tally.left:
            tally.add(await recv(ch))
        return tally.report()

    return asyncio.run(main())


def _blocking_consume(ch: Any, barrier: Any, producers: int, style: str) -> tuple[float, int, int]:
    """The floor: the same receiving with blocking calls and no event loop."""
    barrier.wait()
    tally = _Tally(producers)
    while tally.left:
        tally.add(ch.recv())
    return tally.report()


# ------------------------------------------------------------------------- run functions


def _channel(capacity: int) -> Any:
    mpchan: Any = importlib.import_module("mpchan")
    return mpchan.Channel(capacity)


def _pingpong(style: str, ping: Callable[..., float]) -> Callable[[Mapping[str, Any]], float]:
    def run(params: Mapping[str, Any]) -> float:
        rounds = int(params["rounds"])
        there, back = _channel(1), _channel(1)
        barrier = FORK.Barrier(2)
        try:
            results, _ = run_processes(
                [
                    (ping, (there, back, barrier, rounds, style)),
                    (_pong, (there, back, barrier, rounds + WARMUP)),
                ],
                timeout=float(params["timeout"]),
            )
        finally:
            there.close()
            back.close()
        if results[1] != rounds + WARMUP:
            raise VerificationError("pong answered the wrong number of pings")
        return float(results[0])

    return run


def _fanin(style: str, consume: Callable[..., Any]) -> Callable[[Mapping[str, Any]], float]:
    def run(params: Mapping[str, Any]) -> float:
        n = int(params["n"])
        ch = _channel(CAPACITY)
        barrier = FORK.Barrier(PRODUCERS + 1)
        jobs: list[tuple[Callable[..., Any], tuple[Any, ...]]] = [
            (_produce, (ch, barrier, range(p, n, PRODUCERS))) for p in range(PRODUCERS)
        ]
        jobs.append((consume, (ch, barrier, PRODUCERS, style)))
        try:
            results, _ = run_processes(jobs, timeout=float(params["timeout"]))
        finally:
            ch.close()
        end, count, total = results[-1]
        if count != n or total != n * (n - 1) // 2:
            raise VerificationError(f"received {count:,} values (sum {total}), expected {n:,}")
        return n / (end - min(results[:-1]))

    return run


def _contenders(
    make: Callable[[str, Callable[..., Any]], Callable[[Mapping[str, Any]], float]],
    awaited: Callable[..., Any],
    blocking: Callable[..., Any],
) -> tuple[Contender, ...]:
    return (
        Contender("mpchan", make("awaited", awaited), "mpchan", _mpchan_available),
        Contender("run_in_executor", make("executor", awaited), "peer", _mpchan_available),
        Contender("blocking floor", make("awaited", blocking), "reference", _mpchan_available),
    )


ASYNC_PINGPONG = Scenario(
    name="async_pingpong",
    group=GROUP,
    label="async ping-pong round trip: int, {rounds:,} rounds",
    unit="µs",
    higher_is_better=False,
    contenders=_contenders(_pingpong, _async_ping, _blocking_ping),
    params=lambda q: {"rounds": 500 if q else 5_000},
    description="Median round trip of a small int between an event loop in one process and "
    "a blocking echo in another, over two Channel(capacity=1): mpchan awaits asend/arecv; "
    "run_in_executor awaits loop.run_in_executor(None, ch.send / ch.recv); the floor is "
    "the same ping with blocking calls and no loop.",
)

ASYNC_FANIN = Scenario(
    name="async_fanin",
    group=GROUP,
    label=f"async fan-in {PRODUCERS}→1: int, N={{n:,}}",
    unit="msgs/s",
    higher_is_better=True,
    contenders=_contenders(_fanin, _async_consume, _blocking_consume),
    params=lambda q: {"n": 20_000 if q else 200_000},
    description=f"{PRODUCERS} producer processes send ints into one Channel(capacity="
    f"{CAPACITY}); one process receives them all on an event loop (mpchan: await "
    "ch.arecv(); run_in_executor: await loop.run_in_executor(None, ch.recv)); the floor "
    "receives with blocking recv and no loop.",
)

SCENARIOS = [ASYNC_PINGPONG, ASYNC_FANIN]
