"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

Rules for thodb migrations:
- Tables are created in schema "tho" (op.* with schema=SCHEMA); on SQLite the engine maps
  it to the main database. Hand-written SQL uses the prefix from thodb.db.schema_prefix.
- The views of the SQL contract are public: changing one is a new migration, and
  docs/sql.md says what changed.
- A new NOT NULL column comes in three steps: nullable with a default, a set-based
  backfill, then NOT NULL.
- downgrade() works, or raises with a sentence saying why it cannot.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
