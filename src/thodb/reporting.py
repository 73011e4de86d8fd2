"""The SQL contract for reporting tools, and a PostgreSQL role that may read only it.

The contract (docs/sql.md) is what SQL users may rely on across releases: the views
created by the migrations, the DICOM coding-scheme table and the imaging tables, and on
PostgreSQL two membership functions. The other tables (``concept``,
``value_set_member``, ...) are the implementation and may change.

:func:`grant_reader` gives a PostgreSQL role exactly that: USAGE on schema ``tho``,
SELECT on the contract objects and EXECUTE on the functions. A role it creates has
LOGIN and no password, so it authenticates however ``pg_hba.conf`` says (``trust``,
``peer``, certificates) or with a password an administrator sets
(``ALTER ROLE ... PASSWORD``); it is not a superuser and cannot create databases or
roles, and its ``search_path`` is ``tho``, so that the contract's names work without
the schema prefix, as on SQLite. Run it again after ``thodb db upgrade``: a migration
that adds or replaces a view creates it without the grants.
"""

from __future__ import annotations

import logging
import re

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from thodb import migrate
from thodb.db import WRITE_OPTION, is_sqlite
from thodb.errors import DatabaseError, ThodbError
from thodb.models import SCHEMA

log = logging.getLogger(__name__)

#: The views of the contract (migrations 0001 and 0002).
CONTRACT_VIEWS = (
    "code_systems",
    "value_sets",
    "value_set_expansion",
    "concepts",
    "concept_ancestor",
)

#: The tables of the contract: reference data and the imaging rows.
CONTRACT_TABLES = ("coding_scheme", "imaging_coded_item", "imaging_selection")

#: The functions of the contract (PostgreSQL only), with their argument types.
CONTRACT_FUNCTIONS = (
    "in_value_set(text, text, text)",
    "in_value_set_dicom(text, text, text)",
)

# Names that can be written unquoted in psql, pg_hba.conf and connection URLs alike.
# PostgreSQL reserves the pg_ prefix and a few names for itself.
_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_RESERVED_ROLES = frozenset(
    {"public", "none", "current_user", "session_user", "current_role"}
)

# SQLSTATE of "permission denied".
_INSUFFICIENT_PRIVILEGE = "42501"


class ReaderRoleError(ThodbError):
    """A reader role cannot be granted: bad name, or a database without roles."""


def check_role_name(role: str) -> None:
    """Refuse a role name that is not a plain lowercase identifier.

    :raises ReaderRoleError: naming the rule the name breaks.
    """
    if not _ROLE_NAME.fullmatch(role):
        raise ReaderRoleError(
            f"role name {role!r} is not accepted: use 1 to 63 lowercase letters, digits "
            "and underscores, starting with a letter or underscore"
        )
    if role.startswith("pg_") or role in _RESERVED_ROLES:
        raise ReaderRoleError(
            f"role name {role!r} is reserved by PostgreSQL: choose another name"
        )


def grant_reader(engine: Engine, role: str, *, include_tables: bool = False) -> bool:
    """Let PostgreSQL role ``role`` read the SQL contract and nothing else.

    Creates the role when it does not exist (LOGIN, no password, see the module
    docstring), then grants USAGE on schema ``tho``, SELECT on
    :data:`CONTRACT_VIEWS` and :data:`CONTRACT_TABLES` and EXECUTE on
    :data:`CONTRACT_FUNCTIONS`, in one transaction. An existing role keeps what it
    was granted before. Running it twice changes nothing.

    :param role: the role name (checked by :func:`check_role_name`).
    :param include_tables: also grant SELECT on every table of the schema, for a
        Python service that calls :func:`thodb.expand.expand`,
        :func:`thodb.query.validate_code` or :func:`thodb.query.lookup` as this
        role: those read the tables, which are not part of the contract. The role
        still cannot write.
    :return: True when the role was created, False when it existed.
    :raises ReaderRoleError: for a bad name, or on SQLite, which has no roles (protect
        the file with file permissions, or open it read-only).
        A user that may not create roles or grant on the schema gets one too (it
        needs CREATEROLE and to own the schema).
    :raises DatabaseError: when the schema is not at the current revision.
    """
    check_role_name(role)
    if is_sqlite(engine):
        raise ReaderRoleError(
            "SQLite has no roles: a reporting tool reads the database file; open it "
            "read-only (sqlite:///file:PATH?mode=ro&uri=true) or restrict the file's "
            "permissions"
        )

    try:
        with engine.execution_options(**{WRITE_OPTION: True}).begin() as connection:
            _check_schema(connection)
            created = _create_role(connection, role)
            _grant(connection, role, include_tables=include_tables)
    except sa.exc.ProgrammingError as exc:
        if getattr(exc.orig, "sqlstate", None) != _INSUFFICIENT_PRIVILEGE:
            raise
        reason = str(exc.orig).strip().splitlines()[0]
        raise ReaderRoleError(
            f"cannot grant the contract to {role!r}: {reason}; connect as the owner of "
            f"schema {SCHEMA} with CREATEROLE (e.g. the user that ran the migrations)"
        ) from None
    log.info(
        "%s role %s: SELECT on %d contract objects",
        "created" if created else "granted existing",
        role,
        len(CONTRACT_VIEWS) + len(CONTRACT_TABLES),
    )
    return created


def _check_schema(connection: sa.Connection) -> None:
    current = migrate.current(connection)
    if current != migrate.head():
        raise DatabaseError(
            f"the database schema is at revision {current or 'base (no thodb tables)'}, "
            f"the contract needs {migrate.head()}: run `thodb db upgrade`"
        )


def _create_role(connection: sa.Connection, role: str) -> bool:
    """Create ``role`` unless it exists; True when it was created."""
    if connection.scalar(
        sa.text("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = :role"),
        {"role": role},
    ):
        return False
    # A reserved SQL keyword would need quotes wherever the name is written.
    if connection.scalar(
        sa.text(
            "SELECT 1 FROM pg_catalog.pg_get_keywords() WHERE word = :role "
            "AND catcode = 'R'"
        ),
        {"role": role},
    ):
        raise ReaderRoleError(
            f"role name {role!r} is a reserved SQL keyword: choose another name"
        )
    quoted = _quote(connection, role)
    connection.exec_driver_sql(
        f"CREATE ROLE {quoted} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION"
    )
    # So that the contract's names work unqualified, as on SQLite and in docs/sql.md.
    connection.exec_driver_sql(f"ALTER ROLE {quoted} SET search_path = {SCHEMA}")
    return True


def _grant(connection: sa.Connection, role: str, *, include_tables: bool) -> None:
    # The names below are constants of this module; only the role comes from input,
    # checked by check_role_name and quoted.
    quoted = _quote(connection, role)
    connection.exec_driver_sql(f"GRANT USAGE ON SCHEMA {SCHEMA} TO {quoted}")
    if include_tables:
        connection.exec_driver_sql(
            f"GRANT SELECT ON ALL TABLES IN SCHEMA {SCHEMA} TO {quoted}"
        )
    for name in (*CONTRACT_VIEWS, *CONTRACT_TABLES):
        connection.exec_driver_sql(f"GRANT SELECT ON {SCHEMA}.{name} TO {quoted}")
    for signature in CONTRACT_FUNCTIONS:
        connection.exec_driver_sql(
            f"GRANT EXECUTE ON FUNCTION {SCHEMA}.{signature} TO {quoted}"
        )


def _quote(connection: sa.Connection, role: str) -> str:
    return connection.dialect.identifier_preparer.quote_identifier(role)
