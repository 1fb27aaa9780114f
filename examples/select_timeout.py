"""select with a timeout: wait for whichever of two workers answers first,
but never longer than a deadline."""

from __future__ import annotations

import contextlib
import time

import mpchan


def answer(out: mpchan.Channel, name: str, delay: float) -> None:
    time.sleep(delay)
    with contextlib.suppress(mpchan.ChannelClosed):  # nobody wants the answer any more
        out.send(name)


def main() -> None:
    fast, slow = mpchan.Channel(1), mpchan.Channel(1)
    workers = [mpchan.go(answer, fast, "fast", 0.05), mpchan.go(answer, slow, "slow", 3.0)]
    index, value, _ok = mpchan.select(fast, slow, mpchan.after(2.0))
    print("first answer:", value if index < 2 else "timed out")
    # nothing is ready now: a 0.1 s timeout fires
    try:
        mpchan.select(slow, timeout=0.1)
    except TimeoutError:
        print("slow worker: no answer within 0.1 s")
    slow.close()  # the slow worker's late send now fails at once
    for h in workers:
        h.join()


if __name__ == "__main__":
    main()
