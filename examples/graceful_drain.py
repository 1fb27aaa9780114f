"""Graceful drain with mpchan.main: the first SIGINT/SIGTERM stops reading
input, lets the items in flight finish and delivers them; a second signal
(or the grace period) cancels. Here the program signals itself after 20
results to show it; from a terminal, press Ctrl-C."""

from __future__ import annotations

import itertools
import os
import signal
import sys

import mpchan
from workers import primes


def job(ctx: mpchan.Context) -> None:
    got = []
    for n in mpchan.stream(itertools.count(), ctx=ctx).map(primes.count, workers=2, ordered=True):
        got.append(n)
        if len(got) == 20:
            os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C was pressed
    # every item taken from the (endless) source was finished and delivered, in order
    assert got == [primes.count(i) for i in range(len(got))]
    print(f"drained: {len(got)} results, none lost (draining={ctx.draining})")


if __name__ == "__main__":
    sys.exit(mpchan.main(job, grace=30))
