"""Channel-level fan-in, fan-out and broadcast (layer 8).

Each helper starts goroutines (``mpchan.go``) that move values between
channels and returns the new channel(s) at once; the goroutines end when
their inputs are closed and drained, and the last one to end closes the
output (a WaitGroup counts them), so ``for v in out`` ends cleanly.

Written only against the public API of the lower layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._channel import Channel
from ._errors import ChannelClosed
from ._go import go
from ._policy import count
from ._sync import WaitGroup

__all__ = ["fan_out", "merge", "tee"]


def _finish(wg: WaitGroup, out: Channel) -> None:
    # Invariant: the last goroutine to call done() sees the count at 0 and
    # closes; two may both see 0 -- close is idempotent.
    wg.done()
    if wg.count == 0:
        out.close()


def _forward(src: Channel, out: Channel, wg: WaitGroup) -> int:
    n = 0
    try:
        for value in src:
            out.send(value)
            n += 1
    except ChannelClosed:
        pass  # the output was closed under us: nothing left to deliver to
    finally:
        _finish(wg, out)
    return n


def _apply(fn: Callable[[Any], Any], src: Channel, out: Channel, wg: WaitGroup) -> int:
    n = 0
    try:
        for value in src:
            result = fn(value)
            out.send(result)
            n += 1
    except ChannelClosed:
        pass
    except BaseException:
        # Stop the upstream too: a fan-out that lost a worker to an error
        # must not look like one that finished.
        src.close()
        raise
    finally:
        _finish(wg, out)
    return n


def _broadcast(src: Channel, outs: list[Channel]) -> int:
    n = 0
    try:
        for value in src:
            for out in outs:
                out.send(value)
            n += 1
    except ChannelClosed:
        pass
    finally:
        for out in outs:
            out.close()
    return n


def merge(*chs: Channel, capacity: int = 0) -> Channel:
    """Fan-in: a new channel that receives every value of every ``chs``.

    Each input's values keep their order; inputs interleave freely. The
    result is closed once every input is closed and drained.

    Blocks: never (one goroutine per input does the moving).
    Cancellation: close the inputs; closing the output ends the goroutines
    at their next value.
    Process safety: the result may be used from any process.
    """
    count("capacity", capacity, 0)
    for ch in chs:
        if not isinstance(ch, Channel):
            raise TypeError(f"merge takes Channels, not {type(ch).__name__}")
    out = Channel(capacity)
    if not chs:
        out.close()
        return out
    wg = WaitGroup()
    wg.add(len(chs))
    for ch in chs:
        go(_forward, ch, out, wg)
    return out


def fan_out(
    fn: Callable[[Any], Any], in_ch: Channel, *, workers: int = 1, capacity: int = 0
) -> Channel:
    """Fan-out: ``workers`` goroutines receive from ``in_ch`` and send
    ``fn(value)`` to the returned channel (in completion order), which is
    closed when all of them have finished.

    An exception from ``fn`` ends its worker and closes ``in_ch`` (so the
    producer sees ``ChannelClosed`` rather than a silent loss); the output
    closes once the other workers are done. Use a stream (``mpchan.stream``)
    when errors must reach the consumer.

    Blocks: never. Cancellation: close ``in_ch`` (workers finish what they
    hold) or the output. Process safety: the result may be used anywhere.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")
    if not isinstance(in_ch, Channel):
        raise TypeError(f"in_ch must be a Channel, not {type(in_ch).__name__}")
    count("workers", workers, 1)
    count("capacity", capacity, 0)
    out = Channel(capacity)
    wg = WaitGroup()
    wg.add(workers)
    for _ in range(workers):
        go(_apply, fn, in_ch, out, wg)
    return out


def tee(ch: Channel, n: int) -> list[Channel]:
    """Broadcast: ``n`` new channels that each receive every value of ``ch``,
    in order; all are closed when ``ch`` is closed and drained.

    The outputs have ``ch``'s capacity; the slowest reader paces the others.

    Blocks: never. Cancellation: close ``ch``, or any output (the broadcast
    then stops and closes the others). Process safety: as merge.
    """
    if not isinstance(ch, Channel):
        raise TypeError(f"tee takes a Channel, not {type(ch).__name__}")
    count("n", n, 1)
    outs = [Channel(ch.capacity) for _ in range(n)]
    go(_broadcast, ch, outs)
    return outs
