"""Every program in examples/ runs and prints what it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# example -> (exit status, text its output must contain)
EXPECTED: dict[str, tuple[int, str]] = {
    "worker_pool.py": (0, "40 results; primes below 40000: 4203"),
    "fan_out_fan_in.py": (0, "100 digests"),
    "pipeline.py": (0, "2000 lines, total score"),
    "select_timeout.py": (0, "first answer: fast"),
    "cancellation.py": (0, "cause='parent gave up'"),
    "errgroup.py": (0, "group failed: bad input 7"),
    "graceful_drain.py": (130, "none lost (draining=True)"),
    "asyncio_service.py": (0, "16 digests, e.g."),
    "numpy_arrays.py": (0, "sum of 8 matrices of 2 MiB: 7340032 (expected 7340032)"),
}


def test_every_example_is_listed() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str) -> None:
    if name == "numpy_arrays.py":
        pytest.importorskip("numpy")
    status, text = EXPECTED[name]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=50,
        check=False,
    )
    assert r.returncode == status, r.stdout + r.stderr
    assert text in r.stdout, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
