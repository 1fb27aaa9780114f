"""A program that holds everything mpchan makes, and is then made to die.

Usage: python program_kill.py START_METHOD MODE

It makes channels and contexts, starts two CPU-bound goroutines and two
goroutines blocked in ``ch.recv(ctx=...)``, waits until all four run (the
blocked ones really blocked), prints one JSON line::

    {"pids": [every descendant process], "workers": [...], "token": "...", "root": PID}

and then, by MODE: ``wait`` blocks (to be killed from outside), ``raise``
dies of an unhandled exception.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import psutil

import mpchan
from mpchan import _supervisor


def spin(ready: mpchan.Channel) -> None:
    ready.send(os.getpid())
    n = 0
    while True:
        n += 1


def blocked(ready: mpchan.Channel, ch: mpchan.Channel, ctx: mpchan.Context) -> object:
    ready.send(os.getpid())
    return ch.recv(ctx=ctx)


def main() -> None:
    method, mode = sys.argv[1], sys.argv[2]
    _supervisor.set_supervisor(_supervisor.Supervisor(method))
    ready = mpchan.Channel(8)
    work = mpchan.Channel(4)
    work.send(b"x" * 100_000)  # a payload out of band, in a file of its own
    idle = mpchan.Channel(0)
    ctx, cancel = mpchan.with_timeout(mpchan.background(), 3600)
    child = mpchan.with_value(mpchan.with_cancel(ctx)[0], "k", "v")
    handles = [mpchan.go(spin, ready) for _ in range(2)]
    handles += [mpchan.go(blocked, ready, idle, child) for _ in range(2)]
    for _ in handles:
        ready.recv(timeout=60)
    deadline = time.monotonic() + 60
    while idle.stats()["blocked_receivers"] < 2:
        if time.monotonic() > deadline:
            raise TimeoutError("the blocked goroutines never blocked")
        time.sleep(0.005)
    token, _, root = os.environ["MPCHAN_SESSION"].partition(":")
    pids = [p.pid for p in psutil.Process().children(recursive=True)]
    info = {
        "pids": pids,
        "workers": [h.pid for h in handles],
        "token": token,
        "root": int(root),
        "segments": {
            "ready": ready._seg.name,
            "work": work._seg.name,
            "idle": idle._seg.name,
            "ctx": [n.name for n in ctx._chain],
            "child": [n.name for n in child._chain],
        },
    }
    del cancel
    print(json.dumps(info), flush=True)
    if mode == "raise":
        raise RuntimeError("the program dies of an unhandled exception")
    threading.Event().wait()


if __name__ == "__main__":
    main()
