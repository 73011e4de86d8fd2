"""Alembic environment for thodb (close to Alembic's generic template).

The database URL comes from the same setting as the thodb command
(``THODB_DATABASE_URL`` or the embedded SQLite default), unless the caller passes a
connection in ``config.attributes["connection"]`` (as ``thodb db upgrade`` does).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, pool

from thodb.db import create_engine
from thodb.models import SCHEMA, Base

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if not sqlite:
        # The version table lives in the schema, which must exist before Alembic uses it.
        connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table_schema=None if sqlite else SCHEMA,
        include_schemas=not sqlite,
        include_name=_include_name,
        transaction_per_migration=False,
        compare_type=True,
    )


def _include_name(name: str | None, type_: str, _parent: object) -> bool:
    # Only our own schema is compared by autogenerate on PostgreSQL.
    return type_ != "schema" or name == SCHEMA


def run_migrations_offline() -> None:
    """Emit the migration SQL without a database (``alembic upgrade head --sql``)."""
    engine = create_engine()
    context.configure(
        url=engine.url,
        target_metadata=target_metadata,
        literal_binds=True,
        version_table_schema=None if engine.dialect.name == "sqlite" else SCHEMA,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations over a connection."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return

    engine = create_engine(poolclass=pool.NullPool)
    with engine.connect() as connection:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
