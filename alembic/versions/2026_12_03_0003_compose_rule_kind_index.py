"""Index compose_rule by (value_set_id, kind).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

Expansion checks every member row against the excludes of its value set; without this
index each check scans all rules of the value set, which grows with the square of the
number of imports (a value set importing 10,000 others).
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SCHEMA = "tho"


def upgrade() -> None:
    op.create_index(
        "ix_compose_rule_value_set_id_kind",
        "compose_rule",
        ["value_set_id", "kind"],
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_index("ix_compose_rule_value_set_id_kind", "compose_rule", schema=SCHEMA)
