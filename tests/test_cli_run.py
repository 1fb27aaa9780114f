"""``mpchan run``, end to end through a real subprocess (``python -m mpchan run``)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

from mpchan._compat import SHM_DIR

ROOT = Path(__file__).resolve().parent.parent
RUN_ITEMS = Path(__file__).resolve().parent / "scripts" / "run_items.py"

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
    """A directory holding ``jobs.py`` and ``run_items.py`` (the workloads of
    the failure tests), used as the working directory of the command."""
    (tmp_path / "jobs.py").write_text(JOBS)
    shutil.copy(RUN_ITEMS, tmp_path / "run_items.py")
    return tmp_path


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("COLUMNS", None)
    env.pop("MPCHAN_SESSION", None)  # the command is a program of its own, as for a user
    env.update(extra or {})
    return env


def mpchan_run(
    *args: str,
    cwd: Path,
    stdin: str | bytes | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-m", "mpchan", "run", *args],
        input=stdin.encode() if isinstance(stdin, str) else stdin,
        capture_output=True,
        cwd=cwd,
        env=_env(env),
        timeout=timeout,
        check=False,
    )
    return subprocess.CompletedProcess(
        r.args, r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode()
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


def test_failed_task_exits_1_with_one_line(jobs: Path) -> None:
    r = mpchan_run("jobs:picky", "--range", "1:30", cwd=jobs)
    assert r.returncode == 1
    assert r.stdout.splitlines() == ["1", "2"]
    assert r.stderr.splitlines() == [
        "mpchan run: error: item 2 (value 3): ValueError: no multiples of three: 3"
    ]


def test_retries_and_timeout_options_are_accepted(jobs: Path) -> None:
    r = mpchan_run("jobs:stuck", "--range", "0:2", "--timeout", "0.3", "--retries", "1", cwd=jobs)
    assert r.returncode == 1
    assert r.stdout.splitlines() == ["0"]
    assert r.stderr.splitlines() == [
        "mpchan run: error: item 1 (value 1): TaskTimeout: task ran past its time limit of 0.3 s"
    ]


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
    assert r.stdout.splitlines() == ['{"id": 1, "total": 0}']


# --------------------------------------------------------------------------- failures
#
# Every failure: the results of the items before it on stdout, then one line
# on stderr naming the item, and status 1 (2 for input that cannot be read).
# The workloads are in tests/scripts/run_items.py: item 37 of 50 fails.

N_ITEMS = 50
FAIL_AT = 37
BEFORE = [str(i) for i in range(FAIL_AT)]


@pytest.fixture
def notes(tmp_path: Path) -> Path:
    """RUN_ITEMS_DIR: where the workloads note their calls and workers."""
    d = tmp_path / "notes"
    d.mkdir()
    return d


def run_items(
    func: str, *args: str, cwd: Path, notes: Path, stdin: str | bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """``mpchan run run_items:FUNC ARGS`` with the notes directory set; checks
    that the run left no worker process and no shared memory behind."""
    funcs = [f if ":" in f else f"run_items:{f}" for f in func.split()]
    r = mpchan_run(
        *funcs, *args, cwd=cwd, stdin=stdin, timeout=45, env={"RUN_ITEMS_DIR": str(notes)}
    )
    _assert_nothing_left(notes)
    return r


def _assert_nothing_left(notes: Path) -> None:
    workers = list(notes.glob("worker-*"))
    procs = []
    for path in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(int(path.name.split("-")[1])))
    _gone, alive = psutil.wait_procs(procs, timeout=5)
    assert not alive, alive
    tokens = {path.read_text() for path in workers} - {""}
    # the command (the root of its session) removed all of it as it ended
    left = [f for f in os.listdir(SHM_DIR) for t in tokens if f.startswith(f"mpchan-{t}-")]
    assert not left, left


def calls(notes: Path) -> Counter[int]:
    """How many times each item was called."""
    return Counter(int(p.name.split("-")[1]) for p in notes.glob("call-*"))


def only_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.mark.parametrize("chunksize", [None, "1", "16"])
def test_exception_writes_every_result_before_it(
    jobs: Path, notes: Path, chunksize: str | None
) -> None:
    # with chunks of 16, item 37 is in the middle of chunk 32..47: 32..36 are
    # results of its own chunk, computed before it failed
    extra = ["--chunksize", chunksize] if chunksize else []
    r = run_items(
        "fails", "--range", f"0:{N_ITEMS}", "--workers", "3", *extra, cwd=jobs, notes=notes
    )
    assert r.returncode == 1
    assert r.stdout.splitlines() == BEFORE
    assert only_line(r) == "mpchan run: error: item 37 (value 37): ValueError: bad input: 37"


@pytest.mark.parametrize("where", ["stdin", "input"])
def test_exception_names_the_input_line(jobs: Path, notes: Path, where: str) -> None:
    text = "".join(f"{i}\n" for i in range(N_ITEMS))
    if where == "stdin":
        r = run_items("fails", cwd=jobs, notes=notes, stdin=text)
    else:
        (jobs / "items.txt").write_text(text)
        r = run_items("fails", "--input", str(jobs / "items.txt"), cwd=jobs, notes=notes)
    assert r.returncode == 1
    assert r.stdout.splitlines() == BEFORE
    assert only_line(r) == "mpchan run: error: item 37 (line 38): ValueError: bad input: 37"


def test_jsonl_error_names_the_line_past_blank_lines(jobs: Path, notes: Path) -> None:
    text = "".join(f"{i}\n" + ("\n" if i % 10 == 0 else "") for i in range(N_ITEMS))
    r = run_items("fails", "--jsonl", cwd=jobs, notes=notes, stdin=text)
    assert r.returncode == 1
    assert r.stdout.splitlines() == BEFORE
    # four blank lines (after 0, 10, 20 and 30) come before item 37
    assert only_line(r) == "mpchan run: error: item 37 (line 42): ValueError: bad input: 37"


def test_exception_in_a_later_stage_names_the_stage(jobs: Path, notes: Path) -> None:
    r = run_items("ident@2 fails@2", "--range", f"0:{N_ITEMS}", cwd=jobs, notes=notes)
    assert r.returncode == 1
    assert r.stdout.splitlines() == BEFORE
    assert only_line(r) == (
        "mpchan run: error: item 37 (value 37) in stage 2 (run_items:fails): "
        "ValueError: bad input: 37"
    )


def test_unordered_writes_what_was_computed_before_the_failure(jobs: Path, notes: Path) -> None:
    # one worker taking one item at a time: everything before 37 was computed before it
    r = run_items(
        "fails",
        *("--range", f"0:{N_ITEMS}", "--unordered", "--workers", "1", "--chunksize", "1"),
        cwd=jobs,
        notes=notes,
    )
    assert r.returncode == 1
    assert r.stdout.splitlines() == BEFORE
    assert only_line(r).startswith("mpchan run: error: item 37 (value 37): ValueError")


def test_traceback_shows_the_functions_frames_only(jobs: Path, notes: Path) -> None:
    r = run_items("fails", "--range", f"0:{N_ITEMS}", "--traceback", cwd=jobs, notes=notes)
    assert r.returncode == 1
    assert r.stdout.splitlines() == BEFORE
    lines = r.stderr.splitlines()
    assert lines[0] == "mpchan run: error: item 37 (value 37): ValueError: bad input: 37"
    assert lines[1] == "Traceback (most recent call last):"
    frames = [line for line in lines if line.lstrip().startswith("File ")]
    assert [re.sub(r".*, in ", "", f) for f in frames] == ["fails", "_check"]
    assert all("run_items.py" in f for f in frames), frames
    assert "mpchan" not in "\n".join(lines[1:])
    assert lines[-1] == "ValueError: bad input: 37"


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_unpicklable_result_is_a_failure_of_its_item(
    jobs: Path, notes: Path, on_error: str
) -> None:
    r = run_items(
        "unpicklable", "--range", f"0:{N_ITEMS}", "--on-error", on_error, cwd=jobs, notes=notes
    )
    error = (
        "item 37 (value 37): PicklingError: cannot pickle the result (lock): "
        "TypeError: cannot pickle '_thread.lock' object"
    )
    if on_error == "skip":
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [str(i) for i in range(N_ITEMS) if i != FAIL_AT]
        assert r.stderr.splitlines() == [
            "mpchan run: 1 item(s) failed and were skipped",
            f"  {error}",
        ]
    else:
        assert r.returncode == 1
        assert r.stdout.splitlines() == BEFORE
        assert only_line(r) == f"mpchan run: error: {error}"


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_result_that_is_not_json_is_a_failure_of_its_item(
    jobs: Path, notes: Path, on_error: str
) -> None:
    text = "".join(f"{i}\n" for i in range(N_ITEMS))
    r = run_items("not_json", "--jsonl", "--on-error", on_error, cwd=jobs, notes=notes, stdin=text)
    error = (
        "item 37 (line 38): the result is not JSON: "
        "TypeError: Object of type set is not JSON serializable"
    )
    if on_error == "skip":
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [str(i) for i in range(N_ITEMS) if i != FAIL_AT]
        assert r.stderr.splitlines() == [
            "mpchan run: 1 item(s) failed and were skipped",
            f"  {error}",
        ]
    else:
        assert r.returncode == 1
        assert r.stdout.splitlines() == BEFORE
        assert only_line(r) == f"mpchan run: error: {error}"


@pytest.mark.parametrize("where", ["stdin", "input"])
def test_malformed_jsonl_line_comes_after_the_results_before_it(
    jobs: Path, notes: Path, where: str
) -> None:
    text = "".join(f"{i}\n" for i in range(FAIL_AT)) + "{oops\n" + "1\n2\n"
    if where == "stdin":
        r = run_items("ident", "--jsonl", "--workers", "3", cwd=jobs, notes=notes, stdin=text)
        name = "<stdin>"
    else:
        name = str(jobs / "items.jsonl")
        Path(name).write_text(text)
        r = run_items("ident", "--jsonl", "--workers", "3", "--input", name, cwd=jobs, notes=notes)
    assert r.returncode == 2
    assert r.stdout.splitlines() == BEFORE
    assert only_line(r).startswith(f"mpchan run: error: {name}:38: malformed JSON: ")


@pytest.mark.parametrize("where", ["stdin", "input"])
@pytest.mark.parametrize("jsonl", [False, True])
def test_input_that_is_not_utf8_is_one_rule(
    jobs: Path, notes: Path, where: str, jsonl: bool
) -> None:
    """Stdin and --input alike: the line is an error (status 2), after the
    results of the lines before it; the writer never sees it."""
    data = b"".join(b"%d\n" % i for i in range(FAIL_AT)) + b"\xff\xfe\n" + b"1\n"
    args = ["--jsonl"] if jsonl else []
    if where == "stdin":
        r = run_items("echo", *args, cwd=jobs, notes=notes, stdin=data)
        name = "<stdin>"
    else:
        name = str(jobs / "items.txt")
        Path(name).write_bytes(data)
        r = run_items("echo", *args, "--input", name, cwd=jobs, notes=notes)
    assert r.returncode == 2
    assert r.stdout.splitlines() == BEFORE
    assert only_line(r) == f"mpchan run: error: {name}:38: not valid UTF-8"


def test_sigkill_with_retries_runs_the_item_again(jobs: Path, notes: Path) -> None:
    r = run_items(
        "killed_once", "--range", f"0:{N_ITEMS}", "--retries", "1", "--workers", "2",
        cwd=jobs, notes=notes,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(i) for i in range(N_ITEMS)]
    assert r.stderr == ""
    assert (notes / f"killed-{FAIL_AT}").exists()  # it was killed, once
    n = calls(notes)
    assert n[FAIL_AT] == 2
    # Run again: only the items of its chunk that had finished, their results
    # died with the worker; never one whose result had been sent on.
    again = sorted(i for i, c in n.items() if c > 1)
    assert all(c <= 2 for c in n.values()), n
    assert again[-1] == FAIL_AT and again[-1] - again[0] < 16, again
    assert set(n) == set(range(N_ITEMS))


def test_sigkill_in_a_later_stage_with_retries(jobs: Path, notes: Path) -> None:
    r = run_items(
        "ident@2 killed_once@2", "--range", f"0:{N_ITEMS}", "--retries", "1",
        cwd=jobs, notes=notes,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(i) for i in range(N_ITEMS)]
    assert (notes / f"killed-{FAIL_AT}").exists()


def test_sigkill_without_retries_is_one_line(jobs: Path, notes: Path) -> None:
    r = run_items("killed", "--range", f"0:{N_ITEMS}", "--chunksize", "4", cwd=jobs, notes=notes)
    assert r.returncode == 1
    # 36 came in the chunk of 37 (36..39): it ran again on the new worker,
    # whose result is written before the failure
    assert r.stdout.splitlines() == BEFORE
    assert re.fullmatch(
        r"mpchan run: error: item 37 \(value 37\): WorkerCrashed: the worker \(pid \d+\) "
        r"running map\(killed\) was killed by SIGKILL: killed \(possibly out of memory\)",
        only_line(r),
    )
    assert calls(notes)[FAIL_AT] == 1


def test_sigkill_every_time_runs_retries_plus_one_times(jobs: Path, notes: Path) -> None:
    r = run_items("killed", "--range", f"0:{N_ITEMS}", "--retries", "2", cwd=jobs, notes=notes)
    assert r.returncode == 1
    assert r.stdout.splitlines() == BEFORE
    assert "item 37 (value 37): WorkerCrashed: " in only_line(r)
    assert calls(notes)[FAIL_AT] == 3


def test_sigkill_with_on_error_skip_skips_the_item(jobs: Path, notes: Path) -> None:
    r = run_items("killed", "--range", f"0:{N_ITEMS}", "--on-error", "skip", cwd=jobs, notes=notes)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(i) for i in range(N_ITEMS) if i != FAIL_AT]
    lines = r.stderr.splitlines()
    assert lines[0] == "mpchan run: 1 item(s) failed and were skipped"
    assert lines[1].startswith("  item 37 (value 37): WorkerCrashed: the worker (pid ")
    assert len(lines) == 2


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
