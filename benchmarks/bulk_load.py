"""Workload 1: load all of THO and the seeds, beside COPY of the same rows.

Each load runs in a child process on a new database (schema created first, untimed).
The floor takes every row the load wrote, read back from the loaded database before
the floor runs (so parsing is not part of it), in primary-key order, and writes them
into the same tables of another new database: PostgreSQL ``COPY ... FROM STDIN``,
SQLite ``executemany`` in one transaction. Indexes and foreign keys are the same in
both; on PostgreSQL the floor drops the foreign keys before its COPY and adds them
after it, as a first load into an empty database does (each checked in one join
instead of row by row).

The database of the last load is kept as the run's content database (see
:func:`benchmarks.content.ensure`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import sqlalchemy as sa

from benchmarks import content
from benchmarks.harness import (
    ChildLoad,
    Context,
    Figure,
    Target,
    Timing,
    load_in_child,
)
from thodb.db import session_scope
from thodb.load import ensure_schema
from thodb.models import Base
from thodb.sql import for_driver

NAME = "bulk-load"

#: Rows of each table, in foreign-key order, as the DB-API returns them.
Rows = list[tuple[str, list[str], list[tuple[Any, ...]]]]


def run(ctx: Context, engine: str) -> None:
    """Measure the content load on ``engine`` and its COPY floor."""
    runs = ctx.pick(1, 2)
    loads: list[ChildLoad] = []
    floor_samples: list[float] = []
    url = ""
    rows: Rows = []
    # Load, floor, load, floor...: each floor sample next to a load, in the same state
    # of the machine. The floor copies the rows the first load wrote.
    while len(loads) < runs:
        if url:
            ctx.databases.drop(url)
        url = ctx.databases.create(engine, "load")
        loaded = load_in_child(url, ctx.content_paths)
        if loaded.error and ctx.content_paths != content.seeds_only(ctx):
            # THO does not load yet: report it, then measure the seeds instead.
            ctx.results.error(NAME, engine, f"loading THO failed: {loaded.error}")
            ctx.content_paths = content.seeds_only(ctx)
            ctx.databases.drop(url)
            url = ""
            loads, floor_samples = [], []
            continue
        if loaded.error:
            ctx.databases.drop(url)
            raise RuntimeError(loaded.error)
        loads.append(loaded)
        if not rows:
            rows = dump_rows(ctx, url)
        floor_url = ctx.databases.create(engine, "copy")
        floor_samples.append(copy_rows(ctx, floor_url, rows))
        ctx.databases.drop(floor_url)
    old = ctx.content.pop(engine, None)
    if old is not None:
        ctx.databases.drop(old)
    ctx.content[engine] = url

    summary = loads[-1].summary
    refresh = summary.get("refresh") or {}
    ctx.results.add(
        Figure(
            NAME,
            engine,
            f"load {content.describe(ctx.content_paths)}",
            Timing([load.seconds for load in loads]),
            floor="COPY of the same rows" if engine == "postgresql" else "executemany",
            floor_timing=Timing(floor_samples),
            target=Target("≤ 2× floor", max_ratio=2.0),
            note="each run on a new database; no separate warm-up",
            extra={
                "read_s": statistics.median(load.read_s for load in loads),
                "write_s": statistics.median(load.write_s for load in loads),
                "refresh_s": statistics.median(load.refresh_s for load in loads),
                "peak_rss_mb": max(load.peak_rss_mb for load in loads),
                "worker_peak_rss_mb": max(load.worker_peak_rss_mb for load in loads),
                "baseline_rss_mb": loads[-1].baseline_rss_mb,
                "files": summary.get("files"),
                "code_systems": summary.get("code_systems_added"),
                "value_sets": summary.get("value_sets_added"),
                "concepts": summary.get("concepts"),
                "members": refresh.get("members"),
                "rows": {table: len(data) for table, _, data in rows},
            },
        )
    )


def dump_rows(ctx: Context, url: str) -> Rows:
    """Every row of every thodb table of the database ``url``."""
    engine = ctx.databases.engine(url)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        found: Rows = []
        postgresql = engine.dialect.name == "postgresql"
        for table in Base.metadata.sorted_tables:
            columns = [column.name for column in table.columns]
            # JSON as its text, as COPY and INSERT take it back.
            selected = [
                f"{c.name}::text"
                if postgresql and isinstance(c.type, sa.JSON)
                else c.name
                for c in table.columns
            ]
            # In primary-key order: the order the floor writes them in is then the
            # cheapest for the key's index, whatever order the load stored them in.
            key = ", ".join(column.name for column in table.primary_key.columns)
            cursor.execute(
                for_driver(
                    engine,
                    f"SELECT {', '.join(selected)} FROM {{p}}{table.name} "
                    f"ORDER BY {key}",
                )
            )
            found.append((table.name, columns, list(cursor.fetchall())))
        raw.rollback()
        return found
    finally:
        raw.close()


def copy_rows(ctx: Context, url: str, rows: Rows) -> float:
    """Write ``rows`` into the empty thodb schema of ``url``; return the seconds it took."""
    engine = ctx.databases.engine(url)
    with session_scope(engine, write=True) as session:
        ensure_schema(session.connection())
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        # Tables the migrations fill (reference data) are not part of a load.
        wanted = []
        for table, columns, data in rows:
            cursor.execute(for_driver(engine, f"SELECT COUNT(*) FROM {{p}}{table}"))
            found = cursor.fetchone()
            if found is not None and found[0] == 0:
                wanted.append((table, columns, data))
        raw.commit()
        start = time.perf_counter()
        if engine.dialect.name == "sqlite":
            cursor.execute("BEGIN IMMEDIATE")
            for table, columns, data in wanted:
                marks = ", ".join("?" for _ in columns)
                cursor.executemany(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", data
                )
            cursor.execute("COMMIT")
        else:
            # As pg_restore and a first load do: the foreign keys are added after the
            # rows, which checks them in one join instead of row by row.
            keys = _foreign_keys({table for table, _, _ in wanted})
            for constraint in keys:
                cursor.execute(_ddl(engine, sa.schema.DropConstraint(constraint)))
            for table, columns, data in wanted:
                statement = f"COPY tho.{table} ({', '.join(columns)}) FROM STDIN"
                with cursor.copy(statement) as copy:
                    for row in data:
                        copy.write_row(row)
            for constraint in keys:
                cursor.execute(_ddl(engine, sa.schema.AddConstraint(constraint)))
            raw.commit()
        return time.perf_counter() - start
    finally:
        raw.close()


def _foreign_keys(tables: set[str]) -> list[sa.ForeignKeyConstraint]:
    return [
        constraint
        for table in Base.metadata.sorted_tables
        if table.name in tables
        for constraint in table.foreign_key_constraints
    ]


def _ddl(engine: sa.Engine, statement: sa.schema.ExecutableDDLElement) -> str:
    return str(statement.compile(dialect=engine.dialect))
