"""Fan-out / fan-in: two producers merged into one channel, hashed by three
workers (fan_out), results gathered from the output channel."""

from __future__ import annotations

import mpchan
from workers import hashing


def produce(out: mpchan.Channel, start: int, stop: int) -> None:
    for i in range(start, stop):
        out.send(i)
    out.close()


def main() -> None:
    a, b = mpchan.Channel(8), mpchan.Channel(8)
    mpchan.go(produce, a, 0, 50)
    mpchan.go(produce, b, 50, 100)
    merged = mpchan.merge(a, b, capacity=8)  # fan-in
    digests = mpchan.fan_out(hashing.leading_zero_bits, merged, workers=3, capacity=8)
    scores = list(digests)  # ends when every worker is done
    print(f"{len(scores)} digests, best has {max(scores)} leading zero bits")


if __name__ == "__main__":
    main()
