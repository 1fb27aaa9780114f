"""The shared knobs: one check each, and one rule for automatic chunks."""

from __future__ import annotations

import pytest

from mpchan import Pool
from mpchan._policy import TARGET_S, Chunker, count, positive

WAIT = 30


def inc(x: int) -> int:
    return x + 1


@pytest.mark.parametrize(
    ("value", "error"), [(True, TypeError), (1.0, TypeError), ("2", TypeError), (0, ValueError)]
)
def test_count_refuses_in_one_line(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"^workers must") as info:
        count("workers", value, 1)
    assert "\n" not in str(info.value)


def test_positive_refuses_nan_zero_and_bools() -> None:
    assert positive("timeout", None) is None
    assert positive("timeout", 0.5) == 0.5
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match=r"^timeout must be > 0"):
            positive("timeout", bad)
    with pytest.raises(TypeError):
        positive("timeout", True)


def test_a_fixed_chunksize_is_always_used() -> None:
    sizer = Chunker(7, cap=3)
    sizer.timed(1e-6, 1)
    sizer.behind()
    assert sizer.size() == 7


def test_untimed_chunks_double_when_behind_and_halve_when_idle() -> None:
    # A stream's feeder: no time per item, only its channel's occupancy.
    sizer = Chunker(None, cap=16)
    assert sizer.size() == 1
    sizes = []
    for _ in range(6):
        sizer.behind()
        sizes.append(sizer.size())
    assert sizes == [2, 4, 8, 16, 16, 16]
    sizer.idle()
    assert sizer.size() == 8
    for _ in range(10):
        sizer.idle()
    assert sizer.size() == 1


def test_timed_chunks_hold_the_target_seconds_then_grow_to_the_cap() -> None:
    # A map: one-item probes, then TARGET_S of calls, doubling up to the cap.
    sizer = Chunker(None, cap=1000)
    assert sizer.size() == 1
    sizer.timed(TARGET_S / 100, 1)  # one call took a hundredth of the target
    assert sizer.size() == 100
    sizer.behind()
    assert sizer.size() == 200
    for _ in range(5):
        sizer.behind()
    assert sizer.size() == 1000
    slow = Chunker(None, cap=1000)
    slow.timed(1.0, 1)  # a long task: single items
    assert slow.size() == 1


def test_recent_chunks_count_more() -> None:
    sizer = Chunker(None, cap=10**6)
    sizer.timed(1.0, 1000)  # 1 ms per item
    first = sizer.per_item
    for _ in range(8):
        sizer.timed(0.001, 1000)  # then 1 us per item
    assert first is not None and sizer.per_item is not None
    assert sizer.per_item < first / 50


def test_a_map_of_tiny_tasks_travels_in_few_chunks() -> None:
    # Each chunk is one task message to a worker; tasks_done counts them.
    with Pool(2) as pool:
        got = list(pool.map(inc, range(100_000), timeout=WAIT))
        assert got == list(range(1, 100_001))
        chunks = sum(row["tasks_done"] for row in pool.stats()["workers"].values())
    # at least the two probes and a quarter of the input per worker at most
    assert 8 <= chunks < 200
