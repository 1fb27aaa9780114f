"""errgroup: run functions in worker processes; the first error cancels the
group's context, the others see it and stop early; wait() raises it."""

from __future__ import annotations

import mpchan
from workers import primes


def count_until_cancelled(ctx: mpchan.Context, n: int) -> int:
    done = 0
    for i in range(n):
        if ctx.cancelled:
            break
        primes.count(i)
        done += 1
    return done


def fail(x: int) -> int:
    raise ValueError(f"bad input {x}")


def main() -> None:
    g = mpchan.Group()
    results = [g.go(count_until_cancelled, g.ctx, 50) for _ in range(2)]
    g.go(fail, 7)
    try:
        g.wait(timeout=60)
    except ValueError as exc:
        print("group failed:", exc)
    print("group context cancelled:", g.ctx.cancelled)
    print("others completed", [r.result() for r in results], "of 50 steps")


if __name__ == "__main__":
    main()
