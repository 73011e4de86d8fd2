"""Workload 4: imaging rows joined to the membership of CID 7151.

The harness adds two plain tables to the content database: ``bench_imaging`` (``id``,
``system``, ``code``, indexed on ``(system, code)``), holding synthetic segment property
type codes (80 % members of CID 7151 Segmentation Property Types, 20 % other DICOM
codes), and ``bench_codes``, a plain table with primary key ``(system, code)`` holding
exactly the codes (and displays) of CID 7151. Both tables are analysed (and, on
PostgreSQL, ``bench_imaging`` vacuumed, as autovacuum would have done).

The measured query counts the rows per display through the public view
``tho.value_set_expansion``; the floor is the same query against ``bench_codes``. The
two answers are compared.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from benchmarks import content, synth
from benchmarks.harness import Context, Figure, Target, kind_of, measure_side_by_side

NAME = "imaging-join"

_VIEW_QUERY = """
SELECT e.display, COUNT(*) FROM bench_imaging i
JOIN {p}value_set_expansion e ON e.system = i.system AND e.code = i.code
WHERE e.value_set_url = :url
GROUP BY e.display ORDER BY e.display
"""

_FLOOR_QUERY = """
SELECT c.display, COUNT(*) FROM bench_imaging i
JOIN bench_codes c ON c.system = i.system AND c.code = i.code
GROUP BY c.display ORDER BY c.display
"""


def run(ctx: Context, engine: str) -> None:
    """Build the imaging tables in the content database and time both joins."""
    db = ctx.databases.engine(content.ensure(ctx, engine))
    count = ctx.pick(10_000, 1_000_000)
    p = "" if kind_of(db) == "sqlite" else "tho."
    with db.begin() as connection:
        members = connection.execute(
            sa.text(
                f"SELECT system, code, display FROM {p}value_set_expansion "
                "WHERE value_set_url = :url ORDER BY system, code"
            ),
            {"url": content.CID_7151},
        ).all()
        others = connection.execute(
            sa.text(
                f"SELECT cs.url, c.code FROM {p}concept c "
                f"JOIN {p}code_system cs ON cs.id = c.code_system_id "
                f"WHERE NOT EXISTS (SELECT 1 FROM {p}value_set_expansion e "
                "WHERE e.value_set_url = :url AND e.system = cs.url AND e.code = c.code) "
                "ORDER BY cs.url, c.code LIMIT 2000"
            ),
            {"url": content.CID_7151},
        ).all()
        rows = synth.imaging_rows(
            count,
            [(r.system, r.code) for r in members],
            [(r.url, r.code) for r in others],
            seed=7151,
        )
        _create_tables(connection, db, rows, [tuple(r) for r in members])
    if kind_of(db) == "postgresql":
        # A table in use has been vacuumed by autovacuum: without it every index-only
        # scan also reads the heap (both queries use one), which is not steady state.
        with db.connect().execution_options(isolation_level="AUTOCOMMIT") as auto:
            auto.exec_driver_sql("VACUUM ANALYZE bench_imaging")

    runs = ctx.pick(3, 7)
    with db.connect() as connection:
        answers: dict[str, Any] = {}

        def query(name: str, statement: str) -> None:
            answers[name] = connection.execute(
                sa.text(statement.format(p=p)), {"url": content.CID_7151}
            ).all()

        floor, timing = measure_side_by_side(
            lambda: query("floor", _FLOOR_QUERY),
            lambda: query("view", _VIEW_QUERY),
            warmup=1,
            runs=runs,
        )
        plan = _plan(connection, _VIEW_QUERY.format(p=p), db)
    ctx.results.add(
        Figure(
            NAME,
            engine,
            f"{count:,} rows × CID 7151 ({len(members)} codes), count per display",
            timing,
            floor="same join to a plain indexed table of the codes",
            floor_timing=floor,
            target=Target("≤ 1.2× floor", max_ratio=1.2),
            extra={
                "rows": count,
                "codes": len(members),
                "same_answer": answers["view"] == answers["floor"],
                "plan": plan,
            },
        )
    )


def _create_tables(
    connection: Connection,
    db: Engine,
    rows: list[tuple[int, str, str]],
    codes: list[tuple[Any, ...]],
) -> None:
    connection.exec_driver_sql("DROP TABLE IF EXISTS bench_imaging")
    connection.exec_driver_sql("DROP TABLE IF EXISTS bench_codes")
    connection.exec_driver_sql(
        "CREATE TABLE bench_imaging (id INTEGER PRIMARY KEY, system TEXT NOT NULL, "
        "code TEXT NOT NULL)"
    )
    connection.exec_driver_sql(
        "CREATE TABLE bench_codes (system TEXT NOT NULL, code TEXT NOT NULL, "
        "display TEXT, PRIMARY KEY (system, code))"
    )
    raw: Any = connection.connection.driver_connection
    if kind_of(db) == "sqlite":
        raw.executemany("INSERT INTO bench_imaging VALUES (?, ?, ?)", rows)
        raw.executemany("INSERT INTO bench_codes VALUES (?, ?, ?)", codes)
    else:
        with raw.cursor() as cursor:
            with cursor.copy(
                "COPY bench_imaging (id, system, code) FROM STDIN"
            ) as copy:
                for row in rows:
                    copy.write_row(row)
            with cursor.copy(
                "COPY bench_codes (system, code, display) FROM STDIN"
            ) as copy:
                for row in codes:
                    copy.write_row(row)
    connection.exec_driver_sql(
        "CREATE INDEX ix_bench_imaging_system_code ON bench_imaging (system, code)"
    )
    connection.exec_driver_sql("ANALYZE")


def _plan(connection: Connection, statement: str, db: Engine) -> list[str]:
    explain = "EXPLAIN QUERY PLAN " if kind_of(db) == "sqlite" else "EXPLAIN "
    found = connection.execute(sa.text(explain + statement), {"url": content.CID_7151})
    return [" ".join(str(cell) for cell in row) for row in found]
