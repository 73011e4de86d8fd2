"""Storing imaging data: DICOM coded items and FHIR ImagingSelection codings.

:func:`store_coded_items` writes what :func:`thodb.imaging.scan.scan` found into
``imaging_coded_item``, and :func:`scan_and_store` does both, remembering the file of
each item. A SOP instance never changes in DICOM (a changed object gets a new SOP
Instance UID), so a row is identified by ``(sop_instance_uid, attribute_path)`` and a
rescan of the same files adds nothing.

:func:`load_selections` reads FHIR R5 ImagingSelection resources (JSON files, Bundles or
folders of them) into ``imaging_selection``, one row per ``Coding`` of
``ImagingSelection.code`` and ``ImagingSelection.category``; a resource loaded again
replaces its rows, and one loaded unchanged changes nothing.

Each call is one transaction: everything is read first, then written, and an error
leaves the database as it was. Reading DICOM needs pydicom (the ``imaging`` extra); it
is imported only when DICOM files are read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from thodb.db import session_scope
from thodb.errors import LoadError, ThodbError
from thodb.fhir.read import parse_bytes
from thodb.load import ensure_schema
from thodb.models import ImagingCodedItem, ImagingSelection

if TYPE_CHECKING:
    from thodb.imaging.scan import CodedItem

log = logging.getLogger(__name__)

#: How to install what reading DICOM files needs.
IMAGING_EXTRA_HINT = "pip install 'thodb[imaging]'"

Progress = Callable[[int, Path], None]
"""Called after each file with the number of files read so far and the file's path."""

# Rows per INSERT and UIDs per IN (...) list: well below SQLite's 32766 parameters.
_BATCH = 500


class ImagingDependencyError(ThodbError):
    """pydicom, which reading DICOM files needs, is not installed."""


@dataclass
class StoreSummary:
    """What :func:`store_coded_items` wrote, by outcome."""

    added: int = 0
    #: Items already stored (same SOP instance and attribute path), left as they are.
    unchanged: int = 0
    #: Items of a dataset without SOP Instance UID, which cannot be identified.
    skipped_no_sop_instance_uid: int = 0


@dataclass
class ScanSummary:
    """What :func:`scan_and_store` read and stored, by outcome."""

    files_read: int = 0
    dicom_files: int = 0
    #: Files that are not DICOM (no preamble and ``DICM`` prefix, empty, too short).
    non_dicom_skipped: int = 0
    #: Coded items found in the DICOM files.
    coded_items: int = 0
    store: StoreSummary = field(default_factory=StoreSummary)


def _pydicom_missing() -> ImagingDependencyError:
    return ImagingDependencyError(
        f"reading DICOM files needs pydicom, which is not installed: {IMAGING_EXTRA_HINT}"
    )


def scan_and_store(
    engine: Engine,
    paths: Sequence[str | Path],
    *,
    progress: Progress | None = None,
) -> ScanSummary:
    """Scan DICOM files for coded items and store them with the file each came from.

    Reads as :func:`thodb.imaging.scan.scan` does (directories recursively in sorted
    order, non-DICOM files skipped and counted), then stores like
    :func:`store_coded_items`, in one transaction.

    :param paths: files and directories.
    :param progress: see :data:`Progress`.
    :raises ImagingDependencyError: when pydicom is not installed.
    :raises LoadError: when a path does not exist.
    :raises DatabaseError: when the schema is not at the current revision.
    """
    try:
        from thodb.imaging import scan as scan_mod
    except ModuleNotFoundError as exc:
        if exc.name != "pydicom" and not str(exc.name).startswith("pydicom."):
            raise
        raise _pydicom_missing() from None

    summary = ScanSummary()
    found: list[tuple[CodedItem, str]] = []
    # scan.scan() returns the items without their file, so its per-file steps are used
    # here to keep each item's file. Call scan() instead once CodedItem carries its
    # source file (or scan's file walk is public).
    for path in scan_mod._iter_files(paths):
        summary.files_read += 1
        dataset = scan_mod._read(path)
        if dataset is None:
            summary.non_dicom_skipped += 1
        else:
            summary.dicom_files += 1
            found.extend(
                (item, str(path)) for item in scan_mod.iter_coded_items(dataset)
            )
        if progress is not None:
            progress(summary.files_read, path)
    summary.coded_items = len(found)
    log.info(
        "scanned %d files: %d DICOM, %d not DICOM (skipped), %d coded items",
        summary.files_read,
        summary.dicom_files,
        summary.non_dicom_skipped,
        summary.coded_items,
    )
    summary.store = _store(engine, found)
    return summary


def store_coded_items(
    engine: Engine, items: Iterable[CodedItem], *, source: str | None = None
) -> StoreSummary:
    """Store coded items (e.g. ``scan(paths).items``) in one transaction.

    An item whose ``(sop_instance_uid, attribute_path)`` is already stored is left as
    it is, so storing the same scan twice changes nothing.

    :param items: the items, as :class:`thodb.imaging.scan.CodedItem`.
    :param source: the file the items came from, stored with each row; ``None`` when
        unknown (use :func:`scan_and_store` to keep the file of each item).
    :raises DatabaseError: when the schema is not at the current revision.
    """
    return _store(engine, [(item, source) for item in items])


def _store(
    engine: Engine, found: Sequence[tuple[CodedItem, str | None]]
) -> StoreSummary:
    summary = StoreSummary()
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for item, source in found:
        if item.sop_instance_uid is None:
            summary.skipped_no_sop_instance_uid += 1
            continue
        key = (item.sop_instance_uid, item.attribute_path)
        if key in rows:
            # The same instance twice in one scan (a copy of a file): the first stays.
            summary.unchanged += 1
            continue
        rows[key] = _coded_item_row(item, source)

    with session_scope(engine, write=True) as session:
        ensure_schema(session.connection())
        stored = _stored_keys(session, {uid for uid, _ in rows})
        new = [row for key, row in rows.items() if key not in stored]
        summary.unchanged += len(rows) - len(new)
        for start in range(0, len(new), _BATCH):
            session.execute(_insert_new(session), new[start : start + _BATCH])
        summary.added = len(new)
    log.info(
        "coded items: %d added, %d already stored, %d without SOP Instance UID (skipped)",
        summary.added,
        summary.unchanged,
        summary.skipped_no_sop_instance_uid,
    )
    return summary


def _coded_item_row(item: CodedItem, source: str | None) -> dict[str, Any]:
    return {
        "study_instance_uid": item.study_instance_uid,
        "series_instance_uid": item.series_instance_uid,
        "sop_instance_uid": item.sop_instance_uid,
        "sop_class_uid": item.sop_class_uid,
        "attribute_path": item.attribute_path,
        "coding_scheme_designator": item.coding_scheme_designator,
        "coding_scheme_version": item.coding_scheme_version,
        "code_value": item.code_value,
        "code_meaning": item.code_meaning,
        "system": item.system,
        "source": source,
    }


def _stored_keys(session: Session, uids: set[str]) -> set[tuple[str, str]]:
    ordered = sorted(uids)
    stored: set[tuple[str, str]] = set()
    for start in range(0, len(ordered), _BATCH):
        chunk = ordered[start : start + _BATCH]
        stored.update(
            (row.sop_instance_uid, row.attribute_path)
            for row in session.execute(
                sa.select(
                    ImagingCodedItem.sop_instance_uid, ImagingCodedItem.attribute_path
                ).where(ImagingCodedItem.sop_instance_uid.in_(chunk))
            )
        )
    return stored


def _insert_new(session: Session) -> sa.Insert:
    # Rows stored by a concurrent scan since _stored_keys looked are left alone too.
    key = ["sop_instance_uid", "attribute_path"]
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(ImagingCodedItem).on_conflict_do_nothing(
            index_elements=key
        )
    return sqlite.insert(ImagingCodedItem).on_conflict_do_nothing(index_elements=key)


# --- FHIR ImagingSelection -------------------------------------------------------------


@dataclass
class SelectionSummary:
    """What :func:`load_selections` read and wrote, by outcome."""

    files: int = 0
    #: JSON files in a folder that are not FHIR resources, passed over.
    skipped_not_fhir: int = 0
    #: Resources of other types (in Bundles or folders), passed over.
    skipped_other_types: int = 0
    selections: int = 0
    added: int = 0
    replaced: int = 0
    unchanged: int = 0
    #: Selections without any Coding that has a code: nothing to store.
    without_codings: int = 0
    #: Rows written for the added and replaced selections (one per Coding).
    codings: int = 0


@dataclass(frozen=True)
class _Selection:
    id: str
    source: str
    rows: tuple[dict[str, Any], ...]


def load_selections(engine: Engine, paths: Sequence[str | Path]) -> SelectionSummary:
    """Load FHIR ImagingSelection resources into ``imaging_selection``, in one transaction.

    PATHS are JSON files holding an ImagingSelection or a Bundle (other resources in it
    are passed over), or folders of them (read recursively, sorted). Each ``Coding`` of
    ``code`` and ``category`` that has a ``code`` becomes a row. A resource is known by
    its ``id`` (in a Bundle, else by the entry's ``fullUrl``); loading it again replaces
    its rows when they differ.

    :raises LoadError: for a file that cannot be read, an element of the wrong type, a
        selection without id, or two different selections with the same id.
    :raises DatabaseError: when the schema is not at the current revision.
    """
    summary = SelectionSummary()
    selections: dict[str, _Selection] = {}
    for selection in _read_selections(paths, summary):
        known = selections.get(selection.id)
        if known is not None and _content(known) != _content(selection):
            raise LoadError(
                selection.source,
                "id",
                f"ImagingSelection {selection.id!r} is also in {known.source} with "
                "other content; give one of them another id",
            )
        selections[selection.id] = selection
    summary.selections = len(selections)

    with session_scope(engine, write=True) as session:
        ensure_schema(session.connection())
        stored = _stored_selections(session, list(selections))
        for selection in selections.values():
            _write_selection(session, selection, stored.get(selection.id), summary)
    log.info(
        "imaging selections: %d added, %d replaced, %d unchanged, %d without codings "
        "(%d codings written)",
        summary.added,
        summary.replaced,
        summary.unchanged,
        summary.without_codings,
        summary.codings,
    )
    return summary


def _write_selection(
    session: Session,
    selection: _Selection,
    before: set[tuple[Any, ...]] | None,
    summary: SelectionSummary,
) -> None:
    if before == {_comparable(row) for row in selection.rows}:
        summary.unchanged += 1
        return
    if before is not None:
        summary.replaced += 1
        session.execute(
            sa.delete(ImagingSelection).where(ImagingSelection.id == selection.id)
        )
    elif selection.rows:
        summary.added += 1
    if not selection.rows:
        # Nothing to join on; rows of an earlier load of it are gone (deleted above).
        summary.without_codings += 1
        return
    session.execute(sa.insert(ImagingSelection), list(selection.rows))
    summary.codings += len(selection.rows)


def _content(selection: _Selection) -> set[tuple[Any, ...]]:
    """The rows of a selection without the file they came from."""
    return {_comparable(row)[:-1] for row in selection.rows}


def _comparable(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[name] for name in _SELECTION_COLUMNS)


_SELECTION_COLUMNS = (
    "id",
    "element",
    "status",
    "study_uid",
    "series_uid",
    "system",
    "version",
    "code",
    "display",
    "source",
)


def _stored_selections(
    session: Session, ids: list[str]
) -> dict[str, set[tuple[Any, ...]]]:
    columns = [getattr(ImagingSelection, name) for name in _SELECTION_COLUMNS]
    stored: dict[str, set[tuple[Any, ...]]] = {}
    for start in range(0, len(ids), _BATCH):
        chunk = ids[start : start + _BATCH]
        for row in session.execute(
            sa.select(*columns).where(ImagingSelection.id.in_(chunk))
        ):
            stored.setdefault(row.id, set()).add(tuple(row))
    return stored


def _read_selections(
    paths: Sequence[str | Path], summary: SelectionSummary
) -> Iterator[_Selection]:
    for given in paths:
        path = Path(given)
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*.json") if p.is_file()):
                yield from _read_selection_file(child, summary, in_folder=True)
        elif path.exists():
            yield from _read_selection_file(path, summary, in_folder=False)
        else:
            raise LoadError(str(path), "", "no such file or folder")


def _read_selection_file(
    path: Path, summary: SelectionSummary, *, in_folder: bool
) -> Iterator[_Selection]:
    summary.files += 1
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LoadError(source, "", f"cannot read: {exc.strerror}") from None
    resource = parse_bytes(data, source, xml=False)
    if resource is None:
        if not in_folder:
            raise LoadError(
                source, "resourceType", "not a FHIR resource (no resourceType)"
            )
        summary.skipped_not_fhir += 1
        log.info("%s: not a FHIR resource, passed over", source)
        return
    yield from _selections_in(resource, source, "", None, summary)


def _selections_in(
    resource: dict[str, Any],
    source: str,
    prefix: str,
    full_url: str | None,
    summary: SelectionSummary,
) -> Iterator[_Selection]:
    kind = resource.get("resourceType")
    if kind == "ImagingSelection":
        yield _selection(resource, source, prefix, full_url)
    elif kind == "Bundle":
        entries = _element(resource, "entry", list, source, prefix) or []
        for i, entry in enumerate(entries):
            where = f"{prefix}entry[{i}]"
            inner = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(inner, dict):
                raise LoadError(source, f"{where}.resource", "is not a resource")
            url = entry.get("fullUrl")
            yield from _selections_in(
                inner,
                source,
                f"{where}.resource.",
                url if isinstance(url, str) else None,
                summary,
            )
    else:
        summary.skipped_other_types += 1
        log.debug("%s: %s%s passed over", source, prefix, kind)


def _selection(
    resource: dict[str, Any], source: str, prefix: str, full_url: str | None
) -> _Selection:
    """The rows of one ImagingSelection (R5 ``code`` 1..1, ``category`` 0..*)."""
    resource_id = _element(resource, "id", str, source, prefix) or full_url
    if not resource_id:
        raise LoadError(
            source,
            f"{prefix}id",
            "an ImagingSelection needs an id (or a Bundle entry fullUrl), so that "
            "loading it again replaces its rows",
        )
    common = {
        "id": resource_id,
        "status": _element(resource, "status", str, source, prefix),
        "study_uid": _element(resource, "studyUid", str, source, prefix),
        "series_uid": _element(resource, "seriesUid", str, source, prefix),
        "source": source,
    }
    concepts: list[tuple[str, Any]] = []
    code = _element(resource, "code", dict, source, prefix)
    if code is not None:
        concepts.append(("code", code))
    categories = _element(resource, "category", list, source, prefix) or []
    concepts.extend((f"category[{i}]", value) for i, value in enumerate(categories))

    rows = []
    for element, concept in concepts:
        if not isinstance(concept, dict):
            raise LoadError(source, f"{prefix}{element}", "must be a CodeableConcept")
        codings = _element(concept, "coding", list, source, f"{prefix}{element}.") or []
        for i, coding in enumerate(codings):
            where = f"{element}.coding[{i}]"
            if not isinstance(coding, dict):
                raise LoadError(source, f"{prefix}{where}", "must be a Coding")
            value = _element(coding, "code", str, source, f"{prefix}{where}.")
            if value is None:
                # A Coding with only a display carries nothing to join on.
                log.debug("%s: %s%s has no code, passed over", source, prefix, where)
                continue
            rows.append(
                {
                    **common,
                    "element": where,
                    "system": _element(
                        coding, "system", str, source, f"{prefix}{where}."
                    ),
                    "version": _element(
                        coding, "version", str, source, f"{prefix}{where}."
                    ),
                    "code": value,
                    "display": _element(
                        coding, "display", str, source, f"{prefix}{where}."
                    ),
                }
            )
    return _Selection(resource_id, source, tuple(rows))


_TYPE_NAMES: dict[type[Any], str] = {
    str: "a string",
    dict: "an object",
    list: "an array",
}


def _element(
    parent: dict[str, Any], name: str, kind: type[Any], source: str, prefix: str
) -> Any:
    """``parent[name]`` when present and of type ``kind``; ``None`` when absent."""
    value = parent.get(name)
    if value is None:
        return None
    if not isinstance(value, kind):
        raise LoadError(source, f"{prefix}{name}", f"must be {_TYPE_NAMES[kind]}")
    return value
