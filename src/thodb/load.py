"""Loading FHIR CodeSystem and ValueSet resources into the database.

One call of :func:`load` is one transaction: every file is read and checked before
anything is written, and any error leaves the database exactly as it was. Loading the
same content again changes nothing; the same ``url|version`` with different content is
refused unless ``replace`` is set. The membership of every value set is recomputed at
the end (:func:`thodb.expand.refresh`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from thodb import expand, migrate
from thodb.canonical import canonical
from thodb.db import session_scope
from thodb.errors import DatabaseError, LoadError
from thodb.fhir.read import ReadCounts, Resource, expand_bundle, read_paths
from thodb.fhir.resources import (
    DEFAULT_CANONICAL_BASE,
    CodeSystemRecord,
    Record,
    ValueSetRecord,
    parse_resource,
)
from thodb.models import (
    CodeSystem,
    CodeSystemProperty,
    ComposeConcept,
    ComposeFilter,
    ComposeImport,
    ComposeRule,
    Concept,
    ConceptDesignation,
    ConceptParent,
    ConceptProperty,
    ValueSet,
)

log = logging.getLogger(__name__)

#: Called with (stage, count) while loading: stage is ``read`` (files read so far) or
#: ``write`` (resources written so far) or ``expand`` (once, before the refresh).
Progress = Callable[[str, int], None]


@dataclass
class LoadSummary:
    """Counts of one load, by outcome."""

    files: int = 0
    skipped_not_fhir: int = 0
    skipped_other_types: int = 0
    code_systems_added: int = 0
    code_systems_replaced: int = 0
    code_systems_unchanged: int = 0
    value_sets_added: int = 0
    value_sets_replaced: int = 0
    value_sets_unchanged: int = 0
    concepts: int = 0
    designations: int = 0
    properties: int = 0
    hierarchy_edges: int = 0
    refresh: expand.RefreshSummary | None = None
    #: Sources of duplicate copies of the same content within this load.
    duplicates: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """True when the load added or replaced anything."""
        return bool(
            self.code_systems_added
            + self.code_systems_replaced
            + self.value_sets_added
            + self.value_sets_replaced
        )


def load(
    engine: Engine,
    paths: Sequence[str | Path],
    *,
    canonical_base: str = DEFAULT_CANONICAL_BASE,
    replace: bool = False,
    progress: Progress | None = None,
) -> LoadSummary:
    """Load every CodeSystem and ValueSet under ``paths`` in one transaction.

    An empty database gets the schema first; a database at an older revision must be
    upgraded (``thodb db upgrade``).

    :param paths: files (JSON, XML, Bundles, NPM ``.tgz`` packages) and folders.
    :param canonical_base: base of the url given to resources without one.
    :param replace: replace a loaded ``url|version`` whose content differs, instead of
        refusing the load.
    :param progress: see :data:`Progress`.
    :raises LoadError: for bad input, naming the file and element path.
    :raises DatabaseError: when the schema is not at the current revision.
    """
    summary = LoadSummary()
    counts = ReadCounts()
    records = _parse(
        read_paths(paths, counts), canonical_base, summary, progress, counts
    )
    with session_scope(engine, write=True) as session:
        ensure_schema(session.connection())
        _write(session, records, replace, summary, progress)
        if summary.changed:
            if progress:
                progress("expand", 0)
            summary.refresh = expand.refresh(session)
    return summary


def load_resources(
    session: Session,
    resources: Iterable[dict[str, Any]],
    *,
    source: str = "request",
    canonical_base: str = DEFAULT_CANONICAL_BASE,
    replace: bool = False,
) -> LoadSummary:
    """Load resources given as FHIR JSON dicts into the session's transaction.

    The caller owns the transaction: roll it back to use the resources for one request
    only (``tx-resource``, an inline ``valueSet``), or commit it. The schema must exist.

    :param source: what error messages call the resources' origin.
    :raises LoadError: for bad input.
    """
    summary = LoadSummary()
    counts = ReadCounts()
    found = (
        resource
        for i, data in enumerate(resources)
        for resource in expand_bundle(Resource(f"{source}[{i}]", data), counts)
    )
    records = _parse(found, canonical_base, summary, None, counts)
    _write(session, records, replace, summary, None)
    if summary.changed:
        summary.refresh = expand.refresh(session)
    return summary


def ensure_schema(connection: sa.Connection) -> None:
    """Create the schema in an empty database; refuse one at another revision.

    Runs in the caller's transaction, so a failed load leaves an empty database empty.

    :raises DatabaseError: when the database is at a revision other than the newest.
    """
    current = migrate.current(connection)
    if current is None:
        log.info("creating the thodb schema")
        migrate.upgrade(connection)
    elif current != migrate.head():
        raise DatabaseError(
            f"the database schema is at revision {current}, this thodb needs "
            f"{migrate.head()}: run `thodb db upgrade`"
        )


def _parse(
    resources: Iterable[Resource],
    canonical_base: str,
    summary: LoadSummary,
    progress: Progress | None,
    counts: ReadCounts,
) -> list[Record]:
    by_key: dict[tuple[str, str, str | None], Record] = {}
    for n, resource in enumerate(resources, start=1):
        record = parse_resource(
            resource.data,
            resource.source,
            canonical_base=canonical_base,
            path_prefix=resource.path_prefix,
        )
        kind = "CodeSystem" if isinstance(record, CodeSystemRecord) else "ValueSet"
        key = (kind, record.url, record.version)
        first = by_key.get(key)
        if first is None:
            by_key[key] = record
        elif first.content_hash == record.content_hash:
            summary.duplicates.append(record.source)
        else:
            raise LoadError(
                record.source,
                "url",
                f"{kind} {canonical(record.url, record.version)} is also in "
                f"{first.source} with different content",
            )
        if progress and n % 50 == 0:
            progress("read", counts.files)
    summary.files = counts.files
    summary.skipped_not_fhir = counts.skipped_not_fhir
    summary.skipped_other_types = counts.skipped_other_types
    if progress:
        progress("read", counts.files)
    return list(by_key.values())


def _write(
    session: Session,
    records: list[Record],
    replace: bool,
    summary: LoadSummary,
    progress: Progress | None,
) -> None:
    existing = _existing(session)
    for n, record in enumerate(records, start=1):
        is_cs = isinstance(record, CodeSystemRecord)
        kind = "CodeSystem" if is_cs else "ValueSet"
        found = existing.get((kind, record.url, record.version))
        if found is not None:
            row_id, row_hash, row_source = found
            if row_hash == record.content_hash:
                if is_cs:
                    summary.code_systems_unchanged += 1
                else:
                    summary.value_sets_unchanged += 1
                continue
            if not replace:
                raise LoadError(
                    record.source,
                    "url",
                    f"{kind} {canonical(record.url, record.version)} is already loaded "
                    f"(from {row_source}) with different content; give it a new "
                    "version, or load with --replace",
                )
            model = CodeSystem if is_cs else ValueSet
            session.execute(sa.delete(model).where(model.id == row_id))
        if isinstance(record, CodeSystemRecord):
            _write_code_system(session, record, summary)
            if found is None:
                summary.code_systems_added += 1
            else:
                summary.code_systems_replaced += 1
        else:
            _write_value_set(session, record)
            if found is None:
                summary.value_sets_added += 1
            else:
                summary.value_sets_replaced += 1
        if progress and n % 100 == 0:
            progress("write", n)
    if progress:
        progress("write", len(records))


def _existing(
    session: Session,
) -> dict[tuple[str, str, str | None], tuple[int, str, str]]:
    found: dict[tuple[str, str, str | None], tuple[int, str, str]] = {}
    for kind, model in (("CodeSystem", CodeSystem), ("ValueSet", ValueSet)):
        for row in session.execute(
            sa.select(
                model.id, model.url, model.version, model.content_hash, model.source
            )
        ):
            found[(kind, row.url, row.version)] = (row.id, row.content_hash, row.source)
    return found


def _insert(session: Session, model: type[Any], rows: list[dict[str, Any]]) -> None:
    if rows:
        session.execute(sa.insert(model), rows)


def _write_code_system(
    session: Session, record: CodeSystemRecord, summary: LoadSummary
) -> None:
    cs_id = session.execute(
        sa.insert(CodeSystem)
        .values(
            url=record.url,
            version=record.version,
            name=record.name,
            title=record.title,
            status=record.status,
            content=record.content,
            hierarchy_meaning=record.hierarchy_meaning,
            case_sensitive=record.case_sensitive,
            supplements=record.supplements,
            value_set=record.value_set,
            concept_count=len(record.concepts),
            content_hash=record.content_hash,
            source=record.source,
        )
        .returning(CodeSystem.id)
    ).scalar_one()
    _insert(
        session,
        CodeSystemProperty,
        [
            {
                "code_system_id": cs_id,
                "code": code,
                "uri": uri,
                "type": type_,
                "description": description,
            }
            for code, uri, type_, description in record.properties
        ],
    )
    _insert(
        session,
        Concept,
        [
            {
                "code_system_id": cs_id,
                "code": c.code,
                "display": c.display,
                "definition": c.definition,
                "status": c.status,
                "inactive": c.inactive,
                "abstract": c.abstract,
            }
            for c in record.concepts
        ],
    )
    ids = {
        code: concept_id
        for code, concept_id in session.execute(
            sa.select(Concept.code, Concept.id).where(Concept.code_system_id == cs_id)
        )
    }
    designations = [
        {
            "concept_id": ids[c.code],
            "value": d.value,
            "language": d.language,
            "use_system": d.use_system,
            "use_code": d.use_code,
        }
        for c in record.concepts
        for d in c.designations
    ]
    properties = [
        {
            "concept_id": ids[c.code],
            "code": p.code,
            "type": p.type,
            "value": p.value,
            "value_system": p.value_system,
        }
        for c in record.concepts
        for p in c.properties
    ]
    edges = {
        (ids[c.code], ids[parent]) for c in record.concepts for parent in c.parents
    }
    _insert(session, ConceptDesignation, designations)
    _insert(session, ConceptProperty, properties)
    _insert(
        session,
        ConceptParent,
        [{"concept_id": child, "parent_id": parent} for child, parent in sorted(edges)],
    )
    summary.concepts += len(record.concepts)
    summary.designations += len(designations)
    summary.properties += len(properties)
    summary.hierarchy_edges += len(edges)


def _write_value_set(session: Session, record: ValueSetRecord) -> None:
    vs_id = session.execute(
        sa.insert(ValueSet)
        .values(
            url=record.url,
            version=record.version,
            name=record.name,
            title=record.title,
            status=record.status,
            has_compose=record.has_compose,
            content_hash=record.content_hash,
            source=record.source,
            expansion_status="pending",
        )
        .returning(ValueSet.id)
    ).scalar_one()
    concepts: list[dict[str, Any]] = []
    filters: list[dict[str, Any]] = []
    imports: list[dict[str, Any]] = []
    for rule in record.rules:
        rule_id = session.execute(
            sa.insert(ComposeRule)
            .values(
                value_set_id=vs_id,
                kind=rule.kind,
                position=rule.position,
                system=rule.system,
                version=rule.version,
                import_count=len(rule.imports),
            )
            .returning(ComposeRule.id)
        ).scalar_one()
        concepts += [
            {"rule_id": rule_id, "position": i, "code": code, "display": display}
            for i, (code, display) in enumerate(rule.concepts)
        ]
        filters += [
            {
                "rule_id": rule_id,
                "position": i,
                "property": prop,
                "op": op,
                "value": value,
            }
            for i, (prop, op, value) in enumerate(rule.filters)
        ]
        imports += [
            {"rule_id": rule_id, "position": i, "url": url, "version": version}
            for i, (url, version) in enumerate(rule.imports)
        ]
    _insert(session, ComposeConcept, concepts)
    _insert(session, ComposeFilter, filters)
    _insert(session, ComposeImport, imports)
