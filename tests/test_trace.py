"""The trace writer of ``mpchan run --trace`` (``mpchan._trace``), on made-up records.

The end-to-end run (real workers, real pids) is in ``test_cli_run.py``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from mpchan import _trace

START = 1000.0

RECORDS = [
    {"stage": 0, "pid": 11, "dropped": 0, "events": [(1000.5, 1000.75, "ok", None)]},
    {
        "stage": 1,
        "pid": 12,
        "dropped": 3,
        "events": [
            (1001.0, 1001.5, "skipped", "ValueError: bad"),
            (1002.0, 1002.25, "error", "KeyError: 'k'"),
        ],
    },
]


def test_events_are_complete_events_in_microseconds_with_process_names() -> None:
    events = list(_trace.trace_events(RECORDS, ["m:first", "m:second"], start=START))
    meta = [e for e in events if e["ph"] == "M"]
    tasks = [e for e in events if e["ph"] == "X"]
    assert events.index(meta[-1]) < events.index(tasks[0])  # metadata first
    names = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    assert names == {11: "stage 1 worker: m:first", 12: "stage 2 worker: m:second"}
    assert tasks == [
        {
            "ph": "X",
            "name": "m:first",
            "cat": "task",
            "pid": 11,
            "tid": 1,
            "ts": 500000.0,
            "dur": 250000.0,
            "args": {"stage": 1, "outcome": "ok"},
        },
        {
            "ph": "X",
            "name": "m:second",
            "cat": "task",
            "pid": 12,
            "tid": 2,
            "ts": 1000000.0,
            "dur": 500000.0,
            "args": {"stage": 2, "outcome": "skipped", "error": "ValueError: bad"},
        },
        {
            "ph": "X",
            "name": "m:second",
            "cat": "task",
            "pid": 12,
            "tid": 2,
            "ts": 2000000.0,
            "dur": 250000.0,
            "args": {"stage": 2, "outcome": "error: KeyError: 'k'"},
        },
    ]


def test_write_trace_is_the_json_object_form_with_dropped_counts() -> None:
    out = io.StringIO()
    n = _trace.write_trace(out, RECORDS, ["m:first", "m:second"], start=START, other={"x": 1})
    assert n == 3
    doc = json.loads(out.getvalue())
    assert doc["displayTimeUnit"] == "ms"
    assert doc["otherData"]["x"] == 1
    assert doc["otherData"]["dropped_events"] == 3
    assert doc["otherData"]["dropped_events_by_pid"] == {"12": 3}
    assert sum(e["ph"] == "X" for e in doc["traceEvents"]) == 3


def test_an_empty_run_still_writes_a_valid_trace(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    with _trace.open_trace(str(path)) as fh:
        assert _trace.write_trace(fh, [], [], start=START) == 0
    doc = json.loads(path.read_text())
    assert doc["traceEvents"] == []
    assert doc["otherData"]["dropped_events"] == 0


def test_open_trace_raises_for_an_unwritable_path(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        _trace.open_trace(str(tmp_path / "no" / "such" / "dir" / "t.json"))
