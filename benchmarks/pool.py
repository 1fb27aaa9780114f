"""Pool scenarios: mpchan.Pool against the process pools users would otherwise pick.

Peers: ``concurrent.futures.ProcessPoolExecutor`` (chunksize 1 and 1000),
``multiprocessing.Pool`` (``map`` with its default chunksize, ``imap`` with
chunksize 1), loky, joblib, mpire, pebble and pypeln -- all with 2 workers.

What every scenario here does the same way for every contender (why it is fair):
    - each measurement runs in a fresh process forked from the harness
      (:func:`benchmarks._proc.run_processes`), which makes the pool, warms it up
      with one task (except in the start-up scenario, which times exactly that),
      and times only the work with ``time.perf_counter``;
    - in the map and submit scenarios a measurement times the same call on the same
      warm pool up to ``TIMED_CALLS`` times (as many as fit in ``TIMED_BUDGET``
      seconds, at least one) and reports the median: a call of a fast contender takes
      ~20 ms, and one preemption of a 2-core machine's scheduler (4 ms ticks) or of its
      host moves a single timing by tens of percent;
    - the task functions are the same module-level functions for everyone;
    - results are checked (count and sum), so a contender that loses or
      corrupts results fails instead of looking fast;
    - each pool is shut down after the measurement, outside the timed part.
"""

from __future__ import annotations

import importlib
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from benchmarks._proc import FORK, run_processes
from benchmarks.harness import Contender, Scenario, Skip, needs_modules

GROUP = "pool"
WORKERS = 2


class VerificationError(RuntimeError):
    """A contender returned the wrong results."""


# ------------------------------------------------------------------------- tasks


def inc(x: int) -> int:
    """The tiny task: x -> x + 1."""
    return x + 1


def spin(n: int) -> int:
    """The CPU-bound task: a pure-Python loop of ``n`` steps."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def _check(results: Iterable[int], expected_sum: int, expected_len: int) -> None:
    values = list(results)
    if len(values) != expected_len or sum(values) != expected_sum:
        raise VerificationError(
            f"got {len(values)} results summing to {sum(values)}, "
            f"expected {expected_len} summing to {expected_sum}"
        )


# ---------------------------------------------------------------------- pools

# Each "runner" takes (fn, items) and returns an iterable of results, given a
# pool made by the matching "maker". Makers return (pool, close).

Maker = Callable[[], tuple[Any, Callable[[], None]]]
Runner = Callable[[Any, Callable[[int], int], list[int]], Iterable[int]]


def _mpchan_pool() -> tuple[Any, Callable[[], None]]:
    mpchan: Any = importlib.import_module("mpchan")
    pool = mpchan.Pool(WORKERS)

    def close() -> None:
        pool.shutdown()
        mpchan.shutdown()

    return pool, close


def _mpchan_fork_pool() -> tuple[Any, Callable[[], None]]:
    mpchan: Any = importlib.import_module("mpchan")
    pool = mpchan.Pool(WORKERS, start_method="fork")

    def close() -> None:
        pool.shutdown()
        mpchan.shutdown()

    return pool, close


def _ppe() -> tuple[Any, Callable[[], None]]:
    from concurrent.futures import ProcessPoolExecutor

    ex = ProcessPoolExecutor(WORKERS, mp_context=FORK)
    return ex, ex.shutdown


def _mp_pool() -> tuple[Any, Callable[[], None]]:
    pool = FORK.Pool(WORKERS)

    def close() -> None:
        pool.close()
        pool.join()

    return pool, close


def _loky() -> tuple[Any, Callable[[], None]]:
    loky: Any = importlib.import_module("loky")
    ex = loky.get_reusable_executor(max_workers=WORKERS)
    return ex, lambda: ex.shutdown(wait=True, kill_workers=True)


def _mpire() -> tuple[Any, Callable[[], None]]:
    mpire: Any = importlib.import_module("mpire")
    pool = mpire.WorkerPool(n_jobs=WORKERS)
    return pool, pool.terminate


def _pebble() -> tuple[Any, Callable[[], None]]:
    pebble: Any = importlib.import_module("pebble")
    pool = pebble.ProcessPool(max_workers=WORKERS)

    def close() -> None:
        pool.close()
        pool.join()

    return pool, close


def _joblib() -> tuple[Any, Callable[[], None]]:
    joblib: Any = importlib.import_module("joblib")
    parallel = joblib.Parallel(n_jobs=WORKERS)
    parallel.__enter__()  # keep the workers for the whole measurement

    def close() -> None:
        parallel.__exit__(None, None, None)
        _stop_joblib_workers()

    return parallel, close


def _stop_joblib_workers() -> None:
    # joblib keeps its loky workers for later calls; a measurement process
    # would wait for them at exit (~30 s) unless they are stopped here.
    loky: Any = importlib.import_module("joblib.externals.loky")
    loky.get_reusable_executor(reuse=True).shutdown(wait=True, kill_workers=True)


def _no_pool() -> tuple[Any, Callable[[], None]]:
    return None, lambda: None


def _joblib_alone() -> tuple[Any, Callable[[], None]]:
    return None, _stop_joblib_workers


def _joblib_run(p: Any, fn: Callable[[int], int], items: list[int]) -> Iterable[int]:
    delayed = importlib.import_module("joblib").delayed
    results: list[int] = p(delayed(fn)(x) for x in items)
    return results


def _joblib_run_1(p: Any, fn: Callable[[int], int], items: list[int]) -> Iterable[int]:
    joblib: Any = importlib.import_module("joblib")
    results: list[int] = joblib.Parallel(n_jobs=WORKERS, batch_size=1)(
        joblib.delayed(fn)(x) for x in items
    )
    return results


def _pypeln_run(p: Any, fn: Callable[[int], int], items: list[int]) -> Iterable[int]:
    pl: Any = importlib.import_module("pypeln")
    return list(pl.process.map(fn, items, workers=WORKERS))


def _submit_each(p: Any, fn: Callable[[int], int], items: list[int]) -> Iterable[int]:
    futures = [p.submit(fn, x) for x in items]
    return [f.result() for f in futures]


def _pebble_schedule(p: Any, fn: Callable[[int], int], items: list[int]) -> Iterable[int]:
    futures = [p.schedule(fn, args=(x,)) for x in items]
    return [f.result() for f in futures]


def _mpire_apply(p: Any, fn: Callable[[int], int], items: list[int]) -> Iterable[int]:
    results = [p.apply_async(fn, args=(x,)) for x in items]
    return [r.get() for r in results]


def _mp_apply(p: Any, fn: Callable[[int], int], items: list[int]) -> Iterable[int]:
    results = [p.apply_async(fn, (x,)) for x in items]
    return [r.get() for r in results]


# (name, kind, maker, map runner, per-task runner) for the map and submit scenarios
MAP_CONTENDERS: list[tuple[str, str, Maker, Runner, tuple[str, ...]]] = [
    ("mpchan", "mpchan", _mpchan_pool, lambda p, f, xs: p.map(f, xs), ()),
    ("ProcessPoolExecutor c=1", "peer", _ppe, lambda p, f, xs: p.map(f, xs, chunksize=1), ()),
    (
        "ProcessPoolExecutor c=1000",
        "peer",
        _ppe,
        lambda p, f, xs: p.map(f, xs, chunksize=1000),
        (),
    ),
    ("mp.Pool.map", "peer", _mp_pool, lambda p, f, xs: p.map(f, xs), ()),
    ("mp.Pool.imap c=1", "peer", _mp_pool, lambda p, f, xs: p.imap(f, xs, chunksize=1), ()),
    ("loky c=1000", "peer", _loky, lambda p, f, xs: p.map(f, xs, chunksize=1000), ("loky",)),
    ("joblib", "peer", _joblib, _joblib_run, ("joblib",)),
    ("mpire", "peer", _mpire, lambda p, f, xs: p.map(f, xs), ("mpire",)),
    (
        "pebble c=1000",
        "peer",
        _pebble,
        lambda p, f, xs: p.map(f, xs, chunksize=1000).result(),
        ("pebble",),
    ),
    ("pypeln", "peer", _no_pool, _pypeln_run, ("pypeln",)),
]

SUBMIT_CONTENDERS: list[tuple[str, str, Maker, Runner, tuple[str, ...]]] = [
    ("mpchan", "mpchan", _mpchan_pool, _submit_each, ()),
    ("ProcessPoolExecutor", "peer", _ppe, _submit_each, ()),
    ("mp.Pool.imap c=1", "peer", _mp_pool, lambda p, f, xs: p.imap(f, xs, chunksize=1), ()),
    ("mp.Pool.apply_async", "peer", _mp_pool, _mp_apply, ()),
    ("loky", "peer", _loky, _submit_each, ("loky",)),
    ("joblib batch_size=1", "peer", _joblib_alone, _joblib_run_1, ("joblib",)),
    ("mpire apply_async", "peer", _mpire, _mpire_apply, ("mpire",)),
    ("pebble schedule", "peer", _pebble, _pebble_schedule, ("pebble",)),
    ("pypeln", "peer", _no_pool, _pypeln_run, ("pypeln",)),
]


# ------------------------------------------------------------------ measurements


def _may_have_children() -> None:
    # run_processes starts daemonic processes, which multiprocessing forbids to
    # start children; a pool is exactly that. The measurement process still
    # ends (and is joined) by run_processes, and every pool is closed first.
    multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]


TIMED_CALLS = 5
"""Most timed calls per throughput measurement (the median is reported)."""
TIMED_BUDGET = 2.0
"""Seconds of timed calls after which a measurement stops (after at least one)."""


def _throughput_child(maker: Maker, runner: Runner, n: int) -> float:
    _may_have_children()
    pool, close = maker()
    try:
        _check(runner(pool, inc, [0, 1]), 3, 2)  # warm-up: workers started and ready
        items = list(range(n))
        rates: list[float] = []
        spent = 0.0
        while len(rates) < TIMED_CALLS and spent < TIMED_BUDGET:
            start = time.perf_counter()
            results = list(runner(pool, inc, items))
            elapsed = time.perf_counter() - start
            _check(results, n * (n + 1) // 2, n)
            del results
            rates.append(n / elapsed)
            spent += elapsed
        return statistics.median(rates)
    finally:
        close()


def _throughput(maker: Maker, runner: Runner) -> Callable[[Mapping[str, Any]], float]:
    def run(params: Mapping[str, Any]) -> float:
        (value,), _ = run_processes(
            [(_throughput_child, (maker, runner, params["n"]))], timeout=params["timeout"]
        )
        return float(value)

    return run


SCALING_ROUNDS = 3
"""Rounds of (serial run, pool run) per efficiency measurement; medians of each."""


def _scaling_child(maker: Maker, runner: Runner, tasks: int, steps: int) -> float:
    _may_have_children()
    items = [steps] * tasks
    expected = spin(steps) * tasks
    serial: list[float] = []
    parallel: list[float] = []
    pool, close = maker()
    try:
        _check(runner(pool, spin, [1, 1]), 2 * spin(1), 2)
        # Serial and pool runs alternate, so a slow spell of the machine
        # (a busy host) lands on both sides alike; medians drop outliers.
        for _ in range(SCALING_ROUNDS):
            start = time.perf_counter()
            _check(map(spin, items), expected, tasks)
            serial.append(time.perf_counter() - start)
            start = time.perf_counter()
            _check(runner(pool, spin, items), expected, tasks)
            parallel.append(time.perf_counter() - start)
    finally:
        close()
    return 100.0 * statistics.median(serial) / (statistics.median(parallel) * WORKERS)


def _scaling(maker: Maker, runner: Runner) -> Callable[[Mapping[str, Any]], float]:
    def run(params: Mapping[str, Any]) -> float:
        (value,), _ = run_processes(
            [(_scaling_child, (maker, runner, params["tasks"], params["steps"]))],
            timeout=params["timeout"],
        )
        return float(value)

    return run


def _startup_child(maker: Maker, runner: Runner, warm: bool) -> float:
    _may_have_children()
    if warm:
        # A pool made and shut down before: the forkserver (and the program's
        # imports) are ready; the new pool's processes are new (a pool's
        # workers exit with it).
        pool, close = maker()
        _check(runner(pool, inc, [0]), 1, 1)
        if hasattr(pool, "shutdown"):
            pool.shutdown()
    start = time.perf_counter()
    pool, close = maker()
    try:
        _check(runner(pool, inc, [0]), 1, 1)
        return (time.perf_counter() - start) * 1000.0
    finally:
        close()


def _startup(
    maker: Maker, runner: Runner, warm: bool = False
) -> Callable[[Mapping[str, Any]], float]:
    def run(params: Mapping[str, Any]) -> float:
        (value,), _ = run_processes(
            [(_startup_child, (maker, runner, warm))], timeout=params["timeout"]
        )
        return float(value)

    return run


def _mpchan_available() -> str | None:
    try:
        importlib.import_module("mpchan").Pool  # noqa: B018 - the lookup is the check
    except Exception as exc:
        return f"mpchan.Pool not available ({type(exc).__name__}: {exc})"
    return None


def _availability(kind: str, modules: tuple[str, ...]) -> Callable[[], str | None]:
    if kind == "mpchan":
        return _mpchan_available
    return needs_modules(*modules)


def _contenders(
    table: list[tuple[str, str, Maker, Runner, tuple[str, ...]]],
    measure: Callable[[Maker, Runner], Callable[[Mapping[str, Any]], float]],
) -> tuple[Contender, ...]:
    return tuple(
        Contender(name, measure(maker, runner), kind=kind, available=_availability(kind, mods))  # type: ignore[arg-type]
        for name, kind, maker, runner, mods in table
    )


def _no_startup(params: Mapping[str, Any]) -> float:
    raise Skip("cannot measure: pypeln has no pool to start (it starts processes per call)")


# ------------------------------------------------------------------------ scenarios

MAP_TINY = Scenario(
    name="pool_map_tiny",
    group=GROUP,
    label="tiny-task map x→x+1, N={n:,}, 2 workers",
    unit="tasks/s",
    higher_is_better=True,
    contenders=_contenders(MAP_CONTENDERS, _throughput),
    params=lambda quick: {"n": 10_000 if quick else 100_000},
    description="map(x -> x + 1) over N ints, results collected in order; a measurement "
    "is the median of up to 5 such calls on the same warm pool (those that fit in 2 s, "
    "at least one). mpchan chooses "
    "its chunks automatically (chunksize=None); mp.Pool.map uses its default chunksize "
    "(N / (4 * workers)); loky and pebble are given chunksize=1000 (their default of 1 "
    "measures per-task cost, see pool_submit); joblib and mpire batch automatically.",
)

SUBMIT = Scenario(
    name="pool_submit",
    group=GROUP,
    label="per-task submit x→x+1, N={n:,}, 2 workers",
    unit="tasks/s",
    higher_is_better=True,
    contenders=_contenders(SUBMIT_CONTENDERS, _throughput),
    params=lambda quick: {"n": 5_000 if quick else 50_000},
    description="One task per call, no chunking: submit N calls, then wait for every "
    "result (mpchan, ProcessPoolExecutor, loky: submit; mp.Pool: imap(chunksize=1) and "
    "apply_async; mpire: apply_async; pebble: schedule; joblib: batch_size=1). A "
    "measurement is the median of up to 5 such runs on the same warm pool (those that "
    "fit in 2 s, at least one).",
)

SCALING = Scenario(
    name="pool_cpu_scaling",
    group=GROUP,
    label="CPU-bound efficiency, {tasks} tasks x {steps:,} steps, 2 workers",
    unit="% efficiency",
    higher_is_better=True,
    contenders=_contenders(MAP_CONTENDERS, _scaling),
    params=lambda quick: {"tasks": 40 if quick else 200, "steps": 20_000 if quick else 100_000},
    description="Serial time of the tasks in one process divided by (2 x the pool's time "
    "for the same tasks): 100% is a perfect 2x speed-up. Each measurement makes the pool, "
    "then times 3 rounds of (serial run, pool run) and divides the medians, so machine "
    "load affects both alike.",
)

STARTUP = Scenario(
    name="pool_startup",
    group=GROUP,
    label="pool start-up to first result, 2 workers",
    unit="ms",
    higher_is_better=False,
    contenders=(
        Contender(
            "mpchan",
            _startup(_mpchan_pool, _submit_each),
            kind="mpchan",
            available=_mpchan_available,
        ),
        Contender(
            "mpchan (second pool)",
            _startup(_mpchan_pool, _submit_each, warm=True),
            kind="mpchan",
            available=_mpchan_available,
        ),
        Contender(
            "mpchan (fork)",
            _startup(_mpchan_fork_pool, _submit_each),
            kind="mpchan",
            available=_mpchan_available,
        ),
        Contender("ProcessPoolExecutor", _startup(_ppe, _submit_each)),
        Contender("mp.Pool", _startup(_mp_pool, _mp_apply)),
        Contender("loky", _startup(_loky, _submit_each), available=needs_modules("loky")),
        Contender(
            "joblib", _startup(_joblib_alone, _joblib_run_1), available=needs_modules("joblib")
        ),
        Contender("mpire", _startup(_mpire, _mpire_apply), available=needs_modules("mpire")),
        Contender("pebble", _startup(_pebble, _pebble_schedule), available=needs_modules("pebble")),
        Contender("pypeln", _no_startup, available=needs_modules("pypeln")),
    ),
    params=lambda quick: {},
    description="From creating the pool (in a fresh process) to holding the result of one "
    "trivial task. 'mpchan' uses its default start method (forkserver on Linux: the "
    "server itself starts first); 'mpchan (fork)' forks like the peers; 'mpchan (second "
    "pool)' makes a second pool after a first one was shut down: the forkserver runs "
    "already, and the pool starts fresh processes (a pool's workers exit with it).",
)

SCENARIOS: list[Scenario] = [MAP_TINY, SUBMIT, SCALING, STARTUP]
