"""A program whose every process is SIGKILLed by the test.

It creates channels (one with an out-of-band payload slot), hands them to
forked children that block on them, prints ``SESSION PID...`` (children)
on one line and waits to be killed.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from mpchan import Channel


def hold(a: Channel, b: Channel) -> None:
    b.send(bytes(300_000))  # a payload slot file
    a.recv()  # blocks until killed


def main() -> None:
    a, b, c = Channel(0), Channel(4), Channel(2)
    c.send(bytes(200_000))
    ctx = multiprocessing.get_context("fork")
    kids = [ctx.Process(target=hold, args=(a, b)) for _ in range(2)]
    for k in kids:
        k.start()
    for _ in kids:
        b.recv(timeout=30)
    b.send(bytes(300_000))
    session = os.environ["MPCHAN_SESSION"].partition(":")[0]
    print(session, *(k.pid for k in kids), flush=True)
    time.sleep(60)


if __name__ == "__main__":
    main()
