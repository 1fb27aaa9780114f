"""The ``mpchan`` command line (edge module: uses the public API, plus the
supervisor setter for ``--start-method``/``--metrics-port`` until there is a
public one, and the stream's internal trace option for ``--trace``).

Commands::

    mpchan --version
    mpchan run MODULE:FUNC [MODULE:FUNC@N ...] [--range A:B | --input FILE] [options]
    mpchan bench [--quick] [--json FILE] [--plot FILE] [--peers LIST]

Exit status: 0 success, 1 failure (a task failed), 2 usage error (click's
convention; also a bad MODULE:FUNC, unreadable input, malformed JSON),
130 after SIGINT, 143 after SIGTERM, 141 when the reader of the output
went away (``mpchan run ... | head``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

import click

__all__ = ["cli", "main"]

_BENCH_NOT_FOUND = "mpchan bench must be run from a checkout of mpchan (benchmarks/ not found)"


def _version() -> str:
    """The installed distribution's version, else the package's ``__version__``."""
    try:
        return importlib.metadata.version("mpchan")
    except importlib.metadata.PackageNotFoundError:
        pass
    import mpchan

    return str(getattr(mpchan, "__version__", "unknown"))


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"mpchan {_version()}")
    ctx.exit(0)


@click.group(name="mpchan", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and exit.",
)
def cli() -> None:
    """mpchan: Go-style channels, select, contexts and worker pools across processes."""


# ----------------------------------------------------------------------------- mpchan run


class _BadUsage(Exception):
    """A problem with the command line or its input: one line on stderr, status 2."""


def _resolve(spec: str, default_workers: int) -> tuple[str, Callable[[Any], Any], int]:
    """``MODULE:FUNC[@N]`` -> (label, function, workers)."""
    target, _, count = spec.partition("@")
    workers = default_workers
    if count:
        try:
            workers = int(count)
        except ValueError:
            raise _BadUsage(f"{spec!r}: the worker count after '@' must be an integer") from None
        if workers < 1:
            raise _BadUsage(f"{spec!r}: the worker count after '@' must be at least 1")
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise _BadUsage(f"{spec!r}: expected MODULE:FUNC (for example workers.primes:count)")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise _BadUsage(f"{spec!r}: no module named {module_name!r}") from None
        raise _BadUsage(f"{spec!r}: cannot import {module_name!r}: {exc}") from None
    except Exception as exc:
        raise _BadUsage(
            f"{spec!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise _BadUsage(f"{spec!r}: module {module_name!r} has no {attr!r}") from None
    if not callable(obj):
        raise _BadUsage(f"{spec!r}: {attr!r} is not callable")
    return target, obj, workers


def _parse_range(text: str) -> range:
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return range(int(start), int(stop))
    except ValueError:
        raise _BadUsage(f"--range {text!r}: expected A:B with integers A and B") from None


def _read_items(fh: IO[str], name: str, jsonl: bool) -> Iterator[Any]:
    """One item a line (the newline stripped); JSON values with ``jsonl``."""
    lineno = 0
    try:
        for lineno, line in enumerate(fh, 1):
            text = line.rstrip("\r\n")
            if not jsonl:
                yield text
                continue
            if not text.strip():
                continue
            try:
                yield json.loads(text)
            except json.JSONDecodeError as exc:
                raise _BadUsage(f"{name}:{lineno}: malformed JSON: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _BadUsage(f"cannot read {name} (line {lineno + 1}): {exc}") from None


class _Writer:
    """Writes one result a line, flushed at least every 0.1 s."""

    def __init__(self, fh: IO[str], jsonl: bool, progress: Any) -> None:
        self.fh = fh
        self.jsonl = jsonl
        self.progress = progress
        self.count = 0
        self.last_flush = time.monotonic()

    def __call__(self, value: Any) -> None:
        text = json.dumps(value) if self.jsonl else str(value)
        self.fh.write(text + "\n")
        self.count += 1
        if self.progress is not None:
            self.progress.update(1)
        now = time.monotonic()
        if now - self.last_flush >= 0.1:
            self.fh.flush()
            self.last_flush = now


def _progress_bar(enabled: bool | None, total: int | None) -> Any:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return None
    return tqdm(total=total, file=sys.stderr, unit="item", dynamic_ncols=True)


def _use_supervisor(method: str | None, metrics_port: int | None) -> None:
    """Install the program's supervisor when an option configures it."""
    if method is None and metrics_port is None:
        return
    from mpchan import _supervisor  # no public setter for the program's supervisor yet

    try:
        sup = _supervisor.Supervisor(start_method=method, metrics_port=metrics_port)
    except (OSError, ValueError) as exc:
        reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
        raise _BadUsage(f"--metrics-port {metrics_port}: {reason}") from None
    _supervisor.set_supervisor(sup)
    if sup.metrics_address is not None:
        host, port = sup.metrics_address
        click.echo(f"mpchan run: metrics on http://{host}:{port}/metrics", err=True)


def _open_trace(path: str | None) -> IO[str] | None:
    if path is None:
        return None
    from mpchan import _trace

    try:
        return _trace.open_trace(path)
    except OSError as exc:
        raise _BadUsage(f"--trace: cannot write {path}: {exc.strerror or exc}") from None


def _write_trace(
    fh: IO[str], path: str, records: list[dict[str, Any]], labels: list[str], start: float
) -> bool:
    """Write what the run recorded; False (and one line on stderr) if that fails."""
    from mpchan import _trace

    other = {"generator": f"mpchan {_version()}", "command": ["mpchan", *sys.argv[1:]]}
    try:
        with fh:
            _trace.write_trace(fh, records, labels, start=start, other=other)
    except OSError as exc:
        click.echo(f"mpchan run: cannot write the trace to {path}: {exc}", err=True)
        return False
    return True


@cli.command(name="run")
@click.argument("funcs", nargs=-1, required=True, metavar="MODULE:FUNC[@N]...")
@click.option(
    "--input",
    "input_file",
    metavar="FILE",
    help="Read items from FILE, one a line (default: stdin).",
)
@click.option("--jsonl", is_flag=True, help="Items and results are JSON, one a line.")
@click.option("--range", "range_text", metavar="A:B", help="Items are the integers A..B-1.")
@click.option("--output", "output_file", metavar="FILE", help="Write results to FILE.")
@click.option(
    "--workers", type=click.IntRange(min=1), help="Workers per stage (default: CPU count)."
)
@click.option(
    "--ordered/--unordered", default=True, help="Results in input order (default) or as done."
)
@click.option(
    "--chunksize",
    type=click.IntRange(min=1),
    default=None,
    help="Items sent together (default: adaptive, 1 to 16).",
)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Seconds per task.")
@click.option("--retries", type=click.IntRange(min=0), default=0, help="Retries per failed task.")
@click.option(
    "--on-error",
    type=click.Choice(["fail", "skip"]),
    default="fail",
    help="Stop at the first failed task (default) or skip failed items.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar on stderr (default: when stderr is a terminal).",
)
@click.option(
    "--start-method",
    type=click.Choice(["spawn", "forkserver", "fork"]),
    help="How worker processes start.",
)
@click.option(
    "--trace",
    "trace_file",
    metavar="FILE",
    help="Write a trace of every item (Chrome trace-event JSON: Perfetto, chrome://tracing).",
)
@click.option(
    "--metrics-port",
    type=int,
    metavar="P",
    help="Serve Prometheus metrics on http://127.0.0.1:P/metrics (0: a free port).",
)
def run(
    funcs: tuple[str, ...],
    input_file: str | None,
    jsonl: bool,
    range_text: str | None,
    output_file: str | None,
    workers: int | None,
    ordered: bool,
    chunksize: int | None,
    timeout: float | None,
    retries: int,
    on_error: str,
    progress: bool | None,
    start_method: str | None,
    trace_file: str | None,
    metrics_port: int | None,
) -> None:
    """Apply MODULE:FUNC to every input item in parallel; several form a pipeline.

    FUNC@N runs that stage in N worker processes. MODULE is imported with
    the current directory on sys.path. The first Ctrl-C stops reading input
    and lets the items in flight finish (their results are written); a
    second one stops at once.
    """
    try:
        status = _run(
            funcs,
            input_file,
            jsonl,
            range_text,
            output_file,
            workers,
            ordered,
            chunksize,
            timeout,
            retries,
            on_error,
            progress,
            start_method,
            trace_file,
            metrics_port,
        )
    except _BadUsage as exc:
        click.echo(f"mpchan run: error: {exc}", err=True)
        status = 2
    sys.exit(status)


def _run(
    funcs: tuple[str, ...],
    input_file: str | None,
    jsonl: bool,
    range_text: str | None,
    output_file: str | None,
    workers: int | None,
    ordered: bool,
    chunksize: int | None,
    timeout: float | None,
    retries: int,
    on_error: str,
    progress: bool | None,
    start_method: str | None,
    trace_file: str | None = None,
    metrics_port: int | None = None,
) -> int:
    cwd = os.getcwd()
    if not sys.path or sys.path[0] != cwd:
        sys.path.insert(0, cwd)
    # worker processes import MODULE too, whatever their start method
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [cwd, os.environ.get("PYTHONPATH")]))
    default_workers = workers or os.cpu_count() or 1
    stages = [_resolve(spec, default_workers) for spec in funcs]
    if range_text is not None and input_file is not None:
        raise _BadUsage("give either --range or --input, not both")
    if metrics_port is not None and not 0 <= metrics_port <= 65535:
        raise _BadUsage(f"--metrics-port {metrics_port}: expected a port number from 0 to 65535")

    import mpchan

    source: Any
    total: int | None = None
    in_fh: IO[str] | None = None
    if range_text is not None:
        source = _parse_range(range_text)
        total = len(source)
    elif input_file is None or input_file == "-":
        source = _read_items(sys.stdin, "<stdin>", jsonl)
    else:
        try:
            in_fh = open(input_file, encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise _BadUsage(f"cannot read {input_file}: {exc.strerror or exc}") from None
        source = _read_items(in_fh, input_file, jsonl)
    out_fh: IO[str] = sys.stdout
    if output_file is not None and output_file != "-":
        try:
            out_fh = open(output_file, "w", encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise _BadUsage(f"cannot write {output_file}: {exc.strerror or exc}") from None
    trace_fh: IO[str] | None = None
    try:
        trace_fh = _open_trace(trace_file)
        _use_supervisor(start_method, metrics_port)
    except BaseException:
        for fh in (in_fh, trace_fh, out_fh if out_fh is not sys.stdout else None):
            if fh is not None:
                fh.close()
        raise

    outcome: dict[str, Any] = {}
    labels = [label for label, _fn, _n in stages]

    def job(ctx: Any) -> None:
        s = mpchan.stream(source, ctx=ctx, chunksize=chunksize, _trace=trace_fh is not None)
        last = len(stages) - 1
        for i, (_label, fn, n) in enumerate(stages):
            s = s.map(
                fn,
                workers=n,
                ordered=ordered and i == last,
                on_error=on_error,  # type: ignore[arg-type]
                retries=retries,
                timeout=timeout,
            )
        bar = _progress_bar(progress, total)
        writer = _Writer(out_fh, jsonl, bar)
        try:
            s.run(writer)
            out_fh.flush()
        except _BadUsage as exc:
            outcome["usage"] = exc
        except BrokenPipeError:
            # the reader went away (`mpchan run ... | head`): stop quietly
            outcome["pipe"] = True
            _silence(out_fh)
        finally:
            if bar is not None:
                bar.close()
            # what the workers recorded, also when the run failed or was cut short
            outcome["trace"] = s._trace_records()
        stats = s.stats()
        failed = sum(st["failed"] for st in stats)
        if failed:
            click.echo(f"mpchan run: {failed} item(s) failed and were skipped", err=True)
            for item, error in s.failures()[:5]:
                click.echo(f"  {item}: {error}", err=True)
        if ctx.draining and ctx.err() is None:
            click.echo(
                f"mpchan run: interrupted; drained: {stats[0]['items_in']} item(s) read, "
                f"{writer.count} result(s) written",
                err=True,
            )
        elif ctx.err() is not None:
            click.echo(f"mpchan run: cancelled; {writer.count} result(s) written", err=True)

    start = time.monotonic()
    try:
        status = mpchan.main(job)
    finally:
        if in_fh is not None:
            in_fh.close()
        if out_fh is not sys.stdout:
            out_fh.close()
        mpchan.shutdown()
        if trace_fh is not None:
            traced = _write_trace(
                trace_fh, str(trace_file), outcome.get("trace", []), labels, start
            )
    if trace_fh is not None and not traced and status == 0:
        status = 1
    if "usage" in outcome and status in (0, 1):
        raise outcome["usage"]
    if "pipe" in outcome and status in (0, 1):
        return 128 + signal.SIGPIPE
    return status


def _silence(fh: IO[str]) -> None:
    """Point a broken output at /dev/null, so flushing it at exit cannot fail."""
    try:
        fd = fh.fileno()
    except (OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


@cli.command()
@click.option("--quick", is_flag=True, help="Short runs: a smoke test of every scenario.")
@click.option(
    "--json",
    "json_file",
    type=click.Path(dir_okay=False, writable=True),
    help="Also write the results as JSON to FILE.",
)
@click.option(
    "--plot",
    "plot_file",
    type=click.Path(dir_okay=False, writable=True),
    help="Also draw a PNG chart to FILE (needs matplotlib).",
)
@click.option("--peers", help="Comma-separated peers to compare with (default: all installed).")
def bench(quick: bool, json_file: str | None, plot_file: str | None, peers: str | None) -> None:
    """Run the benchmark suite: mpchan side by side with its peers.

    Runs from a checkout of mpchan: the suite lives in benchmarks/ of the
    current directory.
    """
    argv: list[str] = []
    if quick:
        argv.append("--quick")
    if json_file is not None:
        argv += ["--json", json_file]
    if plot_file is not None:
        argv += ["--plot", plot_file]
    if peers is not None:
        argv += ["--peers", peers]

    # The suite is not installed with the package: take it from the checkout
    # in the current directory, ahead of anything else named "benchmarks".
    cwd = os.getcwd()
    if not sys.path or sys.path[0] != cwd:
        sys.path.insert(0, cwd)
    try:
        harness = importlib.import_module("benchmarks.harness")
    except ModuleNotFoundError as exc:
        # Only a missing suite is a usage error; a dependency missing inside
        # the suite is a real failure and surfaces as such.
        if exc.name not in ("benchmarks", "benchmarks.harness"):
            raise
        click.echo(_BENCH_NOT_FOUND, err=True)
        sys.exit(2)
    status = harness.main(argv)
    sys.exit(status if isinstance(status, int) else 0)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``mpchan``); exits with the command's status."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="mpchan")
