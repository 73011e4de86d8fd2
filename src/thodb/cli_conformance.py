"""The ``thodb conformance`` command: HL7's terminology test suite against thodb.

A thin shell over :func:`thodb.conformance.suite.run_suites` with
:class:`thodb.conformance.operations.DatabaseOperations`: the results go to stdout, the
progress of each suite to stderr.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    # Imported when the command runs: the other commands start without them.
    from thodb.conformance.operations import DatabaseOperations
    from thodb.conformance.suite import Report


def _root_option(ctx: click.Context, name: str) -> object:
    return ctx.find_root().params.get(name)


@click.command()
@click.argument(
    "directory", type=click.Path(exists=True, file_okay=False, dir_okay=True)
)
@click.option(
    "--suite",
    "suites",
    multiple=True,
    metavar="NAME",
    help="Run only this suite (repeatable). Default: every suite.",
)
@click.option(
    "--mode",
    "modes",
    multiple=True,
    metavar="MODE",
    help="Also run suites and tests of this mode (repeatable), e.g. flat or "
    "tx.fhir.org. Suites of mode general always run.",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False, dir_okay=True),
    help="Write each failing test's actual response and a readable diff here.",
)
@click.pass_context
def conformance(
    ctx: click.Context,
    directory: str,
    suites: tuple[str, ...],
    modes: tuple[str, ...],
    output: str | None,
) -> None:
    """Run HL7's terminology test suite (DIRECTORY/test-cases.json) against thodb.

    Each suite runs on a fresh database of the configured engine (--database-url): a
    new database on the PostgreSQL server, or a temporary SQLite file, removed
    afterwards. Prints one line per suite (semantic comparison), the total, and the
    total under the strict comparison.

    \b
    Example:
      thodb conformance ../shared/tx-tests --suite simple-cases --output /tmp/tx
    """
    from thodb.conformance.operations import DatabaseOperations
    from thodb.conformance.suite import run_suites

    url = _root_option(ctx, "database_url")
    quiet = bool(_root_option(ctx, "quiet"))
    with DatabaseOperations(str(url) if url else None) as operations:
        report = run_suites(
            directory,
            _Progress(operations, quiet),
            suites=suites or None,
            modes=modes,
            output=output,
        )
    _print(report)


class _Progress:
    """The service, passed through, saying on stderr which suite starts."""

    def __init__(self, operations: DatabaseOperations, quiet: bool) -> None:
        self._operations = operations
        self._quiet = quiet
        self._suites = 0
        self.expand = operations.expand
        self.validate_code = operations.validate_code
        self.cs_validate_code = operations.cs_validate_code
        self.lookup = operations.lookup

    def reset(self, setup: list[dict[str, object]]) -> None:
        self._suites += 1
        if not self._quiet:
            click.echo(
                f"suite {self._suites}: loading {len(setup)} resources", err=True
            )
        self._operations.reset(setup)


def _print(report: Report) -> None:
    for line in report.format_lines():
        click.echo(line)
    strict = report.strict
    click.echo(f"strict: {strict.passed} passed, {strict.failed} failed")
