"""Migrations: up, down to base and up again with data, every step, models == migrations.

Every test runs on SQLite and PostgreSQL and works with whatever revisions exist: the
revision list is read from the Alembic scripts. Downgrading to base removes the data by
design; upgrading again and reloading the same content must give the same checksums of
every table. A step down and up again in the middle of the history must keep the data, except the
values of the columns that the revision adds (or that its upgrade rewrites).
Autogenerate's comparison of the models with a migrated database must find nothing.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from conftest import SHARED, Databases, table_checksums
from thodb import migrate
from thodb.load import load
from thodb.models import SCHEMA, Base

CS = "http://example.org/CodeSystem/migrations"
VS = "http://example.org/ValueSet/migrations-"


def _revisions() -> list[tuple[str, str | None]]:
    """(revision, down_revision) of every script, from the first to the head."""
    config = Config()
    config.set_main_option("script_location", str(migrate.script_location()))
    scripts = ScriptDirectory.from_config(config)
    found = [
        (script.revision, script.down_revision)
        for script in scripts.walk_revisions("base", "heads")
    ]
    for _, down in found:
        # A merge revision would have a tuple here; stepping by -1 assumes a line.
        assert down is None or isinstance(down, str)
    return list(reversed(found))  # type: ignore[arg-type]


# Columns a revision's upgrade rewrites in existing rows (its docstring says why).
_REWRITTEN_BY = {
    "0004": {"code_system": {"content_hash"}, "value_set": {"content_hash"}},
}


def _columns(engine: Engine) -> dict[str, set[str]]:
    with engine.connect() as connection:
        inspector = sa.inspect(connection)
        schema = None if engine.dialect.name == "sqlite" else SCHEMA
        return {
            table: {c["name"] for c in inspector.get_columns(table, schema=schema)}
            for table in inspector.get_table_names(schema=schema)
        }


def _content(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    resources: list[dict[str, Any]] = [
        {
            "resourceType": "CodeSystem",
            "url": CS,
            "version": "1",
            "status": "active",
            "content": "complete",
            "property": [{"code": "kind", "type": "code"}],
            "concept": [
                {
                    "code": "root",
                    "display": "Root",
                    "designation": [{"language": "de", "value": "Wurzel"}],
                    "concept": [
                        {
                            "code": f"leaf{i}",
                            "display": f"Leaf {i}",
                            "property": [{"code": "kind", "valueCode": f"k{i % 2}"}],
                        }
                        for i in range(6)
                    ],
                }
            ],
        },
        {
            "resourceType": "ValueSet",
            "url": VS + "even",
            "version": "1",
            "status": "active",
            "compose": {
                "include": [
                    {
                        "system": CS,
                        "filter": [{"property": "kind", "op": "=", "value": "k0"}],
                    }
                ]
            },
        },
        {
            "resourceType": "ValueSet",
            "url": VS + "all-but-even",
            "version": "1",
            "status": "active",
            "compose": {
                "include": [{"system": CS}],
                "exclude": [{"valueSet": [VS + "even"]}],
            },
        },
        {
            "resourceType": "ValueSet",
            "url": VS + "by-reference",
            "status": "active",
        },
    ]
    for i, resource in enumerate(resources):
        (folder / f"r{i}.json").write_text(json.dumps(resource))
    return folder


def _thodb_tables(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        inspector = sa.inspect(connection)
        schema = None if engine.dialect.name == "sqlite" else SCHEMA
        names = inspector.get_table_names(schema=schema)
        names += inspector.get_view_names(schema=schema)
    return sorted(n for n in names if n != "alembic_version")


def test_there_is_a_line_of_revisions_from_base_to_head() -> None:
    revisions = _revisions()
    assert revisions[0][1] is None
    assert revisions[-1][0] == migrate.head()
    for (_, down), (previous, _) in zip(revisions[1:], revisions, strict=False):
        assert down == previous


def test_upgrading_a_new_database_warns_of_nothing(fresh_engine: Engine) -> None:
    # The first command a user runs migrates; a warning on it reaches their terminal.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        migrate.upgrade(fresh_engine)
    assert migrate.current(fresh_engine) == migrate.head()


def test_upgrade_downgrade_to_base_and_upgrade_again_with_data(
    fresh_engine: Engine, tmp_path: Path
) -> None:
    content = _content(tmp_path / "content")
    migrate.upgrade(fresh_engine)
    load(fresh_engine, [content])
    loaded = table_checksums(fresh_engine)
    assert loaded["value_set_member"].split(":")[0] != "0"

    migrate.downgrade(fresh_engine, "base")
    assert migrate.current(fresh_engine) is None
    assert _thodb_tables(fresh_engine) == []

    migrate.upgrade(fresh_engine)
    assert migrate.current(fresh_engine) == migrate.head()
    load(fresh_engine, [content])
    assert table_checksums(fresh_engine) == loaded


def test_every_revision_steps_down_and_up_again_with_data_present(
    fresh_engine: Engine, databases: Databases, engine_kind: str, tmp_path: Path
) -> None:
    content = _content(tmp_path / "content")
    migrate.upgrade(fresh_engine)
    load(fresh_engine, [content])
    at_head = table_checksums(fresh_engine)

    # The columns of each revision, from a scratch database migrated step by step.
    scratch = databases.engine(engine_kind)
    columns_at: dict[str | None, dict[str, set[str]]] = {None: {}}
    for revision, _ in _revisions():
        migrate.upgrade(scratch, revision)
        columns_at[revision] = _columns(scratch)

    for revision, down in reversed(_revisions()):
        assert migrate.current(fresh_engine) == revision
        # A column the revision adds loses its values on the way down, by design; so
        # does a column its upgrade rewrites.
        lost = {
            table: (columns - columns_at[down].get(table, columns))
            | _REWRITTEN_BY.get(revision, {}).get(table, set())
            for table, columns in columns_at[revision].items()
        }
        before = table_checksums(fresh_engine, lost)
        migrate.downgrade(fresh_engine, "-1")
        assert migrate.current(fresh_engine) == down, revision
        migrate.upgrade(fresh_engine, "+1")
        assert migrate.current(fresh_engine) == revision
        if down is None:
            # Down to base drops every table and its rows, by design: the tables come
            # back as a new database at this revision has them.
            empty = databases.engine(engine_kind)
            migrate.upgrade(empty, revision)
            before = table_checksums(empty, lost)
        assert table_checksums(fresh_engine, lost) == before, revision
        migrate.downgrade(fresh_engine, "-1")

    assert migrate.current(fresh_engine) is None
    migrate.upgrade(fresh_engine)
    load(fresh_engine, [content])
    assert table_checksums(fresh_engine) == at_head


def _target_metadata(sqlite: bool) -> sa.MetaData:
    if not sqlite:
        return Base.metadata
    # SQLite has no schemas: compare against a copy of the models without "tho".
    copy = sa.MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(
            copy,
            schema=None,
            referred_schema_fn=lambda *_: sa.schema.BLANK_SCHEMA,
        )
    return copy


def test_models_and_migrations_agree(fresh_engine: Engine) -> None:
    migrate.upgrade(fresh_engine)
    sqlite = fresh_engine.dialect.name == "sqlite"
    metadata = _target_metadata(sqlite)

    def include_name(name: str | None, type_: str, _parent: object) -> bool:
        return sqlite or type_ != "schema" or name == SCHEMA

    with fresh_engine.connect() as connection, warnings.catch_warnings():
        # SQLite cannot reflect expression-based indexes; they are checked below.
        warnings.filterwarnings("ignore", message=".*expression-based index")
        context = MigrationContext.configure(
            connection,
            opts={
                "target_metadata": metadata,
                "compare_type": True,
                "include_schemas": not sqlite,
                "include_name": include_name,
                "version_table_schema": None if sqlite else SCHEMA,
            },
        )
        differences = compare_metadata(context, metadata)
    assert differences == []


def test_every_index_of_the_models_exists_by_name(fresh_engine: Engine) -> None:
    # Autogenerate skips expression-based indexes on SQLite (the url|version
    # uniqueness): look every index up by name instead.
    migrate.upgrade(fresh_engine)
    expected = {
        index.name for table in Base.metadata.tables.values() for index in table.indexes
    }
    with fresh_engine.connect() as connection:
        if fresh_engine.dialect.name == "sqlite":
            query = "SELECT name FROM sqlite_master WHERE type = 'index'"
            found = set(connection.exec_driver_sql(query).scalars())
        else:
            found = set(
                connection.execute(
                    sa.text("SELECT indexname FROM pg_indexes WHERE schemaname = :s"),
                    {"s": SCHEMA},
                ).scalars()
            )
    assert expected - found == set()


@pytest.mark.parametrize(
    "name", ["uq_code_system_url_version", "uq_value_set_url_version"]
)
def test_url_and_version_are_unique_with_a_null_version_counted_as_one(
    fresh_engine: Engine, name: str
) -> None:
    migrate.upgrade(fresh_engine)
    table = "code_system" if name.startswith("uq_code_system") else "value_set"
    p = "" if fresh_engine.dialect.name == "sqlite" else f"{SCHEMA}."
    columns = {
        "code_system": "url, version, concept_count, content_hash, source",
        "value_set": "url, version, has_compose, content_hash, source, expansion_status",
    }[table]
    values = {
        "code_system": "'http://x', NULL, 0, 'h', 's'",
        "value_set": "'http://x', NULL, false, 'h', 's', 'pending'",
    }[table]
    statement = f"INSERT INTO {p}{table} ({columns}) VALUES ({values})"
    with fresh_engine.begin() as connection:
        connection.exec_driver_sql(statement)
    with pytest.raises(sa.exc.IntegrityError), fresh_engine.begin() as connection:
        connection.exec_driver_sql(statement)


def test_the_load_after_upgrading_to_0004_fills_the_new_columns(
    fresh_engine: Engine,
) -> None:
    files = [
        SHARED / "tx-tests" / "inactive" / "codesystem-inactive.json",
        SHARED / "tx-tests" / "inactive" / "valueset-all-active.json",
        SHARED / "tx-tests" / "language" / "codesystem-en-multi.json",
    ]
    resources = [json.loads(f.read_text(encoding="utf-8-sig")) for f in files]
    # A database loaded before 0004: the same rows without the new columns.
    migrate.upgrade(fresh_engine)
    load(fresh_engine, files)
    migrate.downgrade(fresh_engine, "0003")
    migrate.upgrade(fresh_engine)
    load(fresh_engine, files)

    prefix = "" if fresh_engine.dialect.name == "sqlite" else f"{SCHEMA}."
    with fresh_engine.connect() as connection:
        languages = dict(
            connection.exec_driver_sql(
                f"SELECT url, language FROM {prefix}code_system"
            ).all()
        )
        inactive = dict(
            connection.exec_driver_sql(
                f"SELECT url, compose_inactive FROM {prefix}value_set"
            ).all()
        )
    assert languages == {r["url"]: r.get("language") for r in resources[::2]}
    assert {url: bool(flag) for url, flag in inactive.items()} == {
        resources[1]["url"]: resources[1]["compose"]["inactive"]
    }
