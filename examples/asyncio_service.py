"""asyncio: an event loop hands CPU-heavy work to worker processes and awaits
the answers, without ever blocking the loop (a heartbeat keeps ticking)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time

import mpchan


def hasher(jobs: mpchan.Channel, results: mpchan.Channel) -> None:
    for data in jobs:  # blocking calls: this is a worker process
        digest = data
        for _ in range(20_000):  # CPU-heavy: the loop's process never does this
            digest = hashlib.sha256(digest).digest()
        results.send(digest.hex()[:12])


async def heartbeat(beats: list[float]) -> None:
    while True:
        await asyncio.sleep(0.01)
        beats.append(time.monotonic())


async def main() -> None:
    jobs, results = mpchan.Channel(8), mpchan.Channel(8)
    workers = [mpchan.go(hasher, jobs, results) for _ in range(2)]
    beats: list[float] = []
    ticker = asyncio.create_task(heartbeat(beats))

    async def submit() -> None:
        for i in range(16):
            await jobs.asend(b"request %d" % i)  # waits while the buffer is full
        jobs.close()

    feeder = asyncio.create_task(submit())
    digests = [await results.arecv(timeout=30) for _ in range(16)]
    await feeder
    for w in workers:
        await w  # a go handle is awaitable
    # select, awaited: whichever is first, the answer or the timer
    index, _value, _ok = await mpchan.aselect(results, mpchan.after(0.05))
    ticker.cancel()
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    print(f"{len(digests)} digests, e.g. {digests[0]}")
    print("nothing more after 0.05 s:", index == 1)
    print(f"loop never blocked: {len(beats)} heartbeats, longest gap {max(gaps) * 1000:.0f} ms")


if __name__ == "__main__":
    asyncio.run(main())
