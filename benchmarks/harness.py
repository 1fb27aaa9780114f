"""The benchmark runner: scenarios, contenders, repeats, medians, ratios, reports.

Usage::

    python -m benchmarks.harness [--quick] [--json FILE] [--plot FILE]
                                 [--peers LIST] [--scenarios LIST] [--repeats N] [--list]

Plug-in interface. A scenario module is any public module of the ``benchmarks`` package
(other than this one) with a module-level ``SCENARIOS: list[Scenario]``; it is found and
imported by :func:`discover`. A :class:`Scenario` names one measurement (unit, which
direction is better, parameters for full and ``--quick`` runs) and lists its
:class:`Contender` s: mpchan, the peers, and optional reference rows (e.g. memcpy).
Each contender's ``run(params)`` performs ONE measurement -- in fresh processes, started
the same way for everyone, see :mod:`benchmarks._proc` -- and returns a number in the
scenario's unit. It raises :class:`Skip` when it cannot take this case (reported as a
note) and any other exception when it is broken (reported as a failure).

How a scenario is run (the fairness rules every scenario shares):
    - every contender is measured in the same run of the same process tree;
    - repeats are interleaved (repeat 1 of every contender, then repeat 2, ...) with the
      starting contender rotated, so drift on a noisy machine hits everyone alike;
    - the median of the repeats is reported, with the spread and all raw samples in JSON;
    - ``mpchan.shutdown()`` (when it exists) is called at the end of every scenario.

The ratio column is always "mpchan advantage": above 1 means mpchan is better. For
throughput it is mpchan / contender, for latency contender / mpchan; on a reference row
(memcpy) it is the fraction of that reference that mpchan reaches.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import pkgutil
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["mpchan", "peer", "reference"]

FULL_REPEATS = 5
QUICK_REPEATS = 2


class Skip(Exception):
    """Raised by a contender's ``run`` when it cannot take this case (the reason is shown)."""


@dataclass(frozen=True)
class Contender:
    """One implementation measured in a scenario.

    ``run(params)`` performs one measurement and returns it in the scenario's unit.
    ``available()`` returns ``None`` when the contender can run here, else the reason it
    is skipped (e.g. its package is not installed).
    """

    name: str
    run: Callable[[Mapping[str, Any]], float]
    kind: Kind = "peer"
    available: Callable[[], str | None] = field(default=lambda: None)


@dataclass(frozen=True)
class Scenario:
    """One measurement, taken for each of its contenders.

    ``label`` is formatted with the parameters for the table (``"N={n:,}"``);
    ``params(quick)`` returns the parameters of a full or quick run (the harness adds
    ``quick`` and ``timeout``); ``requires`` lists modules without which the whole
    scenario is skipped; ``compare=False`` omits the ratio column (for values such as
    an idle CPU percentage, whose ratio would only amplify noise).
    """

    name: str
    group: str
    label: str
    unit: str
    higher_is_better: bool
    contenders: tuple[Contender, ...]
    params: Callable[[bool], dict[str, Any]]
    description: str = ""
    requires: tuple[str, ...] = ()
    compare: bool = True


@dataclass
class ContenderResult:
    """What a scenario found for one contender."""

    contender: str
    kind: Kind
    status: Literal["ok", "skipped", "failed"] = "ok"
    note: str = ""
    samples: list[float] = field(default_factory=list)
    median: float | None = None
    ratio: float | None = None


@dataclass
class ScenarioResult:
    """All contenders' results for one scenario, with the parameters they ran with."""

    scenario: Scenario
    params: dict[str, Any]
    results: list[ContenderResult]
    note: str = ""

    @property
    def label(self) -> str:
        """The scenario's table label, filled in with its parameters."""
        return self.scenario.label.format(**self.params)


@dataclass(frozen=True)
class RunConfig:
    """Settings of one harness run."""

    quick: bool = False
    repeats: int = FULL_REPEATS
    timeout: float = 300.0
    peers: frozenset[str] | None = None  # lower-case names to keep; None keeps all


def needs_modules(*modules: str) -> Callable[[], str | None]:
    """An ``available`` check: skip unless every named module can be imported."""

    def check() -> str | None:
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        return f"not installed: {', '.join(missing)}" if missing else None

    return check


# --------------------------------------------------------------------------- discovery


def discover() -> tuple[list[Scenario], list[str]]:
    """Import every scenario module of this package; return its scenarios and any errors.

    A module that fails to import is reported (not fatal), so one broken plug-in does
    not hide the others' numbers; the run then exits with status 1.
    """
    package = importlib.import_module("benchmarks")
    scenarios: list[Scenario] = []
    errors: list[str] = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "harness":
            continue
        try:
            module = importlib.import_module(f"benchmarks.{info.name}")
        except Exception as exc:
            errors.append(f"benchmarks.{info.name}: {type(exc).__name__}: {exc}")
            continue
        scenarios.extend(getattr(module, "SCENARIOS", ()))
    names = [s.name for s in scenarios]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        errors.append(f"duplicate scenario names: {', '.join(duplicates)}")
    return scenarios, errors


def select(scenarios: Sequence[Scenario], patterns: Iterable[str]) -> list[Scenario]:
    """Keep the scenarios named by ``patterns``: exact names, globs or group names.

    Raises ``ValueError`` naming any pattern that matches nothing.
    """
    chosen: list[Scenario] = []
    for pattern in patterns:
        hits = [s for s in scenarios if fnmatch.fnmatchcase(s.name, pattern) or s.group == pattern]
        if not hits:
            raise ValueError(f"no scenario matches {pattern!r}")
        chosen.extend(s for s in hits if s not in chosen)
    return [s for s in scenarios if s in chosen]  # keep the suite's order


# ------------------------------------------------------------------------------ runner


def _mpchan_shutdown() -> str:
    """Call ``mpchan.shutdown()`` if mpchan was used and has it; return an error or ''."""
    module = sys.modules.get("mpchan")
    shutdown = getattr(module, "shutdown", None)
    if not callable(shutdown):
        return ""
    try:
        shutdown()
    except Exception as exc:
        return f"mpchan.shutdown() failed: {type(exc).__name__}: {exc}"
    return ""


def _short(exc: BaseException) -> str:
    """One line for the table: the last line of the error's message."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1].strip() if lines else ''}"[:160]


def _ratio(scenario: Scenario, mpchan: float | None, other: float | None) -> float | None:
    """mpchan's advantage over ``other`` (>1: mpchan better), or None when undefined."""
    if mpchan is None or other is None or not scenario.compare:
        return None
    num, den = (mpchan, other) if scenario.higher_is_better else (other, mpchan)
    return num / den if den > 0 else None


def run_scenario(
    scenario: Scenario, config: RunConfig, log: Callable[[str], None] = lambda _: None
) -> ScenarioResult:
    """Measure every available contender of ``scenario`` ``config.repeats`` times."""
    params = dict(scenario.params(config.quick), quick=config.quick, timeout=config.timeout)
    results = {c.name: ContenderResult(c.name, c.kind) for c in scenario.contenders}
    active: list[Contender] = []
    missing = needs_modules(*scenario.requires)()
    for contender in scenario.contenders:
        result = results[contender.name]
        if missing:
            result.status, result.note = "skipped", missing
        elif (
            config.peers is not None
            and contender.kind == "peer"
            and contender.name.lower() not in config.peers
        ):
            result.status, result.note = "skipped", "not selected (--peers)"
        elif reason := contender.available():
            result.status, result.note = "skipped", reason
        else:
            active.append(contender)
    label = scenario.label.format(**params)
    try:
        for repeat in range(config.repeats):
            shift = repeat % len(active) if active else 0
            for contender in active[shift:] + active[:shift]:
                result = results[contender.name]
                if result.status != "ok":
                    continue
                gc.collect()
                try:
                    value = float(contender.run(params))
                except Skip as exc:
                    result.status, result.note = "skipped", str(exc)
                    log(f"  {contender.name}: skipped ({exc})")
                    continue
                except Exception as exc:
                    result.status, result.note = "failed", _short(exc)
                    log(f"  {contender.name}: FAILED\n{traceback.format_exc()}")
                    continue
                result.samples.append(value)
                log(
                    f"  [{label}] {contender.name} {repeat + 1}/{config.repeats}: "
                    f"{format_value(value)} {scenario.unit}"
                )
    finally:
        shutdown_error = _mpchan_shutdown()
    for result in results.values():
        if result.status == "ok" and result.samples:
            result.median = statistics.median(result.samples)
    reference = results.get("mpchan")
    mpchan_median = reference.median if reference is not None else None
    for result in results.values():
        result.ratio = _ratio(scenario, mpchan_median, result.median)
    return ScenarioResult(scenario, params, list(results.values()), note=shutdown_error)


# ------------------------------------------------------------------------------ report


def format_value(value: float) -> str:
    """Numbers as a reader wants them: 1,234,567 / 12.3 / 0.456."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _spread(samples: Sequence[float], median: float | None) -> str:
    """Half the min-max range as a percentage of the median ('±4%')."""
    if len(samples) < 2 or not median:
        return ""
    return f"±{(max(samples) - min(samples)) / 2 / abs(median) * 100:.0f}%"


LEGEND = (
    "*vs mpchan* is mpchan's advantage: **above 1 means mpchan is better**. "
    "Throughput (msgs/s, GB/s): mpchan ÷ contender; latency (µs): contender ÷ mpchan; "
    "on a reference row (memcpy) it is the fraction of the reference mpchan reaches. "
    "Median of the repeats; *spread* is half the min-max range."
)


def render_table(scenario_results: Sequence[ScenarioResult]) -> str:
    """The markdown table printed on stdout."""
    lines = [
        LEGEND,
        "",
        "| scenario | contender | median | unit | vs mpchan | spread | note |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    for sr in scenario_results:
        for r in sr.results:
            median = format_value(r.median) if r.median is not None else "—"
            ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
            note = r.note if r.status != "ok" else ""
            if r.status == "failed":
                note = f"FAILED: {note}"
            name = f"**{r.contender}**" if r.kind == "mpchan" else r.contender
            lines.append(
                f"| {sr.label} | {name} | {median} | {sr.scenario.unit} | {ratio} | "
                f"{_spread(r.samples, r.median)} | {note.replace('|', '/')} |"
            )
        if sr.note:
            lines.append(f"| {sr.label} | | | | | | {sr.note.replace('|', '/')} |")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """What a reader needs to reproduce or discount the numbers."""
    versions: dict[str, str | None] = {}
    for dist in (
        "mpchan",
        "numpy",
        "faster-fifo",
        "psutil",
        "loky",
        "joblib",
        "mpire",
        "pebble",
        "pypeln",
    ):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(affinity) if affinity is not None else os.cpu_count(),
        "python": sys.version,
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions,
    }


def to_json(
    scenario_results: Sequence[ScenarioResult], config: RunConfig, errors: Sequence[str]
) -> dict[str, Any]:
    """Everything measured: raw samples, medians, ratios, parameters and the machine."""
    return {
        "machine": machine_info(),
        "config": {
            "quick": config.quick,
            "repeats": config.repeats,
            "timeout": config.timeout,
            "peers": sorted(config.peers) if config.peers is not None else None,
        },
        "ratio": "mpchan advantage, >1 means mpchan better (throughput: mpchan/contender; "
        "latency: contender/mpchan; reference rows: fraction of the reference)",
        "errors": list(errors),
        "scenarios": [
            {
                "name": sr.scenario.name,
                "group": sr.scenario.group,
                "label": sr.label,
                "description": sr.scenario.description,
                "unit": sr.scenario.unit,
                "higher_is_better": sr.scenario.higher_is_better,
                "params": sr.params,
                "note": sr.note,
                "results": [
                    {
                        "contender": r.contender,
                        "kind": r.kind,
                        "status": r.status,
                        "note": r.note,
                        "samples": r.samples,
                        "median": r.median,
                        "ratio": r.ratio,
                    }
                    for r in sr.results
                ],
            }
            for sr in scenario_results
        ],
    }


def write_plot(scenario_results: Sequence[ScenarioResult], path: str) -> str:
    """Draw one bar chart per scenario into a PNG; return a one-line status message."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"--plot {path}: skipped, matplotlib is not installed"
    shown = [sr for sr in scenario_results if any(r.median is not None for r in sr.results)]
    if not shown:
        return f"--plot {path}: skipped, nothing was measured"
    cols = min(3, len(shown))
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(shown) :]:
        ax.set_visible(False)
    for ax, sr in zip(axes.flat, shown, strict=False):
        measured = [r for r in sr.results if r.median is not None]
        names = [r.contender for r in measured]
        values = [r.median for r in measured if r.median is not None]
        colours = [
            "tab:red" if r.kind == "mpchan" else "tab:gray" if r.kind == "reference" else "tab:blue"
            for r in measured
        ]
        ax.barh(names, values, color=colours)
        ax.invert_yaxis()
        positive = [v for v in values if v > 0]
        if len(positive) == len(values) and max(positive) / min(positive) > 30:
            ax.set_xscale("log")  # e.g. pipes vs memcpy: linear bars would hide the peers
        elif not positive:
            ax.set_xlim(0, 1)
        better = "higher" if sr.scenario.higher_is_better else "lower"
        ax.set_title(sr.label, fontsize=9)
        ax.set_xlabel(f"{sr.scenario.unit} ({better} is better)", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"--plot {path}: written"


# --------------------------------------------------------------------------------- CLI


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.harness",
        description="Benchmark mpchan against its peers; print a markdown table.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small sizes and {QUICK_REPEATS} repeats (a smoke run)",
    )
    parser.add_argument("--json", metavar="FILE", help="write raw samples and medians as JSON")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG bar chart (matplotlib)")
    parser.add_argument(
        "--peers",
        metavar="LIST",
        help="comma-separated peer names to run (default: all installed; "
        "'none' runs mpchan and reference rows only)",
    )
    parser.add_argument(
        "--scenarios",
        metavar="LIST",
        help="comma-separated scenario names, globs or groups (default: all)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        metavar="N",
        help=f"repeats per contender (default {FULL_REPEATS}, {QUICK_REPEATS} with --quick)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="limit for one measurement in seconds (default 300, 60 quick)",
    )
    parser.add_argument(
        "--list", action="store_true", help="print the scenario names (and contenders) and exit"
    )
    return parser.parse_args(argv)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    """Run the suite; return 0, 1 when a contender or module failed, 2 on a usage error."""
    args = _parse_args(argv)
    scenarios, errors = discover()
    for error in errors:
        print(f"note: scenario module failed to import: {error}", file=sys.stderr)
    if args.list:
        for s in scenarios:
            print(f"{s.name}\t{s.group}\t{', '.join(c.name for c in s.contenders)}")
        return 1 if errors else 0
    try:
        if args.scenarios:
            scenarios = select(scenarios, _split(args.scenarios))
    except ValueError as exc:
        print(f"error: {exc}; known: {', '.join(s.name for s in scenarios)}", file=sys.stderr)
        return 2
    peers: frozenset[str] | None = None
    if args.peers is not None:
        known = {c.name.lower() for s in scenarios for c in s.contenders if c.kind == "peer"}
        wanted = {p.lower() for p in _split(args.peers)} - {"none"}
        unknown = wanted - known
        if unknown:
            print(
                f"error: unknown peer(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(known))}",
                file=sys.stderr,
            )
            return 2
        peers = frozenset(wanted)
    if args.repeats is not None and args.repeats < 1:
        print("error: --repeats must be at least 1", file=sys.stderr)
        return 2
    config = RunConfig(
        quick=args.quick,
        repeats=args.repeats or (QUICK_REPEATS if args.quick else FULL_REPEATS),
        timeout=args.timeout or (60.0 if args.quick else 300.0),
        peers=peers,
    )

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.monotonic()
    scenario_results = []
    for scenario in scenarios:
        log(f"{scenario.name}: {scenario.label.format(**scenario.params(config.quick))}")
        scenario_results.append(run_scenario(scenario, config, log))
    log(f"done in {time.monotonic() - started:.1f} s")

    print(render_table(scenario_results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(to_json(scenario_results, config, errors), fh, indent=2)
            fh.write("\n")
    if args.plot:
        print(write_plot(scenario_results, args.plot), file=sys.stderr)
    failed = any(r.status == "failed" for sr in scenario_results for r in sr.results)
    failed = failed or any(sr.note for sr in scenario_results)
    return 1 if failed or errors else 0


if __name__ == "__main__":
    # Run the copy that scenario modules import (benchmarks.harness), not this __main__
    # copy, so that their Skip and Scenario are the classes the runner checks for.
    from benchmarks.harness import main as _main

    sys.exit(_main())
