"""The ``mpchan`` command line, run for real in a subprocess (``python -m mpchan``)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mpchan

PACKAGE_DIR = Path(next(iter(mpchan.__path__))).resolve()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An environment in which only the mpchan package (not the checkout) is importable.

    A directory holding a link to the package goes on PYTHONPATH, so the tests
    do not depend on how mpchan was installed, and a ``benchmarks`` package
    is found only where a test puts one.
    """
    site = tmp_path / "site"
    site.mkdir()
    (site / "mpchan").symlink_to(PACKAGE_DIR, target_is_directory=True)
    environ = dict(os.environ)
    environ["PYTHONPATH"] = str(site)
    return environ


def run_cli(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpchan", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=30,
        check=False,
    )


def test_version(env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("--version", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    name, _, version = result.stdout.strip().partition(" ")
    assert name == "mpchan"
    assert version
    try:
        expected = importlib.metadata.version("mpchan")
    except importlib.metadata.PackageNotFoundError:
        expected = str(getattr(mpchan, "__version__", "unknown"))
    assert version == expected


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(env: dict[str, str], tmp_path: Path, flag: str) -> None:
    result = run_cli(flag, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: mpchan ")
    assert "--version" in result.stdout
    assert "bench" in result.stdout


def test_bench_help(env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("bench", "--help", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for option in ("--quick", "--json", "--plot", "--peers"):
        assert option in result.stdout


def test_unknown_command_is_a_usage_error(env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("no-such-command", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "No such command" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_option_is_a_usage_error(env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("bench", "--no-such-option", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_bench_outside_a_checkout(env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("bench", "--quick", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "mpchan bench must be run from a checkout of mpchan (benchmarks/ not found)"
    )
    assert result.stdout == ""


def test_bench_passes_its_options_to_the_harness(env: dict[str, str], tmp_path: Path) -> None:
    suite = tmp_path / "benchmarks"
    suite.mkdir()
    (suite / "__init__.py").write_text("")
    (suite / "harness.py").write_text(
        "import json, sys\ndef main(argv):\n    print(json.dumps(argv))\n    return 3\n"
    )
    result = run_cli(
        "bench",
        "--quick",
        "--json",
        "out.json",
        "--plot",
        "out.png",
        "--peers",
        "loky,mpire",
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 3, result.stderr
    assert json.loads(result.stdout) == [
        "--quick",
        "--json",
        "out.json",
        "--plot",
        "out.png",
        "--peers",
        "loky,mpire",
    ]

    result = run_cli("bench", env=env, cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert json.loads(result.stdout) == []


def test_main_is_the_console_script_entry_point() -> None:
    try:
        importlib.metadata.distribution("mpchan")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("mpchan is not installed (running from a source tree)")
    scripts = importlib.metadata.entry_points(group="console_scripts", name="mpchan")
    assert [ep.value for ep in scripts] == ["mpchan.cli:main"]
