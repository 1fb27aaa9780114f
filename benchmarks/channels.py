"""Channel scenarios: moving values between processes, mpchan.Channel against its peers.

Peers: ``multiprocessing.Queue``, ``multiprocessing.SimpleQueue``, ``multiprocessing.Pipe``
and ``faster_fifo.Queue``; in-process ``np.copyto`` is the reference for large arrays.

What every scenario here does the same way for every contender (why it is fair):
    - the transport is created in the parent and inherited by fresh processes started
      with ``multiprocessing.get_context("fork")`` -- one start method for everyone;
    - each process exchanges a few warm-up messages first (feeder threads, shared-memory
      attachment and other lazy set-up happen there), then waits on a shared
      ``Barrier``; only what follows is timed, with ``time.perf_counter`` inside the
      processes (CLOCK_MONOTONIC, one clock for all processes on Linux), from the
      earliest start after the barrier to the last message received;
    - the hot loops are the same Python code for every contender: only the bound
      ``send``/``recv`` callables differ (faster_fifo's carry an explicit timeout);
    - every message is counted and checksummed by the receivers and checked by the
      parent, so a contender that loses or corrupts messages fails instead of looking
      fast.
"""

from __future__ import annotations

import functools
import importlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks._proc import FORK, run_processes
from benchmarks.harness import Contender, Scenario, Skip, needs_modules

GROUP = "channels"
CAPACITY = 1024  # mpchan's buffer for the message scenarios
BATCH = 256  # items per batch in the batched scenario
ARRAY_CAPACITY = 4  # mpchan's buffer (and faster_fifo's, in arrays) for the array scenarios
ARRAY_WARMUP = ARRAY_CAPACITY + 1  # full-size arrays moved untimed before measuring
WARMUP = 200  # untimed messages per process before the start barrier
MiB = 1 << 20


class VerificationError(RuntimeError):
    """A contender delivered the wrong number of messages or the wrong data."""


# ---------------------------------------------------------------------------- transports


@dataclass
class Link:
    """One one-way link as the processes use it; ``close`` is called by the parent."""

    send: Callable[[Any], object]
    recv: Callable[[], Any]
    send_batch: Callable[[list[Any]], object]
    recv_batch: Callable[[], list[Any]]
    close: Callable[[], None]


def _mpchan_available() -> str | None:
    """Skip mpchan (with the reason) until ``mpchan.Channel`` can be imported."""
    try:
        importlib.import_module("mpchan").Channel  # noqa: B018 - the lookup is the check
    except Exception as exc:
        return f"mpchan.Channel not available ({type(exc).__name__}: {exc})"
    return None


def _mpchan_link(params: Mapping[str, Any], capacity: int = CAPACITY) -> Link:
    """A fresh ``mpchan.Channel``; a batch is ``send_many`` / ``recv_many(BATCH)``."""
    mpchan: Any = importlib.import_module("mpchan")
    ch = mpchan.Channel(capacity=capacity)
    return Link(ch.send, ch.recv, ch.send_many, functools.partial(ch.recv_many, BATCH), ch.close)


def _mp_queue_link(params: Mapping[str, Any]) -> Link:
    """A fresh, unbounded ``multiprocessing.Queue`` (its default, as users get it)."""
    q = FORK.Queue()

    def close() -> None:
        q.close()
        q.join_thread()  # the parent may have put (idle scenario): stop its feeder thread

    # A batch is one list object per put/get: what mp.Queue users do to batch.
    return Link(q.put, q.get, q.put, q.get, close)


def _simple_queue_link(params: Mapping[str, Any]) -> Link:
    """A fresh ``multiprocessing.SimpleQueue`` (a pipe with a lock on each end)."""
    q = FORK.SimpleQueue()
    return Link(q.put, q.get, q.put, q.get, q.close)


def _pipe_link(params: Mapping[str, Any]) -> Link:
    """A fresh one-way ``multiprocessing.Pipe``; only usable 1->1."""
    reader, writer = FORK.Pipe(duplex=False)

    def close() -> None:
        reader.close()
        writer.close()

    return Link(writer.send, reader.recv, writer.send, reader.recv, close)


def _faster_fifo_link(params: Mapping[str, Any], max_size_bytes: int = 1_000_000) -> Link:
    """A fresh ``faster_fifo.Queue`` (1 MB ring, its default, unless told otherwise)."""
    faster_fifo: Any = importlib.import_module("faster_fifo")
    q = faster_fifo.Queue(max_size_bytes=max_size_bytes)
    # An explicit timeout, as long as the measurement's: its own default must not decide
    # when a slow run gives up.
    t = float(params["timeout"])
    return Link(
        functools.partial(q.put, timeout=t),
        functools.partial(q.get, timeout=t),
        functools.partial(q.put_many, timeout=t),
        functools.partial(q.get_many, timeout=t, max_messages_to_get=BATCH),
        q.close,
    )


LinkFactory = Callable[[Mapping[str, Any]], Link]

MPCHAN: tuple[str, LinkFactory] = ("mpchan", _mpchan_link)
MP_QUEUE: tuple[str, LinkFactory] = ("mp.Queue", _mp_queue_link)
SIMPLE_QUEUE: tuple[str, LinkFactory] = ("mp.SimpleQueue", _simple_queue_link)
PIPE: tuple[str, LinkFactory] = ("mp.Pipe", _pipe_link)
FASTER_FIFO: tuple[str, LinkFactory] = ("faster_fifo", _faster_fifo_link)


def _contender(name: str, run: Callable[[Mapping[str, Any]], float]) -> Contender:
    """Wrap ``run`` with the right kind and availability check for ``name``."""
    if name == "mpchan":
        return Contender(name, run, kind="mpchan", available=_mpchan_available)
    if name == "faster_fifo":
        return Contender(name, run, available=needs_modules("faster_fifo"))
    return Contender(name, run)


# ------------------------------------------------------------------- process bodies


def _produce_ints(link: Link, barrier: Any, values: Iterable[int | None], warmup: int) -> float:
    """Send ``warmup`` zeros, wait at the barrier, send ``values``; return the start time."""
    send = link.send
    for _ in range(warmup):
        send(0)
    barrier.wait()
    start = time.perf_counter()
    for value in values:
        send(value)
    return start


def _produce_bytes(link: Link, barrier: Any, n: int, size: int, warmup: int) -> float:
    """Like :func:`_produce_ints` with one ``size``-byte ``bytes`` object sent ``n`` times."""
    send = link.send
    payload = b"x" * size
    for _ in range(warmup):
        send(payload)
    barrier.wait()
    start = time.perf_counter()
    for _ in range(n):
        send(payload)
    return start


def _consume_ints(link: Link, barrier: Any, n: int, warmup: int) -> tuple[float, float, int, int]:
    """Receive ``warmup`` then exactly ``n`` ints; return (start, end, count, sum)."""
    recv = link.recv
    for _ in range(warmup):
        recv()
    barrier.wait()
    start = time.perf_counter()
    total = 0
    for _ in range(n):
        total += recv()
    return start, time.perf_counter(), n, total


def _consume_bytes(link: Link, barrier: Any, n: int, warmup: int) -> tuple[float, float, int, int]:
    """Receive ``warmup`` then exactly ``n`` messages; return (start, end, count, bytes)."""
    recv = link.recv
    for _ in range(warmup):
        recv()
    barrier.wait()
    start = time.perf_counter()
    size = 0
    for _ in range(n):
        size += len(recv())
    return start, time.perf_counter(), n, size


def _consume_until_sentinel(link: Link, barrier: Any, warmup: int) -> tuple[float, float, int, int]:
    """Receive ints until the first ``None``; return (start, end, count, sum).

    Each producer sends one ``None`` after its values and each consumer stops at one,
    so once every sentinel is taken every value has been taken (each producer's
    messages arrive in order, and a consumer stops only after a sentinel).
    """
    recv = link.recv
    for _ in range(warmup):
        recv()
    barrier.wait()
    start = time.perf_counter()
    count = total = 0
    while (value := recv()) is not None:
        count += 1
        total += value
    return start, time.perf_counter(), count, total


def _produce_batches(link: Link, barrier: Any, n: int, warmup: int) -> float:
    """Send ``n`` ints in lists of ``BATCH`` (built before the timer starts)."""
    send_batch = link.send_batch
    batches = [list(range(i, min(i + BATCH, n))) for i in range(0, n, BATCH)]
    for i in range(0, warmup, BATCH):
        send_batch([0] * min(BATCH, warmup - i))
    barrier.wait()
    start = time.perf_counter()
    for batch in batches:
        send_batch(batch)
    return start


def _consume_batches(
    link: Link, barrier: Any, n: int, warmup: int
) -> tuple[float, float, int, int]:
    """Receive lists of up to ``BATCH`` ints until ``n`` items; return (start, end, count, sum)."""
    recv_batch = link.recv_batch
    got = 0
    while got < warmup:
        got += len(recv_batch())
    barrier.wait()
    start = time.perf_counter()
    count = total = 0
    while count < n:
        batch = recv_batch()
        count += len(batch)
        total += sum(batch)
    return start, time.perf_counter(), count, total


def _ping(out: Link, back: Link, barrier: Any, rounds: int, warmup: int) -> float:
    """Send i, wait for i + 1, ``rounds`` times; return the median round trip in µs."""
    send, recv = out.send, back.recv
    barrier.wait()
    for i in range(warmup):
        send(i)
        if recv() != i + 1:
            raise VerificationError("wrong reply during warm-up")
    clock = time.perf_counter
    rtts = []
    for i in range(rounds):
        t0 = clock()
        send(i)
        reply = recv()
        rtts.append(clock() - t0)
        if reply != i + 1:
            raise VerificationError(f"round {i}: got {reply!r}, expected {i + 1}")
    rtts.sort()
    return rtts[len(rtts) // 2] * 1e6


def _pong(inbound: Link, reply: Link, barrier: Any, rounds: int) -> int:
    """Answer every value v with v + 1; return how many were answered."""
    recv, send = inbound.recv, reply.send
    barrier.wait()
    for _ in range(rounds):
        send(recv() + 1)
    return rounds


def _produce_arrays(link: Link, barrier: Any, count: int, nbytes: int) -> float:
    """Send ``count`` distinct int64 arrays of ``nbytes`` each (array i is filled with i).

    The arrays are allocated and written before the barrier (no page faults timed);
    they are distinct because ``mp.Queue`` pickles lazily in a thread, so an array
    must not change after ``put``.
    """
    import numpy as np

    send = link.send
    arrays = []
    for i in range(count):
        array = np.empty(nbytes // 8, dtype=np.int64)
        array.fill(i)
        arrays.append(array)
    # Warm-up, untimed and the same for every transport: a few arrays of the
    # measured size, so buffers, feeder threads and shared-memory slots exist
    # (steady state, as in a program that sends many arrays).
    warm = np.zeros(nbytes // 8, dtype=np.int64)
    for _ in range(ARRAY_WARMUP):
        send(warm)
    barrier.wait()
    start = time.perf_counter()
    for array in arrays:
        send(array)
    return start


def _consume_arrays(
    link: Link, barrier: Any, count: int, nbytes: int
) -> tuple[float, float, int, int]:
    """Receive ``count`` arrays, checking size and first/last element of each.

    The receiver does not read the whole array: it gets a usable array either way,
    and a transport that can hand over a view without copying deserves that win.
    """
    recv = link.recv
    for _ in range(ARRAY_WARMUP):
        recv()
    barrier.wait()
    start = time.perf_counter()
    for i in range(count):
        array = recv()
        if array.nbytes != nbytes or int(array[0]) != i or int(array[-1]) != i:
            raise VerificationError(f"array {i}: wrong size or content")
        del array
    return start, time.perf_counter(), count, count * nbytes


def _idle_receiver(link: Link, ready: Any) -> Any:
    """Take the warm-up value, signal ``ready``, then block in ``recv`` (the measured part)."""
    link.recv()
    ready.set()
    return link.recv()


# --------------------------------------------------------------------- measurements


def _elapsed(
    producer_starts: list[float], consumer_reports: list[tuple[float, float, int, int]]
) -> float:
    """From the earliest start after the barrier to the last consumer's last message."""
    first = min([*producer_starts, *(r[0] for r in consumer_reports)])
    return max(r[1] for r in consumer_reports) - first


def _check(
    name: str, reports: list[tuple[float, float, int, int]], count: int, checksum: int
) -> None:
    got = sum(r[2] for r in reports)
    got_sum = sum(r[3] for r in reports)
    if got != count or got_sum != checksum:
        raise VerificationError(
            f"{name}: received {got:,} messages (checksum {got_sum}), "
            f"expected {count:,} (checksum {checksum})"
        )


def _throughput(
    name: str, make: LinkFactory, *, producers: int, consumers: int, payload: str
) -> Callable[[Mapping[str, Any]], float]:
    """A run function: ``params["n"]`` messages through ``make(params)``, in msgs/s.

    ``payload`` is "int" (values 0..n-1, checksum = their sum), "bytes" (100-byte
    messages, checksum = total length) or "batch" (ints in lists of ``BATCH``).
    """

    def run(params: Mapping[str, Any]) -> float:
        n = int(params["n"])
        link = make(params)
        barrier = FORK.Barrier(producers + consumers)
        jobs: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        if payload == "batch":
            jobs.append((_produce_batches, (link, barrier, n, BATCH)))
            jobs.append((_consume_batches, (link, barrier, n, BATCH)))
            checksum = n * (n - 1) // 2
        elif payload == "bytes":
            size = int(params["size"])
            jobs.append((_produce_bytes, (link, barrier, n, size, WARMUP)))
            jobs.append((_consume_bytes, (link, barrier, n, WARMUP)))
            checksum = n * size
        elif consumers == 1:
            jobs.append((_produce_ints, (link, barrier, range(n), WARMUP)))
            jobs.append((_consume_ints, (link, barrier, n, WARMUP)))
            checksum = n * (n - 1) // 2
        else:
            # Producer p sends p, p + P, p + 2P, ... then one sentinel.
            for p in range(producers):
                values: Any = [*range(p, n, producers), None]
                jobs.append((_produce_ints, (link, barrier, values, WARMUP)))
            jobs.extend(
                (_consume_until_sentinel, (link, barrier, WARMUP)) for _ in range(consumers)
            )
            checksum = n * (n - 1) // 2
        try:
            results, _ = run_processes(jobs, timeout=float(params["timeout"]))
        finally:
            link.close()
        producer_starts = [r for r in results if isinstance(r, float)]
        consumer_reports = [r for r in results if isinstance(r, tuple)]
        _check(name, consumer_reports, n, checksum)
        return n / _elapsed(producer_starts, consumer_reports)

    return run


def _pingpong(make: LinkFactory, duplex_pipe: bool = False) -> Callable[[Mapping[str, Any]], float]:
    """A run function: median round trip in µs between two processes over two links.

    For ``mp.Pipe`` the two directions are the two ends of one duplex pipe, which is
    how a Pipe is used for request/reply; the others use two one-way links.
    """

    def run(params: Mapping[str, Any]) -> float:
        rounds = int(params["rounds"])
        warmup = min(WARMUP, rounds)
        if duplex_pipe:
            a, b = FORK.Pipe(duplex=True)
            a_end = Link(a.send, a.recv, a.send, a.recv, a.close)
            b_end = Link(b.send, b.recv, b.send, b.recv, b.close)
            # ping sends and receives on end a, pong on end b.
            ping_args = (a_end, a_end)
            pong_args = (b_end, b_end)
            links = [a_end, b_end]
        else:
            there, back = make(params), make(params)  # ping -> pong, pong -> ping
            ping_args = (there, back)
            pong_args = (there, back)
            links = [there, back]
        barrier = FORK.Barrier(2)
        try:
            results, _ = run_processes(
                [
                    (_ping, (*ping_args, barrier, rounds, warmup)),
                    (_pong, (*pong_args, barrier, rounds + warmup)),
                ],
                timeout=float(params["timeout"]),
            )
        finally:
            for link in links:
                link.close()
        if results[1] != rounds + warmup:
            raise VerificationError("pong answered the wrong number of pings")
        return float(results[0])

    return run


def _array_link(name: str, make: LinkFactory, params: Mapping[str, Any]) -> Link:
    """The transport for the array scenarios, holding about ``ARRAY_CAPACITY`` arrays."""
    nbytes = int(params["nbytes"])
    if name == "mpchan":
        return _mpchan_link(params, capacity=ARRAY_CAPACITY)
    if name == "faster_fifo":
        # Its ring is sized in bytes and must hold a whole pickled array.
        try:
            return _faster_fifo_link(params, max_size_bytes=ARRAY_CAPACITY * nbytes + MiB)
        except Exception as exc:
            raise Skip(
                f"cannot allocate a {ARRAY_CAPACITY * nbytes // MiB} MiB queue: {exc}"
            ) from exc
    return make(params)


def _arrays(name: str, make: LinkFactory) -> Callable[[Mapping[str, Any]], float]:
    """A run function: ``count`` arrays of ``nbytes`` 1→1, in GB/s (10^9 bytes/s)."""

    def run(params: Mapping[str, Any]) -> float:
        count, nbytes = int(params["count"]), int(params["nbytes"])
        link = _array_link(name, make, params)
        barrier = FORK.Barrier(2)
        try:
            results, _ = run_processes(
                [
                    (_produce_arrays, (link, barrier, count, nbytes)),
                    (_consume_arrays, (link, barrier, count, nbytes)),
                ],
                timeout=float(params["timeout"]),
            )
        finally:
            link.close()
        _check(name, [results[1]], count, count * nbytes)
        return count * nbytes / _elapsed([results[0]], [results[1]]) / 1e9

    return run


def _memcpy(params: Mapping[str, Any]) -> float:
    """In-process ``np.copyto`` of the same arrays, in GB/s: the machine's memcpy."""
    import numpy as np

    count, nbytes = int(params["count"]), int(params["nbytes"])
    src = np.empty(nbytes // 8, dtype=np.int64)
    src.fill(7)
    dst = np.zeros_like(src)  # written once below, so its pages exist before timing
    np.copyto(dst, src)
    start = time.perf_counter()
    for _ in range(count):
        np.copyto(dst, src)
    elapsed = time.perf_counter() - start
    if int(dst[-1]) != 7:
        raise VerificationError("np.copyto did not copy")
    return count * nbytes / elapsed / 1e9


def _idle_cpu(make: LinkFactory) -> Callable[[Mapping[str, Any]], float]:
    """A run function: CPU % of a process blocked in ``recv`` for ``params["seconds"]``.

    The parent reads the child's user + system CPU time with psutil before and after
    the window, then sends the value that releases it.
    """

    def run(params: Mapping[str, Any]) -> float:
        import psutil

        seconds = float(params["seconds"])
        link = make(params)
        ready = FORK.Event()

        def measure(pids: list[int]) -> float:
            link.send(0)  # warm-up value: the child's first recv sets up what it needs
            if not ready.wait(float(params["timeout"])):
                raise TimeoutError("receiver never became ready")
            proc = psutil.Process(pids[0])
            before, t0 = proc.cpu_times(), time.perf_counter()
            time.sleep(seconds)  # the measured window, not synchronisation
            after, t1 = proc.cpu_times(), time.perf_counter()
            link.send(1)
            busy = (after.user - before.user) + (after.system - before.system)
            return float(busy / (t1 - t0) * 100)

        try:
            results, cpu = run_processes(
                [(_idle_receiver, (link, ready))],
                timeout=float(params["timeout"]) + seconds,
                while_running=measure,
            )
        finally:
            link.close()
        if results[0] != 1:
            raise VerificationError(f"receiver got {results[0]!r}, expected 1")
        return float(cpu)

    return run


# ----------------------------------------------------------------------- scenarios


def _msg_params(full: int, quick: int, **extra: Any) -> Callable[[bool], dict[str, Any]]:
    return lambda q: {"n": quick if q else full, **extra}


def _throughput_scenario(
    name: str,
    label: str,
    peers: Sequence[tuple[str, LinkFactory]],
    description: str,
    params: Callable[[bool], dict[str, Any]],
    *,
    producers: int = 1,
    consumers: int = 1,
    payload: str = "int",
) -> Scenario:
    return Scenario(
        name=name,
        group=GROUP,
        label=label,
        unit="msgs/s",
        higher_is_better=True,
        contenders=tuple(
            _contender(
                n, _throughput(n, make, producers=producers, consumers=consumers, payload=payload)
            )
            for n, make in [MPCHAN, *peers]
        ),
        params=params,
        description=description,
    )


_SMALL_PEERS: list[tuple[str, LinkFactory]] = [MP_QUEUE, SIMPLE_QUEUE, PIPE, FASTER_FIFO]

SMALL_INT = _throughput_scenario(
    "chan_1to1_int",
    "1→1 small msgs: int, N={n:,}",
    _SMALL_PEERS,
    "Throughput of single sends of small ints from one process to another "
    f"(mpchan Channel(capacity={CAPACITY}) send/recv vs queue put/get and Pipe send/recv). "
    "Dominated by per-message overhead: pickling, locking, wake-ups.",
    _msg_params(50_000, 10_000),
)

SMALL_BYTES = _throughput_scenario(
    "chan_1to1_bytes",
    "1→1 small msgs: {size} B bytes, N={n:,}",
    _SMALL_PEERS,
    "As chan_1to1_int with a 100-byte bytes object per message (the receiver checks the "
    "total length).",
    _msg_params(50_000, 10_000, size=100),
    payload="bytes",
)

SMALL_4TO4 = _throughput_scenario(
    "chan_4to4_int",
    "4→4 small msgs: int, N={n:,}",
    [MP_QUEUE, SIMPLE_QUEUE, FASTER_FIFO],
    "Four producers and four consumers share one channel/queue (a Pipe is 1→1, so it is "
    "not a contender). Each producer sends its share and one sentinel; counts and sums of "
    "all consumers are checked. Measures contention as well as per-message cost.",
    _msg_params(50_000, 10_000),
    producers=4,
    consumers=4,
)

BATCHED = _throughput_scenario(
    "chan_batch_1to1",
    f"1→1 batched: int, {BATCH}/batch, N={{n:,}}",
    [MP_QUEUE, FASTER_FIFO],
    f"Ints 1→1 in batches of {BATCH}: mpchan send_many/recv_many({BATCH}), faster_fifo "
    f"put_many/get_many(max_messages_to_get={BATCH}), and mp.Queue carrying one list of "
    f"{BATCH} per put (how batching is done with it). Reported per item.",
    _msg_params(BATCH * 1000, BATCH * 200),
    payload="batch",
)

PINGPONG = Scenario(
    name="chan_pingpong",
    group=GROUP,
    label="ping-pong round trip: int, {rounds:,} rounds",
    unit="µs",
    higher_is_better=False,
    contenders=(
        _contender("mpchan", _pingpong(functools.partial(_mpchan_link, capacity=1))),
        _contender("mp.Pipe", _pingpong(_pipe_link, duplex_pipe=True)),
        _contender("mp.Queue", _pingpong(_mp_queue_link)),
        _contender("mp.SimpleQueue", _pingpong(_simple_queue_link)),
        _contender("faster_fifo", _pingpong(_faster_fifo_link)),
    ),
    params=lambda q: {"rounds": 1_000 if q else 10_000},
    description="Median round trip of a small int between two processes: one sends i and "
    "waits for i + 1 from the other (mpchan: two Channel(capacity=1); queues: "
    "two queues; Pipe: one duplex pipe). Measures wake-up latency; lower is "
    "better.",
)


def _array_scenario(mib: int, full_count: int, quick_count: int) -> Scenario:
    contenders = [
        _contender(n, _arrays(n, make)) for n, make in [MPCHAN, MP_QUEUE, PIPE, FASTER_FIFO]
    ]
    contenders.append(Contender("memcpy (np.copyto)", _memcpy, kind="reference"))
    return Scenario(
        name=f"chan_array_{mib}MiB",
        group=GROUP,
        label=f"1→1 numpy arrays: {mib} MiB x {{count}}",
        unit="GB/s",
        higher_is_better=True,
        contenders=tuple(contenders),
        params=lambda q: {"nbytes": mib * MiB, "count": quick_count if q else full_count},
        requires=("numpy",),
        description=f"Bandwidth of sending distinct {mib} MiB int64 numpy arrays from one "
        "process to another (GB = 10^9 bytes), with in-process np.copyto of the "
        "same size as the machine's reference; mpchan's ratio on that row is "
        "the fraction of memcpy bandwidth it reaches. mpchan Channel and "
        f"faster_fifo hold about {ARRAY_CAPACITY} arrays; mp.Queue is "
        "unbounded.",
    )


ARRAYS = [_array_scenario(1, 32, 8), _array_scenario(8, 16, 4), _array_scenario(64, 4, 2)]

IDLE = Scenario(
    name="chan_idle_cpu",
    group=GROUP,
    label="idle receiver: blocked recv for {seconds} s",
    unit="% CPU",
    higher_is_better=False,
    compare=False,
    contenders=(
        _contender("mpchan", _idle_cpu(_mpchan_link)),
        _contender("mp.Queue", _idle_cpu(_mp_queue_link)),
    ),
    params=lambda q: {"seconds": 0.5 if q else 2.0},
    requires=("psutil",),
    description="CPU used by a process blocked in recv on an empty channel (mp.Queue.get "
    "as the reference), read with psutil from the parent. Should be ~0: a "
    "blocked call must not spin.",
)

SCENARIOS: list[Scenario] = [SMALL_INT, SMALL_BYTES, SMALL_4TO4, BATCHED, PINGPONG, *ARRAYS, IDLE]
