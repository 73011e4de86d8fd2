"""Languages, experimental and standards status, compose.inactive, value-set extensions.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

Every column is nullable: rows loaded before this revision read as "not stated". The
upgrade clears the content hash of every loaded code system and value set, so that the
next ``thodb load`` of the same files rewrites them and fills the new columns (an
unchanged file is otherwise skipped).

- ``code_system`` / ``value_set``: ``language``, ``experimental``, ``standards_status``.
- ``value_set``: ``compose_inactive`` (``compose.inactive``), ``supplements`` (the
  ``valueset-supplement`` extensions) and ``expansion_parameters`` (the
  ``valueset-expansion-parameter`` extensions of ``compose``).
- ``compose_concept``: the designations, extension properties and status that a value
  set gives an enumerated code.
- ``concept_designation``: ``standards_status``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from thodb.db import schema_prefix

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SCHEMA = "tho"

_COLUMNS: dict[str, list[tuple[str, sa.types.TypeEngine[object]]]] = {
    "code_system": [
        ("language", sa.String(32)),
        ("experimental", sa.Boolean()),
        ("standards_status", sa.String(16)),
    ],
    "value_set": [
        ("language", sa.String(32)),
        ("experimental", sa.Boolean()),
        ("standards_status", sa.String(16)),
        ("compose_inactive", sa.Boolean()),
        ("supplements", sa.JSON()),
        ("expansion_parameters", sa.JSON()),
    ],
    "compose_concept": [
        ("designations", sa.JSON()),
        ("properties", sa.JSON()),
        ("standards_status", sa.String(16)),
    ],
    "concept_designation": [("standards_status", sa.String(16))],
}


def _schema() -> str | None:
    # Alembic writes ALTER TABLE itself, past the engine's schema map: SQLite has none.
    return None if op.get_bind().dialect.name == "sqlite" else SCHEMA


def upgrade() -> None:
    for table, columns in _COLUMNS.items():
        for name, type_ in columns:
            op.add_column(
                table, sa.Column(name, type_, nullable=True), schema=_schema()
            )
    p = schema_prefix(op.get_bind())
    for table in ("code_system", "value_set"):
        op.execute(f"UPDATE {p}{table} SET content_hash = ''")


def downgrade() -> None:
    for table, columns in _COLUMNS.items():
        for name, _ in reversed(columns):
            op.drop_column(table, name, schema=_schema())
