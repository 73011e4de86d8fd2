"""Timing, databases, child-process loads and results, shared by every workload."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from thodb.db import create_engine

log = logging.getLogger(__name__)

#: The repository root (where ``python -m benchmarks`` runs from).
ROOT = Path(__file__).resolve().parents[1]

#: Environment variable naming a PostgreSQL URL whose database is used only to create and
#: drop the benchmark databases.
ADMIN_URL_ENV = "THODB_BENCH_DATABASE_URL"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

#: The engines a run can measure, in the order they run.
ENGINES = ("postgresql", "sqlite")


# --- timing ------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Wall-clock samples of one measurement, in seconds."""

    samples: list[float]

    @property
    def median(self) -> float:
        """The median sample (p50)."""
        return statistics.median(self.samples)

    @property
    def p95(self) -> float:
        """The 95th percentile (nearest rank: the largest sample below 20 samples)."""
        ordered = sorted(self.samples)
        return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]

    def to_json(self) -> dict[str, Any]:
        """The samples with their median and p95."""
        return {
            "runs": len(self.samples),
            "median_s": self.median,
            "p95_s": self.p95,
            "samples_s": self.samples,
        }


def measure(
    fn: Callable[[], object],
    *,
    warmup: int,
    runs: int,
    budget_s: float | None = None,
) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times timed, one sample each.

    :param budget_s: stop early once the timed calls have taken this long (with at
        least three samples), and the warm-up once it has taken a quarter of it (with
        at least one call); the number of samples is in the results.
    """
    _warm_up((fn,), warmup, budget_s)
    samples: list[float] = []
    started = time.perf_counter()
    while _more(samples, runs, budget_s):
        begin = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - begin)
    log.debug(
        "measured %d samples in %.1f s", len(samples), time.perf_counter() - started
    )
    return Timing(samples)


def measure_side_by_side(
    floor: Callable[[], object],
    fn: Callable[[], object],
    *,
    warmup: int,
    runs: int,
    budget_s: float | None = None,
) -> tuple[Timing, Timing]:
    """Measure ``floor`` and ``fn`` in alternation, one sample of each in turn, so that
    both see the machine in the same state (its speed drifts over seconds: measured one
    after the other, the ratio carried that drift).

    :param budget_s: as for :func:`measure`, counted on the samples of ``fn``.
    :return: the timings of ``floor`` and of ``fn``.
    """
    _warm_up((floor, fn), warmup, budget_s)
    floor_samples: list[float] = []
    samples: list[float] = []
    while _more(samples, runs, budget_s):
        begin = time.perf_counter()
        floor()
        middle = time.perf_counter()
        fn()
        floor_samples.append(middle - begin)
        samples.append(time.perf_counter() - middle)
    return Timing(floor_samples), Timing(samples)


def _warm_up(
    calls: tuple[Callable[[], object], ...], warmup: int, budget_s: float | None
) -> None:
    """Make each of ``calls`` ``warmup`` times in turn, or until a quarter of the budget
    is spent (after at least one round)."""
    start = time.perf_counter()
    for done in range(warmup):
        if budget_s is not None and done and time.perf_counter() - start > budget_s / 4:
            break
        for call in calls:
            call()


def _more(samples: list[float], runs: int, budget_s: float | None) -> bool:
    """Whether to take another sample: fewer than ``runs``, and the budget not spent
    (which needs at least three samples)."""
    if len(samples) >= runs:
        return False
    return budget_s is None or len(samples) < 3 or sum(samples) <= budget_s


# --- results -----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A performance target: a bound on the ratio to the floor and/or on the median."""

    text: str
    max_ratio: float | None = None
    max_median: float | None = None

    def met(self, median: float, ratio: float | None) -> bool:
        """True when every bound the target sets holds."""
        if self.max_ratio is not None and (ratio is None or ratio > self.max_ratio):
            return False
        return self.max_median is None or median <= self.max_median


@dataclass
class Figure:
    """One measured figure of a workload on one engine, with its floor when it has one."""

    workload: str
    engine: str
    measure: str
    timing: Timing
    floor: str | None = None
    floor_timing: Timing | None = None
    target: Target | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: ``s`` for times, ``MB`` for memory.
    unit: str = "s"

    @property
    def ratio(self) -> float | None:
        """Median over the floor's median (None without a floor)."""
        if self.floor_timing is None or self.floor_timing.median <= 0:
            return None
        return self.timing.median / self.floor_timing.median

    @property
    def met(self) -> bool | None:
        """Whether the target is met (None without a target)."""
        if self.target is None:
            return None
        return self.target.met(self.timing.median, self.ratio)

    def to_json(self) -> dict[str, Any]:
        """The figure as plain JSON values."""
        return {
            "workload": self.workload,
            "engine": self.engine,
            "measure": self.measure,
            "unit": self.unit,
            **self.timing.to_json(),
            "floor": self.floor,
            "floor_timing": self.floor_timing.to_json() if self.floor_timing else None,
            "ratio": self.ratio,
            "target": self.target.text if self.target else None,
            "met": self.met,
            "note": self.note,
            "extra": self.extra,
        }


@dataclass
class Curve:
    """A growth curve: one line per series label, points (size, value)."""

    name: str
    title: str
    x_label: str
    y_label: str
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def add(self, label: str, x: float, y: float) -> None:
        """Add the point ``(x, y)`` to the series ``label``."""
        self.series.setdefault(label, []).append((x, y))


@dataclass
class Results:
    """Everything one run measured."""

    quick: bool
    machine: dict[str, Any] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    curves: dict[str, Curve] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def add(self, figure: Figure) -> Figure:
        """Record ``figure`` and log it."""
        self.figures.append(figure)
        ratio = f", {figure.ratio:.2f}x floor" if figure.ratio is not None else ""
        log.info(
            "%s/%s %s: median %s%s",
            figure.workload,
            figure.engine,
            figure.measure,
            format_value(figure.timing.median, figure.unit),
            ratio,
        )
        return figure

    def curve(self, name: str, title: str, x_label: str, y_label: str) -> Curve:
        """The curve ``name``, created on first use."""
        if name not in self.curves:
            self.curves[name] = Curve(name, title, x_label, y_label)
        return self.curves[name]

    def error(
        self, workload: str, engine: str, message: str, *, fatal: bool = False
    ) -> None:
        """Record a problem of ``workload`` on ``engine``.

        :param fatal: the workload stopped (else it went on, e.g. with other content).
        """
        log.error("%s/%s: %s", workload, engine, message)
        self.errors.append(
            {"workload": workload, "engine": engine, "error": message, "fatal": fatal}
        )

    @property
    def failed(self) -> bool:
        """True when a workload stopped with an error."""
        return any(error["fatal"] for error in self.errors)

    def to_json(self) -> dict[str, Any]:
        """The whole run as plain JSON values."""
        return {
            "quick": self.quick,
            "machine": self.machine,
            "figures": [figure.to_json() for figure in self.figures],
            "curves": [
                {
                    "name": c.name,
                    "title": c.title,
                    "x_label": c.x_label,
                    "y_label": c.y_label,
                    "series": {k: [list(p) for p in v] for k, v in c.series.items()},
                }
                for c in self.curves.values()
            ],
            "errors": self.errors,
        }


def format_value(value: float, unit: str) -> str:
    """``value`` in ``unit`` (``s`` or ``MB``) as the table shows it."""
    if unit == "MB":
        return f"{value:,.0f} MB"
    return format_seconds(value)


def format_seconds(seconds: float) -> str:
    """``seconds`` with a unit that keeps three significant digits (µs, ms or s)."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def format_table(figures: Sequence[Figure]) -> str:
    """The figures as a Markdown table (median, p95, floor, ratio, target, met)."""
    head = ["workload", "engine", "measure", "runs", "median", "p95", "floor median"]
    head += ["ratio", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in figures:
        cells = [
            f.workload,
            f.engine,
            f.measure,
            str(len(f.timing.samples)),
            format_value(f.timing.median, f.unit),
            format_value(f.timing.p95, f.unit),
            format_value(f.floor_timing.median, f.unit) if f.floor_timing else "—",
            f"{f.ratio:.2f}×" if f.ratio is not None else "—",
            f.target.text if f.target else "—",
            {None: "—", True: "yes", False: "**no**"}[f.met],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_curves(curves: Sequence[Curve]) -> str:
    """Each curve as a Markdown table: one row per size, one column per series."""
    blocks = []
    for curve in curves:
        labels = sorted(curve.series)
        sizes = sorted({x for points in curve.series.values() for x, _ in points})
        unit = "MB" if curve.y_label == "MB" else "s"
        lines = [
            f"{curve.title}",
            "",
            f"| {curve.x_label} | " + " | ".join(labels) + " |",
            "|" + "---|" * (len(labels) + 1),
        ]
        for size in sizes:
            cells = []
            for label in labels:
                values = [y for x, y in curve.series[label] if x == size]
                cells.append(format_value(values[0], unit) if values else "—")
            lines.append(f"| {size:,.0f} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# --- databases ---------------------------------------------------------------------


class Databases:
    """Creates the benchmark databases (PostgreSQL or SQLite files) and drops them."""

    def __init__(self, tmp: Path, admin_url: str | None = None) -> None:
        self.tmp = tmp
        self.admin_url = sa.make_url(
            admin_url or os.environ.get(ADMIN_URL_ENV) or DEFAULT_ADMIN_URL
        ).set(drivername="postgresql+psycopg")
        self.run = uuid.uuid4().hex[:8]
        self._count = 0
        self._created: dict[str, str] = {}
        self._engines: dict[str, Engine] = {}

    def _admin(self) -> Engine:
        return sa.create_engine(
            self.admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
        )

    def postgresql_available(self) -> bool:
        """True when the PostgreSQL server answers."""
        try:
            with self._admin().connect():
                return True
        except sa.exc.OperationalError:
            return False

    def server_version(self, kind: str) -> str:
        """The version of the engine ``kind`` this run uses."""
        if kind == "sqlite":
            import sqlite3

            return sqlite3.sqlite_version
        with self._admin().connect() as connection:
            return str(connection.exec_driver_sql("SHOW server_version").scalar())

    def server_settings(self, kind: str) -> dict[str, str]:
        """The settings of the PostgreSQL server this run uses that bear on its
        figures (:data:`SERVER_SETTINGS`), as ``SHOW`` gives them (``128MB``); none for
        SQLite."""
        if kind == "sqlite":
            return {}
        with self._admin().connect() as connection:
            rows = connection.exec_driver_sql(
                "SELECT name, current_setting(name) FROM pg_settings "
                "WHERE name = ANY(%(names)s) ORDER BY name",
                {"names": list(SERVER_SETTINGS)},
            )
            return {name: value for name, value in rows}

    def create(self, kind: str, label: str) -> str:
        """The URL of a new, empty database of ``kind`` (``label`` names it)."""
        self._count += 1
        name = f"thodb_bench_{self.run}_{self._count}_{label}"
        if kind == "sqlite":
            url = f"sqlite:///{self.tmp / (name + '.sqlite')}"
        else:
            with self._admin().connect() as connection:
                connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
            url = self.admin_url.set(database=name).render_as_string(
                hide_password=False
            )
        self._created[url] = name
        return url

    def engine(self, url: str) -> Engine:
        """The (cached) engine of a database made by :meth:`create`."""
        if url not in self._engines:
            self._engines[url] = create_engine(url)
        return self._engines[url]

    def drop(self, url: str) -> None:
        """Drop a database made by :meth:`create`."""
        engine = self._engines.pop(url, None)
        if engine is not None:
            engine.dispose()
        name = self._created.pop(url)
        if url.startswith("sqlite"):
            for suffix in ("", "-wal", "-shm"):
                Path(self.tmp / (name + ".sqlite" + suffix)).unlink(missing_ok=True)
            return
        with self._admin().connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def drop_all(self) -> None:
        """Drop every database still there."""
        for url in list(self._created):
            self.drop(url)


def kind_of(engine: Engine) -> str:
    """``sqlite`` or ``postgresql``."""
    return "sqlite" if engine.dialect.name == "sqlite" else "postgresql"


# --- loads in a child process --------------------------------------------------------


@dataclass(frozen=True)
class ChildLoad:
    """What one :func:`thodb.load.load` call in a child process measured."""

    seconds: float
    read_s: float
    write_s: float
    refresh_s: float
    peak_rss_mb: float
    baseline_rss_mb: float
    summary: dict[str, Any]
    error: str | None = None
    worker_peak_rss_mb: float = 0.0
    #: CPU seconds by process: ``process``, ``parse_workers`` and ``server`` (``None``
    #: when the server's cannot be read, see :mod:`benchmarks.cpu`).
    cpu_s: dict[str, float | None] = field(default_factory=dict)


class _LoadServer:
    """The :mod:`benchmarks.child` fork server, started on first use."""

    process: subprocess.Popen[str] | None = None

    @classmethod
    def start(cls) -> subprocess.Popen[str]:
        if cls.process is None or cls.process.poll() is not None:
            cls.process = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.child"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
        return cls.process

    @classmethod
    def ask(cls, job: dict[str, Any]) -> dict[str, Any]:
        process = cls.start()
        if process.stdin is None or process.stdout is None:
            raise RuntimeError("the load server has no pipes")
        process.stdin.write(json.dumps(job) + "\n")
        process.stdin.flush()
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("the load server ended (its error is on stderr)")
        answer: dict[str, Any] = json.loads(line)
        return answer

    @classmethod
    def close(cls) -> None:
        process, cls.process = cls.process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            # A load still runs (the run was stopped): its database is dropped next.
            process.kill()
            process.wait()


def load_in_child(
    url: str, paths: Sequence[Path], *, replace: bool = False
) -> ChildLoad:
    """Run :func:`thodb.load.load` in a process of its own (see :mod:`benchmarks.child`).

    A process of its own gives the load's own peak RSS. A load that fails, with a
    :class:`thodb.errors.ThodbError` or a crash, comes back with ``error`` set.
    """
    job = {"url": url, "paths": [str(p) for p in paths], "replace": replace}
    answer = _LoadServer.ask(job)
    if "crash" in answer:
        return ChildLoad(
            0, 0, 0, 0, 0, 0, {}, f"{answer['crash']} (its traceback is on stderr)"
        )
    return ChildLoad(**answer)


def start_load_server() -> None:
    """Start the fork server of :func:`load_in_child` now, so it imports thodb early."""
    _LoadServer.start()


def stop_load_server() -> None:
    """Stop the fork server of :func:`load_in_child`, if it runs."""
    _LoadServer.close()


# --- the run -------------------------------------------------------------------------


@dataclass
class Context:
    """What every workload gets: sizes, folders, databases and the results."""

    quick: bool
    tmp: Path
    output: Path
    databases: Databases
    results: Results
    #: The paths of the content a database is filled with (THO and the seeds, copied).
    content_paths: list[Path] = field(default_factory=list)
    #: Per engine, the URL of a database holding the content (see bulk_load).
    content: dict[str, str] = field(default_factory=dict)
    #: The largest is-a hierarchy to build (``--max-concepts``), None for no cap.
    max_concepts: int | None = None

    def pick(self, quick: Any, full: Any) -> Any:
        """``quick`` in a ``--quick`` run, else ``full``."""
        return quick if self.quick else full


#: The PostgreSQL settings the results record: those that change what a load, a
#: query or a background process costs (a server's configuration may differ from
#: PostgreSQL's defaults: autovacuum turned off, say).
SERVER_SETTINGS = (
    "autovacuum",
    "effective_cache_size",
    "fsync",
    "jit",
    "lc_collate",
    "maintenance_work_mem",
    "max_parallel_maintenance_workers",
    "max_parallel_workers_per_gather",
    "max_wal_size",
    "random_page_cost",
    "shared_buffers",
    "synchronous_commit",
    "wal_level",
    "work_mem",
)


def machine_info(databases: Databases, engines: Sequence[str]) -> dict[str, Any]:
    """The machine and software versions, for the results and the doc."""
    import psycopg

    memory_kb = 0
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory_kb = int(line.split()[1])
    return {
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "memory_gb": round(memory_kb / 1024 / 1024, 1),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "sqlalchemy": sa.__version__,
        "psycopg": psycopg.__version__,
        "platform": platform.platform(),
        "engines": {kind: databases.server_version(kind) for kind in engines},
        "settings": {
            kind: settings
            for kind in engines
            if (settings := databases.server_settings(kind))
        },
    }
