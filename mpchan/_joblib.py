r"""joblib's ``"mpchan"`` backend: joblib's batches run on mpchan Pool workers (layer 8).

``with joblib.parallel_config(backend="mpchan", n_jobs=N):`` (or the older
``parallel_backend``) makes every ``joblib.Parallel`` -- scikit-learn's
``n_jobs`` included -- submit its batches to a process-wide
:class:`mpchan.Pool` (``_joblib_hook`` registers the name lazily)::

    parent: Parallel(...)                                  pool worker
    ---------------------                                  -----------
    configure(n_jobs)  -- _POOLS.acquire((N, threads)) --> Pool(N, initializer=
        |                 (one Pool per key, kept open      _init_worker(threads))
        |                  between calls; closed at exit)    env *_NUM_THREADS,
    start_call()       -- _SharedArrays(token)               threadpool_limits
    submit(batch, cb)                                          |
      _BatchPickler(batch) -> blob                             |
        ndarray >= max_nbytes -> (first time in this call)     |
            copied to shm file mpchan-<session>-a<id>          |
            pickled as _shared_array(token, name, ...)         |
        non-importable function -> _codec.pickle_value (by value)
      pool.submit(_PickledBatch(token, blob)) -------------->  _PickledBatch()
      future.add_done_callback(cb)                               _WORKER.enter(token):
                                                                   maps of an older
                                                                   call are dropped
                                                                 pickle.loads(blob):
                                                                   _shared_array maps
                                                                   the file read-only
                                                                   (once per name)
    cb(future) <-- retrieve_result_callback <--- result ------   batch() -> [results]
    stop_call() / terminate() / abort_everything()
      -> the call's shm files unlinked; abort also cancels what is queued
         and kills (PoolFuture.kill) what runs; the pool replaces workers

Invariants:
    * One Pool per (workers, threads cap) key at most; a pool no call holds
      is shut down as soon as a pool of another key is made (one still held
      then, when its last lease is given back), so changing ``n_jobs`` does
      not pile up processes; every pool is shut down at exit.
    * Inside a worker, a nested Parallel call gets at most the worker's
      thread cap of threads (``get_nested_backend``), and this backend
      itself runs sequentially: no process starts processes.
    * An array is copied to shared memory at most once per joblib call
      (keyed by its data address, shape, strides and dtype; the store holds
      the array, so that memory is not reused meanwhile); its file is
      unlinked when the call ends, when it is aborted, when the backend is
      terminated or dropped, or at exit.
    * A worker keeps the mappings of one call at a time (the last token it
      saw); arrays it rebuilds are read-only views of the file.
    * The batch is unpickled in the worker only when it is called (a reply
      dropped by the parent and unpickled there never maps anything).

Ownership:
    * ``_POOLS`` (this module) owns the pools: made, shared and shut down
      here; a backend only holds a lease on one between ``configure`` and
      ``terminate``.
    * The parent's :class:`_SharedArrays` of a call creates, writes and
      unlinks its files; workers only map them (``_shm`` ``ARRAY`` files).
    * ``_WORKER`` is the worker process's own state (the thread cap, the
      current call's mappings); it is written only by the pool's task
      thread of that worker.
    * The exit hook (``atexit``, registered when the first pool is made, so
      after -- and therefore run before -- ``_lifecycle``'s) shuts the pools
      down before the pools' and the supervisor's own exit hooks run.

Lock order: none -- ``MpchanBackend._lock``, ``_Pools._lock`` and
``_SharedArrays._lock`` never nest, and none is held while pickling,
submitting, completing a future or shutting a pool down.
"""

from __future__ import annotations

import atexit
import io
import os
import pickle
import secrets
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Literal

import joblib
from joblib.parallel import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
    ThreadingBackend,
)

from . import _shm
from ._codec import by_reference, cannot_pickle, pickle_value
from ._pool import Pool

__all__ = [
    "DEFAULT_MAX_NBYTES",
    "THREAD_VARS",
    "CappedThreadingBackend",
    "MpchanBackend",
    "register",
    "shutdown_pools",
]

DEFAULT_MAX_NBYTES = 1 << 20
"""Arrays of at least this many bytes go through shared memory (joblib's ``max_nbytes``)."""

THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMBA_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
"""Environment variables a worker sets to its thread cap before any native library loads."""

_PROTOCOL = 5


def register(name: str = "mpchan") -> None:
    """Register :class:`MpchanBackend` with joblib under ``name``.

    Never blocks. Process safety: any thread.
    """
    joblib.register_parallel_backend(name, MpchanBackend)


def cpu_count() -> int:
    """The CPUs this process may use (joblib's count: affinity and cgroup quotas). Never blocks."""
    return max(1, int(joblib.cpu_count()))


# ---------------------------------------------------------------- the pools


class _Pools:
    """The process-wide pools, one per (workers, threads) key, reused across calls."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        # Invariant: users[key] is the number of leases out on pools[key].
        self.pools: dict[tuple[int, int], Pool] = {}
        self.users: dict[tuple[int, int], int] = {}
        self._hooked = False

    def acquire(self, workers: int, threads: int) -> Pool:
        """A lease on the pool of this key (made if needed); give it back with :meth:`release`."""
        key = (workers, threads)
        idle: list[Pool] = []
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the pools are the parent's
                self.pools.clear()
                self.users.clear()
                self._pid = os.getpid()
            pool = self.pools.get(key)
            if pool is not None and pool.draining:  # shut down by someone else
                del self.pools[key]
                pool = None
            if pool is not None:
                self.users[key] = self.users.get(key, 0) + 1
                self.pools[key] = self.pools.pop(key)  # the most recent last
                return pool
        made = Pool(workers, initializer=_init_worker, initargs=(threads,))
        with self._lock:
            other = self.pools.get(key)
            if other is not None:  # another thread made one meanwhile: use it
                idle.append(made)
                made = other
            else:
                self.pools[key] = made
            self.users[key] = self.users.get(key, 0) + 1
            for k in [k for k in self.pools if k != key and not self.users.get(k)]:
                idle.append(self.pools.pop(k))
                self.users.pop(k, None)
            hook = not self._hooked
            self._hooked = True
        if hook:
            # After the first Pool registered _lifecycle's atexit handler, so
            # this one runs first (atexit is last in, first out).
            atexit.register(self.shutdown)
        for p in idle:
            p.shutdown(wait=False)
        return made

    def release(self, workers: int, threads: int, pool: Pool) -> None:
        """Give a lease back; the pool stays open for the next call unless
        a pool of another key was made since."""
        key = (workers, threads)
        with self._lock:
            if self.pools.get(key) is not pool:
                return  # already replaced or shut down
            self.users[key] = max(0, self.users.get(key, 0) - 1)
            current = next(reversed(self.pools))
            stale = key != current and self.users[key] == 0
            if stale:
                del self.pools[key]
                del self.users[key]
        if stale:
            pool.shutdown(wait=False)

    def shutdown(self) -> None:
        """Shut every pool down: cancel what has not started, wait for the rest and
        for the workers to exit.

        Blocks: until every worker process of these pools exited.
        Cancellation: none; idempotent. Process safety: any thread.
        """
        with self._lock:
            pools = list(self.pools.values()) if self._pid == os.getpid() else []
            self.pools.clear()
            self.users.clear()
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)


_POOLS = _Pools()


def shutdown_pools() -> None:
    """Shut down the pools the backend keeps between calls (also done at exit).

    The next joblib call on the backend makes a fresh pool.
    Blocks: until their worker processes exited. Cancellation: none.
    Process safety: any thread.
    """
    _POOLS.shutdown()


# ---------------------------------------------------------------- shared arrays (parent)


def _unlink_all(names: list[str]) -> None:
    for name in names:
        _shm.unlink_quietly(name)
    names.clear()


class _SharedArrays:
    """The arrays one joblib call shares through shared memory (parent side)."""

    def __init__(self, min_nbytes: int | None) -> None:
        self.token = secrets.token_hex(8)
        self.min_nbytes = min_nbytes
        self._lock = threading.Lock()
        # Invariant: every name in _names is a file of this call not yet unlinked.
        self._names: list[str] = []
        # key -> (the array, held so its memory is not reused; handle args)
        self._by_key: dict[tuple[Any, ...], tuple[Any, tuple[Any, ...]]] = {}
        # Dropped without release (a backend never terminated), or at exit.
        self._fin = weakref.finalize(self, _unlink_all, self._names)

    @property
    def names(self) -> list[str]:
        """The shared-memory files this call made and did not unlink yet. Never blocks."""
        with self._lock:
            return list(self._names)

    def reduce(self, arr: Any) -> tuple[Any, ...] | None:
        """The reduction of a large array (a handle to its shared copy), or None
        to pickle it as usual. Copies it on first sight. Never blocks."""
        if (
            self.min_nbytes is None
            or arr.nbytes < self.min_nbytes
            or arr.dtype.hasobject
            or arr.size == 0
        ):
            return None
        # The same memory seen the same way: the array again, or an equal
        # view of it made anew for each task (``X[:, ::2]`` in a generator).
        key = (arr.__array_interface__["data"][0], arr.shape, arr.strides, arr.dtype.str)
        with self._lock:
            known = self._by_key.get(key)
            if known is not None:
                return (_shared_array, known[1])
        order: Literal["C", "F"] = (
            "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
        )
        name = _shm.new_name(_shm.ARRAY)
        mm = _shm.map_file(name, arr.nbytes, create=True)
        try:
            with self._lock:
                self._names.append(name)
            import numpy as np

            dst = np.ndarray(arr.shape, dtype=arr.dtype, buffer=mm, order=order)
            dst[...] = arr
            del dst
        finally:
            mm.close()
        args = (self.token, name, arr.dtype, arr.shape, order)
        with self._lock:
            self._by_key[key] = (arr, args)
        return (_shared_array, args)

    def release(self) -> None:
        """Unlink every file of this call (workers keep what they mapped). Never blocks."""
        with self._lock:
            self._by_key.clear()
            names = list(self._names)
            self._names.clear()
        _unlink_all(names)


class _BatchPickler(pickle.Pickler):
    """Pickles a batch: large arrays as shared-memory handles, functions a worker
    cannot import by value (``_codec``'s rule), the rest as pickle does."""

    def __init__(self, file: io.BytesIO, arrays: _SharedArrays) -> None:
        super().__init__(file, protocol=_PROTOCOL)
        self.arrays = arrays
        np = sys.modules.get("numpy")
        self.ndarray: type | None = np.ndarray if np is not None else None

    def reducer_override(self, obj: Any) -> Any:
        t = type(obj)
        if t is self.ndarray:
            reduced = self.arrays.reduce(obj)
            return NotImplemented if reduced is None else reduced
        if (t is types.FunctionType or isinstance(obj, type)) and not by_reference(obj):
            return (pickle.loads, (pickle_value(obj),))
        return NotImplemented


def _dump_batch(batch: Any, arrays: _SharedArrays) -> bytes:
    out = io.BytesIO()
    _BatchPickler(out, arrays).dump(batch)
    return out.getvalue()


class _PickledBatch:
    """A joblib batch, pickled in the parent by :class:`_BatchPickler`; what the
    pool sends (``__reduce__`` carries the bytes) and a worker calls."""

    __slots__ = ("blob", "token")

    def __init__(self, token: str, blob: bytes) -> None:
        self.token = token
        self.blob = blob

    def __reduce__(self) -> tuple[Any, ...]:
        return (_PickledBatch, (self.token, self.blob))

    def __call__(self) -> Any:
        _WORKER.enter(self.token)
        batch = pickle.loads(self.blob)
        _WORKER.limit_threads()
        return batch()


# ---------------------------------------------------------------- the worker side


class _WorkerState:
    """This worker process's part: its thread cap and the current call's arrays."""

    def __init__(self) -> None:
        self.in_worker = False
        self.threads = 0
        self.token = ""
        self.arrays: dict[str, Any] = {}
        self.modules_seen = 0

    def enter(self, token: str) -> None:
        """A batch of call ``token`` starts: forget an older call's mappings."""
        if token != self.token:
            self.arrays.clear()
            self.token = token

    def limit_threads(self) -> None:
        """Cap the thread pools of native libraries loaded since the last check."""
        if not self.in_worker or len(sys.modules) == self.modules_seen:
            return
        self.modules_seen = len(sys.modules)
        _threadpool_limits(self.threads)


_WORKER = _WorkerState()


def _threadpool_limits(threads: int) -> None:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: the environment variables still apply
        return
    threadpool_limits(limits=threads)


def _init_worker(threads: int) -> None:
    """The pool's initializer: cap the native thread pools of this worker at ``threads``."""
    _WORKER.in_worker = True
    _WORKER.threads = threads
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    _WORKER.limit_threads()


def _shared_array(
    token: str, name: str, dtype: Any, shape: tuple[int, ...], order: Literal["C", "F"]
) -> Any:
    """Rebuild a shared array in a worker: a read-only view of its file (mapped once)."""
    _WORKER.enter(token)
    arr = _WORKER.arrays.get(name)
    if arr is None:
        import numpy as np

        mm = _shm.map_file(name, readonly=True)
        arr = np.ndarray(shape, dtype=dtype, buffer=mm, order=order)
        _WORKER.arrays[name] = arr
    return arr


# ---------------------------------------------------------------- nested calls


class CappedThreadingBackend(ThreadingBackend):  # type: ignore[misc]
    """joblib's threading backend, never more than ``cap`` threads: what a
    Parallel call inside an mpchan worker runs on (no oversubscription)."""

    def __init__(self, cap: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cap = cap

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """``min(n_jobs resolved as the threading backend does, cap)``. Never blocks."""
        return max(1, min(int(super().effective_n_jobs(n_jobs)), self.cap))


# ---------------------------------------------------------------- the backend


def _nbytes_option(value: Any) -> int | None:
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


class MpchanBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """A joblib backend that runs joblib's batches in an mpchan :class:`~mpchan.Pool`.

    Made by joblib for ``parallel_config(backend="mpchan", n_jobs=N,
    inner_max_num_threads=T, max_nbytes=...)``. ``n_jobs=-1`` means every
    CPU (joblib's count), ``-2`` all but one, as with loky; ``n_jobs=1`` (or
    any call inside an mpchan worker) runs sequentially. Each worker caps
    BLAS/OpenMP threads at ``T`` (default ``max(1, cpu_count // N)``).
    Arrays of ``max_nbytes`` bytes or more (default 1 MiB; None: never) go
    to the workers through shared memory, copied once per call.
    Batches are sized by joblib's auto-batching.

    Process safety: joblib calls it from the thread running the Parallel
    call and from the pool's collector thread (completion callbacks).
    """

    supports_retrieve_callback = True
    supports_inner_max_num_threads = True
    supports_sharedmem = False
    uses_threads = False

    def __init__(
        self,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        **backend_kwargs: Any,
    ) -> None:
        super().__init__(
            nesting_level=nesting_level,
            inner_max_num_threads=inner_max_num_threads,
            **backend_kwargs,
        )
        self._lock = threading.Lock()
        self._pool: Pool | None = None
        self._key: tuple[int, int] = (0, 0)
        self._arrays: _SharedArrays | None = None
        self._max_nbytes: int | None = _nbytes_option(
            backend_kwargs.get("max_nbytes", DEFAULT_MAX_NBYTES)
        )
        # Invariant: the futures submitted and not yet done.
        self._futures: set[Future[Any]] = set()
        self.parallel: Any = None

    # -- sizing -------------------------------------------------------------

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """The workers a call with ``n_jobs`` gets (1 inside an mpchan worker). Never blocks."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if _WORKER.in_worker:
            if n_jobs != 1:
                warnings.warn(
                    "the mpchan joblib backend runs sequentially inside an mpchan worker "
                    "(n_jobs set to 1)",
                    stacklevel=3,
                )
            return 1
        if n_jobs < 0:
            return max(cpu_count() + 1 + n_jobs, 1)
        return int(n_jobs)

    def threads_per_worker(self, n_jobs: int) -> int:
        """The BLAS/OpenMP thread cap of a worker when ``n_jobs`` run at once. Never blocks."""
        if self.inner_max_num_threads is not None:
            return max(1, int(self.inner_max_num_threads))
        return max(1, cpu_count() // max(1, n_jobs))

    # -- joblib's calls -------------------------------------------------------

    def configure(
        self,
        n_jobs: int | None = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        **kwargs: Any,
    ) -> int:
        """Lease the pool for ``n_jobs`` workers; return the number of workers.

        Falls back to joblib's sequential backend when that number is 1.
        Blocks: while a new pool is made (its workers start in the background).
        Cancellation: none. Process safety: the thread of the Parallel call.
        """
        n = self.effective_n_jobs(n_jobs)
        if n == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        if "max_nbytes" in kwargs:
            self._max_nbytes = _nbytes_option(kwargs["max_nbytes"])
        self.parallel = parallel
        self._release_pool()
        threads = self.threads_per_worker(n)
        self._pool = _POOLS.acquire(n, threads)
        self._key = (n, threads)
        return n

    def start_call(self) -> None:
        """A Parallel call starts: a fresh set of shared arrays. Never blocks."""
        self._release_arrays()
        with self._lock:
            self._arrays = _SharedArrays(self._max_nbytes)

    def stop_call(self) -> None:
        """A Parallel call ended (every batch done or aborted): unlink its arrays.
        Never blocks."""
        self._release_arrays()

    def submit(self, func: Callable[[], Any], callback: Callable[[Any], Any] | None = None) -> Any:
        """Send one joblib batch to the pool; return its Future.

        The batch is pickled here (large arrays copied to shared memory the
        first time this call meets them); a failure to pickle or to submit
        is the returned Future's exception, never raised (joblib calls this
        from the pool's callback thread too).
        Blocks: never (beyond copying a new large array).
        Cancellation: :meth:`abort_everything`.
        Process safety: any thread.
        """
        with self._lock:
            arrays = self._arrays
            if arrays is None:
                arrays = self._arrays = _SharedArrays(self._max_nbytes)
            pool = self._pool
        future: Future[Any]
        try:
            if pool is None:
                raise RuntimeError("the mpchan joblib backend is not configured")
            try:
                blob = _dump_batch(func, arrays)
            except Exception as exc:
                raise cannot_pickle("the joblib batch", exc) from exc
            future = pool.submit(_PickledBatch(arrays.token, blob))
        except Exception as exc:
            future = Future()
            future.set_exception(exc)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._futures.discard(future)

    def retrieve_result_callback(self, out: Future[Any]) -> Any:
        """The batch's results, or raise its exception (with its remote traceback
        as ``__cause__``). Never blocks (called once the Future is done)."""
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Stop every batch of this backend: cancel the queued ones, kill the
        running ones (their workers are replaced), unlink the shared arrays.

        The pool stays usable, so ``ensure_ready`` needs nothing more.
        Blocks: never (processes are signalled, not waited for).
        Cancellation: none. Process safety: any thread.
        """
        with self._lock:
            futures = list(self._futures)
        for f in futures:
            f.cancel()  # first, so no queued batch starts on a replacement worker
        for f in futures:
            kill = getattr(f, "kill", None)
            if kill is not None and not f.done():
                kill()
        self._release_arrays()
        if not ensure_ready:
            self.terminate()

    def terminate(self) -> None:
        """Give the pool back (it stays open for later calls) and unlink the
        shared arrays. Never blocks."""
        self._release_arrays()
        self._release_pool()
        self.reset_batch_stats()

    def get_nested_backend(self) -> tuple[Any, int | None]:
        """What a Parallel call inside a worker runs on: at most the worker's
        thread cap of threads (sequential when that cap is 1 or deeper down).
        Never blocks."""
        level = (self.nesting_level or 0) + 1
        cap = self._key[1] or self.threads_per_worker(max(1, self._key[0]))
        if level > 1 or cap <= 1:
            return SequentialBackend(nesting_level=level), None
        return CappedThreadingBackend(cap, nesting_level=level), None

    # -- state ---------------------------------------------------------------

    def shared_files(self) -> list[str]:
        """The shared-memory files of the current call (for tests and stats). Never blocks."""
        with self._lock:
            arrays = self._arrays
        return arrays.names if arrays is not None else []

    def _release_arrays(self) -> None:
        with self._lock:
            arrays, self._arrays = self._arrays, None
        if arrays is not None:
            arrays.release()

    def _release_pool(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            _POOLS.release(*self._key, pool)

    def __getstate__(self) -> dict[str, Any]:
        # joblib may pickle a backend (a nested one, a config); the pool,
        # futures and files stay with the process that owns them.
        state = dict(self.__dict__)
        for k in ("_lock", "_pool", "_arrays", "_futures", "parallel"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pool = None
        self._arrays = None
        self._futures = set()
        self.parallel = None
