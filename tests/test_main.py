"""mpchan.main: exit statuses and two-stage signals (drain, then cancel)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import mpchan

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = """
import itertools, sys, time
import mpchan

def slow(x):
    time.sleep(0.05 if x >= 0 else 0)
    return x

def stuck(x):
    if x > 0:
        time.sleep(60)
    return x

def job(ctx, fn_name):
    fn = {"slow": slow, "stuck": stuck}[fn_name]
    s = mpchan.stream(itertools.count(), ctx=ctx).map(fn, workers=3, ordered=True)
    print("ready", flush=True)
    for v in s:
        print(v, flush=True)
    print("draining" if ctx.draining else "not draining", ctx.err() is not None, flush=True)

if __name__ == "__main__":
    grace = float(sys.argv[2]) if len(sys.argv) > 2 else None
    sys.exit(mpchan.main(job, sys.argv[1], grace=grace))
"""


def test_status_0_when_fn_returns() -> None:
    seen: list[Any] = []

    def fn(ctx: mpchan.Context, a: int, b: int) -> None:
        seen.append((ctx.draining, ctx.err(), a + b))

    assert mpchan.main(fn, 1, 2) == 0
    assert seen == [(False, None, 3)]


def test_status_1_and_traceback_when_fn_raises(capsys: pytest.CaptureFixture[str]) -> None:
    def fn(ctx: mpchan.Context) -> None:
        raise RuntimeError("bad day")

    assert mpchan.main(fn) == 1
    assert "RuntimeError: bad day" in capsys.readouterr().err


def test_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGINT)
    mpchan.main(lambda ctx: None)
    assert signal.getsignal(signal.SIGINT) is before


def test_negative_grace_is_rejected() -> None:
    with pytest.raises(ValueError):
        mpchan.main(lambda ctx: None, grace=-1)


def _start(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    script = tmp_path / "prog.py"
    script.write_text(PROGRAM)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    p = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,  # readline must not read ahead of what communicate() returns
        env=env,
        start_new_session=True,
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == b"ready"
    return p


def _finish(p: subprocess.Popen[bytes]) -> tuple[str, str]:
    try:
        out, err = p.communicate(timeout=30)
        return out.decode(), err.decode()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_first_signal_drains(tmp_path: Path, sig: int, status: int) -> None:
    p = _start(tmp_path, "slow")
    assert p.stdout is not None
    first = p.stdout.readline().decode()  # the stream is running
    os.kill(p.pid, sig)
    out, err = _finish(p)
    lines = [first, *out.splitlines()]
    assert p.returncode == status, err
    assert lines[-1].strip() == "draining False"  # drained, not cancelled
    values = [int(v) for v in lines[:-1]]
    assert values == list(range(len(values)))  # nothing read was lost
    assert "Traceback" not in err


def test_grace_expiry_cancels(tmp_path: Path) -> None:
    p = _start(tmp_path, "stuck", "0.5")
    assert p.stdout is not None
    assert p.stdout.readline().strip() == b"0"  # the stream is running
    started = time.monotonic()
    os.kill(p.pid, signal.SIGTERM)
    out, err = _finish(p)
    assert p.returncode == 143, err
    assert out.strip().splitlines()[-1] == "draining True"  # cancelled after the grace
    assert time.monotonic() - started < 15
    assert "Traceback" not in err
