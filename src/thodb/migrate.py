"""Schema migrations: Alembic driven from code, for ``thodb db`` and ``thodb seed``.

Alembic is imported when a function here first runs, not with this module: it takes
about a fifth of a second, and the commands that only read (``thodb expand``,
``validate-code``, ``lookup``) never need it.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection
from sqlalchemy.engine import Engine

from thodb.db import WRITE_OPTION, is_sqlite
from thodb.models import SCHEMA

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)


def script_location() -> Path:
    """The folder of the Alembic scripts.

    An installed thodb carries them as the package ``thodb.migrations``; a source
    checkout has them in the top-level ``alembic/`` folder.
    """
    installed = Path(__file__).parent / "migrations"
    if (installed / "env.py").exists():
        return installed
    return Path(__file__).resolve().parents[2] / "alembic"


def _config() -> Config:
    from alembic.config import Config

    config = Config(stdout=io.StringIO())
    config.set_main_option("script_location", str(script_location()))
    config.set_main_option("path_separator", "os")
    return config


def _run(bind: Engine | Connection, action: str, revision: str) -> None:
    from alembic import command

    config = _config()
    if isinstance(bind, Connection):
        config.attributes["connection"] = bind
        getattr(command, action)(config, revision)
        return
    with bind.execution_options(**{WRITE_OPTION: True}).begin() as connection:
        config.attributes["connection"] = connection
        getattr(command, action)(config, revision)


def upgrade(bind: Engine | Connection, revision: str = "head") -> None:
    """Migrate the schema up to ``revision`` (default: the newest).

    Given an engine, the migration runs in a transaction of its own; given a
    connection, in the connection's transaction.
    """
    log.info("upgrading schema to %s", revision)
    _run(bind, "upgrade", revision)


def downgrade(bind: Engine | Connection, revision: str = "-1") -> None:
    """Migrate the schema down to ``revision`` (``base`` removes every table)."""
    log.info("downgrading schema to %s", revision)
    _run(bind, "downgrade", revision)


def current(bind: Engine | Connection) -> str | None:
    """The revision the database is at, or ``None`` when it has no thodb schema."""
    if isinstance(bind, Engine):
        with bind.connect() as connection:
            return current(connection)
    from alembic.runtime.migration import MigrationContext

    context = MigrationContext.configure(
        bind, opts={"version_table_schema": None if is_sqlite(bind) else SCHEMA}
    )
    return context.get_current_revision()


def head() -> str | None:
    """The newest revision this version of thodb knows."""
    from alembic.script import ScriptDirectory

    config = _config()
    return ScriptDirectory.from_config(config).get_current_head()
