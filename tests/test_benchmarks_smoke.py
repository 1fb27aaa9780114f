"""The benchmark suite runs end to end (``--quick``) so that it cannot rot.

The harness's own bookkeeping (ratio direction, skips, failures, selection) is checked
with in-process fake contenders; the real scenarios are run once as a subprocess,
exactly as a user runs them, and their JSON report is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _harness() -> Any:
    sys.path.insert(0, str(ROOT))
    try:
        import benchmarks.harness as harness
    finally:
        sys.path.remove(str(ROOT))
    return harness


def _fake_scenario(harness: Any, *, higher_is_better: bool) -> Any:
    def const(value: float) -> Any:
        return lambda params: value

    def skip(params: Mapping[str, Any]) -> float:
        raise harness.Skip("cannot take this size")

    def broken(params: Mapping[str, Any]) -> float:
        raise RuntimeError("lost a message")

    C = harness.Contender
    return harness.Scenario(
        name="fake", group="fakes", label="fake n={n}", unit="u",
        higher_is_better=higher_is_better, params=lambda quick: {"n": 1 if quick else 2},
        contenders=(
            C("mpchan", const(2.0), kind="mpchan"),
            C("fast", const(4.0)),
            C("slow", const(1.0)),
            C("missing", const(1.0), available=lambda: "not installed: nothing"),
            C("skipping", skip),
            C("broken", broken),
            C("memcpy", const(8.0), kind="reference"),
        ),
    )  # fmt: skip


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_ratio_is_mpchan_advantage(higher_is_better: bool) -> None:
    harness = _harness()
    scenario = _fake_scenario(harness, higher_is_better=higher_is_better)
    result = harness.run_scenario(scenario, harness.RunConfig(quick=True, repeats=3))
    by_name = {r.contender: r for r in result.results}
    assert by_name["mpchan"].samples == [2.0, 2.0, 2.0]
    assert by_name["mpchan"].ratio == pytest.approx(1.0)
    # ">1 means mpchan better": with higher-is-better mpchan (2) beats slow (1) by 2x.
    expected_fast, expected_slow = (0.5, 2.0) if higher_is_better else (2.0, 0.5)
    assert by_name["fast"].ratio == pytest.approx(expected_fast)
    assert by_name["slow"].ratio == pytest.approx(expected_slow)
    assert by_name["missing"].status == "skipped"
    assert by_name["skipping"].status == "skipped"
    assert by_name["skipping"].note == "cannot take this size"
    assert by_name["broken"].status == "failed"
    assert "lost a message" in by_name["broken"].note
    table = harness.render_table([result])
    assert "above 1 means mpchan is better" in table
    assert "FAILED" in table


def test_peer_selection_and_scenario_selection() -> None:
    harness = _harness()
    scenario = _fake_scenario(harness, higher_is_better=True)
    config = harness.RunConfig(quick=True, repeats=1, peers=frozenset({"fast"}))
    by_name = {r.contender: r for r in harness.run_scenario(scenario, config).results}
    assert by_name["fast"].status == "ok"
    assert by_name["mpchan"].status == "ok"
    assert by_name["memcpy"].status == "ok"  # references are not peers
    assert by_name["slow"].status == "skipped"
    assert harness.select([scenario], ["fakes"]) == [scenario]
    assert harness.select([scenario], ["fa*"]) == [scenario]
    with pytest.raises(ValueError, match="no scenario"):
        harness.select([scenario], ["nothing"])


@pytest.mark.timeout(450)  # the whole --quick suite: many short multi-process runs
def test_quick_run_reports_every_scenario(tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    listed = subprocess.run(
        [sys.executable, "-m", "benchmarks.harness", "--list"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    names = [line.split("\t")[0] for line in listed.stdout.splitlines() if line.strip()]
    assert names, "no scenarios found"

    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.harness", "--quick", "--json", str(out)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-8000:]}"
    assert "| scenario | contender |" in run.stdout
    report = json.loads(out.read_text())
    assert report["machine"]["cpu_count"] >= 1
    assert [s["name"] for s in report["scenarios"]] == names
    for scenario in report["scenarios"]:
        results = {r["contender"]: r for r in scenario["results"]}
        mpchan = results["mpchan"]
        assert mpchan["status"] == "ok", (scenario["name"], mpchan["note"])
        assert mpchan["median"] is not None and mpchan["median"] >= 0
        assert len(mpchan["samples"]) == report["config"]["repeats"]
        peers = [r for r in scenario["results"] if r["kind"] == "peer"]
        measured = [r for r in peers if r["status"] == "ok" and r["median"] is not None]
        assert measured, f"{scenario['name']}: no peer measured"
        for peer in peers:  # a peer may only be missing because it is not installed
            assert peer["status"] != "failed", (scenario["name"], peer)
            if peer["status"] == "skipped":
                assert "not installed" in peer["note"] or "cannot" in peer["note"], peer
