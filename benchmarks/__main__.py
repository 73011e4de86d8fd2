"""The command line of the benchmark harness: ``python -m benchmarks``."""

from __future__ import annotations

import logging
import signal
import sys
import tempfile
from pathlib import Path

import click

from benchmarks.harness import (
    ADMIN_URL_ENV,
    ENGINES,
    Databases,
    format_curves,
    format_table,
)
from benchmarks.runner import WORKLOADS, run


@click.command()
@click.option(
    "--quick", is_flag=True, help="Small sizes; finishes in well under a minute."
)
@click.option(
    "--engine",
    "engines",
    multiple=True,
    type=click.Choice(ENGINES),
    help="Engine to measure (repeatable). Default: both.",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("benchmark-results"),
    show_default=True,
    help="Folder for results.json, results.md and the PNG charts.",
)
@click.option(
    "--only",
    multiple=True,
    type=click.Choice(list(WORKLOADS)),
    help="Run only this workload (repeatable). Default: all.",
)
@click.option(
    "--max-concepts",
    type=click.IntRange(min=10),
    help="Cap the is-a hierarchy sizes (full run: 10k, 100k, 350k concepts).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def main(
    quick: bool,
    engines: tuple[str, ...],
    output: Path,
    only: tuple[str, ...],
    max_concepts: int | None,
    quiet: bool,
) -> None:
    """Measure thodb against the physical floor on PostgreSQL and SQLite.

    PostgreSQL is the server of $THODB_BENCH_DATABASE_URL (default: postgres at
    127.0.0.1:5432); each workload creates its own databases there and drops them.
    The tables go to stdout, progress to stderr. Example:

        python -m benchmarks --quick --engine sqlite --output /tmp/bench
    """
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
    # Alembic and thodb report each migration at INFO; the harness migrates many
    # databases.
    for name in ("alembic", "thodb"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # On SIGTERM, unwind (and drop the run's databases) as on an error.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    selected = [e for e in ENGINES if e in engines] if engines else list(ENGINES)
    databases = Databases(Path(tempfile.gettempdir()))
    if "postgresql" in selected and not databases.postgresql_available():
        raise click.ClickException(
            f"PostgreSQL does not answer at {databases.admin_url.render_as_string()}: "
            f"start it, set ${ADMIN_URL_ENV}, or pass --engine sqlite"
        )
    results = run(
        quick=quick,
        engines=selected,
        output=output,
        only=only,
        max_concepts=max_concepts,
    )
    click.echo(format_table(results.figures))
    if results.curves:
        click.echo()
        click.echo(format_curves(list(results.curves.values())))
    for error in results.errors:
        click.echo(f"{error['workload']}/{error['engine']}: {error['error']}", err=True)
    click.echo(f"results in {output}", err=True)
    if results.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
