"""The ``thodb`` command: a thin shell over the library.

Results go to stdout; progress, warnings and errors to stderr. Errors a user can cause
print one line and exit 2 (``--debug`` shows the traceback); ``validate-code`` exits 1
for a code that is not a member.

The loader and the FHIR resource builders are imported by the commands that use them:
a command that only reads starts without them (a tenth of a second of imports).
"""

from __future__ import annotations

import csv
import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import click
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from thodb import migrate, query
from thodb import stats as stats_mod
from thodb.canonical import DEFAULT_CANONICAL_BASE, split_canonical
from thodb.db import check_connection, create_engine, safe_url, session_scope
from thodb.errors import ThodbError
from thodb.expand import ExpandOptions, Member
from thodb.expand import expand as expand_value_set
from thodb.languages import LanguagePreference
from thodb.seed import seeds_path
from thodb.subsumes import subsumes
from thodb.versions import VersionRules

if TYPE_CHECKING:
    from thodb.load import LoadSummary

EXIT_ERROR = 2


class _State:
    def __init__(self, url: str | None, debug: bool, quiet: bool) -> None:
        self.url = url
        self.debug = debug
        self.quiet = quiet
        self._engine: Engine | None = None

    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = create_engine(self.url)
            check_connection(self._engine)
        return self._engine

    def close(self) -> None:
        """Close the engine's connections (the command is done)."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


class _Group(click.Group):
    """Turns thodb's own errors into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ThodbError, sa.exc.OperationalError) as exc:
            state = ctx.find_object(_State)
            if state is not None and state.debug:
                raise
            _fail(_one_line(exc))


def _one_line(exc: Exception) -> str:
    if isinstance(exc, sa.exc.OperationalError):
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        return f"database error: {reason}"
    return " ".join(str(exc).split())


# C0 and C1 control characters and lone surrogates: text from input (a code, a file
# name) must not move the cursor, forge an extra line or break the terminal encoding.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def printable(text: str) -> str:
    """``text`` with control characters and lone surrogates written as escapes."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def _fail(message: str) -> NoReturn:
    click.echo(f"thodb: error: {printable(message)}", err=True)
    sys.exit(EXIT_ERROR)


def _status(message: str) -> None:
    state = click.get_current_context().find_object(_State)
    if state is None or not state.quiet:
        click.echo(message, err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--database-url",
    envvar="THODB_DATABASE_URL",
    metavar="URL",
    help="SQLAlchemy URL of the database, e.g. postgresql+psycopg://user@host/db "
    "(env THODB_DATABASE_URL). Default: an embedded SQLite file.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks and SQL-level logging.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or status on stderr.")
@click.option(
    "-v", "--verbose", count=True, help="More log output on stderr (-vv: debug)."
)
@click.version_option(package_name="thodb")
@click.pass_context
def main(
    ctx: click.Context, database_url: str | None, debug: bool, quiet: bool, verbose: int
) -> None:
    """thodb: a terminology database for HL7 Terminology (THO) and DICOM.

    Loads FHIR CodeSystem and ValueSet resources into SQLite or PostgreSQL, expands
    value sets (imports resolved by recursive SQL) and answers validate-code and lookup.

    Without --database-url or THODB_DATABASE_URL the database is the SQLite file
    $XDG_DATA_HOME/thodb/thodb.sqlite (~/.local/share/thodb/thodb.sqlite).

    \b
    Example:
      thodb seed
      thodb expand http://terminology.hl7.org/ValueSet/image-reference-type
    """
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose > 1 or debug:
        level = logging.DEBUG
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))
    # A code or url that cannot be encoded is written as an escape, not a crash.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    ctx.obj = _State(database_url, debug, quiet)
    ctx.call_on_close(ctx.obj.close)


def _state() -> _State:
    return click.get_current_context().ensure_object(_State)


@contextmanager
def _session() -> Iterator[Session]:
    with session_scope(_state().engine()) as session:
        yield session


# --- loading -----------------------------------------------------------------------


class _Progress:
    """Throttled progress lines on stderr: at most one every half second."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.last = 0.0

    def __call__(self, stage: str, count: int) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if stage == "expand":
            click.echo("computing value-set membership ...", err=True)
        elif now - self.last >= 0.5:
            verb = "read" if stage == "read" else "wrote"
            noun = "files" if stage == "read" else "resources"
            click.echo(f"{verb} {count} {noun}", err=True)
            self.last = now


def _print_summary(summary: LoadSummary) -> None:
    passed_over = (
        f" ({summary.skipped_not_fhir} not FHIR resources, passed over)"
        if summary.skipped_not_fhir
        else ""
    )
    lines = [
        f"files read: {summary.files}{passed_over}",
        _outcomes(
            "code systems",
            summary.code_systems_added,
            summary.code_systems_replaced,
            summary.code_systems_unchanged,
        ),
        _outcomes(
            "value sets",
            summary.value_sets_added,
            summary.value_sets_replaced,
            summary.value_sets_unchanged,
        ),
        (
            f"concepts: {summary.concepts}, designations: {summary.designations}, "
            f"properties: {summary.properties}, "
            f"hierarchy edges: {summary.hierarchy_edges}"
        ),
    ]
    refresh = summary.refresh
    if refresh is not None:
        lines.append(
            f"membership: {refresh.expanded} value sets expanded "
            f"({refresh.members} members), {refresh.not_expandable} not expandable "
            "(see `thodb stats`)"
        )
    for line in lines:
        _status(line)


def _outcomes(what: str, added: int, replaced: int, unchanged: int) -> str:
    return f"{what}: {added} added, {replaced} replaced, {unchanged} unchanged"


def _run_load(
    paths: list[str], canonical_base: str, replace: bool, jobs: int | None = None
) -> None:
    from thodb.load import load as load_paths

    state = _state()
    _status(f"loading into {safe_url(state.engine().url)}")
    summary = load_paths(
        state.engine(),
        paths,
        canonical_base=canonical_base,
        replace=replace,
        progress=_Progress(state.quiet),
        jobs=jobs,
    )
    _print_summary(summary)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option(
    "--canonical-base",
    default=DEFAULT_CANONICAL_BASE,
    show_default=True,
    metavar="URL",
    help="Base of the url given to a resource without one: URL/<type>/<id>.",
)
@click.option(
    "--replace",
    is_flag=True,
    help="Replace a loaded url|version whose content differs (default: refuse).",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    metavar="N",
    help="Processes that parse the files, on Linux (default: one per core; 1: parse "
    "in the loading process).",
)
def load(
    paths: tuple[str, ...], canonical_base: str, replace: bool, jobs: int | None
) -> None:
    """Load FHIR CodeSystem and ValueSet resources, in one transaction.

    PATHS are JSON or XML files, Bundles, FHIR NPM packages (.tgz) or folders (read
    recursively). Any error stops the load and leaves the database as it was. On
    Linux, many files are parsed on every core.

    \b
    Example:
      thodb load ../shared/data/tho
    """
    _run_load(list(paths), canonical_base, replace, jobs)


@main.command()
def seed() -> None:
    """Create or upgrade the schema and load the shipped seed content.

    The seeds are THO's Image Reference Type value set, the DICOM DCM code system, the
    small DICOM code systems and all 1466 DICOM context groups (seeds/README.md).

    \b
    Example:
      thodb seed && thodb expand http://terminology.hl7.org/ValueSet/image-reference-type
    """
    engine = _state().engine()
    migrate.upgrade(engine)
    _run_load([str(seeds_path())], DEFAULT_CANONICAL_BASE, replace=False)


# --- schema --------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Schema migrations (Alembic).

    \b
    Example:
      thodb db upgrade && thodb db current
    """


@db.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Upgrade the schema to REVISION (default: head, the newest).

    \b
    Example:
      thodb db upgrade
    """
    migrate.upgrade(_state().engine(), revision)
    _status(f"schema at {migrate.current(_state().engine())}")


@db.command("downgrade")
@click.argument("revision", default="-1")
def db_downgrade(revision: str) -> None:
    """Downgrade the schema to REVISION (default: -1; base removes every table).

    \b
    Example:
      thodb db downgrade base
    """
    migrate.downgrade(_state().engine(), revision)
    _status(
        f"schema at {migrate.current(_state().engine()) or 'base (no thodb tables)'}"
    )


@db.command("current")
def db_current() -> None:
    """Print the schema revision of the database (nothing when it has no schema).

    \b
    Example:
      thodb db current
    """
    revision = migrate.current(_state().engine())
    if revision:
        click.echo(revision)
    else:
        _status("the database has no thodb schema (run `thodb db upgrade`)")


# --- queries -------------------------------------------------------------------------


def _language_option(value: str | None) -> LanguagePreference | None:
    if value is None:
        return None
    try:
        return LanguagePreference.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--display-language") from None


_DISPLAY_LANGUAGE_HELP = (
    "Displays in this language where the code system has them, as displayLanguage "
    "or Accept-Language (e.g. 'de' or 'de, en;q=0.5'). Default: the value set's "
    "language, else the code systems' displays."
)


@main.command()
@click.argument("value_set")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json", "fhir"]),
    default="table",
    show_default=True,
    help="table: aligned columns; csv: header system,code,display,inactive; json; "
    "fhir: the ValueSet that $expand returns.",
)
@click.option(
    "--live",
    is_flag=True,
    help="Compute the expansion from the compose now instead of reading the stored one.",
)
@click.option(
    "--active-only", is_flag=True, help="Leave out inactive codes (activeOnly)."
)
@click.option(
    "--filter",
    "text_filter",
    metavar="TEXT",
    help="Only codes whose display or designations have words starting with every "
    "word of TEXT (filter).",
)
@click.option("--display-language", metavar="LANGUAGES", help=_DISPLAY_LANGUAGE_HELP)
@click.option(
    "--include-designations",
    is_flag=True,
    help="Give each code's designations (includeDesignations; json and fhir formats).",
)
@click.option(
    "--offset", type=click.IntRange(min=0), default=0, help="Codes to skip (offset)."
)
@click.option(
    "--count",
    type=click.IntRange(min=0),
    help="Codes to return at most (count); 0 gives the total only.",
)
@click.option(
    "--supplement",
    "supplements",
    multiple=True,
    metavar="CANONICAL",
    help="Apply this loaded code system supplement (useSupplement; repeatable).",
)
@click.option(
    "--system-version",
    "system_versions",
    multiple=True,
    metavar="URL|VERSION",
    help="The code system version to use where the value set names none (repeatable).",
)
@click.option(
    "--force-system-version",
    "force_versions",
    multiple=True,
    metavar="URL|VERSION",
    help="The code system version to use whatever the value set says (repeatable).",
)
def expand(
    value_set: str,
    fmt: str,
    live: bool,
    active_only: bool,
    text_filter: str | None,
    display_language: str | None,
    include_designations: bool,
    offset: int,
    count: int | None,
    supplements: tuple[str, ...],
    system_versions: tuple[str, ...],
    force_versions: tuple[str, ...],
) -> None:
    """Expand VALUE_SET (a canonical url, optionally url|version).

    Every $expand parameter, tx-resource and inline value sets included, is available
    through `thodb operation expand`.

    \b
    Examples:
      thodb expand http://terminology.hl7.org/ValueSet/image-reference-type --format csv
      thodb expand http://terminology.hl7.org/ValueSet/image-reference-type \\
          --filter liver --count 5 --format json
    """
    url, version = split_canonical(value_set)
    options = ExpandOptions(
        active_only=active_only,
        include_designations=include_designations,
        language=_language_option(display_language),
        filter=text_filter,
        offset=offset,
        count=count,
        supplements=supplements,
        versions=VersionRules.from_canonicals(
            default=system_versions, force=force_versions
        ),
    )
    with _session() as session:
        expansion = expand_value_set(session, url, version, live=live, options=options)
    out = sys.stdout
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["system", "code", "display", "inactive"])
        for m in expansion.contains:
            writer.writerow(
                [m.system, m.code, m.display or "", "true" if m.inactive else "false"]
            )
    elif fmt == "json":
        _print_json(
            {
                "url": expansion.url,
                "version": expansion.version,
                "total": expansion.total,
                "offset": expansion.offset,
                "contains": [
                    _json_member(m, include_designations) for m in expansion.contains
                ],
            }
        )
    elif fmt == "fhir":
        from thodb.fhir import operations as fhir_operations

        _print_json(
            fhir_operations.expansion_resource(
                expansion, paged=offset > 0 or count is not None
            )
        )
    else:
        _print_table(
            ["system", "code", "display", "inactive"],
            [
                [m.system, m.code, m.display or "", "inactive" if m.inactive else ""]
                for m in expansion.contains
            ],
        )
    shown = len(expansion.contains)
    _status(
        f"{expansion.total} codes"
        if shown == expansion.total
        else f"{shown} of {expansion.total} codes"
    )


def _json_member(member: Member, designations: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "system": member.system,
        "code": member.code,
        "display": member.display,
        "version": member.version,
        "inactive": member.inactive,
    }
    if designations:
        entry["designations"] = [
            {"language": d.language, "use": d.use_code, "value": d.value}
            for d in member.designations
        ]
    return entry


@main.command("validate-code")
@click.argument("value_set")
@click.option("--system", required=True, help="The code system url of the code.")
@click.option("--code", required=True, help="The code.")
@click.option("--display", help="A display to check against the expansion's display.")
@click.option(
    "--system-version",
    metavar="VERSION",
    help="The version of the code system the code is from.",
)
@click.option("--display-language", metavar="LANGUAGES", help=_DISPLAY_LANGUAGE_HELP)
@click.option(
    "--active-only", is_flag=True, help="An inactive code is not valid (activeOnly)."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "fhir"]),
    default="text",
    show_default=True,
    help="fhir: the Parameters resource that $validate-code returns, with its issues.",
)
def validate_code(
    value_set: str,
    system: str,
    code: str,
    display: str | None,
    system_version: str | None,
    display_language: str | None,
    active_only: bool,
    fmt: str,
) -> None:
    """Check that a code is in VALUE_SET: exit 0 member, 1 not a member, 2 error.

    \b
    Example:
      thodb validate-code http://terminology.hl7.org/ValueSet/image-reference-type \\
          --system http://dicom.nema.org/resources/ontology/DCM --code 121191
    """
    url, version = split_canonical(value_set)
    options = query.ValidateOptions(
        active_only=active_only, language=_language_option(display_language)
    )
    with _session() as session:
        answer = query.validate_code(
            session,
            url,
            system=system,
            code=code,
            display=display,
            version=version,
            system_version=system_version,
            options=options,
        )
    if fmt == "text":
        if answer.result:
            flag = " (inactive)" if answer.inactive else ""
            click.echo(
                printable(
                    f"member: {answer.system}#{answer.code} {answer.display or ''}{flag}"
                ).rstrip()
            )
        else:
            click.echo(printable(f"not a member: {answer.message}"))
    elif fmt == "fhir":
        from thodb.fhir import operations as fhir_operations

        _print_json(fhir_operations.validation_resource(answer, mode="code"))
    else:
        _print_json(
            {
                "result": answer.result,
                "system": answer.system,
                "code": answer.code,
                "display": answer.display,
                "inactive": answer.inactive,
                "message": answer.message,
                "issues": [
                    {
                        "severity": i.severity,
                        "code": i.code,
                        "type": i.tx_type,
                        "text": i.text,
                    }
                    for i in answer.issues
                ],
            }
        )
    sys.exit(0 if answer.result else 1)


@main.command()
@click.option(
    "--system", required=True, help="The code system url (url|version allowed)."
)
@click.option("--code", required=True, help="The code to look up.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "fhir"]),
    default="text",
    show_default=True,
    help="fhir: a Parameters resource as $lookup returns.",
)
def lookup(system: str, code: str, fmt: str) -> None:
    """Look up a code in a loaded code system: display, definition, properties.

    \b
    Example:
      thodb lookup --system http://dicom.nema.org/resources/ontology/DCM --code 121191
    """
    url, version = split_canonical(system)
    with _session() as session:
        found = query.lookup(session, system=url, code=code, version=version)
    if fmt == "text":
        click.echo(
            f"system: {found.system}" + (f"|{found.version}" if found.version else "")
        )
        click.echo(printable(f"code: {found.code}"))
        click.echo(printable(f"display: {found.display or ''}"))
        if found.definition:
            click.echo(printable(f"definition: {found.definition}"))
        click.echo(printable(f"inactive: {'true' if found.inactive else 'false'}"))
        for prop, value in found.properties:
            click.echo(printable(f"property {prop}: {value}"))
        for language, use, value in found.designations:
            click.echo(
                f"designation [{language or '-'}] {use or ''}: {value}".replace(
                    " :", ":"
                )
            )
        return
    if fmt == "json":
        _print_json(
            {
                "name": found.name,
                "system": found.system,
                "version": found.version,
                "code": found.code,
                "display": found.display,
                "definition": found.definition,
                "inactive": found.inactive,
                "abstract": found.abstract,
                "properties": [{"code": c, "value": v} for c, v in found.properties],
                "designations": [
                    {"language": lang, "use": use, "value": v}
                    for lang, use, v in found.designations
                ],
            }
        )
        return
    parameters: list[dict[str, Any]] = []
    if found.name:
        parameters.append({"name": "name", "valueString": found.name})
    if found.version:
        parameters.append({"name": "version", "valueString": found.version})
    parameters.append({"name": "display", "valueString": found.display or ""})
    if found.definition:
        parameters.append({"name": "definition", "valueString": found.definition})
    parameters.append({"name": "abstract", "valueBoolean": found.abstract})
    for prop, value in found.properties:
        parameters.append(
            {
                "name": "property",
                "part": [
                    {"name": "code", "valueCode": prop},
                    {"name": "value", "valueString": value},
                ],
            }
        )
    for language, use, value in found.designations:
        part: list[dict[str, Any]] = []
        if language:
            part.append({"name": "language", "valueCode": language})
        if use:
            part.append({"name": "use", "valueCoding": {"code": use}})
        part.append({"name": "value", "valueString": value})
        parameters.append({"name": "designation", "part": part})
    _print_json({"resourceType": "Parameters", "parameter": parameters})


@main.command("subsumes")
@click.option(
    "--system", required=True, help="The code system url (url|version allowed)."
)
@click.argument("code_a")
@click.argument("code_b")
def subsumes_command(system: str, code_a: str, code_b: str) -> None:
    """Print how CODE_A relates to CODE_B in the code system's hierarchy.

    One of equivalent, subsumes (CODE_A is an ancestor of CODE_B), subsumed-by or
    not-subsumed, as FHIR's $subsumes answers.

    \b
    Example:
      thodb subsumes --system http://terminology.hl7.org/CodeSystem/v3-ActCode \\
          _ActAccountCode CASH
    """
    url, version = split_canonical(system)
    with _session() as session:
        outcome = subsumes(
            session, system=url, code_a=code_a, code_b=code_b, version=version
        )
    click.echo(outcome)


@main.command()
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
)
def stats(fmt: str) -> None:
    """Counts of what is loaded, and every value set that cannot be expanded, with why.

    \b
    Example:
      thodb stats
    """
    with _session() as session:
        found = stats_mod.stats(session)
    if fmt == "json":
        _print_json(
            {
                "code_systems": found.code_systems,
                "concepts": found.concepts,
                "value_sets": found.value_sets,
                "expanded": found.expanded,
                "members": found.members,
                "not_expandable": [
                    {"value_set": vs, "reason": why} for vs, why in found.not_expandable
                ],
            }
        )
        return
    click.echo(printable(f"code systems: {found.code_systems}"))
    click.echo(printable(f"concepts: {found.concepts}"))
    click.echo(printable(f"value sets: {found.value_sets}"))
    click.echo(printable(f"expanded: {found.expanded} ({found.members} members)"))
    click.echo(printable(f"not expandable: {len(found.not_expandable)}"))
    for vs, why in found.not_expandable:
        click.echo(printable(f"  {vs}: {why}"))


# --- output helpers ----------------------------------------------------------------


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    # The last column is not padded, so lines carry no trailing spaces.
    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) for c, w in zip(cells[:-1], widths[:-1], strict=True)]
        return "  ".join([*padded, cells[-1]]).rstrip()

    click.echo(line(header))
    for row in rows:
        click.echo(printable(line(row)))


from thodb.cli_reporting import grant_reader, imaging  # noqa: E402

main.add_command(imaging)
main.add_command(grant_reader)

from thodb.cli_conformance import conformance  # noqa: E402

main.add_command(conformance)

from thodb.cli_operation import operation  # noqa: E402

main.add_command(operation)
