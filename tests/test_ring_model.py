"""A channel against a deque: Hypothesis state machine (single process).

The channels here get small rings (down to a few records) so wrap-around,
PAD records, the implicit end-of-ring gap and the out-of-band path for
values that do not fit are all exercised by short programs.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mpchan import Channel, ChannelClosed, EndOfChannel, WouldBlock, _core, _shm

REC = _core.REC_SIZE

values = st.one_of(
    st.integers(),
    st.text(max_size=20),
    st.binary(max_size=40),
    st.builds(lambda n, b: bytes([b % 256]) * n, st.integers(0, 3000), st.integers(0, 255)),
    st.lists(st.integers(), max_size=5),
)


class ChannelModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.model: deque[Any] = deque()
        self.closed = False
        self.ch: Channel | None = None

    @initialize(
        capacity=st.sampled_from([0, 1, 2, 3, 7, 64]),
        ring=st.sampled_from([512, 1024, 4096, 65536]),
    )
    def make(self, capacity: int, ring: int) -> None:
        self.capacity = capacity
        # the channel's own sizing keeps >= 512 bytes a message; 128 is the
        # least that still fits an out-of-band descriptor per message
        ring = max(ring, (capacity + 1) * 128)
        self.ch = Channel._from_segment(_shm.create_segment(capacity, ring))

    @rule(v=values)
    def send_nowait(self, v: Any) -> None:
        assert self.ch is not None
        if self.closed:
            with pytest.raises(ChannelClosed):
                self.ch.send_nowait(v)
        elif self.capacity == 0 or len(self.model) >= self.capacity:
            with pytest.raises(WouldBlock):
                self.ch.send_nowait(v)
        else:
            self.ch.send_nowait(v)
            self.model.append(v)

    @rule(vs=st.lists(values, max_size=6))
    def send_many(self, vs: list[Any]) -> None:
        assert self.ch is not None
        if self.closed or self.capacity == 0 or len(self.model) + len(vs) > self.capacity:
            return
        self.ch.send_many(vs, timeout=1)
        self.model.extend(vs)

    @rule()
    def recv_nowait(self) -> None:
        assert self.ch is not None
        if self.model:
            assert self.ch.recv_nowait() == self.model.popleft()
        elif self.closed:
            with pytest.raises(EndOfChannel):
                self.ch.recv_nowait()
        else:
            with pytest.raises(WouldBlock):
                self.ch.recv_nowait()

    @precondition(lambda self: bool(self.model))
    @rule(n=st.integers(1, 5))
    def recv_many(self, n: int) -> None:
        assert self.ch is not None
        got = self.ch.recv_many(n, timeout=1)
        want = [self.model.popleft() for _ in range(min(n, len(self.model)))]
        assert got == want

    @rule()
    def close(self) -> None:
        assert self.ch is not None
        self.ch.close()
        self.closed = True

    @invariant()
    def agrees(self) -> None:
        if self.ch is None:
            return
        assert len(self.ch) == len(self.model)
        s = self.ch.stats()
        assert s["len"] == len(self.model)
        assert s["sent"] - s["received"] == len(self.model)
        assert s["closed"] == self.closed == self.ch.closed

    def teardown(self) -> None:
        if self.ch is not None:
            self.ch._seg.release()


ChannelModel.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestChannelModel = ChannelModel.TestCase
