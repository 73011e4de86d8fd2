"""Schema migrations: Alembic driven from code, for ``thodb db`` and ``thodb seed``."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from thodb.db import WRITE_OPTION, is_sqlite
from thodb.models import SCHEMA

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


def _config(engine: Engine) -> Config:
    config = Config(stdout=io.StringIO())
    config.set_main_option("script_location", str(script_location()))
    config.set_main_option("path_separator", "os")
    config.attributes["engine"] = engine
    return config


def _run(engine: Engine, action: str, revision: str) -> None:
    config = _config(engine)
    with engine.execution_options(**{WRITE_OPTION: True}).begin() as connection:
        config.attributes["connection"] = connection
        if action == "upgrade":
            command.upgrade(config, revision)
        else:
            command.downgrade(config, revision)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the schema up to ``revision`` (default: the newest), in one transaction."""
    log.info("upgrading schema to %s", revision)
    _run(engine, "upgrade", revision)


def downgrade(engine: Engine, revision: str = "-1") -> None:
    """Migrate the schema down to ``revision`` (``base`` removes every table)."""
    log.info("downgrading schema to %s", revision)
    _run(engine, "downgrade", revision)


def current(engine: Engine) -> str | None:
    """The revision the database is at, or ``None`` when it has no thodb schema."""
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={"version_table_schema": None if is_sqlite(engine) else SCHEMA},
        )
        return context.get_current_revision()


def head() -> str | None:
    """The newest revision this version of thodb knows."""
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    return ScriptDirectory.from_config(config).get_current_head()
