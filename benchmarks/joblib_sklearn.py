"""joblib scenarios: the "mpchan" joblib backend against joblib's default, loky.

Two workloads a scikit-learn user meets: a ``GridSearchCV`` (few calls of
real work each: fits of an SVC) and a ``Parallel`` of many tiny calls (where
joblib's batching and the backend's per-batch cost decide). Both with
``n_jobs=2``.

What every scenario here does the same way for every contender (why it is fair):
    - each measurement runs in a fresh process forked from the harness
      (:func:`benchmarks._proc.run_processes`); the only difference between the
      contenders is the ``joblib.parallel_config(backend=...)`` around the work;
    - the backend's workers are started and warmed first, outside the timed part,
      by one small ``Parallel`` call (both backends keep their workers between
      calls: loky's reusable executor, mpchan's process-wide pool) and, for the
      grid search, one untimed ``fit`` (so the workers have imported scikit-learn);
    - a measurement times the same call up to ``TIMED_CALLS`` times (as many as
      fit in ``TIMED_BUDGET`` seconds, at least one) and reports the median;
    - both backends cap each worker's BLAS/OpenMP threads at ``cpu_count // 2``;
    - results are checked (the grid search's best parameters and scores against a
      sequential run made once; the tiny calls' count and sum).
"""

from __future__ import annotations

import importlib
import multiprocessing
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

from benchmarks._proc import run_processes
from benchmarks.harness import Contender, Scenario, needs_modules

GROUP = "joblib"
N_JOBS = 2
TIMED_CALLS = 5
"""Most timed calls per measurement (the median is reported)."""
TIMED_BUDGET = 3.0
"""Seconds of timed calls after which a measurement stops (after at least one)."""


class VerificationError(RuntimeError):
    """A contender returned the wrong results."""


def inc(x: int) -> int:
    """The tiny task: x -> x + 1."""
    return x + 1


def _may_have_children() -> None:
    # run_processes starts daemonic processes, which multiprocessing forbids to
    # start children; a backend's pool is exactly that (see benchmarks/pool.py).
    multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]


def _backend(name: str) -> Any:
    joblib: Any = importlib.import_module("joblib")
    if name == "mpchan":
        importlib.import_module("mpchan")
        # A no-op once ``import mpchan`` installs the hook itself.
        importlib.import_module("mpchan._joblib_hook").install()
    return joblib.parallel_config(backend=name, n_jobs=N_JOBS)


def _timed(call: Callable[[], Any], check: Callable[[Any], None], quick: bool) -> float:
    """Median seconds of up to TIMED_CALLS calls of ``call`` (each result checked;
    one call in a quick run)."""
    times: list[float] = []
    spent = 0.0
    most = 1 if quick else TIMED_CALLS
    while len(times) < most and spent < TIMED_BUDGET:
        start = time.perf_counter()
        result = call()
        elapsed = time.perf_counter() - start
        check(result)
        del result
        times.append(elapsed)
        spent += elapsed
    return statistics.median(times)


def _shutdown(name: str) -> None:
    # Outside the timed part. loky's workers are multiprocessing children the
    # measurement process would otherwise join at exit until they time out.
    if name == "mpchan":
        importlib.import_module("mpchan._joblib").shutdown_pools()
    else:
        loky: Any = importlib.import_module("joblib.externals.loky")
        loky.get_reusable_executor(reuse=True).shutdown(wait=True, kill_workers=True)


# ----------------------------------------------------------------- grid search


def _grid(samples: int) -> tuple[Any, Any, Any, dict[str, list[Any]]]:
    datasets: Any = importlib.import_module("sklearn.datasets")
    svm: Any = importlib.import_module("sklearn.svm")
    X, y = datasets.make_classification(
        n_samples=samples, n_features=20, n_informative=10, random_state=0
    )
    grid = {"C": [0.1, 1.0, 10.0], "gamma": ["scale", 0.01]}
    return X, y, svm.SVC(), grid


def _grid_child(name: str, samples: int, folds: int, quick: bool) -> float:
    _may_have_children()
    model_selection: Any = importlib.import_module("sklearn.model_selection")
    joblib: Any = importlib.import_module("joblib")
    X, y, est, grid = _grid(samples)
    expected = model_selection.GridSearchCV(est, grid, cv=folds, n_jobs=1).fit(X, y)

    def search() -> Any:
        return model_selection.GridSearchCV(est, grid, cv=folds).fit(X, y)

    def check(found: Any) -> None:
        if found.best_params_ != expected.best_params_ or list(
            found.cv_results_["mean_test_score"]
        ) != list(expected.cv_results_["mean_test_score"]):
            raise VerificationError(f"{name}: grid search results differ from n_jobs=1")

    with _backend(name):
        try:
            joblib.Parallel()(joblib.delayed(inc)(i) for i in range(2 * N_JOBS))  # warm-up
            check(search())  # warm-up: the workers import scikit-learn
            seconds = _timed(search, check, quick)
        finally:
            _shutdown(name)
    fits = folds * len(grid["C"]) * len(grid["gamma"])
    return fits / seconds


def _grid_run(name: str) -> Callable[[Mapping[str, Any]], float]:
    def run(params: Mapping[str, Any]) -> float:
        (value,), _ = run_processes(
            [(_grid_child, (name, params["samples"], params["folds"], params["quick"]))],
            timeout=params["timeout"],
        )
        return float(value)

    return run


# ----------------------------------------------------------------- tiny calls


def _tiny_child(name: str, n: int, quick: bool) -> float:
    _may_have_children()
    joblib: Any = importlib.import_module("joblib")
    expected = n * (n + 1) // 2

    def call() -> list[int]:
        out: list[int] = joblib.Parallel()(joblib.delayed(inc)(i) for i in range(n))
        return out

    def check(values: list[int]) -> None:
        if len(values) != n or sum(values) != expected:
            raise VerificationError(f"{name}: {len(values)} results summing to {sum(values)}")

    with _backend(name):
        try:
            joblib.Parallel()(joblib.delayed(inc)(i) for i in range(2 * N_JOBS))  # warm-up
            seconds = _timed(call, check, quick)
        finally:
            _shutdown(name)
    return n / seconds


def _tiny_run(name: str) -> Callable[[Mapping[str, Any]], float]:
    def run(params: Mapping[str, Any]) -> float:
        (value,), _ = run_processes(
            [(_tiny_child, (name, params["n"], params["quick"]))], timeout=params["timeout"]
        )
        return float(value)

    return run


# ----------------------------------------------------------------- scenarios


def _contenders(
    measure: Callable[[str], Callable[[Mapping[str, Any]], float]], *modules: str
) -> tuple[Contender, ...]:
    return (
        Contender("mpchan", measure("mpchan"), kind="mpchan", available=needs_modules(*modules)),
        Contender("joblib-loky", measure("loky"), available=needs_modules(*modules)),
    )


GRID_SEARCH = Scenario(
    name="joblib_gridsearch",
    group=GROUP,
    label="GridSearchCV SVC, 6 candidates x {folds} folds, {samples:,} samples, n_jobs=2",
    unit="fits/s",
    higher_is_better=True,
    contenders=_contenders(_grid_run, "joblib", "sklearn"),
    params=lambda quick: {"samples": 400 if quick else 2000, "folds": 3 if quick else 5},
    description="GridSearchCV(SVC(), C x gamma = 6 candidates, cv=folds).fit(X, y) on a "
    "make_classification dataset (20 features) under parallel_config(backend=..., n_jobs=2); "
    "fits per second of the median of up to 5 searches on warm workers (those that fit in "
    "3 s, at least one), each checked against a sequential search.",
    requires=("joblib", "sklearn"),
)

TINY_CALLS = Scenario(
    name="joblib_tiny_calls",
    group=GROUP,
    label="Parallel of N={n:,} tiny calls x→x+1, n_jobs=2",
    unit="calls/s",
    higher_is_better=True,
    contenders=_contenders(_tiny_run, "joblib"),
    params=lambda quick: {"n": 2_000 if quick else 100_000},
    description="joblib.Parallel()(delayed(inc)(i) for i in range(N)) under "
    "parallel_config(backend=..., n_jobs=2), joblib's automatic batch size; calls per "
    "second of the median of up to 5 such calls on warm workers (those that fit in 3 s, "
    "at least one). N is large because joblib's result loop polls every 10 ms: with "
    "20,000 calls (~80 ms) that quantum alone moves a timing by over 10%.",
    requires=("joblib",),
)

SCENARIOS: list[Scenario] = [GRID_SEARCH, TINY_CALLS]
