"""A first load into PostgreSQL adds the foreign keys of the tables it writes and of
those the refresh fills after filling them, and builds their indexes (and the primary
keys of the two filled tables) after them: it must end with the constraints and
indexes the migrations make, and must not wait for a transaction that holds those
tables. It also leaves the planner statistics of those tables, which have none before,
and of the tables it wrote, and the statistics of the strata for the passes that select
by them. A first load into SQLite builds the indexes after the rows too (not the keys,
which SQLite cannot drop); a first load that fails leaves the indexes as they were, on
either engine."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from conftest import Databases
from thodb import migrate, sql
from thodb.db import session_scope
from thodb.errors import LoadError
from thodb.expand import expand
from thodb.load import load
from thodb.refresh import refresh

CS = "http://example.org/CodeSystem/first-load"
VS = "http://example.org/ValueSet/first-load"
CODES = ["a", "b", "c"]

_FOREIGN_KEYS = sa.text(
    "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
    "FROM pg_constraint WHERE contype = 'f' AND connamespace = 'tho'::regnamespace "
    "ORDER BY 1, 2"
)


@pytest.fixture
def postgresql(databases: Databases) -> Engine:
    return databases.engine("postgresql")


def _content(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    code_system = {
        "resourceType": "CodeSystem",
        "url": CS,
        "status": "active",
        "content": "complete",
        "concept": [
            {
                "code": code,
                "display": code.upper(),
                "designation": [{"language": "de", "value": f"{code.upper()} (de)"}],
            }
            for code in CODES
        ],
    }
    value_set = {
        "resourceType": "ValueSet",
        "url": VS,
        "status": "active",
        "compose": {"include": [{"system": CS}]},
    }
    for name, resource in (("cs.json", code_system), ("vs.json", value_set)):
        (folder / name).write_text(json.dumps(resource))
    return folder


# Every index with its definition, and every constraint that is not a foreign key.
_INDEXES = sa.text(
    "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'tho' "
    "UNION ALL "
    "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
    "FROM pg_constraint WHERE contype <> 'f' AND connamespace = 'tho'::regnamespace "
    "ORDER BY 1, 2, 3"
)


def _foreign_keys(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(_FOREIGN_KEYS)]


def _indexes(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(_INDEXES)]


def _migrated(databases: Databases) -> Engine:
    engine = databases.engine("postgresql")
    with engine.begin() as connection:
        migrate.upgrade(connection)
    return engine


def _migrated_foreign_keys(databases: Databases) -> list[Any]:
    return _foreign_keys(_migrated(databases))


def test_a_first_load_ends_with_the_migrations_foreign_keys(
    postgresql: Engine, databases: Databases, tmp_path: Path
) -> None:
    load(postgresql, [_content(tmp_path / "content")])

    assert _foreign_keys(postgresql) == _migrated_foreign_keys(databases)
    with session_scope(postgresql) as session:
        assert [m.code for m in expand(session, VS, cache=False).contains] == CODES


def test_a_first_load_ends_with_the_migrations_indexes(
    postgresql: Engine, databases: Databases, tmp_path: Path
) -> None:
    load(postgresql, [_content(tmp_path / "content")])

    assert _indexes(postgresql) == _indexes(_migrated(databases))


# Every index of an SQLite database, with its table and definition.
_SQLITE_INDEXES = sa.text(
    "SELECT tbl_name, name, sql FROM sqlite_master WHERE type = 'index' ORDER BY 1, 2"
)


@contextmanager
def _dropped_indexes(engine: Engine) -> Iterator[list[str]]:
    """The names of the indexes dropped on ``engine`` while the block runs."""
    dropped: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().startswith("DROP INDEX"):
            dropped.append(statement.split()[-1].split(".")[-1])

    sa.event.listen(engine, "before_cursor_execute", note)
    try:
        yield dropped
    finally:
        sa.event.remove(engine, "before_cursor_execute", note)


def _indexes_of(engine: Engine) -> list[Any]:
    if engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(_SQLITE_INDEXES)]
    return _indexes(engine)


def test_a_first_load_into_sqlite_ends_with_the_migrations_indexes(
    databases: Databases, tmp_path: Path
) -> None:
    sqlite = databases.engine("sqlite")
    migrated = databases.engine("sqlite")
    with migrated.begin() as connection:
        migrate.upgrade(connection)
    with _dropped_indexes(sqlite) as dropped:
        load(sqlite, [_content(tmp_path / "content")])

    # The indexes of the written tables and of the two filled ones were built after.
    assert "ix_concept_designation_concept_id" in dropped
    assert "ix_value_set_member_system_code" in dropped
    assert _indexes_of(sqlite) == _indexes_of(migrated)
    with session_scope(sqlite) as session:
        assert [m.code for m in expand(session, VS, cache=False).contains] == CODES


def test_a_failed_first_load_leaves_the_indexes_as_they_were(
    fresh_engine: Engine, tmp_path: Path
) -> None:
    with fresh_engine.begin() as connection:
        migrate.upgrade(connection)
    before = _indexes_of(fresh_engine)
    folder = tmp_path / "content"
    folder.mkdir()
    # More code systems than one batch holds, written before the broken file is read.
    for n in range(60):
        code_system = {
            "resourceType": "CodeSystem",
            "url": f"{CS}-{n}",
            "status": "active",
            "content": "complete",
            "concept": [{"code": code} for code in CODES],
        }
        (folder / f"cs-{n:02}.json").write_text(json.dumps(code_system))
    (folder / "zz-broken.json").write_text("{")
    stages: list[tuple[str, int]] = []

    with _dropped_indexes(fresh_engine) as dropped, pytest.raises(LoadError):
        load(fresh_engine, [folder], progress=lambda *stage: stages.append(stage))

    assert "ix_concept_property_concept_id" in dropped
    assert ("write", 50) in stages  # a batch was written before the error
    assert _indexes_of(fresh_engine) == before
    with fresh_engine.connect() as connection:
        concepts = f"SELECT count(*) FROM {_prefix(fresh_engine)}concept"
        assert connection.scalar(sa.text(concepts)) == 0


def _prefix(engine: Engine) -> str:
    return "" if engine.dialect.name == "sqlite" else "tho."


@pytest.mark.parametrize(
    "statement",
    [
        # A table the refresh fills, then tables the load writes.
        (
            "INSERT INTO tho.value_set_member (value_set_id, system, code, "
            "inactive, abstract, value_set_url) "
            "VALUES (-1, 'http://x', 'y', false, false, 'http://z')"
        ),
        (
            "INSERT INTO tho.concept_property (concept_id, code, type, value) "
            "VALUES (-1, 'p', 'code', 'v')"
        ),
        "INSERT INTO tho.concept_parent (concept_id, parent_id) VALUES (-1, -2)",
        # The primary keys of the filled tables, built after them: a second row.
        ("INSERT INTO tho.value_set_member SELECT * FROM tho.value_set_member LIMIT 1"),
        "INSERT INTO tho.compose_rule_code SELECT * FROM tho.compose_rule_code LIMIT 1",
        (
            "INSERT INTO tho.compose_filter (rule_id, position, property, op, value) "
            "VALUES (-1, 0, 'concept', 'is-a', 'a')"
        ),
    ],
)
def test_the_keys_still_refuse_orphans_and_doubles_after_a_first_load(
    postgresql: Engine, tmp_path: Path, statement: str
) -> None:
    load(postgresql, [_content(tmp_path / "content")])
    with pytest.raises(sa.exc.IntegrityError), postgresql.begin() as connection:
        connection.execute(sa.text(statement))


def test_a_first_load_does_not_wait_for_a_reader(
    postgresql: Engine, databases: Databases, tmp_path: Path
) -> None:
    with postgresql.begin() as connection:
        migrate.upgrade(connection)
    content = _content(tmp_path / "content")
    failures: list[BaseException] = []

    def run() -> None:
        try:
            load(postgresql, [content])
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    # A reader's open transaction holds a lock on value_set while the load runs.
    with postgresql.connect() as reader, reader.begin():
        reader.execute(sa.text("SELECT count(*) FROM tho.value_set")).scalar()
        loader = threading.Thread(target=run)
        loader.start()
        loader.join(timeout=120)
        finished = not loader.is_alive()
    loader.join()

    assert finished, "the load waited for the reader's transaction"
    assert failures == []
    assert _foreign_keys(postgresql) == _migrated_foreign_keys(databases)


_STATISTICS = sa.text(
    "SELECT tablename, attname FROM pg_stats WHERE schemaname = 'tho' "
    "AND (tablename, attname) IN (('compose_rule_code', 'rule_id'), "
    "('concept_designation', 'concept_id'), ('value_set_member', 'value_set_id')) "
    "ORDER BY 1"
)


def test_a_first_load_leaves_statistics_of_the_derived_tables(
    postgresql: Engine, tmp_path: Path
) -> None:
    with postgresql.begin() as connection:
        migrate.upgrade(connection)
        assert connection.execute(_STATISTICS).all() == []

    load(postgresql, [_content(tmp_path / "content")])

    with postgresql.connect() as connection:
        assert [tuple(row) for row in connection.execute(_STATISTICS)] == [
            ("compose_rule_code", "rule_id"),
            ("concept_designation", "concept_id"),
            ("value_set_member", "value_set_id"),
        ]


def test_a_first_load_leaves_statistics_of_the_final_statuses(
    postgresql: Engine, tmp_path: Path
) -> None:
    # value_set is analyzed while the load has every value set pending; statistics kept
    # from then would have every later incremental refresh plan for all of them.
    folder = _content(tmp_path / "content")
    listed = {"include": [{"system": CS, "concept": [{"code": "a"}]}]}
    # Four more value sets with a compose, two without (defined by reference).
    for n, compose in enumerate([listed] * 4 + [None] * 2):
        resource = {"resourceType": "ValueSet", "url": f"{VS}-{n}", "status": "active"}
        if compose is not None:
            resource["compose"] = compose
        (folder / f"vs-{n}.json").write_text(json.dumps(resource))

    load(postgresql, [folder])

    with postgresql.connect() as connection:
        common = connection.scalar(
            sa.text(
                "SELECT most_common_vals::text FROM pg_stats WHERE schemaname = 'tho' "
                "AND tablename = 'value_set' AND attname = 'expansion_status'"
            )
        )
    assert common == "{expanded,not-expandable}"


def test_the_passes_are_planned_with_statistics_of_the_strata(
    postgresql: Engine, tmp_path: Path
) -> None:
    # The loader analyzes value_set before any value set has a stratum; a pass selects
    # its value sets by stratum, so the strata are analyzed before the first pass runs.
    with postgresql.begin() as connection:
        migrate.upgrade(connection)
    seen: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        text = " ".join(statement.split())
        if text.startswith("ANALYZE tho.value_set "):
            seen.append("analyze " + text.split("(", 1)[1].rstrip(")"))
        elif "FROM tho.value_set WHERE stratum =" in text and "INSERT INTO" in text:
            seen.append("pass")

    sa.event.listen(postgresql, "before_cursor_execute", note)
    try:
        load(postgresql, [_content(tmp_path / "content")])
    finally:
        sa.event.remove(postgresql, "before_cursor_execute", note)

    assert "pass" in seen
    before_the_passes = seen[: seen.index("pass")]
    assert any("stratum" in entry for entry in before_the_passes)


@pytest.mark.parametrize("setting", ["on", "off"])
@pytest.mark.parametrize("pending", ["every value set", "one value set"])
def test_a_full_refresh_groups_without_hashing_and_leaves_the_setting(
    postgresql: Engine, tmp_path: Path, setting: str, pending: str
) -> None:
    # A full refresh's MATERIALIZE groups its rows in the order they are stored in
    # (sorted, not hashed); an incremental one, which compares the few rows of its
    # passes with the stored ones, leaves hashing as it is. The caller's
    # enable_hashagg is as before afterwards.
    with postgresql.begin() as connection:
        migrate.upgrade(connection)
    folder = _content(tmp_path / "content")
    other = {
        "resourceType": "ValueSet",
        "url": f"{VS}-other",
        "status": "active",
        "compose": {"include": [{"system": CS, "concept": [{"code": CODES[0]}]}]},
    }
    (folder / "other.json").write_text(json.dumps(other))
    load(postgresql, [folder])
    seen: list[str] = []

    def note(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any
    ) -> None:
        text = " ".join(statement.split())
        if text.startswith(
            "WITH RECURSIVE target(value_set_id) AS ( SELECT id FROM tho.value_set "
            "WHERE stratum ="
        ):
            seen.append("pass")
        elif (
            "set_config" in text and (parameters or {}).get("name") == "enable_hashagg"
        ):
            seen.append("back" if "before" in parameters else "off")

    with session_scope(postgresql) as session:
        session.execute(sa.text(f"SET LOCAL enable_hashagg = {setting}"))
        with sql.without_hash_aggregation(session):
            assert session.scalar(sa.text("SHOW enable_hashagg")) == "off"
        assert session.scalar(sa.text("SHOW enable_hashagg")) == setting
        session.execute(
            sa.text(
                "UPDATE tho.value_set SET expansion_status = 'pending' "
                "WHERE url = :url OR :every"
            ),
            {"url": VS, "every": pending == "every value set"},
        )
        sa.event.listen(postgresql, "before_cursor_execute", note)
        try:
            summary = refresh(session)
        finally:
            sa.event.remove(postgresql, "before_cursor_execute", note)
        if pending == "every value set":
            assert summary.recomputed == 2
            assert seen == ["off", "pass"] + (["back"] if setting == "on" else [])
        else:
            assert summary.recomputed == 1
            assert seen == ["pass"]
        assert session.scalar(sa.text("SHOW enable_hashagg")) == setting
        session.rollback()


@pytest.mark.parametrize(("setting", "inside"), [("4MB", "64MB"), ("128MB", "128MB")])
def test_a_refresh_raises_work_mem_for_itself_only(
    postgresql: Engine, setting: str, inside: str
) -> None:
    # The sorts and hashes of a refresh get at least 64 MB; a larger setting stays, and
    # the caller's setting is as before afterwards.
    with session_scope(postgresql) as session:
        session.execute(sa.text(f"SET LOCAL work_mem = '{setting}'"))
        with sql.work_mem_at_least(session, 64 * 1024):
            assert session.scalar(sa.text("SHOW work_mem")) == inside
        assert session.scalar(sa.text("SHOW work_mem")) == setting
        migrate.upgrade(session.connection())
        refresh(session)
        assert session.scalar(sa.text("SHOW work_mem")) == setting
        session.rollback()
