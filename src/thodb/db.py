"""Engines, sessions and schema migrations.

thodb speaks to PostgreSQL (``postgresql+psycopg://...``) in production and to an embedded
SQLite file by default. On SQLite the ``tho`` schema of the models is mapped to the main
database, so the same models and SQL work on both.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from thodb.errors import DatabaseError
from thodb.models import SCHEMA

log = logging.getLogger(__name__)

#: Environment variable holding the database URL.
URL_ENV = "THODB_DATABASE_URL"

#: Execution option marking a connection that will write (a load or a migration).
WRITE_OPTION = "thodb_write"


def default_sqlite_path() -> Path:
    """Where the embedded database lives when no URL is given.

    ``$XDG_DATA_HOME/thodb/thodb.sqlite``, that is ``~/.local/share/thodb/thodb.sqlite``
    on most systems.
    """
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(base) / "thodb" / "thodb.sqlite"


def resolve_url(url: str | None = None) -> str:
    """The database URL: ``url``, else ``$THODB_DATABASE_URL``, else the SQLite default."""
    if url:
        return url
    env = os.environ.get(URL_ENV)
    if env:
        return env
    return f"sqlite:///{default_sqlite_path()}"


def safe_url(url: str | sa.URL) -> str:
    """The URL as it may be printed: any password is masked."""
    return sa.make_url(url).render_as_string(hide_password=True)


def is_sqlite(bind: Engine | sa.Connection | Session) -> bool:
    """True when ``bind`` talks to SQLite."""
    return (
        bind.get_bind().dialect.name == "sqlite"
        if isinstance(bind, Session)
        else (bind.dialect.name == "sqlite")
    )


def schema_prefix(bind: Engine | sa.Connection | Session) -> str:
    """The prefix for table names in hand-written SQL: ``tho.`` or nothing on SQLite."""
    return "" if is_sqlite(bind) else f"{SCHEMA}."


def create_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """Create an engine for ``url`` (see :func:`resolve_url`).

    On SQLite the parent folder is created, foreign keys are enforced, the journal is
    WAL (readers do not block the loader) and ``tho`` maps to the main database.

    :raises DatabaseError: when the URL cannot be parsed or names no known driver.
    """
    resolved = resolve_url(url)
    try:
        parsed = sa.make_url(resolved)
    except sa.exc.ArgumentError as exc:
        raise DatabaseError(f"not a database URL: {exc}") from None

    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {}).setdefault("timeout", 60)
    elif (
        parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql"
    ):
        # Plain postgresql:// would pick psycopg2, which thodb does not depend on.
        parsed = parsed.set(drivername="postgresql+psycopg")

    try:
        engine = sa.create_engine(parsed, **kwargs)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
        raise DatabaseError(f"cannot use {safe_url(parsed)}: {exc}") from None

    # What a transaction noted of its snapshot holds no longer (see epoch()).
    for ended in ("commit", "rollback", "rollback_savepoint"):
        event.listen(engine, ended, new_epoch)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        engine = engine.execution_options(schema_translate_map={SCHEMA: None})
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy issue BEGIN itself, so that DDL is transactional too.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.close()


def _sqlite_on_begin(connection: sa.Connection) -> None:
    # A writer takes the write lock up front (IMMEDIATE), so two loads queue on the busy
    # timeout instead of failing when both try to upgrade a read lock.
    if connection.get_execution_options().get(WRITE_OPTION):
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        connection.exec_driver_sql("BEGIN")


def kept_cursor(connection: sa.Connection) -> Any:
    """The DB-API cursor of this database connection for the small statements thodb
    runs often (a warm validation's probe, the refresh token), made once per
    connection: a psycopg cursor made and closed for each call was most of the 35 µs
    that keeping it took off a warm validation (about 200 µs). Whoever executes on it
    fetches every row before the next statement; it holds the last result until then,
    so it is not for statements of many rows."""
    info = connection.connection.info
    cursor = info.get(_KEPT_CURSOR)
    if cursor is None:
        cursor = info[_KEPT_CURSOR] = connection.connection.cursor()
    return cursor


_KEPT_CURSOR = "thodb.db.kept_cursor"


def reads_one_snapshot(connection: sa.Connection) -> bool:
    """True when the transaction of ``connection`` reads one snapshot of the database
    (and its own writes) in all its statements, on an engine of :func:`create_engine`
    (which counts the ends of transactions, see :func:`epoch`). That is every
    transaction on SQLite, where :func:`create_engine` begins each one itself (the
    driver alone begins one only before a write, so its reads would see every commit),
    and on PostgreSQL one at ``REPEATABLE READ`` or ``SERIALIZABLE``, as
    :func:`session_scope` reads.
    """
    if not counts_epochs(connection.engine):
        return False
    if connection.dialect.name == "sqlite":
        return bool(
            getattr(connection.connection.dbapi_connection, "in_transaction", 0)
        )
    isolation = connection.get_execution_options().get("isolation_level")
    return connection.in_transaction() and isolation in _ONE_SNAPSHOT


_ONE_SNAPSHOT = frozenset({"REPEATABLE READ", "SERIALIZABLE"})


def counts_epochs(engine: Engine) -> bool:
    """True for engines of :func:`create_engine`: the ends of their transactions
    begin a new :func:`epoch`."""
    return new_epoch in engine.dispatch.commit


def epoch() -> int:
    """A number that changes whenever a transaction of an engine of
    :func:`create_engine` ends or rolls back to a savepoint, and when thodb replaces
    what such a transaction may have noted of its snapshot (the refresh token): a
    value noted in a transaction together with the epoch holds while the epoch is the
    same."""
    return _epoch


def new_epoch(*_event_args: object) -> None:
    """Begin a new :func:`epoch` (also the listener of transaction ends)."""
    global _epoch
    _epoch = next(_EPOCHS)


_EPOCHS = itertools.count(1)
_epoch = 0


@contextmanager
def session_scope(engine: Engine, *, write: bool = False) -> Iterator[Session]:
    """A session in one transaction: committed when the block ends, rolled back on error.

    A reading transaction sees one snapshot of the database for all its statements
    (REPEATABLE READ on PostgreSQL; SQLite's read transaction is one already), so an
    answer is never a mix of the states before and after a load that commits meanwhile.

    :param write: the transaction will write; on SQLite it then takes the write lock
        when it begins.
    """
    bind: Engine
    if write:
        bind = engine.execution_options(**{WRITE_OPTION: True})
    elif engine.dialect.name == "postgresql":
        bind = engine.execution_options(isolation_level="REPEATABLE READ")
    else:
        bind = engine
    with Session(bind) as session, session.begin():
        yield session


def check_connection(engine: Engine) -> None:
    """Connect once, turning a connection failure into a :class:`DatabaseError`."""
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise DatabaseError(
            f"cannot connect to {safe_url(engine.url)}: {reason}"
        ) from None
