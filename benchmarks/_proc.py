"""Run one measurement's processes, collect what they report, leave nothing behind.

Every contender of every scenario starts its processes through :func:`run_processes`,
so they are all started the same way (``multiprocessing.get_context("fork")``), and each
process reports its own measurement (``time.perf_counter`` readings, counts, checksums)
back to the parent over a private one-way pipe that is not part of what is measured.

Data flow::

    parent --fork--> child i: fn(*args) --result--> pipe i --> parent (results[i])

Invariants:
    - every process started here is joined before ``run_processes`` returns or raises;
      one that does not finish in time is killed by its PID (SIGKILL) and then joined;
    - the first failure (an exception in a child, a child that exits without reporting,
      or the deadline) kills the remaining children at once, so a child blocked forever
      on a broken contender cannot hang the run.

Ownership:
    - the parent creates and closes both ends of each result pipe; a child only writes.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

FORK = multiprocessing.get_context("fork")
"""The one start method used for every contender's processes."""

Job = tuple[Callable[..., Any], tuple[Any, ...]]
"""A function to run in a fresh process and its arguments (inherited through fork)."""


class ProcessFailed(RuntimeError):
    """A benchmark process raised, died without reporting, or ran past its deadline."""


def _child_main(
    conn: multiprocessing.connection.Connection, fn: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    """Run ``fn(*args)`` and send ``("ok", result)`` or ``("err", traceback)`` to the parent."""
    # Whatever this process and the peers' processes it starts print goes to
    # stderr: stdout is the report (``mpchan bench > table.md``).
    sys.stdout.flush()
    os.dup2(2, 1)
    try:
        result = fn(*args)
    except BaseException:
        conn.send(("err", traceback.format_exc()))
    else:
        conn.send(("ok", result))
    finally:
        conn.close()


def _stop(procs: Sequence[multiprocessing.process.BaseProcess], grace: float) -> None:
    """Join every process, killing by PID any that is still alive after ``grace`` seconds."""
    deadline = time.monotonic() + grace
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join()


def run_processes(
    jobs: Sequence[Job],
    *,
    timeout: float,
    while_running: Callable[[list[int]], Any] | None = None,
) -> tuple[list[Any], Any]:
    """Run each job in its own fresh forked process and return what each one returned.

    ``while_running``, if given, is called in the parent with the children's PIDs once
    they have all started (the idle-CPU scenario samples them from there); its return
    value is the second element of the result.

    Blocks: until every child has reported and exited, or ``timeout`` seconds passed.
    Raises :class:`ProcessFailed` on the first failure, after killing and joining all.
    """
    procs: list[multiprocessing.process.BaseProcess] = []
    readers: list[multiprocessing.connection.Connection] = []
    ok = False
    try:
        for fn, args in jobs:
            reader, writer = FORK.Pipe(duplex=False)
            readers.append(reader)
            proc = FORK.Process(target=_child_main, args=(writer, fn, args), daemon=True)
            proc.start()
            writer.close()
            procs.append(proc)
        deadline = time.monotonic() + timeout
        extra = (
            while_running([p.pid for p in procs if p.pid is not None]) if while_running else None
        )
        results: list[Any] = [None] * len(jobs)
        pending: dict[Any, int] = {reader: index for index, reader in enumerate(readers)}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProcessFailed(
                    f"timed out after {timeout:.0f} s "
                    f"({len(pending)} of {len(jobs)} processes unfinished)"
                )
            for ready in multiprocessing.connection.wait(list(pending), timeout=left):
                index = pending.pop(ready)
                reader = readers[index]
                try:
                    status, value = reader.recv()
                except EOFError:
                    procs[index].join(1.0)
                    raise ProcessFailed(
                        f"process {procs[index].pid} exited (code {procs[index].exitcode}) "
                        "without reporting"
                    ) from None
                if status != "ok":
                    raise ProcessFailed(f"process {procs[index].pid} raised:\n{value}")
                results[index] = value
        ok = True
        return results, extra
    finally:
        # On success children are already on their way out (they reported last thing);
        # on failure there is nothing worth waiting for.
        _stop(procs, grace=max(0.0, min(30.0, timeout)) if ok else 0.0)
        for reader in readers:
            reader.close()
