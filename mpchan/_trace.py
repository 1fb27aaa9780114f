"""Chrome trace-event files of a pipeline run (edge module, used by ``mpchan run --trace``).

The file is the JSON object form of the Trace Event Format, which Perfetto
(https://ui.perfetto.dev) and chrome://tracing open::

    {"displayTimeUnit": "ms",
     "otherData": {"generator": ..., "dropped_events": N, ...},
     "traceEvents": [
       {"ph": "M", "name": "process_name", "pid": P, "args": {"name": "stage 1 worker: mod:fn"}},
       {"ph": "X", "name": "mod:fn", "cat": "task", "pid": P, "tid": 1,
        "ts": 1234.5, "dur": 80.25, "args": {"stage": 1, "outcome": "ok"}},
       ...]}

One process (lane group) per stage worker, one complete ("X") event per
item it ran: ``ts`` and ``dur`` in microseconds from the start of the run,
``tid`` and ``args.stage`` the stage number (1 = the first function of the
command line), ``args.outcome`` ``"ok"``, ``"error: Type: message"`` (the
item that stopped the run) or ``"skipped"`` (failed under ``--on-error
skip``; ``args.error`` says why).  Workers record at most a fixed number of
events each; ``otherData.dropped_events`` counts the rest.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

__all__ = ["open_trace", "trace_events", "write_trace"]

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def open_trace(path: str) -> IO[str]:
    """Open (create or truncate) the trace file, before the run starts.

    Raises OSError when it cannot be written. Never blocks (beyond the open).
    """
    return open(path, "w", encoding="utf-8")  # the caller closes it


def trace_events(
    records: Iterable[dict[str, Any]], labels: Sequence[str], *, start: float
) -> Iterator[dict[str, Any]]:
    """The trace events of ``records`` (``_stream.trace_records(s)``).

    ``labels`` names the stages by index; ``start`` is the ``time.monotonic()``
    of the start of the run (time zero). Metadata events come first. Never blocks.
    """
    records = list(records)
    names: dict[int, list[str]] = {}
    for rec in records:
        stage = int(rec["stage"])
        text = f"stage {stage + 1} worker: {_label(labels, stage)}"
        names.setdefault(int(rec["pid"]), [])
        if text not in names[int(rec["pid"])]:
            names[int(rec["pid"])].append(text)
    for rec in records:
        pid, stage = int(rec["pid"]), int(rec["stage"])
        if pid not in names:
            continue  # already described
        title = ", ".join(names[pid])
        yield {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": title}}
        yield {"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": stage}}
        yield {
            "ph": "M",
            "name": "thread_name",
            "pid": pid,
            "tid": stage + 1,
            "args": {"name": f"stage {stage + 1}"},
        }
        del names[pid]
    for rec in records:
        pid, stage = int(rec["pid"]), int(rec["stage"])
        name = _label(labels, stage)
        for t0, t1, outcome, error in rec["events"]:
            args: dict[str, Any] = {"stage": stage + 1}
            if outcome == "error":
                args["outcome"] = f"error: {error}"
            else:
                args["outcome"] = outcome
                if error is not None:
                    args["error"] = error
            yield {
                "ph": "X",
                "name": name,
                "cat": "task",
                "pid": pid,
                "tid": stage + 1,
                "ts": round((t0 - start) * 1e6, 3),
                "dur": round(max(0.0, t1 - t0) * 1e6, 3),
                "args": args,
            }


def write_trace(
    fh: IO[str],
    records: Sequence[dict[str, Any]],
    labels: Sequence[str],
    *,
    start: float,
    other: dict[str, Any] | None = None,
) -> int:
    """Write the trace of ``records`` to ``fh`` (see :func:`trace_events`);
    return how many task events it holds.

    ``other`` goes into ``otherData`` with the dropped-event counts. The
    events are written one by one, so a big trace is never held as text.
    Blocks: while writing. Raises OSError from the file.
    """
    dropped = {str(rec["pid"]): int(rec["dropped"]) for rec in records if rec["dropped"]}
    meta = {
        **(other or {}),
        "clock": "time.monotonic, microseconds from the start of the run",
        "workers": len(records),
        "dropped_events": sum(dropped.values()),
        "dropped_events_by_pid": dropped,
    }
    fh.write('{"displayTimeUnit":"ms","otherData":' + _dumps(meta) + ',"traceEvents":[\n')
    count = 0
    first = True
    for event in trace_events(records, labels, start=start):
        fh.write(("" if first else ",\n") + _dumps(event))
        first = False
        count += event["ph"] == "X"
    fh.write("\n]}\n")
    fh.flush()
    return count


def _label(labels: Sequence[str], stage: int) -> str:
    return labels[stage] if 0 <= stage < len(labels) else f"stage {stage + 1}"
