"""A user's own script with a Pool, run as a child program (``python script.py``).

The functions of the program's ``__main__`` script go by reference, as under
``multiprocessing``: the workers import the script (or inherit it, with fork),
so module globals an initializer sets are seen by the tasks, a big global is
not pickled into each task, and a remote traceback shows the script's own
file and line. What no worker can import by name (a function defined under
the ``__main__`` guard, a lambda, a function of ``python -c`` or of a
session reading stdin) goes by value.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "script_pool.py"
REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MPCHAN_SESSION", None)  # a program of its own
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _run(args: list[str], *, stdin: str | None = None) -> dict[str, str]:
    proc = subprocess.run(
        [sys.executable, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        cwd=str(REPO),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    return lines


@pytest.mark.timeout(150)
@pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"])
def test_script_functions_behave_as_under_multiprocessing(method: str) -> None:
    out = _run([str(SCRIPT), method])
    # The initializer's module global is the tasks' module global.
    assert out["state"] == "ready"
    assert out["map_state"] == "['ready']"
    # A 64 MiB global of the script is not pickled into each of 40 tasks.
    assert out["big_ok"] == "True"
    assert float(out["big_seconds"]) < 0.5
    # The remote traceback names the script and shows the failing line.
    tb = out["traceback"]
    assert str(SCRIPT) in tb and "line 29, in fails" in tb
    assert 'raise ValueError(f\\"bad input {x}\\")' in tb or "raise ValueError" in tb
    assert "<dynamic-code>" not in tb
    # Bound methods, staticmethods and classmethods of a script class.
    assert out["methods"] == "6 8 Scaler"
    # What the workers cannot import by name goes by value.
    assert out["local"] == "101 [101, 102]"
    assert out["lambda"] == "0"
    assert out["pid_differs"] == "True"


PROGRAM = textwrap.dedent(
    """
    import mpchan

    def square(x):
        return x * x

    with mpchan.Pool(2) as pool:
        print("square", pool.submit(square, 7).result(timeout=60))
        print("map", sum(pool.map(square, range(100))))
    """
)


@pytest.mark.timeout(150)
def test_functions_of_a_program_without_a_file_go_by_value() -> None:
    # python -c: the main module has no file for a worker to import.
    out = _run(["-c", PROGRAM])
    assert out == {"square": "49", "map": "328350"}


@pytest.mark.timeout(150)
def test_functions_of_a_program_read_from_stdin_go_by_value() -> None:
    out = _run(["-"], stdin=PROGRAM)
    assert out == {"square": "49", "map": "328350"}
