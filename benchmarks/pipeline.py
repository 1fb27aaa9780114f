"""Pipeline scenario: a 3-stage CPU pipeline (parse -> score -> reduce), items/s.

Contenders, all with the same workers per stage and the same stage functions
(:mod:`workers.textscore`):
    - mpchan: ``mpchan.stream(lines).map(parse, workers=P).map(score, workers=S)``,
      reduced (summed) by the consumer, with its defaults: adaptive chunks (items
      travel alone while the stages keep up, up to 16 together while they are
      behind);
    - mpchan chunksize=1: the same with every item travelling alone, as in the
      two peers below (shown so the effect of chunking is visible);
    - pypeln: ``pl.process.map(parse, lines, workers=P)`` then ``pl.process.map(score,
      ..., workers=S)``, summed by the consumer;
    - mp.Queue pipeline: the hand-built version -- bounded ``multiprocessing.Queue``s
      between P parse and S score processes (fork), a feeder thread, sentinels, summed
      by the consumer.

What is timed, the same for everyone: from handing the input to the pipeline to
having the reduced total, process start-up included (what a user waits for).
The peers send items one at a time (what their users get without writing
batching code); queues and channels are bounded at the same depth (in
messages), and every contender's total is checked against the serial one, so
a pipeline that loses or repeats items fails instead of looking fast.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from benchmarks._proc import FORK
from benchmarks.harness import Contender, Scenario, needs_modules

GROUP = "pipeline"
DEPTH = 64  # bound of every queue/channel between stages


def _textscore() -> Any:
    return importlib.import_module("workers.textscore")


def _score(params: Mapping[str, Any]) -> Any:
    """The score stage: ``textscore.score`` with the scenario's work per word."""
    return functools.partial(_textscore().score, rounds=int(params["rounds"]))


def _lines(n: int) -> list[str]:
    ts = _textscore()
    return [ts.make_line(i) for i in range(n)]


_expected: dict[tuple[int, int], float] = {}


def _check(params: Mapping[str, Any], total: float) -> None:
    key = (int(params["items"]), int(params["rounds"]))
    if key not in _expected:
        ts, score = _textscore(), _score(params)
        _expected[key] = sum(score(ts.parse(line)) for line in _lines(key[0]))
    expected = _expected[key]
    if abs(total - expected) > 1e-6 * max(1.0, abs(expected)):
        raise RuntimeError(f"wrong total {total!r}, expected {expected!r}")


# ------------------------------------------------------------------------------ mpchan


def _run_mpchan(params: Mapping[str, Any], chunksize: int | None = None) -> float:
    mpchan: Any = importlib.import_module("mpchan")
    ts = _textscore()
    lines = _lines(int(params["items"]))
    start = time.perf_counter()
    s = (
        mpchan.stream(lines, chunksize=chunksize)
        .map(ts.parse, workers=params["parse_workers"], capacity=DEPTH)
        .map(_score(params), workers=params["score_workers"], capacity=DEPTH)
    )
    total = sum(s)
    elapsed = time.perf_counter() - start
    _check(params, total)
    return len(lines) / elapsed


# ------------------------------------------------------------------------------ pypeln


def _run_pypeln(params: Mapping[str, Any]) -> float:
    pl: Any = importlib.import_module("pypeln")
    ts = _textscore()
    lines = _lines(int(params["items"]))
    start = time.perf_counter()
    stage = pl.process.map(ts.parse, lines, workers=params["parse_workers"], maxsize=DEPTH)
    score = _score(params)
    stage = pl.process.map(score, stage, workers=params["score_workers"], maxsize=DEPTH)
    total = sum(stage)
    elapsed = time.perf_counter() - start
    _check(params, total)
    return len(lines) / elapsed


# ---------------------------------------------------------------------- mp.Queue pipeline

_STOP = None


def _mp_stage(fn: Any, inq: Any, outq: Any) -> None:
    while True:
        item = inq.get()
        if item is _STOP:
            break
        outq.put(fn(item))


def _run_mp_queue(params: Mapping[str, Any]) -> float:
    lines = _lines(int(params["items"]))
    pw, sw = int(params["parse_workers"]), int(params["score_workers"])
    start = time.perf_counter()
    q1, q2, q3 = FORK.Queue(DEPTH), FORK.Queue(DEPTH), FORK.Queue(DEPTH)
    parse, score = _textscore().parse, _score(params)
    parsers = [FORK.Process(target=_mp_stage, args=(parse, q1, q2)) for _ in range(pw)]
    scorers = [FORK.Process(target=_mp_stage, args=(score, q2, q3)) for _ in range(sw)]
    for p in parsers + scorers:
        p.start()

    def feed() -> None:
        for line in lines:
            q1.put(line)
        for _ in parsers:
            q1.put(_STOP)
        for p in parsers:
            p.join()
        for _ in scorers:
            q2.put(_STOP)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    total = 0.0
    try:
        for _ in range(len(lines)):
            total += q3.get(timeout=params["timeout"])
        feeder.join()
        for p in scorers:
            p.join()
        elapsed = time.perf_counter() - start
    finally:
        for p in parsers + scorers:
            if p.is_alive():
                p.kill()
            p.join()
        for q in (q1, q2, q3):
            q.close()
            q.join_thread()
    _check(params, total)
    return len(lines) / elapsed


def _mpchan_available() -> str | None:
    try:
        importlib.import_module("mpchan").stream  # noqa: B018 - the lookup is the check
    except Exception as exc:
        return f"mpchan.stream not available ({type(exc).__name__}: {exc})"
    return None


def _params(quick: bool) -> dict[str, Any]:
    # Sized to the machine: score (the heavy stage) gets half the cores, parse a
    # quarter, so every process of every contender can have a core of its own.
    cpus = os.cpu_count() or 1
    workers = {"parse_workers": max(1, cpus // 4), "score_workers": max(1, cpus // 2)}
    if quick:
        return {"items": 500, "rounds": 2, **workers}
    return {"items": 6000, "rounds": 2, **workers}


PIPELINE = Scenario(
    name="pipeline_3stage",
    group=GROUP,
    label=(
        "parse x{parse_workers} -> score x{score_workers} (rounds={rounds}) -> reduce,"
        " {items:,} lines"
    ),
    unit="items/s",
    higher_is_better=True,
    contenders=(
        Contender("mpchan", _run_mpchan, kind="mpchan", available=_mpchan_available),
        Contender(
            "mpchan chunksize=1",
            functools.partial(_run_mpchan, chunksize=1),
            available=_mpchan_available,
        ),
        Contender("pypeln", _run_pypeln, available=needs_modules("pypeln")),
        Contender("mp.Queue pipeline", _run_mp_queue),
    ),
    params=_params,
    description="3-stage CPU pipeline, items/s including start-up; same workers per stage",
)

SCENARIOS: list[Scenario] = [PIPELINE]
