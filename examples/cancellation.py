"""Cancellation: a context with a deadline reaches a worker process, which
stops between units of work; cancel() from the parent stops another."""

from __future__ import annotations

import mpchan
from workers import hashing


def grind(ctx: mpchan.Context) -> int:
    rounds = 0
    while not ctx.cancelled:  # check between units of work
        hashing.digest(rounds, rounds=200)
        rounds += 1
    return rounds


def main() -> None:
    ctx, cancel = mpchan.with_timeout(mpchan.background(), 0.5)
    h = mpchan.go(grind, ctx)
    print(f"deadline: worker stopped after {h.result(timeout=10)} rounds, err={ctx.err()!r}")
    cancel()

    ctx2, cancel2 = mpchan.with_cancel(mpchan.background())
    h2 = mpchan.go(grind, ctx2)
    ch = mpchan.Channel(0)
    try:  # wait for something that never comes, bounded by ctx2's cancellation
        mpchan.select(ch, timeout=0.2)
    except TimeoutError:
        cancel2("parent gave up")
    print(f"cancel(): worker stopped after {h2.result(timeout=10)} rounds, cause={ctx2.cause()!r}")


if __name__ == "__main__":
    main()
