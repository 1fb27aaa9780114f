"""``mpchan run``, end to end through a real subprocess (``python -m mpchan run``)."""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent

JOBS = """
import time

def double(x):
    return int(x) * 2

def parse(line):
    return int(line.split(",")[1])

def record(obj):
    return {"id": obj["id"], "total": sum(obj["values"])}

def picky(x):
    if int(x) % 3 == 0:
        raise ValueError(f"no multiples of three: {x}")
    return int(x)

def slow(x):
    time.sleep(0.05)
    return int(x) * 2

def stuck(x):
    if int(x) > 0:
        time.sleep(60)
    return int(x)

not_callable = 42
"""


@pytest.fixture
def jobs(tmp_path: Path) -> Path:
    """A directory holding ``jobs.py``, used as the working directory of the command."""
    (tmp_path / "jobs.py").write_text(JOBS)
    return tmp_path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("COLUMNS", None)
    return env


def mpchan_run(
    *args: str, cwd: Path, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpchan", "run", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(),
        timeout=timeout,
        check=False,
    )


def test_range_output_is_ordered(jobs: Path) -> None:
    sys.path.insert(0, str(ROOT))
    try:
        from workers import primes
    finally:
        sys.path.remove(str(ROOT))
    r = mpchan_run(
        "workers.primes:count", "--range", "0:40", "--workers", "3", "--no-progress", cwd=jobs
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(primes.count(i)) for i in range(40)]


def test_unordered_output_has_everything(jobs: Path) -> None:
    r = mpchan_run("jobs:double", "--range", "0:100", "--unordered", "--chunksize", "7", cwd=jobs)
    assert r.returncode == 0, r.stderr
    assert sorted(map(int, r.stdout.split())) == [2 * i for i in range(100)]


def test_stdin_and_two_stage_pipeline(jobs: Path) -> None:
    lines = "".join(f"row{i},{i}\n" for i in range(50))
    r = mpchan_run("jobs:parse", "jobs:double@2", "--workers", "2", cwd=jobs, stdin=lines)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(2 * i) for i in range(50)]


def test_json_lines_in_and_out_with_files(jobs: Path) -> None:
    src = jobs / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"id": i, "values": list(range(i))}) + "\n" for i in range(20)) + "\n"
    )
    out = jobs / "out.jsonl"
    r = mpchan_run("jobs:record", "--jsonl", "--input", str(src), "--output", str(out), cwd=jobs)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got == [{"id": i, "total": sum(range(i))} for i in range(20)]


def test_on_error_skip(jobs: Path) -> None:
    r = mpchan_run("jobs:picky", "--range", "0:30", "--on-error", "skip", cwd=jobs)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(i) for i in range(30) if i % 3]
    assert "10 item(s) failed" in r.stderr
    assert "Traceback" not in r.stderr


def test_failed_task_exits_1_with_its_traceback(jobs: Path) -> None:
    r = mpchan_run("jobs:picky", "--range", "1:30", cwd=jobs)
    assert r.returncode == 1
    assert "no multiples of three: 3" in r.stderr
    assert "picky" in r.stderr  # the remote traceback names the function


def test_retries_and_timeout_options_are_accepted(jobs: Path) -> None:
    r = mpchan_run("jobs:stuck", "--range", "0:2", "--timeout", "0.3", "--retries", "1", cwd=jobs)
    assert r.returncode == 1
    assert "TaskTimeout" in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nocolon"], "expected MODULE:FUNC"),
        (["no_such_module_xyz:f", "--range", "0:3"], "no module named"),
        (["jobs:nosuch", "--range", "0:3"], "has no 'nosuch'"),
        (["jobs:not_callable", "--range", "0:3"], "not callable"),
        (["jobs:double@x", "--range", "0:3"], "worker count"),
        (["jobs:double@0", "--range", "0:3"], "worker count"),
        (["jobs:double", "--range", "3"], "expected A:B"),
        (["jobs:double", "--input", "/nonexistent/file.txt"], "cannot read"),
        (["jobs:double", "--output", "/nonexistent/dir/out.txt", "--range", "0:3"], "cannot write"),
        (["jobs:double", "--range", "0:3", "--input", "x"], "either --range or --input"),
        (["jobs:double", "--range", "0:3", "--metrics-port", "70000"], "from 0 to 65535"),
        (["jobs:double", "--range", "0:3", "--trace", "/nonexistent/t.json"], "--trace: cannot"),
    ],
)
def test_bad_usage_is_one_line_and_status_2(jobs: Path, args: list[str], message: str) -> None:
    r = mpchan_run(*args, cwd=jobs, stdin="")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert message in lines[0]
    assert "Traceback" not in r.stderr


def test_malformed_json_is_one_line_and_status_2(jobs: Path) -> None:
    r = mpchan_run("jobs:record", "--jsonl", cwd=jobs, stdin='{"id": 1, "values": []}\n{oops\n')
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "<stdin>:2: malformed JSON" in lines[0]


def test_unreadable_input_is_status_2(jobs: Path) -> None:
    bad = jobs / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe\n")
    r = mpchan_run("jobs:double", "--input", str(bad), cwd=jobs)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot read" in r.stderr


# --------------------------------------------------------------------------- signals


def _start(args: list[str], cwd: Path, stdin: int | None = None) -> subprocess.Popen[bytes]:
    # Unbuffered: reading the first line must not read ahead into a buffer that
    # communicate() would then skip.
    return subprocess.Popen(
        [sys.executable, "-m", "mpchan", "run", *args, "--no-progress"],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
        cwd=cwd,
        env=_env(),
        start_new_session=True,
    )


def _first_line(p: subprocess.Popen[bytes], timeout: float = 30) -> str:
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    assert ready, "no output in time"
    return p.stdout.readline().decode()


def _communicate(p: subprocess.Popen[bytes]) -> tuple[str, str]:
    out, err = p.communicate(timeout=30)
    return out.decode(), err.decode()


def _tree(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_drains_in_flight_items(jobs: Path, sig: int, status: int) -> None:
    _drain_once(jobs, sig, status)


@pytest.mark.stress
@pytest.mark.timeout(600)
def test_sigint_drain_loses_nothing_over_10_runs(jobs: Path) -> None:
    """The issue's figure: 10 runs interrupted at once, 0 in-flight results lost."""
    for _ in range(10):
        _drain_once(jobs, signal.SIGINT, 130)


def _drain_once(jobs: Path, sig: int, status: int) -> None:
    p = _start(["jobs:slow", "--range", "0:1000000", "--workers", "4"], jobs)
    try:
        first = _first_line(p)
        kids = _tree(p.pid)
        os.kill(p.pid, sig)
        out, err = _communicate(p)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    values = [int(v) for v in [first, *out.splitlines()]]
    assert p.returncode == status, err
    # ordered output: every item read before the drain was finished and written
    assert values == [2 * i for i in range(len(values))]
    assert len(values) < 1000000
    # and nothing read was dropped: as many items read as results written
    n = len(values)
    assert f"drained: {n} item(s) read, {n} result(s) written" in err, err
    assert "Traceback" not in err
    _gone, alive = psutil.wait_procs(kids, timeout=5)
    assert not alive, alive


def test_second_sigint_ends_it_fast(jobs: Path) -> None:
    p = _start(["jobs:stuck", "--range", "0:100", "--workers", "2"], jobs)
    try:
        assert _first_line(p).strip() == "0"
        kids = _tree(p.pid)
        os.kill(p.pid, signal.SIGINT)
        # the drain cannot finish (tasks sleep a minute); a second Ctrl-C cancels
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(timeout=0.5)
        started = time.monotonic()
        os.kill(p.pid, signal.SIGINT)
        _out, err = _communicate(p)
        elapsed = time.monotonic() - started
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert elapsed < 10
    assert "Traceback" not in err
    _gone, alive = psutil.wait_procs(kids, timeout=5)
    assert not alive, alive


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_start_method(jobs: Path, method: str) -> None:
    r = mpchan_run("jobs:double", "--range", "0:20", "--start-method", method, cwd=jobs)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(2 * i) for i in range(20)]


def test_progress_bar_goes_to_stderr(jobs: Path) -> None:
    pytest.importorskip("tqdm")
    r = mpchan_run("jobs:double", "--range", "0:30", "--progress", cwd=jobs)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(2 * i) for i in range(30)]
    assert "30/30" in r.stderr


def test_sigint_drains_while_waiting_for_stdin(jobs: Path) -> None:
    p = _start(["jobs:double"], jobs, stdin=subprocess.PIPE)
    assert p.stdin is not None and p.stdout is not None
    try:
        p.stdin.write(b"1\n2\n3\n")  # and keep stdin open: the reader blocks
        lines = [p.stdout.readline() for _ in range(3)]
        assert [int(v) for v in lines] == [2, 4, 6]
        os.kill(p.pid, signal.SIGINT)
        p.wait(timeout=30)  # stdin still open: the drain must not wait for its end
        assert p.stderr is not None
        out, err = p.stdout.read(), p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdin.close()
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()
    assert p.returncode == 130, err
    assert out == b""
    assert b"drained: 3 item(s) read, 3 result(s) written" in err


def test_reader_going_away_ends_quietly(jobs: Path) -> None:
    p = _start(["jobs:double", "--range", "0:1000000"], jobs)
    assert p.stdout is not None and p.stderr is not None
    try:
        assert p.stdout.readline() == b"0\n"
        p.stdout.close()  # as `| head -1` does
        p.wait(timeout=30)
        err = p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()
    assert p.returncode == 128 + signal.SIGPIPE, err
    assert b"Traceback" not in err


# --------------------------------------------------------------------------- observability


def _load_trace(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[int, str]]:
    """(the whole document, its task events, process name by pid)."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["displayTimeUnit"] == "ms"
    events = doc["traceEvents"]
    tasks = [e for e in events if e["ph"] == "X"]
    names = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e["ph"] == "M" and e["name"] == "process_name"
    }
    return doc, tasks, names


def test_trace_has_one_event_per_item_per_stage(jobs: Path) -> None:
    trace = jobs / "run.json"
    p = subprocess.Popen(
        [
            *(sys.executable, "-m", "mpchan", "run", "jobs:double@2", "jobs:picky@2"),
            *("--range", "0:50", "--on-error", "skip", "--trace", str(trace), "--no-progress"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=jobs,
        env=_env(),
    )
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    # picky(2x) fails for every x divisible by 3
    assert out.splitlines() == [str(2 * x) for x in range(50) if x % 3]
    doc, tasks, names = _load_trace(trace)
    assert doc["otherData"]["dropped_events"] == 0
    by_stage: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for e in tasks:
        assert e["cat"] == "task"
        assert e["ts"] >= 0 and e["dur"] >= 0
        assert e["tid"] == e["args"]["stage"]
        by_stage[e["args"]["stage"]].append(e)
    assert len(by_stage[1]) == 50 and len(by_stage[2]) == 50
    assert {e["name"] for e in by_stage[1]} == {"jobs:double"}
    assert {e["name"] for e in by_stage[2]} == {"jobs:picky"}
    assert all(e["args"]["outcome"] == "ok" for e in by_stage[1])
    outcomes = sorted(e["args"]["outcome"] for e in by_stage[2])
    assert outcomes == ["ok"] * 33 + ["skipped"] * 17
    errors = {e["args"]["error"] for e in by_stage[2] if e["args"]["outcome"] == "skipped"}
    assert errors == {f"ValueError: no multiples of three: {2 * x}" for x in range(0, 50, 3)}
    # every event comes from a named worker process of its stage, not from mpchan run
    pids = {s: {e["pid"] for e in evs} for s, evs in by_stage.items()}
    assert p.pid not in pids[1] | pids[2]
    assert not pids[1] & pids[2]
    assert 1 <= len(pids[1]) <= 2 and 1 <= len(pids[2]) <= 2
    for pid in pids[1]:
        assert names[pid] == "stage 1 worker: jobs:double"
    for pid in pids[2]:
        assert names[pid] == "stage 2 worker: jobs:picky"
    # a worker's items follow one another on its lane
    for evs in by_stage.values():
        for pid in {e["pid"] for e in evs}:
            lane = sorted((e["ts"], e["dur"]) for e in evs if e["pid"] == pid)
            for (t0, d0), (t1, _d1) in itertools.pairwise(lane):
                assert t0 + d0 <= t1 + 1  # microseconds, rounded


def test_trace_is_written_when_the_run_fails(jobs: Path) -> None:
    trace = jobs / "failed.json"
    r = mpchan_run("jobs:picky", "--range", "1:30", "--trace", str(trace), cwd=jobs)
    assert r.returncode == 1
    _doc, tasks, _names = _load_trace(trace)
    outcomes = [e["args"]["outcome"] for e in tasks]
    assert "error: ValueError: no multiples of three: 3" in outcomes
    assert all(o == "ok" or o.startswith("error: ValueError") for o in outcomes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body: bytes = resp.read()
            return body.decode()
    except (urllib.error.URLError, ConnectionError):
        return None


def test_metrics_port_serves_while_it_runs(jobs: Path) -> None:
    port = _free_port()
    p = _start(["jobs:slow@2", "--range", "0:100000", "--metrics-port", str(port)], jobs)
    try:
        # poll until the endpoint answers with the pipeline's stage metrics
        text = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and p.poll() is None:
            text = _scrape(port)
            if text is not None and "mpchan_stream_stage_chunks_received_total" in text:
                break
            time.sleep(0.05)
        assert p.poll() is None, "mpchan run ended before it was scraped"
        assert text is not None, "the metrics endpoint never answered"
        kids = _tree(p.pid)
        os.kill(p.pid, signal.SIGINT)
        _out, err = _communicate(p)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert f"metrics on http://127.0.0.1:{port}/metrics" in err
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, val = line.rpartition(" ")
            samples[name] = float(val)
    assert samples['mpchan_workers{state="busy"}'] >= 2
    received = [
        v
        for k, v in samples.items()
        if k.startswith("mpchan_stream_stage_chunks_received_total{")
        and 'fn="map(slow)"' in k
        and 'stage="0"' in k
    ]
    assert len(received) == 1 and received[0] >= 0
    assert "# TYPE mpchan_stream_stage_chunks_received_total counter" in text
    # the server went with the program
    assert _scrape(port) is None
    _gone, alive = psutil.wait_procs(kids, timeout=5)
    assert not alive, alive


def test_metrics_port_in_use_is_status_2(jobs: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = mpchan_run("jobs:double", "--range", "0:3", "--metrics-port", str(port), cwd=jobs)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"--metrics-port {port}: cannot serve metrics on 127.0.0.1:{port}" in lines[0]
    assert r.stdout == ""
