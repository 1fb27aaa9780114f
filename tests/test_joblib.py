"""joblib's "mpchan" backend (``mpchan/_joblib.py``, ``mpchan/_joblib_hook.py``).

What is checked: the name is registered lazily (``import mpchan`` does not
import joblib, in either import order); scikit-learn's ``n_jobs`` runs on
the pool's workers with the results of ``n_jobs=1``; joblib's auto-batching,
generators and abort-on-error work; nested calls and BLAS threads are
capped; big arrays travel once through shared memory; a user's script
leaves no process or file behind. Every test ends with the backend's pools
shut down, so the leak check sees nothing of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from joblib import Parallel, delayed
from scripts.procs import ROOT, gone, start_json_program, wait_until

from mpchan import _joblib, _joblib_hook, _shm
from mpchan._compat import SHM_DIR

_joblib_hook.install()  # a no-op once the facade installs it

SCRIPT = Path(__file__).parent / "scripts" / "joblib_script.py"


@pytest.fixture(autouse=True)
def _fresh_pools(mpchan_leak_check: None) -> Iterator[None]:
    """Each test starts and ends without the backend's cached pools."""
    _joblib.shutdown_pools()
    yield
    _joblib.shutdown_pools()


def _pool_pids() -> set[int]:
    pids: set[int] = set()
    for pool in _joblib._POOLS.pools.values():
        pids |= set(pool.stats()["workers"])
    return pids


def _array_files() -> list[str]:
    token = os.environ.get("MPCHAN_SESSION", "").partition(":")[0]
    prefix = f"{_shm.PREFIX}{token}-{_shm.ARRAY}"
    return [n for n in os.listdir(SHM_DIR) if token and n.startswith(prefix)]


# ---------------------------------------------------------------- tasks (run in workers)


def pid_of(x: int) -> tuple[int, int]:
    return x, os.getpid()


def inc(x: int) -> int:
    return x + 1


def slow(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x


def fail_or_sleep(i: int, marks: str) -> int:
    if i == 0:
        time.sleep(0.2)
        raise ValueError("task 0 failed")
    Path(marks, str(i)).touch()
    time.sleep(30 if i == 1 else 0.3)
    return i


def nested_info(_: int) -> dict[str, Any]:
    backend, n_jobs = joblib.parallel.get_active_backend()
    inner = Parallel(n_jobs=-1)
    pids = inner(delayed(os.getpid)() for _ in range(4))
    _joblib.register()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with joblib.parallel_config(backend="mpchan", n_jobs=2):
            explicit = Parallel()._effective_n_jobs()
    return {
        "backend": type(backend).__name__,
        "n_jobs": n_jobs,
        "inner": inner._effective_n_jobs(),
        "pids": sorted(set(pids)),
        "me": os.getpid(),
        "cpus": _joblib.cpu_count(),
        "explicit": explicit,
        "warned": any("sequentially" in str(w.message) for w in caught),
    }


def thread_info(_: int) -> dict[str, Any]:
    import threadpoolctl

    np.ones(4).dot(np.ones(4))  # BLAS loaded and used
    return {
        "limits": sorted({i["num_threads"] for i in threadpoolctl.threadpool_info()}),
        "env": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
    }


def array_facts(a: np.ndarray, k: int) -> tuple[float, bool, int, int]:
    return float(a.sum()) * k, bool(a.flags.writeable), os.getpid(), len(_joblib._WORKER.arrays)


# ---------------------------------------------------------------- registration


def _run_python(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MPCHAN_SESSION", None)  # a program of its own
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


_USE = """
with joblib.parallel_config(backend="mpchan", n_jobs=2):
    print(sum(joblib.Parallel()(joblib.delayed(abs)(-i) for i in range(10))))
print(joblib.Parallel(backend="mpchan", n_jobs=2)(joblib.delayed(abs)(-i) for i in range(3)))
factory = joblib.parallel.BACKENDS["mpchan"]
print(type(factory).__name__, factory.__name__)
print([f for f in sys.meta_path if type(f).__module__ == "mpchan._joblib_hook"])
"""


@pytest.mark.timeout(120)
def test_import_mpchan_does_not_import_joblib_and_registers_later() -> None:
    out = _run_python(
        textwrap.dedent(
            """
        import sys
        import mpchan
        from mpchan import _joblib_hook
        _joblib_hook.install()
        _joblib_hook.install()
        print("joblib" in sys.modules, "mpchan._joblib" in sys.modules)
        import json.decoder, email.mime.text  # other imports are not disturbed
        try:
            import no_such_module_here
        except ModuleNotFoundError:
            print("missing ok")
        import joblib
        print("mpchan" in joblib.parallel.EXTERNAL_BACKENDS, "mpchan._joblib" in sys.modules)
        print(joblib.parallel.BACKENDS["mpchan"].__name__)
            """
        )
        + _USE
    )
    assert out.splitlines() == [
        "False False",
        "missing ok",
        "True False",
        "make_backend",
        "45",
        "[0, 1, 2]",
        "ABCMeta MpchanBackend",
        "[]",  # the finder left sys.meta_path once it fired
    ]


@pytest.mark.timeout(120)
def test_registration_when_joblib_was_imported_first() -> None:
    out = _run_python(
        textwrap.dedent(
            """
        import sys
        import joblib
        import mpchan
        from mpchan import _joblib_hook
        _joblib_hook.install()
        print("mpchan" in joblib.parallel.EXTERNAL_BACKENDS)
            """
        )
        + _USE
    )
    assert out.splitlines() == ["True", "45", "[0, 1, 2]", "ABCMeta MpchanBackend", "[]"]


# ---------------------------------------------------------------- scikit-learn


def _data() -> tuple[Any, Any]:
    from sklearn.datasets import make_classification

    return make_classification(n_samples=240, n_features=8, random_state=0)


def _pid_scorer(estimator: Any, X: Any, y: Any) -> float:
    return float(os.getpid())


@pytest.mark.timeout(120)
def test_cross_val_score_matches_sequential_and_runs_in_workers() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score, cross_validate

    X, y = _data()
    est = LogisticRegression(max_iter=200)
    expected = cross_val_score(est, X, y, cv=4, n_jobs=1)
    with joblib.parallel_config(backend="mpchan", n_jobs=2):
        got = cross_val_score(est, X, y, cv=4)
        pids = cross_validate(est, X, y, cv=4, scoring=_pid_scorer)["test_score"]
        workers = _pool_pids()
    np.testing.assert_allclose(got, expected)
    ran = {int(p) for p in pids}
    assert os.getpid() not in ran
    assert ran <= workers and len(workers) == 2


@pytest.mark.timeout(120)
def test_grid_search_matches_sequential_and_runs_in_workers() -> None:
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    X, y = _data()
    grid = {"C": [0.1, 1.0, 10.0], "gamma": ["scale", 0.1]}
    scoring = {"acc": "accuracy", "pid": _pid_scorer}
    seq = GridSearchCV(SVC(), grid, cv=3, scoring=scoring, refit="acc", n_jobs=1).fit(X, y)
    with joblib.parallel_config(backend="mpchan", n_jobs=2):
        par = GridSearchCV(SVC(), grid, cv=3, scoring=scoring, refit="acc").fit(X, y)
        workers = _pool_pids()
    assert par.best_params_ == seq.best_params_
    np.testing.assert_allclose(par.cv_results_["mean_test_acc"], seq.cv_results_["mean_test_acc"])
    ran = {int(p) for k in range(3) for p in par.cv_results_[f"split{k}_test_pid"]}
    assert os.getpid() not in ran
    assert ran <= workers


# ---------------------------------------------------------------- joblib semantics


def test_the_pool_is_reused_across_calls_and_replaced_for_another_n_jobs() -> None:
    with joblib.parallel_config(backend="mpchan", n_jobs=2):
        first = {p for _, p in Parallel()(delayed(pid_of)(i) for i in range(8))}
        second = {p for _, p in Parallel()(delayed(pid_of)(i) for i in range(8))}
    assert first | second <= _pool_pids()
    assert len(_joblib._POOLS.pools) == 1
    old = _pool_pids()
    with joblib.parallel_config(backend="mpchan", n_jobs=3):
        third = {p for _, p in Parallel()(delayed(pid_of)(i) for i in range(12))}
    assert not third & old
    assert list(_joblib._POOLS.pools) == [(3, max(1, _joblib.cpu_count() // 3))]
    assert wait_until(lambda: all(gone(p) for p in old), timeout=10)


def test_n_jobs_one_and_minus_one() -> None:
    backend = _joblib.MpchanBackend()
    assert backend.effective_n_jobs(-1) == _joblib.cpu_count()
    assert backend.effective_n_jobs(-2) == max(1, _joblib.cpu_count() - 1)
    with pytest.raises(ValueError):
        backend.effective_n_jobs(0)
    with joblib.parallel_config(backend="mpchan", n_jobs=1):
        p = Parallel()
        assert p(delayed(inc)(i) for i in range(5)) == [1, 2, 3, 4, 5]
        assert type(p._backend).__name__ == "SequentialBackend"
    assert not _joblib._POOLS.pools  # no pool for a sequential call


def test_tiny_tasks_are_batched_automatically() -> None:
    with joblib.parallel_config(backend="mpchan", n_jobs=2):
        p = Parallel()
        assert p(delayed(inc)(i) for i in range(5000)) == list(range(1, 5001))
    assert p.n_dispatched_tasks == 5000
    assert p.n_dispatched_batches < 5000 / 4  # batch size grew well above 1


def test_generator_yields_results_as_they_come() -> None:
    with joblib.parallel_config(backend="mpchan", n_jobs=2):
        start = time.monotonic()
        gen = Parallel(return_as="generator", batch_size=1)(
            delayed(slow)(i, 0.25) for i in range(10)
        )
        first = next(gen)
        first_at = time.monotonic() - start
        rest = list(gen)
        total = time.monotonic() - start
        unordered = Parallel(return_as="generator_unordered")(
            delayed(slow)(i, 0.01 * (5 - i)) for i in range(5)
        )
        assert sorted(unordered) == [0, 1, 2, 3, 4]
    assert [first, *rest] == list(range(10))
    assert total >= 1.2  # 10 x 0.25 s on 2 workers
    assert first_at < total / 2


@pytest.mark.timeout(90)
def test_an_exception_aborts_the_rest_and_the_next_call_works(tmp_path: Path) -> None:
    with joblib.parallel_config(backend="mpchan", n_jobs=2):
        start = time.monotonic()
        with pytest.raises(ValueError, match="task 0 failed"):
            Parallel(batch_size=1, pre_dispatch="all")(
                delayed(fail_or_sleep)(i, str(tmp_path)) for i in range(40)
            )
        elapsed = time.monotonic() - start
        # Task 1 sleeps 30 s: only killing its worker ends the call this soon.
        assert elapsed < 10
        time.sleep(0.5)
        started = len(list(tmp_path.iterdir()))
        assert started < 10  # the queued batches were cancelled
        assert Parallel()(delayed(inc)(i) for i in range(20)) == list(range(1, 21))
    assert len(list(tmp_path.iterdir())) == started
    assert not _array_files()


def test_nested_parallel_inside_a_worker_does_not_oversubscribe() -> None:
    with joblib.parallel_config(backend="mpchan", n_jobs=2):
        infos = Parallel()(delayed(nested_info)(i) for i in range(2))
    cap = max(1, _joblib.cpu_count() // 2)
    for info in infos:
        assert info["inner"] <= cap
        assert info["explicit"] == 1 and info["warned"]
        if cap == 1:
            assert info["backend"] == "SequentialBackend"
            assert info["pids"] == [info["me"]]
        else:
            assert info["backend"] == "CappedThreadingBackend"
    with joblib.parallel_config(backend="mpchan", n_jobs=2, inner_max_num_threads=2):
        infos = Parallel()(delayed(nested_info)(i) for i in range(2))
    for info in infos:
        assert info["backend"] == "CappedThreadingBackend"
        assert info["inner"] == min(2, info["cpus"])
    capped = _joblib.CappedThreadingBackend(2, nesting_level=1)
    assert capped.effective_n_jobs(-1) == min(2, _joblib.cpu_count())
    assert capped.effective_n_jobs(64) == 2
    assert _joblib.CappedThreadingBackend(1).effective_n_jobs(8) == 1


@pytest.mark.timeout(90)
def test_blas_threads_are_capped_in_the_workers() -> None:
    cap = max(1, _joblib.cpu_count() // 2)
    with joblib.parallel_config(backend="mpchan", n_jobs=2):
        infos = Parallel()(delayed(thread_info)(i) for i in range(2))
    for info in infos:
        assert info["limits"] == [cap]
        assert info["env"] == {"OMP_NUM_THREADS": str(cap), "OPENBLAS_NUM_THREADS": str(cap)}
    with joblib.parallel_config(backend="mpchan", n_jobs=2, inner_max_num_threads=3):
        infos = Parallel()(delayed(thread_info)(i) for i in range(2))
    for info in infos:
        assert info["limits"] == [3]
        assert info["env"]["OMP_NUM_THREADS"] == "3"


def test_big_arrays_go_through_shared_memory_once(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    sizes: list[int] = []
    new_name, dump = _shm.new_name, _joblib._dump_batch

    def counting_name(kind: str) -> str:
        name = new_name(kind)
        if kind == _shm.ARRAY:
            made.append(name)
        return name

    def measuring_dump(batch: Any, arrays: Any) -> bytes:
        blob = dump(batch, arrays)
        sizes.append(len(blob))
        return blob

    monkeypatch.setattr(_shm, "new_name", counting_name)
    monkeypatch.setattr(_joblib, "_dump_batch", measuring_dump)
    big = np.arange(512 * 1024, dtype=np.float64).reshape(512, 1024)  # 4 MiB
    fortran = np.asfortranarray(big[:, :300])
    small = np.ones(1000)
    with joblib.parallel_config(backend="mpchan", n_jobs=2):
        out = Parallel(batch_size=1)(delayed(array_facts)(big, k) for k in range(30))
        assert len(made) == 1
        assert max(sizes) < 4096  # a handle, not 4 MiB, in each task
        assert not _array_files()  # unlinked when the call ended
        f_out = Parallel()(delayed(array_facts)(fortran, 1) for _ in range(4))
        s_out = Parallel()(delayed(array_facts)(small, 2) for _ in range(4))
        v_out = Parallel()(delayed(array_facts)(big[:, ::2], 1) for _ in range(4))
    assert len(made) == 3  # the small array was pickled as usual
    assert [r[0] for r in out] == [float(big.sum()) * k for k in range(30)]
    assert not any(r[1] for r in out)  # read-only views of the file
    assert {r[3] for r in out} == {1}
    assert {r[0] for r in f_out} == {float(fortran.sum())}
    assert {r[0] for r in s_out} == {2000.0} and all(r[1] for r in s_out)
    assert {r[0] for r in v_out} == {float(big[:, ::2].sum())}
    # A worker keeps the arrays of the last call only.
    assert {r[3] for r in v_out} == {1}
    assert not _array_files()


def test_a_parallel_kept_open_reuses_its_workers_and_releases_arrays_per_call() -> None:
    big = np.ones((256, 1024))  # 2 MiB
    with Parallel(n_jobs=2, backend="mpchan") as parallel:
        first = parallel(delayed(array_facts)(big, 1) for _ in range(6))
        assert not _array_files()
        second = parallel(delayed(array_facts)(big, 2) for _ in range(6))
        assert not _array_files()
        assert {r[2] for r in first} | {r[2] for r in second} <= _pool_pids()
    assert {r[0] for r in second} == {float(big.sum()) * 2}


def test_arrays_are_unlinked_when_a_call_is_aborted() -> None:
    big = np.ones((512, 512))

    def check(a: np.ndarray, k: int) -> float:  # a closure: goes by value
        if k == 3:
            raise KeyError(k)
        return float(a.sum())

    with joblib.parallel_config(backend="mpchan", n_jobs=2), pytest.raises(KeyError):
        Parallel(batch_size=1)(delayed(check)(big, k) for k in range(8))
    assert not _array_files()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("own_session", [False, True], ids=["in-session", "own-session"])
def test_a_user_script_leaves_nothing_behind(own_session: bool) -> None:
    before = set(os.listdir(SHM_DIR))
    proc, out = start_json_program(SCRIPT, own_session=own_session)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    assert out["squares"] == [i * i for i in range(20)]
    assert out["sums"] == [512.0 * 1024 * k for k in range(4)]
    assert len(out["pids"]) <= 2 and proc.pid not in out["pids"]
    pids = list(out["pids"]) + ([out["reaper"]] if out["reaper"] else [])
    assert wait_until(lambda: all(gone(p) for p in pids), timeout=10)
    prefix = f"{_shm.PREFIX}{out['session']}-"

    def left() -> list[str]:
        return [n for n in set(os.listdir(SHM_DIR)) - before if n.startswith(prefix)]

    assert wait_until(lambda: not left(), timeout=10), left()
