"""Fixtures: every database test runs on SQLite and on a real PostgreSQL.

PostgreSQL comes from ``THODB_TEST_DATABASE_URL`` (a URL whose database is used only to
create and drop the test databases) or the local server at 127.0.0.1:5432. Each test run
creates its own databases and drops them afterwards. With ``CI=true`` an unreachable
PostgreSQL fails the run instead of skipping its tests.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import uuid
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from thodb import load as load_mod
from thodb.db import create_engine, schema_prefix
from thodb.seed import seeds_path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ENGINES = ("sqlite", "postgresql")

_ADMIN_URL = os.environ.get(
    "THODB_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
_RUN = uuid.uuid4().hex[:8]
_counter = itertools.count()
_pg_reachable: bool | None = None


def _admin() -> Engine:
    return sa.create_engine(
        sa.make_url(_ADMIN_URL).set(drivername="postgresql+psycopg"),
        isolation_level="AUTOCOMMIT",
        poolclass=sa.pool.NullPool,
    )


def _require_postgresql() -> None:
    global _pg_reachable
    if _pg_reachable is None:
        try:
            with _admin().connect():
                _pg_reachable = True
        except sa.exc.OperationalError:
            _pg_reachable = False
    if not _pg_reachable:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is not reachable at {_ADMIN_URL} (CI=true)")
        pytest.skip("PostgreSQL is not reachable; set THODB_TEST_DATABASE_URL")


class Databases:
    """Creates empty databases of either engine and removes them at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.created: list[str] = []
        self.engines: list[Engine] = []

    def url(self, kind: str) -> str:
        """The URL of a new, empty database of ``kind`` (sqlite or postgresql)."""
        n = next(_counter)
        if kind == "sqlite":
            return f"sqlite:///{self.tmp / f'db{n}.sqlite'}"
        _require_postgresql()
        name = f"thodb_test_{_RUN}_{n}"
        with _admin().connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return str(
            sa.make_url(_ADMIN_URL)
            .set(drivername="postgresql+psycopg", database=name)
            .render_as_string(hide_password=False)
        )

    def engine(self, kind: str) -> Engine:
        """An engine on a new, empty database of ``kind``."""
        engine = create_engine(self.url(kind))
        self.engines.append(engine)
        return engine

    def close_idle(self) -> None:
        """Close the pooled connections no test holds: every engine of the run keeps
        its pool, and PostgreSQL admits 100 connections by default."""
        for engine in self.engines:
            engine.dispose()

    def drop_all(self) -> None:
        self.close_idle()
        if not self.created:
            return
        with _admin().connect() as connection:
            for name in self.created:
                connection.exec_driver_sql(
                    f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
                )


@pytest.fixture(scope="session")
def databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Databases]:
    """The factory of test databases for the whole run."""
    found = Databases(tmp_path_factory.mktemp("databases"))
    yield found
    found.drop_all()


@pytest.fixture(autouse=True)
def _idle_connections_closed(databases: Databases) -> Iterator[None]:
    yield
    databases.close_idle()


@pytest.fixture(params=ENGINES)
def engine_kind(request: pytest.FixtureRequest) -> str:
    """``sqlite`` or ``postgresql``: tests using it run once on each."""
    kind: str = request.param
    if kind == "postgresql":
        _require_postgresql()
    return kind


@pytest.fixture
def fresh_engine(databases: Databases, engine_kind: str) -> Engine:
    """An engine on a new, empty database (no schema yet)."""
    return databases.engine(engine_kind)


@pytest.fixture(scope="session")
def _seeded(databases: Databases) -> dict[str, Engine]:
    return {}


@pytest.fixture
def seeded_engine(
    _seeded: dict[str, Engine], databases: Databases, engine_kind: str
) -> Engine:
    """An engine on a database holding the seeds (loaded once per engine and run).

    Tests must not change it.
    """
    if engine_kind not in _seeded:
        engine = databases.engine(engine_kind)
        load_mod.load(engine, [seeds_path()])
        _seeded[engine_kind] = engine
    return _seeded[engine_kind]


def table_checksums(
    engine: Engine, ignore: Mapping[str, Collection[str]] | None = None
) -> dict[str, str]:
    """A checksum of every row of every thodb table, to prove a database unchanged.

    The refresh token is left out: it is random, new with every recomputation of the
    membership, so two databases with the same content never share it.

    :param ignore: more columns to leave out, by table.
    """
    result: dict[str, str] = {}
    left_out: dict[str, set[str]] = {"refresh_state": {"token"}}
    for table, columns in (ignore or {}).items():
        left_out[table] = left_out.get(table, set()) | set(columns)
    with engine.connect() as connection:
        inspector = sa.inspect(connection)
        schema = None if engine.dialect.name == "sqlite" else "tho"
        tables = sorted(inspector.get_table_names(schema=schema))
        prefix = schema_prefix(connection)
        for table in tables:
            columns = ", ".join(
                f'"{c["name"]}"'
                for c in inspector.get_columns(table, schema=schema)
                if c["name"] not in left_out.get(table, ())
            )
            rows = connection.exec_driver_sql(
                f"SELECT {columns} FROM {prefix}{table}"
            ).all()
            digest = hashlib.sha256()
            for row in sorted(repr(tuple(row)) for row in rows):
                digest.update(row.encode())
            result[table] = f"{len(rows)}:{digest.hexdigest()}"
    return result
