"""Membership rows carry their value set's url and version.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

``value_set_member.value_set_url`` and ``value_set_version`` repeat the url and version
of the row's value set, and ``value_set_expansion`` reads them from that one table. A
query filtered on a value set's url is then a predicate on the table it reads, with its
own statistics: PostgreSQL estimates the number of members of that value set instead of
the average over all value sets, and a join of many imaging rows to one value set gets
the plan of a join to a plain table of its codes (docs/benchmarks.md). The index on
``(value_set_url, system, code)`` answers ``tho.in_value_set`` and membership tests by
url in one probe.

The view keeps its columns; the upgrade fills the new columns of the rows already
there, and every refresh writes them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op
from alembic.operations import BatchOperations

from thodb.db import schema_prefix

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

SCHEMA = "tho"

_VIEW_FROM_MEMBERS = """
CREATE VIEW {p}value_set_expansion AS
SELECT m.value_set_url AS value_set_url,
       m.value_set_version AS value_set_version,
       m.system AS system,
       m.code AS code,
       m.display AS display,
       m.inactive AS inactive
FROM {p}value_set_member m
"""

_VIEW_WITH_JOIN = """
CREATE VIEW {p}value_set_expansion AS
SELECT vs.url AS value_set_url,
       vs.version AS value_set_version,
       m.system AS system,
       m.code AS code,
       m.display AS display,
       m.inactive AS inactive
FROM {p}value_set_member m
JOIN {p}value_set vs ON vs.id = m.value_set_id
"""


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def _set_view(definition: str) -> None:
    p = schema_prefix(op.get_bind())
    if _sqlite():
        op.execute(definition.format(p=p))
    else:
        # Same columns, same types: the views and functions built on it stay.
        op.execute(definition.format(p=p).replace("CREATE", "CREATE OR REPLACE", 1))


@contextmanager
def _members_table() -> Iterator[BatchOperations]:
    # Alembic writes ALTER TABLE itself, past the engine's schema map: SQLite has none.
    # On SQLite the batch reflects value_set_member and the tables its keys refer to;
    # value_set's unique index on (url, coalesce(version, '')) is an expression, which
    # SQLAlchemy cannot reflect and warns of. The batch rebuilds value_set_member only,
    # so the warning says nothing to the user who runs the migration.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Skipped unsupported reflection of expression-based index"
        )
        with op.batch_alter_table(
            "value_set_member", schema=None if _sqlite() else SCHEMA
        ) as batch:
            yield batch


def upgrade() -> None:
    p = schema_prefix(op.get_bind())
    if _sqlite():
        # A batch step copies and renames the table, which SQLite refuses under a view.
        op.execute("DROP VIEW value_set_expansion")
    with _members_table() as batch:
        batch.add_column(sa.Column("value_set_url", sa.Text(), nullable=True))
        batch.add_column(sa.Column("value_set_version", sa.Text(), nullable=True))
    op.execute(
        f"""
        UPDATE {p}value_set_member SET
            value_set_url = (SELECT vs.url FROM {p}value_set vs
                             WHERE vs.id = {p}value_set_member.value_set_id),
            value_set_version = (SELECT vs.version FROM {p}value_set vs
                                 WHERE vs.id = {p}value_set_member.value_set_id)
        """
    )
    with _members_table() as batch:
        batch.alter_column("value_set_url", existing_type=sa.Text(), nullable=False)
    op.create_index(
        "ix_value_set_member_url_system_code",
        "value_set_member",
        ["value_set_url", "system", "code"],
        schema=SCHEMA,
    )
    _set_view(_VIEW_FROM_MEMBERS)


def downgrade() -> None:
    if _sqlite():
        op.execute("DROP VIEW value_set_expansion")
    else:
        _set_view(_VIEW_WITH_JOIN)
    op.drop_index(
        "ix_value_set_member_url_system_code", "value_set_member", schema=SCHEMA
    )
    with _members_table() as batch:
        batch.drop_column("value_set_version")
        batch.drop_column("value_set_url")
    if _sqlite():
        _set_view(_VIEW_WITH_JOIN)
