"""Worker pool with go + channels: N goroutines take jobs from one channel,
send results to another; a WaitGroup closes the results when all are done."""

from __future__ import annotations

import mpchan
from workers import primes


def worker(jobs: mpchan.Channel, results: mpchan.Channel, wg: mpchan.WaitGroup) -> None:
    try:
        for n in jobs:
            results.send((n, primes.count(n)))
    finally:
        wg.done()
        if wg.count == 0:
            results.close()


def feed(jobs: mpchan.Channel, n: int) -> None:
    for i in range(n):
        jobs.send(i)
    jobs.close()


def main() -> None:
    jobs, results = mpchan.Channel(16), mpchan.Channel(16)
    wg = mpchan.WaitGroup()
    wg.add(4)
    for _ in range(4):
        mpchan.go(worker, jobs, results, wg)
    mpchan.go(feed, jobs, 40)  # produce concurrently: results are read meanwhile
    counts = dict(results)
    print(f"{len(counts)} results; primes below 40000: {counts[39]}")


if __name__ == "__main__":
    main()
