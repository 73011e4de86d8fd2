"""Membership rows name their concept; a token marks each recomputation.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

``compose_rule_code.concept_id`` and ``value_set_member.concept_id`` hold the concept
a code resolved to when its code system is loaded (NULL otherwise), so that an
expansion reads the designations, properties and order of its codes by primary key
instead of joining on (system, version, code). Both are computed by every load; the
upgrade fills them for the rows already there. A partial index finds the enumerated
codes that a value set annotates (designations, extension properties).

``refresh_state`` holds one row whose ``token`` every recomputation of the membership
replaces: a reader that cached something derived from the membership checks it.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

from thodb.db import schema_prefix

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

SCHEMA = "tho"

_TABLES = ("compose_rule_code", "value_set_member")


def _schema() -> str | None:
    # Alembic writes ALTER TABLE itself, past the engine's schema map: SQLite has none.
    return None if op.get_bind().dialect.name == "sqlite" else SCHEMA


_ANNOTATED = (
    "designations IS NOT NULL OR properties IS NOT NULL OR standards_status IS NOT NULL"
)


def upgrade() -> None:
    op.create_index(
        "ix_compose_concept_annotated",
        "compose_concept",
        ["rule_id"],
        schema=SCHEMA,
        postgresql_where=sa.text(_ANNOTATED),
        sqlite_where=sa.text(_ANNOTATED),
    )
    state = op.create_table(
        "refresh_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_refresh_state"),
        schema=SCHEMA,
    )
    op.bulk_insert(state, [{"id": 1, "token": uuid.uuid4().hex}])
    for table in _TABLES:
        op.add_column(
            table,
            sa.Column("concept_id", sa.Integer(), nullable=True),
            schema=_schema(),
        )
    p = schema_prefix(op.get_bind())
    op.execute(
        f"""
        UPDATE {p}compose_rule_code SET concept_id = (
            SELECT c.id FROM {p}compose_rule r
            JOIN {p}concept c ON c.code_system_id = r.code_system_id
            WHERE r.id = {p}compose_rule_code.rule_id
              AND c.code = {p}compose_rule_code.code)
        """
    )
    op.execute(
        f"""
        UPDATE {p}value_set_member SET concept_id = (
            SELECT MIN(c.id) FROM {p}code_system cs
            JOIN {p}concept c ON c.code_system_id = cs.id
            WHERE cs.url = {p}value_set_member.system
              AND COALESCE(cs.version, '') = COALESCE({p}value_set_member.version, '')
              AND COALESCE(cs.content, '') <> 'supplement'
              AND c.code = {p}value_set_member.code)
        """
    )


def downgrade() -> None:
    for table in reversed(_TABLES):
        op.drop_column(table, "concept_id", schema=_schema())
    op.drop_index("ix_compose_concept_annotated", "compose_concept", schema=SCHEMA)
    op.drop_table("refresh_state", schema=SCHEMA)
