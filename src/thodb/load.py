"""Loading FHIR CodeSystem and ValueSet resources into the database.

One call of :func:`load` is one transaction: every file is read and checked before
anything is written, and any error leaves the database exactly as it was. Loading the
same content again changes nothing; the same ``url|version`` with different content is
refused unless ``replace`` is set. The membership of every value set is recomputed at
the end (:func:`thodb.refresh.refresh`).
"""

from __future__ import annotations

import itertools
import json
import logging
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from thodb import collector, migrate
from thodb.canonical import DEFAULT_CANONICAL_BASE, canonical
from thodb.db import is_sqlite, session_scope
from thodb.errors import DatabaseError, LoadError
from thodb.fhir.pool import records_of, records_read
from thodb.fhir.read import ReadCounts, Resource, expand_bundle
from thodb.fhir.resources import CodeSystemRecord, Record, ValueSetRecord
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
from thodb.refresh import (
    ANALYZE_SCALE,
    RefreshSummary,
    Written,
    analyze,
    foreign_keys,
    indexes_built_after,
    keys_checked_after,
    known_rows,
    lock_if_free,
    refresh,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

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
    #: Rows written into the content tables (resources, concepts, compose elements).
    written_rows: int = 0
    refresh: RefreshSummary | None = None
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
    jobs: int | None = None,
) -> LoadSummary:
    """Load every CodeSystem and ValueSet under ``paths`` in one transaction.

    An empty database gets the schema first; a database at an older revision must be
    upgraded (``thodb db upgrade``).

    :param paths: files (JSON, XML, Bundles, NPM ``.tgz`` packages) and folders.
    :param canonical_base: base of the url given to resources without one.
    :param replace: replace a loaded ``url|version`` whose content differs, instead of
        refusing the load.
    :param progress: see :data:`Progress`.
    :param jobs: processes that parse the files (see :mod:`thodb.fhir.pool`); by
        default one per core, 1 parses in this process.
    :raises LoadError: for bad input, naming the file and element path.
    :raises DatabaseError: when the schema is not at the current revision.
    """
    summary = LoadSummary()
    counts = ReadCounts()
    # Parsed resources and their rows form no reference cycles (see thodb.collector).
    # The files are parsed while the records already parsed are written: the parse
    # workers are forked before the transaction begins, and a file that cannot be
    # parsed rolls back what was written.
    with (
        collector.paused(),
        records_read(paths, canonical_base, counts, jobs=jobs) as parsed,
        session_scope(engine, write=True) as session,
    ):
        lock_for_load(session)
        ensure_schema(session.connection())
        first = _first_load(session)
        records = _unique(parsed, summary, progress, counts)
        with (
            keys_checked_after(session, _WRITTEN_FOREIGN_KEYS, first),
            indexes_built_after(session, _WRITTEN_MODELS, first),
        ):
            written = _write(session, records, replace, summary, progress)
        if summary.changed:
            if progress:
                progress("expand", 0)
            _prepare_refresh(session, summary)
            summary.refresh = refresh(session, written=written)
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
    records = _unique(records_of(found, canonical_base), summary, None, counts)
    lock_for_load(session)
    written = _write(session, records, replace, summary, None)
    if summary.changed:
        _prepare_refresh(session, summary)
        summary.refresh = refresh(session, written=written)
    return summary


#: What a load writes. On a first load their indexes are built after writing and, on
#: PostgreSQL, their foreign keys added after it: 300,000 concept properties took 2.6 s
#: to insert into PostgreSQL with their key checked row by row, 1.3 s without it, and
#: 0.06 s to check them all at once. Each key points at a row the same load wrote.
#: SQLite wrote the million properties and parent edges of a 350,000-concept code
#: system in 13.3 s into indexed tables, 9.9 s with their indexes built after.
_WRITTEN_MODELS = (
    CodeSystem,
    CodeSystemProperty,
    Concept,
    ConceptDesignation,
    ConceptParent,
    ConceptProperty,
    ValueSet,
    ComposeRule,
    ComposeConcept,
    ComposeFilter,
    ComposeImport,
)
_WRITTEN_FOREIGN_KEYS = foreign_keys(*_WRITTEN_MODELS)

#: Their tables; PostgreSQL's planner needs their statistics to be current to plan the
#: refresh's recursive statements and the queries that read them.
_WRITTEN_TABLES = tuple(str(model.__tablename__) for model in _WRITTEN_MODELS)


def _first_load(session: Session) -> bool:
    """Whether this is a load into an empty database whose tables no other transaction
    uses: their indexes are then built after writing, and on PostgreSQL their foreign
    keys checked after it (see :func:`thodb.refresh.indexes_built_after` and
    :func:`thodb.refresh.keys_checked_after`).

    On PostgreSQL the tables are locked until the load commits, when no other
    transaction holds a lock on them: a reader that starts meanwhile waits for the load
    instead of finding nothing. On SQLite the load's write lock keeps other writers out
    already, and readers see the database as it was, indexes included, until the load
    commits."""
    if any(
        session.scalar(sa.select(sa.exists().select_from(model)))
        for model in (CodeSystem, ValueSet)
    ):
        return False
    return is_sqlite(session) or lock_if_free(session, _WRITTEN_TABLES)


def _prepare_refresh(session: Session, summary: LoadSummary) -> None:
    if is_sqlite(session):
        return
    # Statistics of the rows just written (ANALYZE is allowed in a transaction), when
    # the load grew the tables by a tenth or more, as autovacuum's default scale factor
    # would: the planner needs them after a first or large load, while after a few
    # resources ANALYZE would take longer than the incremental refresh that follows.
    if summary.written_rows >= ANALYZE_SCALE * known_rows(session, _WRITTEN_TABLES):
        analyze(session, _WRITTEN_TABLES)


#: Key of the PostgreSQL advisory lock that serializes loads ("thodb" in ASCII).
LOAD_LOCK_KEY = 0x74686F6462


def lock_for_load(session: Session) -> None:
    """Wait until no other load is writing, for the rest of the transaction.

    Two loads started at once then run one after the other, each on the other's
    result. PostgreSQL: a transaction-level advisory lock; SQLite: the write lock its
    ``BEGIN IMMEDIATE`` already holds.
    """
    if not is_sqlite(session):
        session.execute(
            sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOAD_LOCK_KEY}
        )


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


def _unique(
    records: Iterable[Record],
    summary: LoadSummary,
    progress: Progress | None,
    counts: ReadCounts,
) -> Iterator[Record]:
    """The records, each url|version once: a second copy is counted as a duplicate,
    a different one refused. The summary's file counts are set once all are read."""
    first_of: dict[tuple[str, str, str | None], tuple[str, str]] = {}
    for n, record in enumerate(records, start=1):
        kind = "CodeSystem" if isinstance(record, CodeSystemRecord) else "ValueSet"
        key = (kind, record.url, record.version)
        first = first_of.get(key)
        if first is None:
            first_of[key] = (record.content_hash, record.source)
            yield record
        elif first[0] == record.content_hash:
            summary.duplicates.append(record.source)
        else:
            raise LoadError(
                record.source,
                "url",
                f"{kind} {canonical(record.url, record.version)} is also in "
                f"{first[1]} with different content",
            )
        if progress and n % 50 == 0:
            progress("read", counts.files)
    summary.files = counts.files
    summary.skipped_not_fhir = counts.skipped_not_fhir
    summary.skipped_other_types = counts.skipped_other_types
    if progress:
        progress("read", counts.files)


#: The content hash of a row that the next load of its resource rewrites, whatever the
#: resource holds (set by migrations that add columns the loader fills).
STALE_HASH = ""


def _write(
    session: Session,
    records: Iterable[Record],
    replace: bool,
    summary: LoadSummary,
    progress: Progress | None,
) -> Written:
    """Write the records that are new or changed, in batches as they come; return the
    urls of what was written."""
    existing = _existing(session)
    code_systems: list[CodeSystemRecord] = []
    value_sets: list[ValueSetRecord] = []
    written_cs: set[str] = set()
    written_vs: set[str] = set()
    written = 0

    def write_code_systems() -> None:
        nonlocal written
        summary.written_rows += sum(
            1
            + len(r.properties)
            + sum(
                1 + len(c.designations) + len(c.properties) + len(c.parents)
                for c in r.concepts
            )
            for r in code_systems
        )
        _write_code_systems(session, code_systems, summary)
        written += len(code_systems)
        code_systems.clear()
        if progress:
            progress("write", written)

    def write_value_sets() -> None:
        nonlocal written
        summary.written_rows += sum(
            1
            + sum(
                1 + len(u.concepts) + len(u.filters) + len(u.imports) for u in r.rules
            )
            for r in value_sets
        )
        _write_value_sets(session, value_sets)
        written += len(value_sets)
        value_sets.clear()
        if progress:
            progress("write", written)

    for record in records:
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
            # An empty hash marks a row that a migration asked to have rewritten.
            if not replace and row_hash != STALE_HASH:
                raise LoadError(
                    record.source,
                    "url",
                    f"{kind} {canonical(record.url, record.version)} is already loaded "
                    f"(from {row_source}) with different content; give it a new "
                    "version, or load with --replace",
                )
            model = CodeSystem if is_cs else ValueSet
            session.execute(sa.delete(model).where(model.id == row_id))
        # Written in batches: one COPY (or executemany) per table and batch, instead of
        # a round trip per resource.
        if isinstance(record, CodeSystemRecord):
            code_systems.append(record)
            written_cs.add(record.url)
            if found is None:
                summary.code_systems_added += 1
            else:
                summary.code_systems_replaced += 1
            if len(code_systems) == _CODE_SYSTEM_BATCH:
                write_code_systems()
        else:
            value_sets.append(record)
            written_vs.add(record.url)
            if found is None:
                summary.value_sets_added += 1
            else:
                summary.value_sets_replaced += 1
            if len(value_sets) == _VALUE_SET_BATCH:
                write_value_sets()
    if code_systems:
        write_code_systems()
    if value_sets:
        write_value_sets()
    return Written(frozenset(written_cs), frozenset(written_vs))


#: Resources per batch written.
_CODE_SYSTEM_BATCH = 50
_VALUE_SET_BATCH = 500


def _allocate_ids(session: Session, model: type[Any], count: int) -> list[int]:
    """``count`` new ids of ``model``'s table, for rows written with their ids.

    PostgreSQL: from the id column's sequence. SQLite: the ids after the largest,
    which is how SQLite numbers a row without one; the load's write lock keeps them
    free until the rows are written.
    """
    if not count:
        return []
    if is_sqlite(session):
        largest = session.scalar(sa.select(sa.func.max(model.id))) or 0
        return list(range(largest + 1, largest + 1 + count))
    table = f"{model.__table__.schema}.{model.__table__.name}"
    return list(session.scalar(_NEW_IDS, {"table": table, "count": count}) or ())


# One array, and the sequence looked up once: with pg_get_serial_sequence in the
# select list and a row per id, 20,000 ids took 68 ms instead of 9.
_NEW_IDS = sa.text(
    "WITH s AS MATERIALIZED ("
    "SELECT CAST(pg_get_serial_sequence(:table, 'id') AS regclass) AS id) "
    "SELECT array(SELECT nextval(s.id) FROM s CROSS JOIN generate_series(1, :count))"
)


def _copy(session: Session, model: type[Any], rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (all with the same keys) into ``model``'s table (see
    :func:`_copy_values`); JSON columns are written as their JSON text."""
    table = model.__table__
    # In the table's order, which is the order of the columns of a compiled INSERT.
    names = [column.name for column in table.columns if column.name in rows[0]]
    as_json = {c.name for c in table.columns if isinstance(c.type, sa.JSON)}
    values: Iterable[Sequence[Any]]
    if as_json.isdisjoint(names) and len(names) > 1:
        # Most tables: each row's values picked in one call, a quarter of the time
        # of a comprehension per row (THO: 149,000 rows).
        values = map(operator.itemgetter(*names), rows)
    else:
        values = (
            [
                json.dumps(row[n]) if n in as_json and row[n] is not None else row[n]
                for n in names
            ]
            for row in rows
        )
    _copy_values(session, model, names, values)


def _copy_values(
    session: Session,
    model: type[Any],
    names: Sequence[str],
    values: Iterable[Sequence[Any]],
) -> None:
    """Write ``values``, rows of the columns ``names`` (in the table's order, as a
    compiled INSERT lists them), into ``model``'s table through the driver:
    PostgreSQL's COPY, SQLite's ``executemany``.

    COPY takes the rows as one stream, several times faster than INSERT statements;
    on SQLite the driver's ``executemany`` of tuples takes a third of the time the
    ORM's bulk insert of the same dicts took (THO: 0.4 s against 1.3 s). Both run
    in the session's transaction.
    """
    table = model.__table__
    assert list(names) == [c.name for c in table.columns if c.name in names], names
    connection = session.connection()
    raw = connection.connection.driver_connection
    assert raw is not None, "the session's connection is open"
    if is_sqlite(session):
        # The connection's schema map (tho is the main database) applied by hand, as
        # the driver runs the statement.
        translate = connection.get_execution_options().get("schema_translate_map")
        insert = sa.insert(table).compile(
            dialect=connection.dialect,
            column_keys=names,
            schema_translate_map=translate,
            render_schema_translate=translate is not None,
        )
        cursor = raw.cursor()
        try:
            cursor.executemany(str(insert), values)
        finally:
            cursor.close()
        return
    # Imported here: only a PostgreSQL connection (which has imported psycopg) gets
    # here, and importing it takes a twentieth of a second that SQLite never needs.
    from psycopg import sql as psycopg_sql

    statement = psycopg_sql.SQL("COPY {} ({}) FROM STDIN").format(
        psycopg_sql.Identifier(table.schema, table.name),
        psycopg_sql.SQL(", ").join(psycopg_sql.Identifier(n) for n in names),
    )
    with raw.cursor() as cursor, cursor.copy(statement) as copy:
        for row in values:
            copy.write_row(row)


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


def _insert(session: Session, model: type[Any], rows: Iterable[dict[str, Any]]) -> int:
    """Write ``rows`` (all with the same keys) in batches; return how many."""
    count = 0
    for batch in _batches_of(rows, _INSERT_BATCH):
        _copy(session, model, batch)
        count += len(batch)
    return count


def _insert_values(
    session: Session,
    model: type[Any],
    names: Sequence[str],
    rows: Iterable[tuple[Any, ...]],
) -> int:
    """Write ``rows``, tuples of the columns ``names``, in batches; return how many.
    For the largest tables (a million properties and parent edges for a code system
    of 350,000 concepts), whose rows are made as tuples rather than dicts."""
    count = 0
    for batch in _batches_of(rows, _INSERT_BATCH):
        _copy_values(session, model, names, batch)
        count += len(batch)
    return count


#: Rows per INSERT ... executemany (SQLite) or COPY (PostgreSQL).
_INSERT_BATCH = 20_000


def _batches_of(rows: Iterable[T], size: int) -> Iterator[list[T]]:
    remaining = iter(rows)
    while batch := list(itertools.islice(remaining, size)):
        yield batch


def _write_code_systems(
    session: Session, records: list[CodeSystemRecord], summary: LoadSummary
) -> None:
    cs_ids = _allocate_ids(session, CodeSystem, len(records))
    _insert(
        session,
        CodeSystem,
        (
            {
                "id": cs_id,
                "url": r.url,
                "version": r.version,
                "name": r.name,
                "title": r.title,
                "status": r.status,
                "content": r.content,
                "hierarchy_meaning": r.hierarchy_meaning,
                "case_sensitive": r.case_sensitive,
                "supplements": r.supplements,
                "value_set": r.value_set,
                "language": r.language,
                "experimental": r.experimental,
                "standards_status": r.standards_status,
                "concept_count": len(r.concepts),
                "content_hash": r.content_hash,
                "source": r.source,
            }
            for cs_id, r in zip(cs_ids, records, strict=True)
        ),
    )
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
            for cs_id, r in zip(cs_ids, records, strict=True)
            for code, uri, type_, description in r.properties
        ],
    )
    concepts = [
        (cs_id, c) for cs_id, r in zip(cs_ids, records, strict=True) for c in r.concepts
    ]
    concept_ids = _allocate_ids(session, Concept, len(concepts))
    _insert(
        session,
        Concept,
        (
            {
                "id": concept_id,
                "code_system_id": cs_id,
                "code": c.code,
                "display": c.display,
                "definition": c.definition,
                "status": c.status,
                "inactive": c.inactive,
                "abstract": c.abstract,
            }
            for (cs_id, c), concept_id in zip(concepts, concept_ids, strict=True)
        ),
    )
    # Generators: the rows of the large tables are made while they are written, not
    # all held at once (a code system of 350,000 concepts has a million properties);
    # as tuples, each concept's id taken from where it is listed.
    numbered = list(zip(concepts, concept_ids, strict=True))
    designations = (
        (concept_id, d.language, d.use_system, d.use_code, d.value, d.standards_status)
        for (_, c), concept_id in numbered
        for d in c.designations
    )
    properties = (
        (concept_id, p.code, p.type, p.value, p.value_system)
        for (_, c), concept_id in numbered
        for p in c.properties
    )
    # The parents by code, in each code system.
    ids: dict[int, dict[str, int]] = defaultdict(dict)
    for (cs_id, c), concept_id in numbered:
        ids[cs_id][c.code] = concept_id
    # Concepts in id order, each one's parents (a parent given twice is one edge) in
    # id order: the rows arrive in the primary key's order without a sort of them all.
    edges = (
        (child, parent)
        for (cs_id, c), child in numbered
        if c.parents
        for parent in sorted({ids[cs_id][code] for code in c.parents})
    )
    summary.designations += _insert_values(
        session,
        ConceptDesignation,
        (
            "concept_id",
            "language",
            "use_system",
            "use_code",
            "value",
            "standards_status",
        ),
        designations,
    )
    summary.properties += _insert_values(
        session,
        ConceptProperty,
        ("concept_id", "code", "type", "value", "value_system"),
        properties,
    )
    summary.hierarchy_edges += _insert_values(
        session, ConceptParent, ("concept_id", "parent_id"), edges
    )
    summary.concepts += len(concepts)


def _write_value_sets(session: Session, records: list[ValueSetRecord]) -> None:
    vs_ids = _allocate_ids(session, ValueSet, len(records))
    _insert(
        session,
        ValueSet,
        (
            {
                "id": vs_id,
                "url": r.url,
                "version": r.version,
                "name": r.name,
                "title": r.title,
                "status": r.status,
                "language": r.language,
                "experimental": r.experimental,
                "standards_status": r.standards_status,
                "compose_inactive": r.compose_inactive,
                "supplements": r.supplements or None,
                "expansion_parameters": [list(p) for p in r.expansion_parameters]
                or None,
                "has_compose": r.has_compose,
                "content_hash": r.content_hash,
                "source": r.source,
                "expansion_status": "pending",
            }
            for vs_id, r in zip(vs_ids, records, strict=True)
        ),
    )
    rules = [
        (vs_id, rule)
        for vs_id, r in zip(vs_ids, records, strict=True)
        for rule in r.rules
    ]
    rule_ids = _allocate_ids(session, ComposeRule, len(rules))
    _insert(
        session,
        ComposeRule,
        (
            {
                "id": rule_id,
                "value_set_id": vs_id,
                "kind": rule.kind,
                "position": rule.position,
                "system": rule.system,
                "version": rule.version,
                "import_count": len(rule.imports),
            }
            for (vs_id, rule), rule_id in zip(rules, rule_ids, strict=True)
        ),
    )
    pairs = list(zip(rule_ids, (rule for _, rule in rules), strict=True))
    _insert(
        session,
        ComposeConcept,
        [
            {
                "rule_id": rule_id,
                "position": i,
                "code": c.code,
                "display": c.display,
                "designations": [
                    {
                        "language": d.language,
                        "use_system": d.use_system,
                        "use_code": d.use_code,
                        "value": d.value,
                    }
                    for d in c.designations
                ]
                or None,
                "properties": [
                    {"code": p.code, "type": p.type, "value": p.value}
                    for p in c.properties
                ]
                or None,
                "standards_status": c.standards_status,
            }
            for rule_id, rule in pairs
            for i, c in enumerate(rule.concepts)
        ],
    )
    _insert(
        session,
        ComposeFilter,
        [
            {
                "rule_id": rule_id,
                "position": i,
                "property": prop,
                "op": op,
                "value": value,
            }
            for rule_id, rule in pairs
            for i, (prop, op, value) in enumerate(rule.filters)
        ],
    )
    _insert(
        session,
        ComposeImport,
        [
            {"rule_id": rule_id, "position": i, "url": url, "version": version}
            for rule_id, rule in pairs
            for i, (url, version) in enumerate(rule.imports)
        ],
    )
