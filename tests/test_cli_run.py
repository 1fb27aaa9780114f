"""``mpchan run``, end to end through a real subprocess (``python -m mpchan run``)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def _start(args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    # Unbuffered: reading the first line must not read ahead into a buffer that
    # communicate() would then skip.
    return subprocess.Popen(
        [sys.executable, "-m", "mpchan", "run", *args, "--no-progress"],
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
    p = subprocess.Popen(
        [sys.executable, "-m", "mpchan", "run", "jobs:double", "--no-progress"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
        cwd=jobs,
        env=_env(),
        start_new_session=True,
    )
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
    p = subprocess.Popen(
        [sys.executable, "-m", "mpchan", "run", "jobs:double", "--range", "0:1000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
        cwd=jobs,
        env=_env(),
        start_new_session=True,
    )
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
