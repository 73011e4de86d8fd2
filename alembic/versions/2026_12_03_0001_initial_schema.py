"""Initial schema: code systems, concepts, value sets with compose rules, membership.

Revision ID: 0001
Revises:
Create Date: 2026-12-03

Creates every table of thodb.models and the first view of the SQL contract,
``value_set_expansion`` (one row per member of every expandable value set).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SCHEMA = "tho"


def _prefix() -> str:
    return "" if op.get_bind().dialect.name == "sqlite" else f"{SCHEMA}."


def upgrade() -> None:
    text = sa.Text
    op.create_table(
        "code_system",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("url", text(), nullable=False),
        sa.Column("version", text(), nullable=True),
        sa.Column("name", text(), nullable=True),
        sa.Column("title", text(), nullable=True),
        sa.Column("status", sa.String(16), nullable=True),
        sa.Column("content", sa.String(16), nullable=True),
        sa.Column("hierarchy_meaning", sa.String(32), nullable=True),
        sa.Column("case_sensitive", sa.Boolean(), nullable=True),
        sa.Column("supplements", text(), nullable=True),
        sa.Column("value_set", text(), nullable=True),
        sa.Column("concept_count", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("source", text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_code_system"),
        schema=SCHEMA,
    )
    op.create_index(
        "uq_code_system_url_version",
        "code_system",
        ["url", sa.text("coalesce(version, '')")],
        unique=True,
        schema=SCHEMA,
    )
    op.create_table(
        "code_system_property",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code_system_id", sa.Integer(), nullable=False),
        sa.Column("code", text(), nullable=False),
        sa.Column("uri", text(), nullable=True),
        sa.Column("type", sa.String(16), nullable=True),
        sa.Column("description", text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["code_system_id"],
            [f"{SCHEMA}.code_system.id"],
            ondelete="CASCADE",
            name="fk_code_system_property_code_system_id_code_system",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_code_system_property"),
        sa.UniqueConstraint(
            "code_system_id", "code", name="uq_code_system_property_code_system_id_code"
        ),
        schema=SCHEMA,
    )
    op.create_table(
        "concept",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code_system_id", sa.Integer(), nullable=False),
        sa.Column("code", text(), nullable=False),
        sa.Column("display", text(), nullable=True),
        sa.Column("definition", text(), nullable=True),
        sa.Column("status", sa.String(32), nullable=True),
        sa.Column("inactive", sa.Boolean(), nullable=False),
        sa.Column("abstract", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["code_system_id"],
            [f"{SCHEMA}.code_system.id"],
            ondelete="CASCADE",
            name="fk_concept_code_system_id_code_system",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_concept"),
        sa.UniqueConstraint(
            "code_system_id", "code", name="uq_concept_code_system_id_code"
        ),
        schema=SCHEMA,
    )
    for table, value_columns in (
        (
            "concept_designation",
            [
                sa.Column("language", sa.String(32), nullable=True),
                sa.Column("use_system", text(), nullable=True),
                sa.Column("use_code", text(), nullable=True),
                sa.Column("value", text(), nullable=False),
            ],
        ),
        (
            "concept_property",
            [
                sa.Column("code", text(), nullable=False),
                sa.Column("type", sa.String(16), nullable=False),
                sa.Column("value", text(), nullable=True),
                sa.Column("value_system", text(), nullable=True),
            ],
        ),
    ):
        op.create_table(
            table,
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("concept_id", sa.Integer(), nullable=False),
            *value_columns,
            sa.ForeignKeyConstraint(
                ["concept_id"],
                [f"{SCHEMA}.concept.id"],
                ondelete="CASCADE",
                name=f"fk_{table}_concept_id_concept",
            ),
            sa.PrimaryKeyConstraint("id", name=f"pk_{table}"),
            schema=SCHEMA,
        )
        op.create_index(f"ix_{table}_concept_id", table, ["concept_id"], schema=SCHEMA)
    op.create_index(
        "ix_concept_property_code_value",
        "concept_property",
        ["code", "value"],
        schema=SCHEMA,
    )
    op.create_table(
        "concept_parent",
        sa.Column("concept_id", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["concept_id"],
            [f"{SCHEMA}.concept.id"],
            ondelete="CASCADE",
            name="fk_concept_parent_concept_id_concept",
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            [f"{SCHEMA}.concept.id"],
            ondelete="CASCADE",
            name="fk_concept_parent_parent_id_concept",
        ),
        sa.PrimaryKeyConstraint("concept_id", "parent_id", name="pk_concept_parent"),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_concept_parent_parent_id", "concept_parent", ["parent_id"], schema=SCHEMA
    )

    op.create_table(
        "value_set",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("url", text(), nullable=False),
        sa.Column("version", text(), nullable=True),
        sa.Column("name", text(), nullable=True),
        sa.Column("title", text(), nullable=True),
        sa.Column("status", sa.String(16), nullable=True),
        sa.Column("has_compose", sa.Boolean(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("source", text(), nullable=False),
        sa.Column("expansion_status", sa.String(16), nullable=False),
        sa.Column("expansion_error", text(), nullable=True),
        sa.Column("member_count", sa.Integer(), nullable=True),
        sa.Column("stratum", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_value_set"),
        schema=SCHEMA,
    )
    op.create_index(
        "uq_value_set_url_version",
        "value_set",
        ["url", sa.text("coalesce(version, '')")],
        unique=True,
        schema=SCHEMA,
    )
    op.create_index("ix_value_set_stratum", "value_set", ["stratum"], schema=SCHEMA)
    op.create_table(
        "compose_rule",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("value_set_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("system", text(), nullable=True),
        sa.Column("version", text(), nullable=True),
        sa.Column("import_count", sa.Integer(), nullable=False),
        sa.Column("code_system_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["value_set_id"],
            [f"{SCHEMA}.value_set.id"],
            ondelete="CASCADE",
            name="fk_compose_rule_value_set_id_value_set",
        ),
        sa.ForeignKeyConstraint(
            ["code_system_id"],
            [f"{SCHEMA}.code_system.id"],
            ondelete="SET NULL",
            name="fk_compose_rule_code_system_id_code_system",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_compose_rule"),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_compose_rule_value_set_id", "compose_rule", ["value_set_id"], schema=SCHEMA
    )
    for table, value_columns in (
        (
            "compose_concept",
            [
                sa.Column("code", text(), nullable=False),
                sa.Column("display", text(), nullable=True),
            ],
        ),
        (
            "compose_filter",
            [
                sa.Column("property", text(), nullable=False),
                sa.Column("op", sa.String(32), nullable=False),
                sa.Column("value", text(), nullable=False),
            ],
        ),
        (
            "compose_import",
            [
                sa.Column("url", text(), nullable=False),
                sa.Column("version", text(), nullable=True),
                sa.Column("value_set_id", sa.Integer(), nullable=True),
                sa.ForeignKeyConstraint(
                    ["value_set_id"],
                    [f"{SCHEMA}.value_set.id"],
                    ondelete="SET NULL",
                    name="fk_compose_import_value_set_id_value_set",
                ),
            ],
        ),
    ):
        op.create_table(
            table,
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("rule_id", sa.Integer(), nullable=False),
            sa.Column("position", sa.Integer(), nullable=False),
            *value_columns,
            sa.ForeignKeyConstraint(
                ["rule_id"],
                [f"{SCHEMA}.compose_rule.id"],
                ondelete="CASCADE",
                name=f"fk_{table}_rule_id_compose_rule",
            ),
            sa.PrimaryKeyConstraint("id", name=f"pk_{table}"),
            schema=SCHEMA,
        )
    op.create_index(
        "ix_compose_concept_rule_id_code",
        "compose_concept",
        ["rule_id", "code"],
        schema=SCHEMA,
    )
    op.create_index(
        "ix_compose_filter_rule_id", "compose_filter", ["rule_id"], schema=SCHEMA
    )
    op.create_index(
        "ix_compose_import_rule_id", "compose_import", ["rule_id"], schema=SCHEMA
    )
    op.create_index(
        "ix_compose_import_value_set_id",
        "compose_import",
        ["value_set_id"],
        schema=SCHEMA,
    )
    op.create_table(
        "compose_rule_code",
        sa.Column("rule_id", sa.Integer(), nullable=False),
        sa.Column("system", text(), nullable=False),
        sa.Column("code", text(), nullable=False),
        sa.Column("display", text(), nullable=True),
        sa.Column("version", text(), nullable=True),
        sa.Column("inactive", sa.Boolean(), nullable=False),
        sa.Column("abstract", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["rule_id"],
            [f"{SCHEMA}.compose_rule.id"],
            ondelete="CASCADE",
            name="fk_compose_rule_code_rule_id_compose_rule",
        ),
        sa.PrimaryKeyConstraint(
            "rule_id", "system", "code", name="pk_compose_rule_code"
        ),
        schema=SCHEMA,
    )
    op.create_table(
        "value_set_member",
        sa.Column("value_set_id", sa.Integer(), nullable=False),
        sa.Column("system", text(), nullable=False),
        sa.Column("code", text(), nullable=False),
        sa.Column("version", text(), nullable=True),
        sa.Column("display", text(), nullable=True),
        sa.Column("inactive", sa.Boolean(), nullable=False),
        sa.Column("abstract", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["value_set_id"],
            [f"{SCHEMA}.value_set.id"],
            ondelete="CASCADE",
            name="fk_value_set_member_value_set_id_value_set",
        ),
        sa.PrimaryKeyConstraint(
            "value_set_id", "system", "code", name="pk_value_set_member"
        ),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_value_set_member_system_code",
        "value_set_member",
        ["system", "code"],
        schema=SCHEMA,
    )

    p = _prefix()
    # The public membership view of the SQL contract (README, docs/sql.md).
    op.execute(
        f"""
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
    )


def downgrade() -> None:
    op.execute(f"DROP VIEW {_prefix()}value_set_expansion")
    for table in (
        "value_set_member",
        "compose_rule_code",
        "compose_import",
        "compose_filter",
        "compose_concept",
        "compose_rule",
        "value_set",
        "concept_parent",
        "concept_property",
        "concept_designation",
        "concept",
        "code_system_property",
        "code_system",
    ):
        op.drop_table(table, schema=SCHEMA)
