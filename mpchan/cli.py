"""The ``mpchan`` command line (edge module: uses the public API only).

Commands::

    mpchan --version
    mpchan bench [--quick] [--json FILE] [--plot FILE] [--peers LIST]

Exit status: 0 success, 1 failure, 2 usage error (click's convention).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from collections.abc import Sequence

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


# `mpchan run MODULE:FUNC ...` (spec section 3) will be registered here.


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
