"""Runtime scenarios: cancellation latency, ``go`` latency, start-up, dying supervisors.

Every measurement runs in a fresh interpreter (``python -c PROGRAM PARAMS``), started
the same way for mpchan and its peers, which reports one JSON line on stdout. A fresh
interpreter is what makes "cold" and "start-up" numbers honest (nothing is cached from
an earlier measurement), and ``-c`` means spawned workers have no main module to
re-import, for mpchan and the peers alike. Tasks are builtins (``time.monotonic``,
``os.getpid``, ``time.sleep``) so a worker imports nothing of the benchmark.

Scenarios:
    - ``rt_cancel_wake`` / ``rt_cancel_wake_p99``: a worker blocked in
      ``ch.recv(ctx=ctx)``; the parent takes ``time.monotonic()`` and cancels; the
      worker takes ``time.monotonic()`` when ``Cancelled`` reaches it (one system-wide
      clock). Median / 99th percentile over the trials. Reference: a process blocked in
      ``multiprocessing.Event.wait()`` woken by ``set()``.
    - ``rt_go_warm``: ``go(time.monotonic)`` with a warm worker cached, from the call
      to the function starting (the value it returns); ProcessPoolExecutor ``submit``
      to a warm pool of one worker alike. ``rt_go_cold``: the first ``go`` of a
      program (supervisor, forkserver and worker started on the way) against a new
      ProcessPoolExecutor's first ``submit``, both with forkserver.
    - ``rt_startup_<method>``: from after the imports to the result of one task on a
      pool of 2: mpchan ``Supervisor(method, max_idle=2)`` then ``go`` (workers start
      on demand); ``ProcessPoolExecutor(max_workers=2, mp_context=method)`` then
      ``submit`` (on demand for spawn/forkserver, both at once for fork); and, as a
      reference row, mpchan starting both workers first (``prestart(2)``).
    - ``rt_sigkill_workers`` / ``rt_sigkill_segments``: a program with 2 workers busy
      in a task is killed with SIGKILL; live worker processes 1 s later, and files it
      left in the shared-memory directory 3 s later. Survivors are killed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from benchmarks.harness import Contender, Scenario, Skip, needs_modules

GROUP = "runtime"
ROOT = Path(__file__).resolve().parent.parent
SHM_DIR = "/dev/shm" if sys.platform.startswith("linux") else None
INFRA = ("resource_tracker", "semaphore_tracker", "forkserver", "mpchan._reaper")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("MPCHAN_SESSION", None)  # each program is a root of its own
    return env


def _run(program: str, params: Mapping[str, Any]) -> Any:
    """Run ``program`` in a fresh interpreter; return the JSON of its last stdout line."""
    args = {k: v for k, v in params.items() if k != "timeout"}
    out = subprocess.run(
        [sys.executable, "-c", program, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=params.get("timeout", 300),
        env=_env(),
        cwd=str(ROOT),
    )
    if out.returncode != 0 or not out.stdout.strip():
        raise RuntimeError(f"exit {out.returncode}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ms_stat(samples: list[float], which: str) -> float:
    if which == "median":
        return float(statistics.median(samples))
    ordered = sorted(samples)
    return float(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))])


# -------------------------------------------------------------------- cancel -> wake

CANCEL_MPCHAN = """
import json, sys, time
import mpchan

def blocked(ch, ctx, ready):
    ready.send(None)
    try:
        ch.recv(ctx=ctx)
    except mpchan.Cancelled:
        return time.monotonic()
    return None

p = json.loads(sys.argv[1])
ch, ready = mpchan.Channel(1), mpchan.Channel(1)
mpchan.go(time.monotonic).result()
out = []
for _ in range(p["trials"]):
    ctx, cancel = mpchan.with_cancel(mpchan.background())
    h = mpchan.go(blocked, ch, ctx, ready)
    ready.recv()
    while ch.stats()["blocked_receivers"] < 1:
        time.sleep(0.0002)
    time.sleep(0.002)  # let it settle into its wait
    t = time.monotonic()
    cancel()
    out.append((h.result() - t) * 1e3)
    del ctx, cancel, h
mpchan.shutdown()
print(json.dumps(out))
"""

CANCEL_EVENT = """
import json, sys, time, multiprocessing as mp

def blocked(ev, ready, q):
    ready.set()
    ev.wait()
    q.put(time.monotonic())

if __name__ == "__main__":
    p = json.loads(sys.argv[1])
    ctx = mp.get_context("fork")
    out = []
    for _ in range(p["trials"]):
        ev, ready, q = ctx.Event(), ctx.Event(), ctx.SimpleQueue()
        proc = ctx.Process(target=blocked, args=(ev, ready, q))
        proc.start()
        ready.wait()
        time.sleep(0.002)
        t = time.monotonic()
        ev.set()
        out.append((q.get() - t) * 1e3)
        proc.join()
    print(json.dumps(out))
"""


def _cancel(program: str, which: str) -> Callable[[Mapping[str, Any]], float]:
    def run(params: Mapping[str, Any]) -> float:
        return _ms_stat(_run(program, params), which)

    return run


def _cancel_scenario(which: str) -> Scenario:
    suffix = "" if which == "median" else "_p99"
    return Scenario(
        name=f"rt_cancel_wake{suffix}",
        group=GROUP,
        label=f"cancel → blocked worker wakes ({which}, {{trials}} trials)",
        unit="ms",
        higher_is_better=False,
        contenders=(
            Contender("mpchan", _cancel(CANCEL_MPCHAN, which), kind="mpchan"),
            Contender("mp.Event (wake-up only)", _cancel(CANCEL_EVENT, which)),
        ),
        params=lambda q: {"trials": 30 if q else 200},
        description="Time from the parent's cancel() to the moment a worker blocked in "
        "ch.recv(ctx=ctx) has Cancelled in hand, measured with time.monotonic in both "
        f"processes; {which} over the trials. Reference: multiprocessing.Event.set waking "
        "a process blocked in Event.wait (no cancellation semantics, just a wake-up).",
    )


# -------------------------------------------------------------------------- go latency

GO_WARM_MPCHAN = """
import json, statistics, sys, time
import mpchan
p = json.loads(sys.argv[1])
mpchan.go(time.monotonic).result()
out = []
for _ in range(p["calls"]):
    t = time.monotonic()
    out.append((mpchan.go(time.monotonic).result() - t) * 1e3)
mpchan.shutdown()
print(json.dumps(statistics.median(out)))
"""

GO_WARM_PPE = """
import json, statistics, sys, time, multiprocessing
from concurrent.futures import ProcessPoolExecutor
if __name__ == "__main__":
    p = json.loads(sys.argv[1])
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")) as ex:
        ex.submit(time.monotonic).result()
        out = []
        for _ in range(p["calls"]):
            t = time.monotonic()
            out.append((ex.submit(time.monotonic).result() - t) * 1e3)
    print(json.dumps(statistics.median(out)))
"""

GO_COLD_MPCHAN = """
import json, time
import mpchan
go = mpchan.go  # the facade is lazy: import what go needs before timing
t = time.monotonic()
started = go(time.monotonic).result()
mpchan.shutdown()
print(json.dumps((started - t) * 1e3))
"""

GO_COLD_PPE = """
import json, time, multiprocessing
from concurrent.futures import ProcessPoolExecutor
if __name__ == "__main__":
    t = time.monotonic()
    ex = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"))
    started = ex.submit(time.monotonic).result()
    ex.shutdown()
    print(json.dumps((started - t) * 1e3))
"""


def _value(program: str) -> Callable[[Mapping[str, Any]], float]:
    def run(params: Mapping[str, Any]) -> float:
        return float(_run(program, params))

    return run


GO_WARM = Scenario(
    name="rt_go_warm",
    group=GROUP,
    label="go() → function starts, warm worker (median of {calls})",
    unit="ms",
    higher_is_better=False,
    contenders=(
        Contender("mpchan", _value(GO_WARM_MPCHAN), kind="mpchan"),
        Contender("ProcessPoolExecutor", _value(GO_WARM_PPE)),
    ),
    params=lambda q: {"calls": 50 if q else 300},
    description="Time from go(time.monotonic) to the function starting in a cached idle "
    "worker (the value it returns), one call at a time; ProcessPoolExecutor.submit to a "
    "warm one-worker pool alike (forkserver).",
)

GO_COLD = Scenario(
    name="rt_go_cold",
    group=GROUP,
    label="first go() of a program → function starts",
    unit="ms",
    higher_is_better=False,
    contenders=(
        Contender("mpchan", _value(GO_COLD_MPCHAN), kind="mpchan"),
        Contender("ProcessPoolExecutor", _value(GO_COLD_PPE)),
    ),
    params=lambda q: {},
    description="In a fresh program (after import): the first go() -- supervisor, "
    "forkserver and worker start on the way -- against creating a forkserver "
    "ProcessPoolExecutor and its first submit, until the function starts.",
)


# ----------------------------------------------------------------------------- start-up

# CPU of the whole process tree since t0 (workers, forkserver, trackers, reaper).
TREE_CPU = """
import psutil

def tree_cpu(cpu0):
    me = psutil.Process()
    total = sum(me.cpu_times()[:2]) - cpu0
    for c in me.children(recursive=True):
        try:
            total += sum(c.cpu_times()[:2])
        except psutil.Error:
            pass
    return total * 1e3
"""

STARTUP_MPCHAN = (
    TREE_CPU
    + """
import json, os, sys, time
import mpchan
from mpchan import _go, _supervisor
p = json.loads(sys.argv[1])
cpu0 = sum(psutil.Process().cpu_times()[:2])
t0 = time.monotonic()
sup = _supervisor.Supervisor(p["method"], max_idle=2)
_supervisor.set_supervisor(sup)
if p.get("prestart"):
    sup.prestart(2)
mpchan.go(os.getpid).result()
elapsed = (time.monotonic() - t0) * 1e3
cpu = tree_cpu(cpu0)
workers = len(sup.pids())
mpchan.shutdown()
print(json.dumps([elapsed, workers, cpu]))
"""
)

STARTUP_PPE = (
    TREE_CPU
    + """
import json, os, sys, time, multiprocessing
from concurrent.futures import ProcessPoolExecutor
if __name__ == "__main__":
    p = json.loads(sys.argv[1])
    cpu0 = sum(psutil.Process().cpu_times()[:2])
    t0 = time.monotonic()
    ex = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(p["method"]))
    ex.submit(os.getpid).result()
    elapsed = (time.monotonic() - t0) * 1e3
    cpu = tree_cpu(cpu0)
    workers = len(ex._processes)
    ex.shutdown()
    print(json.dumps([elapsed, workers, cpu]))
"""
)


def _startup(program: str, cpu: bool = False, **extra: Any) -> Callable[[Mapping[str, Any]], float]:
    def run(params: Mapping[str, Any]) -> float:
        if extra and params.get("quick"):
            raise Skip("measured in full runs only")
        elapsed, _workers, cpu_ms = _run(program, {**params, **extra})
        return float(cpu_ms if cpu else elapsed)

    return run


def _startup_cpu_scenario(method: str) -> Scenario:
    return Scenario(
        name=f"rt_startup_cpu_{method}",
        group=GROUP,
        label=f"pool of 2 workers, 1 task: CPU of the process tree ({method})",
        unit="ms CPU",
        higher_is_better=False,
        contenders=(
            Contender("mpchan", _startup(STARTUP_MPCHAN, cpu=True), kind="mpchan"),
            Contender("ProcessPoolExecutor", _startup(STARTUP_PPE, cpu=True)),
        ),
        params=lambda q: {"method": method},
        requires=("psutil",),
        description=f"The same runs as rt_startup_{method}, measured in CPU time (user + "
        "system) of the program and every process it started, from t0 to the first "
        "result (read with psutil). On a busy machine wall-clock start-up mostly "
        "measures the scheduler; this is the work each actually did, mpchan's reaper "
        "and any forkserver or tracker included.",
    )


def _startup_scenario(method: str) -> Scenario:
    return Scenario(
        name=f"rt_startup_{method}",
        group=GROUP,
        label=f"pool of 2 workers, 1 task: start-up ({method})",
        unit="ms",
        higher_is_better=False,
        contenders=(
            Contender("mpchan", _startup(STARTUP_MPCHAN), kind="mpchan"),
            Contender("ProcessPoolExecutor", _startup(STARTUP_PPE)),
            Contender(
                "mpchan, prestart(2) first",
                _startup(STARTUP_MPCHAN, prestart=True),
                kind="reference",
            ),
        ),
        params=lambda q: {"method": method},
        description=f"From after the imports of a fresh program to the result of one "
        f"task on a pool of 2, start method {method}. mpchan: Supervisor(max_idle=2) + "
        "go(), which starts workers on demand (here one); ProcessPoolExecutor("
        "max_workers=2) + submit(), which starts them on demand for spawn and forkserver "
        "(one) and all at once for fork (two). The reference row makes mpchan start both "
        "workers first (Supervisor.prestart(2)), then go().",
    )


# ------------------------------------------------------------------------ SIGKILL

# Each program starts 2 workers busy in time.sleep(3600), waits until both are
# running, prints {"pids": [worker pids], "token": ...} and blocks.
KILL_COMMON = """
import json, os, sys, threading, time
import psutil
INFRA = __INFRA__

def workers():
    # Infrastructure (resource trackers, a forkserver, mpchan's reaper) runs as
    # direct children with a short command line of its own; everything else
    # below this program is a worker (a forkserver's children included).
    out = []
    for c in psutil.Process().children(recursive=True):
        try:
            args = [a for a in c.cmdline() if len(a) < 400]
            direct = c.ppid() == os.getpid()
        except psutil.Error:
            continue
        if not (direct and any(k in a for a in args for k in INFRA)):
            out.append(c.pid)
    return out

def report(token="", pids=None):
    deadline = time.monotonic() + 60
    while len(workers()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    print(json.dumps({"pids": pids or workers(), "token": token}), flush=True)
    threading.Event().wait()
""".replace("__INFRA__", repr(INFRA))

KILL_PROGRAMS = {
    "mpchan": """
import mpchan
ch = mpchan.Channel(4)
ch.send(b"x" * 100000)
ctx, cancel = mpchan.with_cancel(mpchan.background())
hs = [mpchan.go(time.sleep, 3600) for _ in range(2)]
report(os.environ["MPCHAN_SESSION"].partition(":")[0], [h.pid for h in hs])
""",
    "ProcessPoolExecutor": """
from concurrent.futures import ProcessPoolExecutor
if __name__ == "__main__":
    ex = ProcessPoolExecutor(2)
    fs = [ex.submit(time.sleep, 3600) for _ in range(2)]
    report()
""",
    "multiprocessing.Pool": """
import multiprocessing
if __name__ == "__main__":
    pool = multiprocessing.Pool(2)
    rs = [pool.apply_async(time.sleep, (3600,)) for _ in range(2)]
    report()
""",
    "loky": """
import loky
if __name__ == "__main__":
    ex = loky.get_reusable_executor(max_workers=2)
    fs = [ex.submit(time.sleep, 3600) for _ in range(2)]
    report()
""",
    "joblib": """
import joblib
if __name__ == "__main__":
    run = lambda: joblib.Parallel(n_jobs=2)(joblib.delayed(time.sleep)(3600) for _ in range(2))
    threading.Thread(target=run, daemon=True).start()
    report()
""",
    "mpire": """
import mpire
if __name__ == "__main__":
    pool = mpire.WorkerPool(n_jobs=2)
    rs = [pool.apply_async(time.sleep, (3600,)) for _ in range(2)]
    report()
""",
    "pebble": """
import pebble
if __name__ == "__main__":
    pool = pebble.ProcessPool(max_workers=2)
    fs = [pool.schedule(time.sleep, args=(3600,)) for _ in range(2)]
    report()
""",
}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _shm_files() -> set[str]:
    return set(os.listdir(SHM_DIR)) if SHM_DIR else set()


def _kill_run(name: str, what: str) -> Callable[[Mapping[str, Any]], float]:
    """SIGKILL a program holding 2 busy workers; count what is left."""

    def run(params: Mapping[str, Any]) -> float:
        before = _shm_files()
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_COMMON + KILL_PROGRAMS[name]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=str(ROOT),
        )
        info: dict[str, Any] = {"pids": [], "token": ""}
        try:
            assert proc.stdout is not None and proc.stderr is not None
            line = proc.stdout.readline()
            if not line:
                proc.wait(30)
                raise RuntimeError(proc.stderr.read()[-2000:])
            info = json.loads(line)
            if len(info["pids"]) < 2:
                raise RuntimeError(f"expected 2 workers, found {info['pids']}")
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            killed = time.monotonic()
            if what == "workers":
                # what is still alive 1 s later (polled: all gone ends it early)
                while time.monotonic() - killed < 1.0:
                    if not any(_alive(p) for p in info["pids"]):
                        return 0.0
                    time.sleep(0.01)
                return float(sum(_alive(p) for p in info["pids"]))

            def left() -> set[str]:
                new = _shm_files() - before
                if info["token"]:
                    return {f for f in new if f.startswith(f"mpchan-{info['token']}-")}
                return {f for f in new if not f.startswith("mpchan-")}

            while time.monotonic() - killed < 3.0 and left():
                time.sleep(0.02)
            return float(len(left()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pid in info["pids"]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()

    return run


def _kill_scenario(what: str) -> Scenario:
    contenders = [Contender("mpchan", _kill_run("mpchan", what), kind="mpchan")]
    modules = {"loky": "loky", "joblib": "joblib", "mpire": "mpire", "pebble": "pebble"}
    for name in KILL_PROGRAMS:
        if name == "mpchan":
            continue
        module = modules.get(name)
        available = needs_modules(module) if module else (lambda: None)
        contenders.append(Contender(name, _kill_run(name, what), available=available))
    unit = "workers alive" if what == "workers" else "files left"
    after = "1 s" if what == "workers" else "3 s"
    return Scenario(
        name=f"rt_sigkill_{what}",
        group=GROUP,
        label=f"supervisor SIGKILLed with 2 busy workers: {what} left after {after}",
        unit=unit,
        higher_is_better=False,
        compare=False,
        contenders=tuple(contenders),
        params=lambda q: {},
        requires=("psutil",),
        description="A program with 2 workers busy in a task (and, for mpchan, a channel "
        "holding an out-of-band payload and a context) is killed with SIGKILL. "
        + (
            "Counted: its worker processes still alive (not zombies) 1 s later."
            if what == "workers"
            else "Counted: files it created in /dev/shm still there 3 s later (mpchan: "
            "files of its session; peers: new files not named mpchan-*)."
        ),
    )


SCENARIOS: list[Scenario] = [
    _cancel_scenario("median"),
    _cancel_scenario("p99"),
    GO_WARM,
    GO_COLD,
    *(_startup_scenario(m) for m in ("fork", "forkserver", "spawn")),
    *(_startup_cpu_scenario(m) for m in ("fork", "forkserver", "spawn")),
    _kill_scenario("workers"),
    _kill_scenario("segments"),
]
