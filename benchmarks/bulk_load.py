"""Workload 1: load all of THO and the seeds, beside COPY of the same rows.

Each load runs in a child process on a new database (schema created first, untimed).
The floor takes every row the load wrote, read back from the loaded database before
the floor runs (so parsing is not part of it), in primary-key order, and writes them
into the same tables of another new database: PostgreSQL ``COPY ... FROM STDIN``,
SQLite ``executemany`` in one transaction. Indexes and foreign keys are the same in
both, and the floor writes its rows as a first load into an empty database does: the
indexes that enforce nothing are dropped before the rows and built from them after,
and on PostgreSQL the foreign keys too (each then checked in one join instead of row
by row) and the primary keys of the two tables the refresh fills.

The database of the last load is kept as the run's content database (see
:func:`benchmarks.content.ensure`).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from typing import Any

import sqlalchemy as sa

from benchmarks import content, cpu
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
from thodb.models import SCHEMA, Base
from thodb.refresh import DERIVED_MODELS, indexes_that_enforce_nothing
from thodb.sql import for_driver

log = logging.getLogger(__name__)

NAME = "bulk-load"

#: Loads (each followed by its floor) in a full run.
PAIRS = 5

#: Rows of each table, in foreign-key order, as the DB-API returns them.
Rows = list[tuple[str, list[str], list[tuple[Any, ...]]]]


def run(ctx: Context, engine: str) -> None:
    """Measure the content load on ``engine`` and its COPY floor."""
    # Five pairs: on a virtual machine one floor sample was seen to take 40 % longer
    # than the next, so the median of two pairs could still be a slow one.
    runs = ctx.pick(1, PAIRS)
    loads: list[ChildLoad] = []
    floor_samples: list[float] = []
    floor_cpu: list[float | None] = []
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
            loads, floor_samples, floor_cpu = [], [], []
            continue
        if loaded.error:
            ctx.databases.drop(url)
            raise RuntimeError(loaded.error)
        loads.append(loaded)
        if not rows:
            rows = dump_rows(ctx, url)
        floor_url = ctx.databases.create(engine, "copy")
        seconds, cpu_seconds = copy_rows(ctx, floor_url, rows)
        floor_samples.append(seconds)
        floor_cpu.append(cpu_seconds)
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
                # The ratio of each load to the floor sample taken right after it.
                "pair_ratios": [
                    load.seconds / floor
                    for load, floor in zip(loads, floor_samples, strict=True)
                ],
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
    _add_cpu_figure(ctx, engine, loads, floor_cpu)


def _add_cpu_figure(
    ctx: Context, engine: str, loads: list[ChildLoad], floor_cpu: list[float | None]
) -> None:
    """The CPU time of the loads and of their floors, when it could be read of every
    process (on PostgreSQL: a server on this machine)."""
    parts = ("process", "parse_workers") + (
        ("server",) if engine == "postgresql" else ()
    )
    spent = [[load.cpu_s.get(part) for part in parts] for load in loads]
    known_floor = [s for s in floor_cpu if s is not None]
    if any(None in load for load in spent) or len(known_floor) < len(floor_cpu):
        log.info("%s/%s: the server's CPU time cannot be read here", NAME, engine)
        return
    ctx.results.add(
        Figure(
            NAME,
            engine,
            f"load {content.describe(ctx.content_paths)}: CPU time of its processes",
            Timing([sum(s for s in load if s is not None) for load in spent]),
            floor="CPU time of the same floor",
            floor_timing=Timing(known_floor),
            note=f"{os.cpu_count()} cores; CPU seconds, not wall time",
            extra={
                f"{part}_s": statistics.median(
                    s for load in spent if (s := load[i]) is not None
                )
                for i, part in enumerate(parts)
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


def copy_rows(ctx: Context, url: str, rows: Rows) -> tuple[float, float | None]:
    """Write ``rows`` into the empty thodb schema of ``url``; return the seconds it took
    and the CPU seconds of this process and of the server process together (``None``
    when the server's cannot be read, see :mod:`benchmarks.cpu`)."""
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
        postgresql = engine.dialect.name == "postgresql"
        pid = (
            cpu.backend_pid(raw.driver_connection) if cpu.local_server(engine) else None
        )
        server_start = None if pid is None else cpu.backend_s(pid)
        own_start = cpu.own_s()
        start = time.perf_counter()
        # As pg_restore and a first load do: the indexes that enforce nothing are built
        # from the rows after them (a sort each instead of an insert per row), and on
        # PostgreSQL the foreign keys are added after them (one join each).
        tables = {table for table, _, _ in wanted}
        indexes = _non_unique_indexes(tables)
        keys = _foreign_keys(tables) if postgresql else []
        # PostgreSQL only: SQLite cannot drop a primary key.
        primary_keys = _primary_keys_built_after(tables) if postgresql else []
        if not postgresql:
            cursor.execute("BEGIN IMMEDIATE")
        for index in indexes:
            cursor.execute(_ddl(engine, sa.schema.DropIndex(index)))
        for constraint in [*keys, *primary_keys]:
            cursor.execute(_ddl(engine, sa.schema.DropConstraint(constraint)))
        for table, columns, data in wanted:
            if postgresql:
                statement = f"COPY tho.{table} ({', '.join(columns)}) FROM STDIN"
                with cursor.copy(statement) as copy:
                    for row in data:
                        copy.write_row(row)
            else:
                marks = ", ".join("?" for _ in columns)
                cursor.executemany(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", data
                )
        for constraint in [*primary_keys, *keys]:
            cursor.execute(_ddl(engine, sa.schema.AddConstraint(constraint)))
        for index in indexes:
            cursor.execute(_ddl(engine, sa.schema.CreateIndex(index)))
        if postgresql:
            raw.commit()
        else:
            cursor.execute("COMMIT")
        seconds = time.perf_counter() - start
        own = cpu.own_s() - own_start
        if not postgresql:
            return seconds, own
        server_end = None if pid is None else cpu.backend_s(pid)
        if server_start is None or server_end is None:
            return seconds, None
        return seconds, own + server_end - server_start
    finally:
        raw.close()


def _foreign_keys(tables: set[str]) -> list[sa.ForeignKeyConstraint]:
    return [
        constraint
        for table in Base.metadata.sorted_tables
        if table.name in tables
        for constraint in table.foreign_key_constraints
    ]


def _primary_keys_built_after(tables: set[str]) -> list[sa.Constraint]:
    """Those of the tables a first load's refresh fills, which it builds after them."""
    derived = {model.__tablename__ for model in DERIVED_MODELS}
    return [
        table.primary_key
        for table in Base.metadata.sorted_tables
        if table.name in tables and table.name in derived
    ]


def _non_unique_indexes(tables: set[str]) -> list[sa.Index]:
    return indexes_that_enforce_nothing(
        table for table in Base.metadata.sorted_tables if table.name in tables
    )


def _ddl(engine: sa.Engine, statement: sa.schema.ExecutableDDLElement) -> str:
    """``statement`` as the engine's DDL (on SQLite the ``tho`` schema is the main
    database)."""
    if engine.dialect.name == "sqlite":
        return str(
            statement.compile(
                dialect=engine.dialect,
                schema_translate_map={SCHEMA: "main"},
                render_schema_translate=True,
            )
        )
    return str(statement.compile(dialect=engine.dialect))
