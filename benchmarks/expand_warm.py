"""Workloads 2 and 3: warm ``$expand`` of image-reference-type and one ``$validate-code``.

Both run on the content database, in one long-lived session (a service keeps its
connection). Expand is measured three ways: a repeated call (answered by the
expansion cache), the same with the cache off, and live; validate-code two ways: a
repeated call (answered from the answers kept in the process) and with those off. On
PostgreSQL the repeated calls are measured again in one ``REPEATABLE READ``
transaction, which reads the refresh token once (SQLite's transactions always do).
Each sample is one call, after warm-up calls. The floors run on the same connection
through the DB-API cursor, with the value set's id already known: the rows of the
membership table, and the primary-key lookup of one membership row; each floor sample
is taken right before a sample of what it is the floor of.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

from sqlalchemy.orm import Session

from benchmarks import content
from benchmarks.harness import (
    Context,
    Figure,
    Target,
    Timing,
    measure_side_by_side,
)
from thodb.expand import Member, expand, find_value_set_row
from thodb.query import validate_code
from thodb.seed import IMAGE_REFERENCE_TYPE
from thodb.sql import EXPAND_LIVE, fetch_without_jit, for_driver, named_for_driver

NAME = "expand-validate"

#: Seconds each measurement may take at most (then it has fewer samples): full run,
#: ``--quick``.
BUDGET_S = (20.0, 1.0)
EXPAND = "expand"
VALIDATE = "validate-code"

#: DICOM's own code system (DCM).
DCM = "http://dicom.nema.org/resources/ontology/DCM"

_MEMBER_ROWS = (
    "SELECT system, code, display, version, inactive, abstract "
    "FROM {p}value_set_member WHERE value_set_id = ? ORDER BY system, code"
)
_MEMBER_ROW = (
    "SELECT display, inactive FROM {p}value_set_member "
    "WHERE value_set_id = ? AND system = ? AND code = ?"
)


def run(ctx: Context, engine: str) -> None:
    """Measure expand (materialised and live) and validate-code on ``engine``."""
    db = ctx.databases.engine(content.ensure(ctx, engine))
    with Session(db) as session:
        _measure(ctx, engine, session, "", every_mode=True)
        session.rollback()
    if db.dialect.name == "postgresql":
        # The long-lived session above is at READ COMMITTED, so every call reads the
        # refresh token; a transaction that reads one snapshot reads it once.
        snapshot = db.execution_options(isolation_level="REPEATABLE READ")
        with Session(snapshot) as session:
            _measure(
                ctx,
                engine,
                session,
                ", one REPEATABLE READ transaction",
                every_mode=False,
            )
            session.rollback()


def _measure(
    ctx: Context, engine: str, session: Session, suffix: str, *, every_mode: bool
) -> None:
    """Add the figures of ``session`` (their labels end in ``suffix``): all modes, or
    only the repeated calls answered from what the process kept."""
    db = session.get_bind()
    warmup = ctx.pick(2, 50)
    budget = ctx.pick(BUDGET_S[1], BUDGET_S[0])
    calls = ctx.pick(10, 300)
    value_set = find_value_set_row(session, IMAGE_REFERENCE_TYPE)
    vs_id = value_set.id
    total = expand(session, IMAGE_REFERENCE_TYPE).total
    cursor = session.connection().connection.cursor()

    def floor_rows() -> None:
        cursor.execute(for_driver(db, _MEMBER_ROWS), (vs_id,))
        cursor.fetchall()

    beside_floor = functools.partial(
        measure_side_by_side, floor_rows, warmup=warmup, runs=calls, budget_s=budget
    )

    # The expansion cache answers a repeated call; "cache off" is the work of one
    # expansion read from value_set_member, "live" computes it from the compose.
    modes = (
        ("from value_set_member (expansion cache)", False, True),
        ("from value_set_member, cache off", False, False),
        ("live recursive SQL", True, False),
    )
    for label, live, cache in modes if every_mode else modes[:1]:
        floor, timing = beside_floor(
            functools.partial(
                expand, session, IMAGE_REFERENCE_TYPE, live=live, cache=cache
            )
        )
        target = (
            Target("≤ 1.5× floor and p50 ≤ 5 ms", 1.5, 0.005)
            if live
            else Target("p50 ≤ 5 ms", max_median=0.005)
        )
        ctx.results.add(
            Figure(
                EXPAND,
                engine,
                f"image-reference-type ({total} codes), {label}{suffix}",
                timing,
                floor="SELECT of its value_set_member rows",
                floor_timing=floor,
                target=target,
                extra={"codes": total},
            )
        )

    if every_mode:
        _measure_live_statement(ctx, engine, session, vs_id, beside_floor, suffix)

    members = expand(session, IMAGE_REFERENCE_TYPE).contains
    calls = ctx.pick(20, 2000)
    # A code of a code system that is not loaded (SNOMED CT: the membership row is
    # the answer) and one of a loaded code system (DICOM: the concept is read).
    dicom = [m for m in members if m.system == DCM]
    picked = [("", members[len(members) // 2])]
    picked += [(", code system loaded", dicom[len(dicom) // 2])] if dicom else []
    # A repeated call is answered from the answers kept in the process; with the
    # cache off, the answer is computed (from the facts kept of the value set).
    kept = (("", True), (", answers kept off", False))
    for (label, member), (kept_label, cache) in itertools.product(
        picked, kept if every_mode else kept[:1]
    ):

        def floor_lookup(member: Member = member) -> None:
            cursor.execute(
                for_driver(db, _MEMBER_ROW), (vs_id, member.system, member.code)
            )
            cursor.fetchall()

        floor, timing = measure_side_by_side(
            floor_lookup,
            functools.partial(
                validate_code,
                session,
                IMAGE_REFERENCE_TYPE,
                system=member.system,
                code=member.code,
                cache=cache,
            ),
            warmup=warmup,
            runs=calls,
            budget_s=budget,
        )
        ctx.results.add(
            Figure(
                VALIDATE,
                engine,
                f"image-reference-type, {member.code}{label}{kept_label}{suffix}",
                timing,
                floor="primary-key lookup of one value_set_member row",
                floor_timing=floor,
                target=Target("≤ 2× floor", max_ratio=2.0),
            )
        )


def _measure_live_statement(
    ctx: Context,
    engine: str,
    session: Session,
    value_set_id: int,
    beside_floor: Callable[[Callable[[], object]], tuple[Timing, Timing]],
    suffix: str,
) -> None:
    """The share of a live expansion that is SQL: the recursive statement alone, run
    and fetched as :func:`thodb.expand.expand` runs it, beside the same floor. It
    returns a row per code and include that lists it (one code may come from several);
    the rest of a live expansion is one row per code and the members made of them, as
    for an expansion read from ``value_set_member``; ``beside_floor`` samples it in
    alternation with the floor of the expansions."""
    connection = session.connection()
    statement = named_for_driver(connection, EXPAND_LIVE)
    parameters = {"value_set_id": value_set_id}
    rows = len(fetch_without_jit(connection, statement, parameters)[1])
    floor, timing = beside_floor(
        functools.partial(fetch_without_jit, connection, statement, parameters)
    )
    ctx.results.add(
        Figure(
            EXPAND,
            engine,
            f"image-reference-type, live recursive statement alone ({rows} rows)"
            + suffix,
            timing,
            floor="SELECT of its value_set_member rows",
            floor_timing=floor,
            note="the SQL of the live expansion, without what Python makes of its rows",
            extra={"rows": rows},
        )
    )
