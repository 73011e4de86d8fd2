"""thodb as the terminology service of the conformance runner.

:class:`DatabaseOperations` implements :class:`thodb.conformance.suite.Operations` on a
scratch database of the configured engine: each :meth:`~DatabaseOperations.reset` drops
the previous database and creates an empty one (a new database on the PostgreSQL
server, a temporary file for SQLite), then loads the suite's setup resources. Each
request runs in its own transaction, which is rolled back afterwards, so that the
request's ``tx-resource`` and inline value sets never outlive it.

The operations themselves are :mod:`thodb.fhir.operations`; this module only manages
databases and transactions.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from thodb import load as load_mod
from thodb.conformance.compare import JsonObject
from thodb.db import WRITE_OPTION, create_engine, resolve_url, safe_url
from thodb.errors import DatabaseError, LoadError
from thodb.fhir import operations as fhir_operations
from thodb.fhir.operations import RequestContext

log = logging.getLogger(__name__)

_Operation = Callable[[Session, JsonObject, RequestContext], tuple[int, JsonObject]]


class ScratchDatabases:
    """Creates empty databases beside the configured one and removes them afterwards.

    On PostgreSQL each database is created on the server of ``url`` (whose database is
    used only to issue ``CREATE DATABASE`` and ``DROP DATABASE``); on SQLite it is a
    file in a temporary folder.

    :param url: the configured database URL (see :func:`thodb.db.resolve_url`).
    """

    def __init__(self, url: str | None = None) -> None:
        self.url = sa.make_url(resolve_url(url))
        self.backend = self.url.get_backend_name()
        if self.backend not in ("sqlite", "postgresql"):
            raise DatabaseError(
                f"conformance runs need SQLite or PostgreSQL, not {safe_url(self.url)}"
            )
        self._run = uuid.uuid4().hex[:8]
        self._counter = itertools.count()
        self._folder: Path | None = None
        self._created: dict[Engine, str] = {}

    def create(self) -> Engine:
        """Create an empty database and return an engine on it."""
        n = next(self._counter)
        if self.backend == "sqlite":
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="thodb-conformance-"))
            return create_engine(f"sqlite:///{self._folder / f'suite{n}.sqlite'}")
        name = f"thodb_conformance_{self._run}_{n}"
        with self._admin().connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        engine = create_engine(
            self.url.set(database=name).render_as_string(hide_password=False),
            poolclass=sa.pool.NullPool,
        )
        self._created[engine] = name
        return engine

    def drop(self, engine: Engine) -> None:
        """Dispose of ``engine`` and remove its database."""
        engine.dispose()
        name = self._created.pop(engine, None)
        if name is not None:
            with self._admin().connect() as connection:
                connection.exec_driver_sql(
                    f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
                )
        elif engine.url.database:
            Path(engine.url.database).unlink(missing_ok=True)

    def close(self) -> None:
        """Remove every database still there, and the temporary folder."""
        for engine in list(self._created):
            self.drop(engine)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def _admin(self) -> Engine:
        url = self.url
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        return sa.create_engine(
            url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
        )


class DatabaseOperations:
    """The conformance runner's service: thodb on a fresh database per suite.

    Use it as a context manager, so that the last database is dropped::

        with DatabaseOperations(url) as operations:
            report = run_suites(folder, operations)

    :param url: the configured database URL; ``None`` takes ``THODB_DATABASE_URL`` or
        the SQLite default (only its engine and server are used, never its content).
    """

    def __init__(self, url: str | None = None) -> None:
        self.databases = ScratchDatabases(url)
        self.engine: Engine | None = None

    def __enter__(self) -> DatabaseOperations:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Drop the current database."""
        if self.engine is not None:
            self.databases.drop(self.engine)
            self.engine = None
        self.databases.close()

    def reset(self, setup: list[JsonObject]) -> None:
        """Replace the database with an empty one holding only ``setup``.

        A resource that thodb refuses is left out with a warning, so that the tests
        that need it fail and the others run.
        """
        if self.engine is not None:
            self.databases.drop(self.engine)
        self.engine = self.databases.create()
        with self._session(write=True) as session:
            load_mod.ensure_schema(session.connection())
            try:
                with session.begin_nested():
                    load_mod.load_resources(session, setup, source="setup")
            except LoadError:
                self._load_one_by_one(session, setup)
            session.commit()

    @staticmethod
    def _load_one_by_one(session: Session, setup: list[JsonObject]) -> None:
        for i, resource in enumerate(setup):
            try:
                with session.begin_nested():
                    load_mod.load_resources(session, [resource], source=f"setup[{i}]")
            except LoadError as error:
                log.warning("setup resource left out: %s", error)

    def expand(
        self, request: JsonObject, *, headers: Mapping[str, str]
    ) -> tuple[int, JsonObject]:
        """Run ``ValueSet/$expand`` in a transaction that is rolled back."""
        return self._run(fhir_operations.expand, request, headers)

    def validate_code(
        self, request: JsonObject, *, headers: Mapping[str, str]
    ) -> tuple[int, JsonObject]:
        """Run ``ValueSet/$validate-code`` in a transaction that is rolled back."""
        return self._run(fhir_operations.validate_code, request, headers)

    def cs_validate_code(
        self, request: JsonObject, *, headers: Mapping[str, str]
    ) -> tuple[int, JsonObject]:
        """Run ``CodeSystem/$validate-code`` in a transaction that is rolled back."""
        return self._run(fhir_operations.cs_validate_code, request, headers)

    def lookup(
        self, request: JsonObject, *, headers: Mapping[str, str]
    ) -> tuple[int, JsonObject]:
        """Run ``CodeSystem/$lookup`` in a transaction that is rolled back."""
        return self._run(fhir_operations.lookup, request, headers)

    def _run(
        self, operation: _Operation, request: JsonObject, headers: Mapping[str, str]
    ) -> tuple[int, JsonObject]:
        context = RequestContext.from_headers(headers)
        with self._session(write=True) as session:
            try:
                return operation(session, request, context)
            finally:
                session.rollback()

    def _session(self, *, write: bool = False) -> Session:
        if self.engine is None:
            raise DatabaseError("no suite has been set up: call reset() first")
        bind = (
            self.engine.execution_options(**{WRITE_OPTION: True})
            if write
            else self.engine
        )
        return Session(bind, autobegin=True)
