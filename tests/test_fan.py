"""merge, fan_out and tee: channel-level fan-in, fan-out and broadcast."""

from __future__ import annotations

import sys

import cloudpickle
import pytest

import mpchan

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x: int) -> int:
    return x * x


def fail_on_3(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x


def fill(ch: mpchan.Channel, values: list[int]) -> None:
    try:
        for v in values:
            ch.send(v)
    finally:
        ch.close()


def test_merge_delivers_everything_and_keeps_each_inputs_order() -> None:
    a, b, c = mpchan.Channel(4), mpchan.Channel(4), mpchan.Channel(0)
    out = mpchan.merge(a, b, c, capacity=2)
    hs = [
        mpchan.go(fill, a, list(range(0, 100))),
        mpchan.go(fill, b, list(range(100, 200))),
        mpchan.go(fill, c, list(range(200, 250))),
    ]
    got = list(out)
    for h in hs:
        h.result(timeout=30)
    assert sorted(got) == list(range(250))
    for lo, hi in ((0, 100), (100, 200), (200, 250)):
        mine = [v for v in got if lo <= v < hi]
        assert mine == list(range(lo, hi))


def test_merge_of_nothing_is_closed() -> None:
    assert list(mpchan.merge()) == []


def test_fan_out_applies_fn_and_closes_when_all_finish() -> None:
    src = mpchan.Channel(8)
    out = mpchan.fan_out(square, src, workers=3, capacity=4)
    h = mpchan.go(fill, src, list(range(200)))
    assert sorted(out) == [x * x for x in range(200)]
    h.result(timeout=30)


def test_fan_out_error_closes_input_and_output() -> None:
    src = mpchan.Channel(1)
    out = mpchan.fan_out(fail_on_3, src, workers=1, capacity=10)
    with pytest.raises(mpchan.ChannelClosed):
        for v in range(100):
            src.send(v, timeout=30)
    assert sorted(out) == [0, 1, 2]


def test_tee_broadcasts_in_order() -> None:
    src = mpchan.Channel(4)
    outs = mpchan.tee(src, 3)
    assert len(outs) == 3
    merged = mpchan.merge(*outs)
    h = mpchan.go(fill, src, list(range(50)))
    got = list(merged)
    h.result(timeout=30)
    assert sorted(got) == sorted(list(range(50)) * 3)


def test_argument_checks() -> None:
    ch = mpchan.Channel(1)
    with pytest.raises(ValueError):
        mpchan.fan_out(square, ch, workers=0)
    with pytest.raises(ValueError):
        mpchan.merge(ch, capacity=-1)
    with pytest.raises(ValueError):
        mpchan.tee(ch, 0)
    with pytest.raises(TypeError):
        mpchan.merge(ch, [1])  # type: ignore[arg-type]
