"""The recursive SQL statements of expansion, laid out as SQL.

Each statement is written once with ``{p}`` for the schema prefix (``tho.`` on
PostgreSQL, nothing on SQLite), ``{instr}`` for the substring-position function and
``{regex_code}``/``{regex_property}`` for a whole-value regular-expression match (see
:mod:`thodb.sqlfunctions`); all come from a fixed set in :func:`render`, never from
input. Every value is bound.

FHIR meaning (R5 valueset.html#compose): members = union of ``include`` minus union of
``exclude``; inside one include/exclude, the *system part* (its ``concept`` list, its
``filter`` list, or else the whole code system) and every ``valueSet`` it names are
intersected. ``is-a`` includes the code itself, ``descendent-of`` does not.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, TextClause, text
from sqlalchemy.dialects.postgresql import psycopg
from sqlalchemy.orm import Session

from thodb.db import schema_prefix
from thodb.sqlfunctions import regex_match

#: Filter operators evaluated by RULE_CODES (others leave a value set not expandable).
SUPPORTED_FILTERS = {
    "is-a": ("concept", "code"),
    "descendent-of": ("concept", "code"),
    "is-not-a": ("concept", "code"),
    "child-of": ("concept", "code"),
    "descendent-leaf": ("concept", "code"),
    "generalizes": ("concept", "code"),
    "=": None,  # any property, plus concept/code and display
    "in": None,
    "not-in": None,
    "exists": None,
    "regex": None,  # the code, the display, or any property's value
}


@contextmanager
def without_jit(session: Session) -> Iterator[None]:
    """Run the block with PostgreSQL's JIT compilation off, and its setting as before
    afterwards (the change is local to the transaction).

    PostgreSQL compiles a statement whose estimated cost passes ``jit_above_cost``.
    The recursive statements are costed with every branch, the ones a one-time filter
    skips too, and compiling them takes longer than running them: 230 of the 340 ms of
    the live expansion of a chain of 1,000 imports.
    """
    with _turned_off(session, "jit"):
        yield


@contextmanager
def without_hash_aggregation(session: Session, *, when: bool = True) -> Iterator[None]:
    """Run the block with PostgreSQL's hashed aggregation off (``enable_hashagg``), and
    its setting as before afterwards (local to the transaction); with ``when`` false,
    with the setting as it is.

    For :data:`MATERIALIZE`, whose rows are grouped by (value set, system, code) and
    stored in that order: PostgreSQL grouped THO's 102,216 rows by a hash and sorted
    them after (0.26 s of the statement); without, it sorts them once, groups them in
    order and keeps the order through the join with ``value_set`` (the statement took
    485 instead of 623 ms).
    """
    if not when:
        yield
        return
    with _turned_off(session, "enable_hashagg"):
        yield


@contextmanager
def _turned_off(session: Session, setting: str) -> Iterator[None]:
    if not schema_prefix(session):  # SQLite
        yield
        return
    # The setting as it was (read from the CTE before set_config runs), and off.
    before = session.scalar(
        text(
            "WITH before AS MATERIALIZED (SELECT current_setting(:name) AS value) "
            "SELECT value FROM before WHERE set_config(:name, 'off', true) = 'off'"
        ),
        {"name": setting},
    )
    yield
    # Not after an error: the transaction may have failed, and its end (or the
    # rollback of the savepoint it is in) puts the setting back anyway.
    if before is not None and before != "off":
        session.execute(
            text("SELECT set_config(:name, :before, true)"),
            {"name": setting, "before": before},
        )


@contextmanager
def work_mem_at_least(session: Session, kilobytes: int) -> Iterator[None]:
    """Run the block with PostgreSQL's ``work_mem`` at least ``kilobytes`` (a larger
    setting stays), and its setting as before afterwards (local to the transaction).

    The sorts and hashes of a refresh over all of THO need more than the default 4 MB:
    with it they spill to disk (the 102,216 rows of the member walk sorted by an
    external merge, the rule codes hashed in four batches).
    """
    if not schema_prefix(session):  # SQLite
        yield
        return
    before, known = session.execute(
        text(
            "SELECT current_setting('work_mem'), setting::bigint "
            "FROM pg_settings WHERE name = 'work_mem'"
        )
    ).one()
    raised = known < kilobytes
    if raised:
        session.execute(
            text("SELECT set_config('work_mem', :wanted, true)"),
            {"wanted": f"{kilobytes}kB"},
        )
    yield
    # Not after an error: the end of the transaction puts the setting back anyway.
    if raised:
        session.execute(
            text("SELECT set_config('work_mem', :before, true)"), {"before": before}
        )


def fetch_without_jit(
    connection: Connection, statement: str, parameters: Mapping[str, object]
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The column names and rows of ``statement`` (in the driver's parameter style,
    see :func:`named_for_driver`), run on the DB-API cursor with PostgreSQL's JIT off
    as :func:`without_jit` does it, for a statement a service runs often: on
    PostgreSQL the setting is turned off, the statement run and the setting put back in
    one round trip (psycopg's pipeline), where :func:`without_jit` takes three."""
    driver: Any = connection.connection.driver_connection
    if not schema_prefix(connection):  # SQLite
        cursor = driver.cursor()
        try:
            cursor.execute(statement, parameters)
            return [c[0] for c in cursor.description], cursor.fetchall()
        finally:
            cursor.close()
    with driver.cursor() as off, driver.cursor() as main, driver.cursor() as back:
        with driver.pipeline():
            off.execute(_JIT_OFF)
            main.execute(statement, parameters)
            back.execute(_JIT_BACK)
        return [c.name for c in main.description], main.fetchall()


# The setting as it was (read from the CTE before set_config runs) is kept in a
# setting of thodb's own for the rest of the transaction, and set again from there.
_JIT_OFF = (
    "WITH before AS MATERIALIZED (SELECT current_setting('jit') AS jit) "
    "SELECT set_config('thodb.jit_before', jit, true), set_config('jit', 'off', true) "
    "FROM before"
)
_JIT_BACK = "SELECT set_config('jit', current_setting('thodb.jit_before'), true)"


def for_driver(bind: Engine | Session | Connection, template: str) -> str:
    """``template`` with ``{p}`` filled and its ``?`` placeholders in the parameter style
    of ``bind``'s DB-API driver (``%s`` for psycopg), for the few statements that run on
    the DB-API cursor: where SQLAlchemy's own work per statement or per row is most of
    the cost."""
    return _for_driver(schema_prefix(bind), template)


@functools.cache
def _for_driver(prefix: str, template: str) -> str:
    statement = template.format(p=prefix)
    if not prefix:  # SQLite, whose driver takes ? itself
        return statement
    return statement.replace("?", "%s")


def named_for_driver(bind: Session | Connection, template: str) -> str:
    """The statement :func:`render` makes of ``template``, as ``bind``'s DB-API driver
    takes it with its ``:name`` parameters given as a mapping: for a statement whose
    many rows are read on the DB-API cursor."""
    return _named_for_driver(schema_prefix(bind), template)


@functools.cache
def _named_for_driver(prefix: str, template: str) -> str:
    clause = _render(prefix, template, False)
    if not prefix:  # SQLite, whose driver takes :name itself
        return clause.text
    return str(clause.compile(dialect=_PSYCOPG))


# The statements compile alike for every PostgreSQL engine (psycopg's pyformat).
_PSYCOPG = psycopg.dialect()  # type: ignore[no-untyped-call]


def render(
    bind: Session | Connection, template: str, *, pending_only: bool = False
) -> TextClause:
    """Fill the dialect fragments of a statement template and wrap it as text.

    :param pending_only: limit :data:`RULE_CODES` and :data:`MATERIALIZE` to the value
        sets whose ``expansion_status`` is ``pending`` (an incremental refresh), and
        have :data:`MATERIALIZE` write into :data:`MEMBER_NEW`.
    """
    return _render(schema_prefix(bind), template, pending_only)


# Kept: text() scans a statement for bind parameters with regular expressions each
# time it is made, and the statements are several KB (0.16 ms of a live expansion of
# image-reference-type on PostgreSQL).
@functools.cache
def _render(p: str, template: str, pending_only: bool) -> TextClause:
    sqlite = p == ""
    return text(
        template.format(
            p=p,
            only_rules=(
                f"AND r.value_set_id IN (SELECT id FROM {p}value_set "
                "WHERE expansion_status = 'pending')"
                if pending_only
                else ""
            ),
            only_targets="AND expansion_status = 'pending'" if pending_only else "",
            into="member_new" if pending_only else f"{p}value_set_member",
            # SQLite with statistics (after ANALYZE) would rather build an automatic
            # index on all of compose_rule_code, each time, than take its primary
            # key's for the rules at hand: 88 instead of 5 ms for image-reference-type.
            by_rule="INDEXED BY sqlite_autoindex_compose_rule_code_1" if sqlite else "",
            # PostgreSQL stores the rows where they come: in key order, a value set's
            # members (a rule's codes) are side by side, on 22 heap pages instead of
            # 849 for image-reference-type. Sorted by value set (rule) only, a first
            # load took 0.2 s less, but a large value set read slower (50,000 codes:
            # 392 instead of 157 ms live, about 30 % more from value_set_member).
            # SQLite gains nothing from it and sorting took 0.2 s of a first load.
            in_key_order="" if sqlite else "ORDER BY 1, 2, 3",
            instr="instr" if sqlite else "strpos",
            regex_code=regex_match(sqlite, "c.code", "f.value"),
            regex_display=regex_match(sqlite, "c.display", "f.value"),
            regex_property=regex_match(sqlite, "cp.value", "f.value"),
            seeds=(
                "SELECT value FROM json_each(:ids)"
                if sqlite
                else "SELECT unnest(CAST(:ids AS INTEGER[]))"
            ),
        )
    )


def bound_ids(bind: Session | Connection, ids: Iterable[int]) -> object:
    """``ids`` as the value of the ``:ids`` parameter of :func:`id_in_bound` and of the
    ``{seeds}`` of :data:`CLOSURE` and :data:`IMPORTERS`: a JSON array on SQLite, an
    array on PostgreSQL (one parameter, whatever the number of ids)."""
    listed = sorted(ids)
    return json.dumps(listed) if not schema_prefix(bind) else listed


def reached(session: Session, template: str, seeds: Iterable[int]) -> list[int]:
    """The ids that :data:`CLOSURE` or :data:`IMPORTERS` (``template``) reaches from
    ``seeds``, the seeds among them; no statement when there are none."""
    listed = list(seeds)
    if not listed:
        return []
    ids = bound_ids(session, listed)
    return list(session.scalars(render(session, template), {"ids": ids}))


def id_in_bound(bind: Session | Connection, column: str) -> str:
    """SQL: ``column`` (a fixed name) is one of the ids bound as ``:ids``."""
    if not schema_prefix(bind):  # SQLite
        return f"{column} IN (SELECT value FROM json_each(:ids))"
    return f"{column} = ANY(CAST(:ids AS INTEGER[]))"


# The system part of every rule, as rows of compose_rule_code. Hierarchy filters walk
# concept_parent down from the filter's code (or up, for generalizes); UNION (not
# UNION ALL) makes each walk stop at concepts already reached, so a multi-parent
# hierarchy is walked once per concept, and a cycle (refused at load) could not loop.
RULE_CODES = """
WITH RECURSIVE
anchor(filter_id, concept_id) AS (
    SELECT f.id, c.id
    FROM {p}compose_filter f
    JOIN {p}compose_rule r ON r.id = f.rule_id
    JOIN {p}concept c ON c.code_system_id = r.code_system_id AND c.code = f.value
    WHERE f.op IN ('is-a', 'descendent-of', 'is-not-a', 'child-of', 'descendent-leaf',
                   'generalizes')
      AND f.property IN ('concept', 'code')
      {only_rules}
),
below(filter_id, concept_id) AS (
    SELECT a.filter_id, a.concept_id
    FROM anchor a JOIN {p}compose_filter f ON f.id = a.filter_id
    WHERE f.op <> 'generalizes'
    UNION
    SELECT b.filter_id, e.concept_id
    FROM below b JOIN {p}concept_parent e ON e.parent_id = b.concept_id
),
above(filter_id, concept_id) AS (
    SELECT a.filter_id, a.concept_id
    FROM anchor a JOIN {p}compose_filter f ON f.id = a.filter_id
    WHERE f.op = 'generalizes'
    UNION
    SELECT b.filter_id, e.parent_id
    FROM above b JOIN {p}concept_parent e ON e.concept_id = b.concept_id
),
filter_match(filter_id, concept_id) AS (
    -- is-a: the code and everything below it
    SELECT b.filter_id, b.concept_id
    FROM below b JOIN {p}compose_filter f ON f.id = b.filter_id
    WHERE f.op = 'is-a'
    UNION
    -- descendent-of and descendent-leaf: below it, not the code itself
    SELECT b.filter_id, b.concept_id
    FROM below b JOIN {p}compose_filter f ON f.id = b.filter_id
    WHERE f.op IN ('descendent-of', 'descendent-leaf')
      AND NOT EXISTS (SELECT 1 FROM anchor a
                      WHERE a.filter_id = b.filter_id AND a.concept_id = b.concept_id)
      AND (f.op = 'descendent-of'
           OR NOT EXISTS (SELECT 1 FROM {p}concept_parent e
                          WHERE e.parent_id = b.concept_id))
    UNION
    -- child-of: the direct children
    SELECT a.filter_id, e.concept_id
    FROM anchor a
    JOIN {p}compose_filter f ON f.id = a.filter_id
    JOIN {p}concept_parent e ON e.parent_id = a.concept_id
    WHERE f.op = 'child-of'
    UNION
    -- generalizes: the code and everything above it
    SELECT filter_id, concept_id FROM above
    UNION
    -- is-not-a: every concept of the system that is not the code or below it
    SELECT f.id, c.id
    FROM {p}compose_filter f
    JOIN {p}compose_rule r ON r.id = f.rule_id
    JOIN {p}concept c ON c.code_system_id = r.code_system_id
    WHERE f.op = 'is-not-a'
      AND NOT EXISTS (SELECT 1 FROM below b
                      WHERE b.filter_id = f.id AND b.concept_id = c.id)
      {only_rules}
    UNION
    -- = and in on the code or display
    SELECT f.id, c.id
    FROM {p}compose_filter f
    JOIN {p}compose_rule r ON r.id = f.rule_id
    JOIN {p}concept c ON c.code_system_id = r.code_system_id
    WHERE ((f.op = '=' AND f.property IN ('concept', 'code') AND c.code = f.value)
       OR (f.op = '=' AND f.property = 'display' AND c.display = f.value)
       OR (f.op = 'in' AND f.property IN ('concept', 'code')
           AND {instr}(',' || f.value || ',', ',' || c.code || ',') > 0)
       OR (f.op = 'not-in' AND f.property IN ('concept', 'code')
           AND {instr}(',' || f.value || ',', ',' || c.code || ',') = 0)
       OR (f.op = 'regex' AND f.property IN ('concept', 'code') AND {regex_code})
       OR (f.op = 'regex' AND f.property = 'display' AND {regex_display}))
      {only_rules}
    UNION
    -- =, in and exists on a concept property
    SELECT f.id, c.id
    FROM {p}compose_filter f
    JOIN {p}compose_rule r ON r.id = f.rule_id
    JOIN {p}concept c ON c.code_system_id = r.code_system_id
    JOIN {p}concept_property cp ON cp.concept_id = c.id AND cp.code = f.property
    WHERE ((f.op = '=' AND cp.value = f.value)
       OR (f.op = 'in' AND {instr}(',' || f.value || ',', ',' || cp.value || ',') > 0)
       OR (f.op = 'exists' AND f.value = 'true')
       OR (f.op = 'regex' AND f.property NOT IN ('concept', 'code', 'display')
           AND {regex_property}))
      {only_rules}
    UNION
    -- not-in and exists = false on a concept property
    SELECT f.id, c.id
    FROM {p}compose_filter f
    JOIN {p}compose_rule r ON r.id = f.rule_id
    JOIN {p}concept c ON c.code_system_id = r.code_system_id
    WHERE ((f.op = 'exists' AND f.value = 'false')
           OR (f.op = 'not-in' AND f.property NOT IN ('concept', 'code')))
      AND NOT EXISTS (
          SELECT 1 FROM {p}concept_property cp
          WHERE cp.concept_id = c.id AND cp.code = f.property
            AND (f.op = 'exists'
                 OR {instr}(',' || f.value || ',', ',' || cp.value || ',') > 0))
      {only_rules}
),
-- Rules that take a whole code system (no concept list, no filter). Materialized, so
-- that the planner joins these few rules to their concepts instead of joining every
-- rule of a large code system to every concept and discarding most of the pairs.
whole_system_rule(rule_id) AS MATERIALIZED (
    SELECT r.id FROM {p}compose_rule r
    WHERE r.code_system_id IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM {p}compose_concept k WHERE k.rule_id = r.id)
      AND NOT EXISTS (SELECT 1 FROM {p}compose_filter f WHERE f.rule_id = r.id)
      {only_rules}
)
INSERT INTO {p}compose_rule_code
    (rule_id, system, code, display, version, inactive, abstract, concept_id)
-- A concept list: its codes, whether or not their code system is loaded; but a code that
-- a loaded complete code system does not have is not a code (HL7 tx: enum-bad).
SELECT r.id, r.system, k.code,
       MIN(COALESCE(c.display, k.display)),
       MIN(COALESCE(cs.version, r.version)),
       COALESCE(MAX(CASE WHEN c.inactive THEN 1 ELSE 0 END), 0) = 1,
       COALESCE(MAX(CASE WHEN c.abstract THEN 1 ELSE 0 END), 0) = 1,
       MIN(c.id)
FROM {p}compose_concept k
JOIN {p}compose_rule r ON r.id = k.rule_id
LEFT JOIN {p}concept c ON c.code_system_id = r.code_system_id AND c.code = k.code
LEFT JOIN {p}code_system cs ON cs.id = r.code_system_id
WHERE (c.id IS NOT NULL OR COALESCE(cs.content, '') <> 'complete')
  {only_rules}
GROUP BY r.id, r.system, k.code
UNION ALL
-- Filters: the concepts that the first filter matches and every other filter too.
SELECT r.id, r.system, c.code, c.display, cs.version, c.inactive, c.abstract, c.id
FROM {p}compose_rule r
JOIN {p}code_system cs ON cs.id = r.code_system_id
JOIN {p}compose_filter f0 ON f0.rule_id = r.id AND f0.position = 0
JOIN filter_match m0 ON m0.filter_id = f0.id
JOIN {p}concept c ON c.id = m0.concept_id
WHERE NOT EXISTS (
    SELECT 1 FROM {p}compose_filter f
    WHERE f.rule_id = r.id AND f.position > 0
      AND NOT EXISTS (SELECT 1 FROM filter_match m
                      WHERE m.filter_id = f.id AND m.concept_id = c.id))
  {only_rules}
UNION ALL
-- Neither: the whole code system.
SELECT r.id, r.system, c.code, c.display, cs.version, c.inactive, c.abstract, c.id
FROM whole_system_rule w
JOIN {p}compose_rule r ON r.id = w.rule_id
JOIN {p}code_system cs ON cs.id = r.code_system_id
JOIN {p}concept c ON c.code_system_id = cs.id
{in_key_order}
"""

# "Code m is in the system part of rule r" (a rule without system has no system part).
_IN_SYSTEM_PART = """(r.system IS NULL OR EXISTS (
          SELECT 1 FROM {p}compose_rule_code k
          WHERE k.rule_id = r.id AND k.system = m.system AND k.code = m.code))"""

# "Code m is in every value set rule r names after its first" (from earlier passes).
_IN_OTHER_IMPORTS = """NOT EXISTS (
          SELECT 1 FROM {p}compose_import j
          WHERE j.rule_id = r.id AND j.position > 0
            AND NOT EXISTS (SELECT 1 FROM {p}value_set_member m2
                            WHERE m2.value_set_id = j.value_set_id
                              AND m2.system = m.system AND m2.code = m.code))"""

# "No exclude of value set t.value_set_id takes code m out": an exclude matches when m
# is in its system part and in every value set it names (those are earlier passes).
# Most value sets have no exclude: for them `excluding` answers without a probe of the
# rules per code. The conditions name t, not r (the same value set), so that
# PostgreSQL tests them after the join with the targets, not on every rule code.
_NOT_EXCLUDED = """(t.value_set_id NOT IN (SELECT value_set_id FROM excluding)
       OR NOT EXISTS (
          SELECT 1 FROM {p}compose_rule e
          WHERE e.value_set_id = t.value_set_id AND e.kind = 'exclude'
            AND (e.system IS NULL OR EXISTS (
                SELECT 1 FROM {p}compose_rule_code k
                WHERE k.rule_id = e.id AND k.system = m.system AND k.code = m.code))
            AND NOT EXISTS (
                SELECT 1 FROM {p}compose_import j
                WHERE j.rule_id = e.id
                  AND NOT EXISTS (SELECT 1 FROM {p}value_set_member m2
                                  WHERE m2.value_set_id = j.value_set_id
                                    AND m2.system = m.system AND m2.code = m.code))))"""

# "Value set t.value_set_id may hold code m": an inactive code only when its compose
# does not say ``inactive: false``.
_ACTIVE_UNLESS_ALLOWED = """(NOT m.inactive OR NOT EXISTS (
          SELECT 1 FROM {p}value_set v
          WHERE v.id = t.value_set_id AND v.compose_inactive = FALSE))"""

# The smallest display that the operands of an intersection (rule r, member m of its
# first value set) give for m: those of the value sets and of the system part. A
# loaded code system's display is the same in all of them; an enumerated code of one
# that is not loaded may have a display in one operand only. A rule that names one
# value set and no system has no other operand: m's display, without the probes per
# member (an incremental refresh reads the value sets its changes do not reach this
# way; after one DICOM CID changed the probes took 22 of the 50 ms of a pass).
_SMALLEST_DISPLAY = """CASE WHEN r.import_count = 1 AND r.system IS NULL THEN m.display
           ELSE (SELECT MIN(d.display) FROM (
               SELECT m2.display FROM {p}compose_import j
               JOIN {p}value_set_member m2 ON m2.value_set_id = j.value_set_id
               WHERE j.rule_id = r.id AND m2.system = m.system AND m2.code = m.code
               UNION ALL
               SELECT k.display FROM {p}compose_rule_code k
               WHERE k.rule_id = r.id AND k.system = m.system AND k.code = m.code
           ) d) END"""

# The same for a member m of the recursive walk: the smaller of its display and the
# one rule r's system part gives (PostgreSQL allows no aggregate over the recursive
# table inside the walk, so two values are compared); a rule without system part
# gives none.
_SMALLER_RULE_DISPLAY = """CASE WHEN r.system IS NULL THEN m.display ELSE COALESCE((
               SELECT CASE WHEN m.display IS NULL OR k.display < m.display
                           THEN k.display ELSE m.display END
               FROM {p}compose_rule_code k
               WHERE k.rule_id = r.id AND k.system = m.system AND k.code = m.code
                 AND k.display IS NOT NULL), m.display) END"""

# The members of every value set in `target`, in one recursive statement. Rows flow
# up the import graph: a value set's codes are added to each value set that includes
# it (an include naming exactly one value set is a union edge). An include that
# intersects several value sets, and an exclude that names value sets, are not
# monotone, so their value sets come from value_set_member, filled by an earlier pass
# (see thodb.refresh.refresh). UNION keeps each (value set, code, display...) once,
# which is what makes a diamond (two import paths reaching the same set) cost nothing
# extra and bounds the recursion by the number of distinct rows.
_MEMBERS = (
    """
-- The targets with an exclude.
excluding(value_set_id) AS (
    SELECT DISTINCT e.value_set_id FROM {p}compose_rule e
    JOIN target t ON t.value_set_id = e.value_set_id
    WHERE e.kind = 'exclude'
),
member(value_set_id, system, code, display, version, inactive, abstract,
       concept_id) AS (
    -- An include without valueSet: the codes of its system part.
    SELECT r.value_set_id, m.system, m.code, m.display, m.version, m.inactive,
           m.abstract, m.concept_id
    FROM {p}compose_rule r
    JOIN target t ON t.value_set_id = r.value_set_id
    JOIN {p}compose_rule_code m ON m.rule_id = r.id
    WHERE r.kind = 'include' AND r.import_count = 0
      AND """
    + _NOT_EXCLUDED
    + """
      AND """
    + _ACTIVE_UNLESS_ALLOWED
    + """
    -- ALL: the UNION with the recursive part below keeps each row once, rows of these
    -- two parts too; a UNION here sorted them all a first time (THO: 83,606 rows).
    UNION ALL
    -- An include whose value sets were expanded in an earlier pass: the members of the
    -- first that are also in the others and in the system part, with the smallest
    -- display any of them gives.
    SELECT r.value_set_id, m.system, m.code, """
    + _SMALLEST_DISPLAY
    + """, m.version,
           m.inactive, m.abstract, m.concept_id
    FROM {p}compose_rule r
    JOIN target t ON t.value_set_id = r.value_set_id
    JOIN {p}compose_import i ON i.rule_id = r.id AND i.position = 0
    JOIN {p}value_set_member m ON m.value_set_id = i.value_set_id
    WHERE r.kind = 'include'
      AND (r.import_count > 1
           OR i.value_set_id NOT IN (SELECT value_set_id FROM target))
      AND """
    + _IN_OTHER_IMPORTS
    + """
      AND """
    + _IN_SYSTEM_PART
    + """
      AND """
    + _NOT_EXCLUDED
    + """
      AND """
    + _ACTIVE_UNLESS_ALLOWED
    + """
    UNION
    -- An include of exactly one value set of this statement: its members, again, with
    -- the system part's display where that is smaller.
    SELECT r.value_set_id, m.system, m.code, """
    + _SMALLER_RULE_DISPLAY
    + """,
           m.version, m.inactive, m.abstract, m.concept_id
    FROM member m
    JOIN {p}compose_import i ON i.value_set_id = m.value_set_id
    JOIN {p}compose_rule r ON r.id = i.rule_id
    JOIN target t ON t.value_set_id = r.value_set_id
    WHERE r.kind = 'include' AND r.import_count = 1
      AND """
    + _IN_SYSTEM_PART
    + """
      AND """
    + _NOT_EXCLUDED
    + """
      AND """
    + _ACTIVE_UNLESS_ALLOWED
    + """
)
"""
)

# One row per (value set, code): the smallest display and version when import paths
# disagree (only possible for code systems that are not loaded, or for includes of
# two versions of one code system, where the concept is the first loaded).
_COLLAPSE = """
SELECT value_set_id, system, code, MIN(version) AS version, MIN(display) AS display,
       MAX(CASE WHEN inactive THEN 1 ELSE 0 END) = 1 AS inactive,
       MAX(CASE WHEN abstract THEN 1 ELSE 0 END) = 1 AS abstract,
       MIN(concept_id) AS concept_id
FROM member
"""

#: Fill value_set_member for every value set of pass ``:stratum``.
MATERIALIZE = (
    """
WITH RECURSIVE
target(value_set_id) AS (
    SELECT id FROM {p}value_set WHERE stratum = :stratum {only_targets}
),"""
    + _MEMBERS
    + """
INSERT INTO {into}
    (value_set_id, system, code, version, display, inactive, abstract, concept_id,
     value_set_url, value_set_version)
SELECT c.value_set_id, c.system, c.code, c.version, c.display, c.inactive, c.abstract,
       c.concept_id, vs.url, vs.version
FROM ("""
    + _COLLAPSE
    + """
GROUP BY value_set_id, system, code
) c
JOIN {p}value_set vs ON vs.id = c.value_set_id
{in_key_order}
"""
)

#: Where an incremental refresh's :data:`MATERIALIZE` writes the members of a pass, to
#: be compared with the stored ones (a temporary table, by engine): a value set that
#: is recomputed because one it imports changed keeps most of its rows.
MEMBER_NEW = {
    "postgresql": "CREATE TEMPORARY TABLE IF NOT EXISTS member_new "
    "(LIKE tho.value_set_member) ON COMMIT DROP",
    "sqlite": "CREATE TEMPORARY TABLE IF NOT EXISTS member_new AS "
    "SELECT * FROM value_set_member WHERE 0",
}

_MEMBER_COLUMNS = (
    "value_set_id, system, code, version, display, inactive, abstract, concept_id, "
    "value_set_url, value_set_version"
)
_PASS_TARGETS = """(
    SELECT id FROM {p}value_set
    WHERE stratum = :stratum AND expansion_status = 'pending')"""

#: After :data:`MATERIALIZE` of pass ``:stratum`` into ``member_new``: remove the
#: stored members of its value sets that are not among the new ones, column for column
#: (``EXCEPT`` takes two NULLs for equal, as a comparison would not).
DROP_CHANGED_MEMBERS = (
    """
DELETE FROM {p}value_set_member
WHERE value_set_id IN """
    + _PASS_TARGETS
    + """
  AND (value_set_id, system, code) IN (
    SELECT value_set_id, system, code FROM (
        SELECT """
    + _MEMBER_COLUMNS
    + """ FROM {p}value_set_member
        WHERE value_set_id IN """
    + _PASS_TARGETS
    + """
        EXCEPT
        SELECT """
    + _MEMBER_COLUMNS
    + """ FROM member_new) changed)
"""
)

#: Then store the new members that are not stored yet (what is left of the pass's
#: value sets is what did not change).
ADD_NEW_MEMBERS = (
    """
INSERT INTO {p}value_set_member ("""
    + _MEMBER_COLUMNS
    + """)
SELECT """
    + _MEMBER_COLUMNS
    + """ FROM member_new
EXCEPT
SELECT """
    + _MEMBER_COLUMNS
    + """ FROM {p}value_set_member WHERE value_set_id IN """
    + _PASS_TARGETS
    + """
"""
)

#: Expand value set ``:value_set_id`` from its compose, without value_set_member rows of
#: its own: the value sets it reaches through union edges are walked by the same
#: statement; the operands of intersections and value-set excludes are read from
#: value_set_member. When every value set reached is a union of system parts and of
#: other value sets (no exclude, no intersection, no ``inactive: false``), as the
#: DICOM context groups are, its members are the codes of those system parts, read
#: once each instead of carried up every import path: one row per system part that
#: lists a code, which :func:`thodb.expand.expand` merges as :data:`MATERIALIZE` merges
#: the rows of a code (SQLite took 1.5 of 5.2 ms of the statement for image-reference-type
#: to group its 1,270 rows in SQL; PostgreSQL as long as Python does). The rows come in
#: no order: :func:`thodb.expand.expand` orders the members as their code systems order
#: their concepts.
EXPAND_LIVE = (
    """
WITH RECURSIVE
target(value_set_id) AS (
    SELECT CAST(:value_set_id AS INTEGER)
    UNION
    SELECT i.value_set_id
    FROM target t
    JOIN {p}compose_rule r ON r.value_set_id = t.value_set_id
    JOIN {p}compose_import i ON i.rule_id = r.id
    WHERE r.kind = 'include' AND r.import_count = 1 AND i.value_set_id IS NOT NULL
),
-- Whether a value set reached does more than unite: then the walk is needed.
walked(needed) AS (
    SELECT EXISTS (
        SELECT 1 FROM target t
        JOIN {p}compose_rule r ON r.value_set_id = t.value_set_id
        WHERE r.kind = 'exclude' OR r.import_count > 1
           OR (r.import_count = 1 AND r.system IS NOT NULL))
        OR EXISTS (
        SELECT 1 FROM target t
        JOIN {p}value_set v ON v.id = t.value_set_id
        WHERE v.compose_inactive = FALSE)
),"""
    + _MEMBERS
    + _COLLAPSE
    + """
-- Each branch is skipped when the other one answers: PostgreSQL tests the scalar
-- subquery once before the branch, SQLite the joined row of walked.
JOIN walked ON walked.needed
WHERE value_set_id = :value_set_id AND (SELECT needed FROM walked)
GROUP BY value_set_id, system, code
UNION ALL
-- CROSS JOIN keeps SQLite to this order (the few targets first, then their rules);
-- PostgreSQL plans it as any inner join.
SELECT CAST(:value_set_id AS INTEGER), m.system, m.code, m.version, m.display,
       m.inactive, m.abstract, m.concept_id
FROM walked
CROSS JOIN target t
CROSS JOIN {p}compose_rule r
CROSS JOIN {p}compose_rule_code m {by_rule}
WHERE NOT walked.needed AND NOT (SELECT needed FROM walked)
  AND r.value_set_id = t.value_set_id AND m.rule_id = r.id
  AND r.kind = 'include' AND r.import_count = 0
"""
)

#: Ids of the value sets bound as ``:ids`` (:func:`bound_ids`) and of every value set
#: they import, directly or through others (includes and excludes). UNION stops at
#: value sets already reached, so a diamond is walked once and a cycle (refused before
#: expansion) ends.
CLOSURE = """
WITH RECURSIVE closure(value_set_id) AS (
    {seeds}
    UNION
    SELECT i.value_set_id
    FROM closure c
    JOIN {p}compose_rule r ON r.value_set_id = c.value_set_id
    JOIN {p}compose_import i ON i.rule_id = r.id
    WHERE i.value_set_id IS NOT NULL
)
SELECT value_set_id FROM closure
"""

#: Ids of the value sets bound as ``:ids`` and of every value set that imports one of
#: them, directly or through others: what a change of those value sets changes.
IMPORTERS = """
WITH RECURSIVE importers(value_set_id) AS (
    {seeds}
    UNION
    SELECT r.value_set_id
    FROM importers t
    JOIN {p}compose_import i ON i.value_set_id = t.value_set_id
    JOIN {p}compose_rule r ON r.id = i.rule_id
)
SELECT value_set_id FROM importers
"""
