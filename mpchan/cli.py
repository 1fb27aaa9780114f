"""The ``mpchan`` command line (edge module: uses the public API, plus the
supervisor setter for ``--start-method``/``--metrics-port`` until there is a
public one, the stream's internal trace option for ``--trace``, and its
internal per-item records, to name the item in a failure).

Commands::

    mpchan --version
    mpchan run MODULE:FUNC [MODULE:FUNC@N ...] [--range A:B | --input FILE] [options]
    mpchan bench [--quick] [--json FILE] [--plot FILE] [--peers LIST]

Exit status: 0 success, 1 failure (a task failed), 2 usage error (click's
convention; also a bad MODULE:FUNC, unreadable input, malformed JSON),
130 after SIGINT, 143 after SIGTERM, 141 when the reader of the output
went away (``mpchan run ... | head``).

A failure of ``mpchan run`` is one line on stderr, never a traceback
(``--traceback`` adds the user's own frames)::

    mpchan run: error: item 17 (line 18): ValueError: bad input
    mpchan run: error: item 17 (value 17) in stage 2 (jobs:score): WorkerCrashed: ...
    mpchan run: error: in.jsonl:5: malformed JSON: Expecting value

and comes after the results of every item before it.
"""

from __future__ import annotations

import bisect
import contextlib
import importlib
import importlib.metadata
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, NamedTuple

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


class _Lines:
    """The items of a file or stdin, one a line (LF or CR LF ends a line).

    The file is read as bytes and every line decoded as UTF-8, so stdin and
    ``--input`` follow one rule whatever the locale: a line that is not
    valid UTF-8, like one that is not JSON under ``--jsonl``, ends the input
    with a usage error naming it (the items before it are processed and
    written first). With ``jsonl`` every line is parsed as JSON and blank
    lines are skipped. Remembers the line of every item, for messages.

    Reads the descriptor with ``os.read``, never through a buffered file
    object: the feeder thread may still be blocked in a read of a terminal
    or pipe when the program ends (after a drain), and a buffered reader's
    lock held there would abort the interpreter's shutdown.
    """

    def __init__(self, fd: int, name: str, jsonl: bool) -> None:
        self.fd = fd
        self.name = name
        self.jsonl = jsonl
        # Invariant: item i came from line i + 1 + _skipped[j], j the last
        # entry with _starts[j] <= i (one entry per run of skipped lines).
        self._starts: list[int] = [0]
        self._skipped: list[int] = [0]

    def line_of(self, index: int) -> int:
        j = bisect.bisect_right(self._starts, index) - 1
        return index + 1 + self._skipped[j]

    def __iter__(self) -> Iterator[Any]:
        index = skipped = lineno = 0
        try:
            for lineno, raw in enumerate(_raw_lines(self.fd), 1):
                try:
                    text = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    raise _BadUsage(f"{self.name}:{lineno}: not valid UTF-8") from None
                value: Any = text
                if self.jsonl:
                    if not text.strip():
                        skipped += 1
                        continue
                    try:
                        value = json.loads(text)
                    except json.JSONDecodeError as exc:
                        problem = f"{self.name}:{lineno}: malformed JSON: {exc.msg}"
                        raise _BadUsage(problem) from None
                if skipped != self._skipped[-1]:
                    self._starts.append(index)
                    self._skipped.append(skipped)
                yield value
                index += 1
        except OSError as exc:
            raise _BadUsage(
                f"cannot read {self.name} (line {lineno + 1}): {exc.strerror or exc}"
            ) from None


def _raw_lines(fd: int) -> Iterator[bytes]:
    """The lines of ``fd`` as bytes, each with its newline (the last maybe without)."""
    partial = bytearray()  # a line begun in an earlier read
    while True:
        data = os.read(fd, 1 << 16)
        if not data:
            break
        start = 0
        while (end := data.find(b"\n", start) + 1) > 0:
            if partial:
                partial += data[start:end]
                yield bytes(partial)
                partial.clear()
            else:
                yield data[start:end]
            start = end
        partial += data[start:]
    if partial:
        yield bytes(partial)


class _Writer:
    """Writes one result a line, flushed at least every 0.1 s."""

    def __init__(self, fh: IO[str], jsonl: bool, progress: Any) -> None:
        self.fh = fh
        self.jsonl = jsonl
        self.progress = progress
        self.count = 0
        self.last_flush = time.monotonic()

    def write(self, value: Any) -> str | None:
        """Write ``value``; None, or why it cannot be written (a failure of its
        item: not JSON under ``--jsonl``, a ``str()`` that raises, text the
        output cannot encode). Raises OSError when the output fails."""
        try:
            text = json.dumps(value) if self.jsonl else str(value)
            self.fh.write(text + "\n")  # encodes the whole line first: all or nothing
        except OSError:
            raise
        except Exception as exc:
            what = "not JSON" if self.jsonl and not isinstance(exc, UnicodeError) else "not text"
            return f"the result is {what}: {_one_line(exc)}"
        self.count += 1
        if self.progress is not None:
            self.progress.update(1)
        now = time.monotonic()
        if now - self.last_flush >= 0.1:
            self.fh.flush()
            self.last_flush = now
        return None


def _one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (the message's first line)."""
    try:
        text = str(exc).strip()
    except Exception:
        text = ""
    first, more, _rest = text.partition("\n")
    name = type(exc).__name__
    return f"{name}: {first}{' [...]' if more else ''}" if first else name


class _Failure(NamedTuple):
    """What ended a run: the item (its source index) if one, its stage (1-based)
    if known, the error, and the user's own frames (for ``--traceback``)."""

    item: int | None
    stage: int | None
    error: str
    traceback: str = ""


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
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=0,
    help="Run a failed item again, up to N times: after an exception, a time-out, "
    "or its worker dying (SIGKILL, os._exit).",
)
@click.option(
    "--on-error",
    type=click.Choice(["fail", "skip"]),
    default="fail",
    help="Stop at the first failed item (default) or skip failed items.",
)
@click.option(
    "--traceback",
    "show_traceback",
    is_flag=True,
    help="After the error line of a failed item, print its traceback (the function's frames).",
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
def run(**options: Any) -> None:
    """Apply MODULE:FUNC to every input item in parallel; several form a pipeline.

    FUNC@N runs that stage in N worker processes. MODULE is imported with
    the current directory on sys.path. Input lines must be UTF-8.

    A failed item (an exception, a result that cannot be pickled or, with
    --jsonl, is not JSON, a worker that died) ends the run with status 1 and
    one line on stderr naming it: "mpchan run: error: item 17 (line 18):
    ValueError: ...". A line that is not valid UTF-8, or not JSON with
    --jsonl, ends it with status 2 ("mpchan run: error: <stdin>:18: not valid
    UTF-8"). Either way the results of the items before it are written
    first. --on-error skip goes on instead, and counts what it skipped.

    The first Ctrl-C stops reading input and lets the items in flight finish
    (their results are written); a second one stops at once.
    """
    try:
        status = _run(_RunOptions(**options))
    except _BadUsage as exc:
        click.echo(f"mpchan run: error: {exc}", err=True)
        status = 2
    sys.exit(status)


class _RunOptions(NamedTuple):
    """The options of one ``mpchan run``, as click parsed them."""

    funcs: tuple[str, ...]
    input_file: str | None
    jsonl: bool
    range_text: str | None
    output_file: str | None
    workers: int | None
    ordered: bool
    chunksize: int | None
    timeout: float | None
    retries: int
    on_error: str
    progress: bool | None
    start_method: str | None
    trace_file: str | None
    metrics_port: int | None
    show_traceback: bool


def _run(o: _RunOptions) -> int:
    cwd = os.getcwd()
    if not sys.path or sys.path[0] != cwd:
        sys.path.insert(0, cwd)
    # worker processes import MODULE too, whatever their start method
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [cwd, os.environ.get("PYTHONPATH")]))
    default_workers = o.workers or os.cpu_count() or 1
    stages = [_resolve(spec, default_workers) for spec in o.funcs]
    if o.range_text is not None and o.input_file is not None:
        raise _BadUsage("give either --range or --input, not both")
    if o.metrics_port is not None and not 0 <= o.metrics_port <= 65535:
        raise _BadUsage(f"--metrics-port {o.metrics_port}: expected a port number from 0 to 65535")

    import mpchan
    from mpchan import _stream  # what a run shows beyond iteration: indexes, failures, traces

    source: Any
    total: int | None = None
    in_fd: int | None = None  # --input FILE, opened here (stdin is never closed)
    if o.range_text is not None:
        source = _parse_range(o.range_text)
        total = len(source)
    elif o.input_file is None or o.input_file == "-":
        source = _Lines(0, "<stdin>", o.jsonl)
    else:
        try:
            in_fd = os.open(o.input_file, os.O_RDONLY)
        except OSError as exc:
            raise _BadUsage(f"cannot read {o.input_file}: {exc.strerror or exc}") from None
        source = _Lines(in_fd, o.input_file, o.jsonl)
    out_fh: IO[str] = sys.stdout
    if o.output_file is not None and o.output_file != "-":
        try:
            out_fh = open(o.output_file, "w", encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise _BadUsage(f"cannot write {o.output_file}: {exc.strerror or exc}") from None
    trace_fh: IO[str] | None = None
    try:
        trace_fh = _open_trace(o.trace_file)
        _use_supervisor(o.start_method, o.metrics_port)
    except BaseException:
        if in_fd is not None:
            os.close(in_fd)
        for fh in (trace_fh, out_fh if out_fh is not sys.stdout else None):
            if fh is not None:
                fh.close()
        raise

    outcome: dict[str, Any] = {}
    labels = [label for label, _fn, _n in stages]

    def where(index: int | None, stage: int | None) -> str:
        """How a message names an item: ``item 17 (line 18)``, ``item 17 (value 17)``."""
        if index is None:
            text = "an item"
        elif isinstance(source, range):
            text = f"item {index} (value {source[index]})"
        else:
            text = f"item {index} (line {source.line_of(index)})"
        if stage is not None and len(stages) > 1:
            text += f" in stage {stage} ({labels[stage - 1]})"
        return text

    def job(ctx: Any) -> None:
        s = mpchan.stream(source, ctx=ctx, chunksize=o.chunksize, _trace=trace_fh is not None)
        last = len(stages) - 1
        for i, (_label, fn, n) in enumerate(stages):
            s = s.map(
                fn,
                workers=n,
                ordered=o.ordered and i == last,
                on_error=o.on_error,  # type: ignore[arg-type]
                retries=o.retries,
                timeout=o.timeout,
            )
        bar = _progress_bar(o.progress, total)
        writer = _Writer(out_fh, o.jsonl, bar)
        unwritten: list[_Failure] = []  # results skipped because they cannot be written
        results = _stream.indexed_results(s)
        try:
            for index, value in results:
                problem = writer.write(value)
                if problem is None:
                    continue
                failure = _Failure(index, None, problem)
                if o.on_error != "skip":
                    outcome["failure"] = failure
                    break
                unwritten.append(failure)
            out_fh.flush()
        except _BadUsage as exc:
            outcome["usage"] = exc
        except BrokenPipeError:
            # the reader went away (`mpchan run ... | head`): stop quietly
            outcome["pipe"] = True
            _silence(out_fh)
        except OSError as exc:
            outcome["failure"] = _Failure(None, None, f"cannot write the results: {exc}")
        except Exception as exc:
            outcome["failure"] = _failure_of(exc, _stream.fatal_item(s))
        finally:
            # stops the stages if the loop stopped early; what the run raises
            # then comes after the failure that stopped it
            with contextlib.suppress(Exception):
                results.close()
            if bar is not None:
                bar.close()
            # what the workers recorded, also when the run failed or was cut short
            outcome["trace"] = _stream.trace_records(s)
        stats = s.stats()
        failed = sum(st["failed"] for st in stats) + len(unwritten)
        if failed:
            click.echo(f"mpchan run: {failed} item(s) failed and were skipped", err=True)
            skipped = [
                _Failure(r.source_index, r.stage + 1, r.error) for r in _stream.failed_items(s)
            ]
            skipped += unwritten
            skipped.sort(key=lambda f: (f.item is None, f.item or 0))
            for f in skipped[:5]:
                click.echo(f"  {where(f.item, f.stage)}: {f.error}", err=True)
        ended: _Failure | None = outcome.get("failure")
        if ended is not None:
            named = where(ended.item, ended.stage) + ": " if ended.item is not None else ""
            click.echo(f"mpchan run: error: {named}{ended.error}", err=True)
            if o.show_traceback and ended.traceback:
                click.echo(ended.traceback.rstrip("\n"), err=True)
        elif ctx.draining and ctx.err() is None:
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
        if in_fd is not None:
            os.close(in_fd)
        if out_fh is not sys.stdout:
            out_fh.close()
        mpchan.shutdown()
        if trace_fh is not None:
            traced = _write_trace(
                trace_fh, str(o.trace_file), outcome.get("trace", []), labels, start
            )
    if trace_fh is not None and not traced and status == 0:
        status = 1
    if "usage" in outcome and status in (0, 1):
        raise outcome["usage"]
    if "pipe" in outcome and status in (0, 1):
        return 128 + signal.SIGPIPE
    if "failure" in outcome and status == 0:
        return 1
    return status


def _failure_of(exc: Exception, item: Any) -> _Failure:
    """The failure an exception from the run stands for; ``item``: the
    stream's record of the failed item that ended it, if one did."""
    if item is not None:
        return _Failure(item.source_index, item.stage + 1, item.error, item.traceback)
    return _Failure(None, None, _one_line(exc))


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
