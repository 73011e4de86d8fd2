"""The ``thodb imaging`` and ``thodb grant-reader`` commands (registered in cli.py).

Each command parses its arguments, calls one function of :mod:`thodb.imaging.store` or
:mod:`thodb.reporting` and reports counts on stderr; thodb's own errors are turned into
one line by the ``thodb`` group.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from thodb.db import safe_url
from thodb.reporting import grant_reader as grant_reader_role

if TYPE_CHECKING:
    from thodb.cli import _State


# cli.py imports this module at its end to register the commands, so its helpers are
# imported when a command runs: that works whichever module is imported first.
def _state() -> _State:
    from thodb.cli import _state as state

    return state()


def _status(message: str) -> None:
    from thodb.cli import _status as status

    status(message)


class _ScanProgress:
    """``scanned N files`` on stderr, at most every half second."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.last = 0.0

    def __call__(self, files_done: int, _path: Path) -> None:
        now = time.monotonic()
        if not self.quiet and now - self.last >= 0.5:
            click.echo(f"scanned {files_done} files", err=True)
            self.last = now


@click.group()
def imaging() -> None:
    """Imaging data: coded items of DICOM files, FHIR ImagingSelection codings.

    The rows land in the tables imaging_coded_item and imaging_selection, which
    SQL can join to the terminology (docs/sql.md).

    \b
    Example:
      thodb imaging scan /data/dicom/study1
      thodb imaging load-selections selections.json
    """


@imaging.command("scan")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
def scan(paths: tuple[str, ...]) -> None:
    """Store every coded item of the DICOM files under PATHS, in one transaction.

    Folders are read recursively; files that are not DICOM are skipped and counted.
    An item already stored (same SOP instance and attribute path) is left as it is,
    so scanning the same files again changes nothing. Needs pydicom
    (pip install 'thodb[imaging]').

    \b
    Example:
      thodb imaging scan /data/dicom/study1 report.dcm
    """
    from thodb.imaging import store  # with the loader: only these commands need it

    state = _state()
    _status(f"scanning into {safe_url(state.engine().url)}")
    summary = store.scan_and_store(
        state.engine(), list(paths), progress=_ScanProgress(state.quiet)
    )
    _status(
        f"files read: {summary.files_read} ({summary.dicom_files} DICOM, "
        f"{summary.non_dicom_skipped} not DICOM, skipped)"
    )
    stored = summary.store
    _status(
        f"coded items: {summary.coded_items} found, {stored.added} added, "
        f"{stored.unchanged} already stored, "
        f"{stored.skipped_no_sop_instance_uid} without SOP Instance UID (skipped)"
    )


@imaging.command("load-selections")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
def load_selections(paths: tuple[str, ...]) -> None:
    """Load the codings of FHIR ImagingSelection resources, in one transaction.

    PATHS are JSON files holding an ImagingSelection or a Bundle, or folders of them.
    Each Coding of ImagingSelection.code and .category becomes a row of
    imaging_selection; a selection loaded again replaces its rows.

    \b
    Example:
      thodb imaging load-selections selections/
    """
    from thodb.imaging import store

    summary = store.load_selections(_state().engine(), list(paths))
    _status(
        f"files read: {summary.files} ({summary.skipped_not_fhir} not FHIR, "
        f"{summary.skipped_other_types} other resources, passed over)"
    )
    _status(
        f"imaging selections: {summary.selections} read, {summary.added} added, "
        f"{summary.replaced} replaced, {summary.unchanged} unchanged, "
        f"{summary.without_codings} without codings; {summary.codings} codings written"
    )


@click.command("grant-reader")
@click.argument("role")
@click.option(
    "--include-tables",
    is_flag=True,
    help="Also SELECT on every table of schema tho, for a Python service that runs "
    "thodb's expand, validate-code and lookup as ROLE (still no writes).",
)
def grant_reader(role: str, include_tables: bool) -> None:
    """Let PostgreSQL role ROLE read the SQL contract (docs/sql.md) and nothing else.

    Creates ROLE if it does not exist (LOGIN, no password: it authenticates as
    pg_hba.conf says, or set one with ALTER ROLE), then grants USAGE on schema tho,
    SELECT on the contract's views and tables and EXECUTE on its functions. Run it
    again after `thodb db upgrade`. Connect as the owner of the schema.

    \b
    Example:
      thodb --database-url postgresql://postgres@db/thodb grant-reader reporting
    """
    created = grant_reader_role(_state().engine(), role, include_tables=include_tables)
    verb = "created role" if created else "role exists:"
    _status(f"{verb} {role}; granted read access to the SQL contract")
