"""Reporting contract: documented views, DICOM coding schemes, imaging tables.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03

Creates the views of the SQL contract besides ``value_set_expansion`` (``code_systems``,
``value_sets``, ``concepts``, ``concept_ancestor``), the table ``coding_scheme`` filled
from :data:`thodb.imaging.schemes.SCHEMES`, the imaging tables ``imaging_coded_item``
and ``imaging_selection``, and on PostgreSQL the functions ``tho.in_value_set`` and
``tho.in_value_set_dicom``. docs/sql.md documents every one of them.

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

from thodb.db import schema_prefix
from thodb.imaging.schemes import SCHEMES

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SCHEMA = "tho"

# Each view of the contract, in creation order; {p} is the schema prefix.
VIEWS: dict[str, str] = {
    "code_systems": """
        SELECT url, version, name, title, status, content, concept_count
        FROM {p}code_system
    """,
    "value_sets": """
        SELECT url, version, name, title, status, expansion_status, expansion_error,
               member_count
        FROM {p}value_set
    """,
    "concepts": """
        SELECT cs.url AS system, cs.version AS version, c.code AS code,
               c.display AS display, c.definition AS definition,
               c.inactive AS inactive, c.abstract AS abstract
        FROM {p}concept c
        JOIN {p}code_system cs ON cs.id = c.code_system_id
    """,
    # OMOP CONCEPT_ANCESTOR over concept_parent: every concept is its own ancestor at
    # distance 0, then each edge is followed upwards. Recursion starts from the edges,
    # not from every concept, so it does work only where there is a hierarchy; UNION
    # keeps each (descendant, ancestor, distance) once, which bounds the walk by the
    # number of distinct path lengths (the loader refuses hierarchy cycles). Computed
    # on every query: all of THO takes about 0.1 s on PostgreSQL, 0.3 s on SQLite.
    "concept_ancestor": """
        WITH RECURSIVE up(descendant_id, ancestor_id, levels) AS (
            SELECT concept_id, parent_id, 1 FROM {p}concept_parent
            UNION
            SELECT u.descendant_id, e.parent_id, u.levels + 1
            FROM up u JOIN {p}concept_parent e ON e.concept_id = u.ancestor_id
        ),
        closure(descendant_id, ancestor_id, min_levels, max_levels) AS (
            SELECT id, id, 0, 0 FROM {p}concept
            UNION ALL
            SELECT descendant_id, ancestor_id, MIN(levels), MAX(levels)
            FROM up GROUP BY descendant_id, ancestor_id
        )
        SELECT cs.url AS system, cs.version AS version,
               a.code AS ancestor_code, d.code AS descendant_code,
               c.min_levels AS min_levels_of_separation,
               c.max_levels AS max_levels_of_separation
        FROM closure c
        JOIN {p}concept d ON d.id = c.descendant_id
        JOIN {p}concept a ON a.id = c.ancestor_id
        JOIN {p}code_system cs ON cs.id = d.code_system_id
    """,
}

# Written with $1..$3: inside a SQL function a column name wins over a parameter of
# the same name (system, code), so the named parameters are for callers only. Both
# read the contract views, not the tables, so that a role granted the contract alone
# may call them. CASE gives NULL (unknown) for a value set that is not loaded or not
# expanded, so that `NOT tho.in_value_set(...)` does not flag every row over a typo.
# PostgreSQL never inlines a scalar function whose body has a subquery, so each call
# runs the body's cached plan: an index lookup on value_set (url) and one on the key of
# value_set_member, about 50 microseconds. A join over many rows is faster written as a
# join to value_set_expansion, which the planner can hash (docs/sql.md).
IN_VALUE_SET = """
CREATE FUNCTION tho.in_value_set(value_set_url text, system text, code text)
RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN EXISTS (
            SELECT 1 FROM tho.value_set_expansion e
            WHERE e.value_set_url = split_part($1, '|', 1)
              AND (strpos($1, '|') = 0
                   OR e.value_set_version = substr($1, strpos($1, '|') + 1))
              AND e.system = $2 AND e.code = $3)
        THEN true
        WHEN EXISTS (
            SELECT 1 FROM tho.value_sets v
            WHERE v.url = split_part($1, '|', 1)
              AND (strpos($1, '|') = 0 OR v.version = substr($1, strpos($1, '|') + 1))
              AND v.expansion_status = 'expanded')
        THEN false
    END
$$
"""

IN_VALUE_SET_DICOM = """
CREATE FUNCTION tho.in_value_set_dicom(value_set_url text, designator text, code text)
RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT tho.in_value_set(
        $1, (SELECT s.system FROM tho.coding_scheme s WHERE s.designator = $2), $3)
$$
"""

# Catalog comments on PostgreSQL (\d+ in psql shows them); docs/sql.md has the rest.
# Tables get none: their documentation is in thodb.models, which autogenerate compares.
COMMENTS = {
    "VIEW tho.code_systems": "The loaded code systems, one row per url|version.",
    "VIEW tho.value_sets": (
        "The loaded value sets, one row per url|version, with whether they could be "
        "expanded and why not."
    ),
    "VIEW tho.concepts": "Every concept of every loaded code system.",
    "VIEW tho.concept_ancestor": (
        "Hierarchy closure (OMOP CONCEPT_ANCESTOR): ancestor_code subsumes "
        "descendant_code; every concept is its own ancestor at distance 0."
    ),
    "FUNCTION tho.in_value_set(text, text, text)": (
        "True when system|code is in the expansion of the value set (url or "
        "url|version; any loaded version when none is given), false when not, "
        "NULL when the value set is not loaded or cannot be expanded."
    ),
    "FUNCTION tho.in_value_set_dicom(text, text, text)": (
        "tho.in_value_set with a DICOM Coding Scheme Designator instead of a system "
        "URL (resolved through tho.coding_scheme)."
    ),
}


def upgrade() -> None:
    bind = op.get_bind()
    p = schema_prefix(bind)
    for name, body in VIEWS.items():
        op.execute(f"CREATE VIEW {p}{name} AS {body.format(p=p)}")

    coding_scheme = op.create_table(
        "coding_scheme",
        sa.Column("designator", sa.Text(), nullable=False),
        sa.Column("system", sa.Text(), nullable=False),
        sa.Column("uid", sa.Text(), nullable=True),
        sa.Column("name", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("designator", name="pk_coding_scheme"),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_coding_scheme_system", "coding_scheme", ["system"], schema=SCHEMA
    )
    # The rows as the code knows them today. A later change to SCHEMES needs its own
    # migration that brings existing databases up to date.
    op.bulk_insert(
        coding_scheme,
        [
            {
                "designator": s.designator,
                "system": s.system,
                "uid": s.uid,
                "name": s.name,
            }
            for s in SCHEMES
        ],
    )

    op.create_table(
        "imaging_coded_item",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.Text(), nullable=True),
        sa.Column("series_instance_uid", sa.Text(), nullable=True),
        sa.Column("sop_instance_uid", sa.Text(), nullable=False),
        sa.Column("sop_class_uid", sa.Text(), nullable=True),
        sa.Column("attribute_path", sa.Text(), nullable=False),
        sa.Column("coding_scheme_designator", sa.Text(), nullable=True),
        sa.Column("coding_scheme_version", sa.Text(), nullable=True),
        sa.Column("code_value", sa.Text(), nullable=False),
        sa.Column("code_meaning", sa.Text(), nullable=False),
        sa.Column("system", sa.Text(), nullable=True),
        sa.Column("source", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_imaging_coded_item"),
        sa.UniqueConstraint(
            "sop_instance_uid",
            "attribute_path",
            name="uq_imaging_coded_item_sop_instance_uid_attribute_path",
        ),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_imaging_coded_item_system_code_value",
        "imaging_coded_item",
        ["system", "code_value"],
        schema=SCHEMA,
    )
    op.create_index(
        "ix_imaging_coded_item_coding_scheme_designator_code_value",
        "imaging_coded_item",
        ["coding_scheme_designator", "code_value"],
        schema=SCHEMA,
    )

    op.create_table(
        "imaging_selection",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("element", sa.Text(), nullable=False),
        sa.Column("status", sa.String(32), nullable=True),
        sa.Column("study_uid", sa.Text(), nullable=True),
        sa.Column("series_uid", sa.Text(), nullable=True),
        sa.Column("system", sa.Text(), nullable=True),
        sa.Column("version", sa.Text(), nullable=True),
        sa.Column("code", sa.Text(), nullable=False),
        sa.Column("display", sa.Text(), nullable=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", "element", name="pk_imaging_selection"),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_imaging_selection_system_code",
        "imaging_selection",
        ["system", "code"],
        schema=SCHEMA,
    )

    if bind.dialect.name == "postgresql":
        op.execute(IN_VALUE_SET)
        op.execute(IN_VALUE_SET_DICOM)
        # COMMENT takes no bound parameters; the texts are the constants above.
        quote = sa.String().literal_processor(bind.dialect)
        for target, comment in COMMENTS.items():
            op.execute(f"COMMENT ON {target} IS {quote(comment)}")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("DROP FUNCTION tho.in_value_set_dicom(text, text, text)")
        op.execute("DROP FUNCTION tho.in_value_set(text, text, text)")
    op.drop_table("imaging_selection", schema=SCHEMA)
    op.drop_table("imaging_coded_item", schema=SCHEMA)
    op.drop_table("coding_scheme", schema=SCHEMA)
    p = schema_prefix(bind)
    for name in reversed(VIEWS):
        op.execute(f"DROP VIEW {p}{name}")
