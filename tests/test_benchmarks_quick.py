"""The benchmark harness runs end to end in ``--quick`` mode.

Only that every workload produced its figures, its curves and its charts is checked:
timings are never asserted (they depend on the machine), they are printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from benchmarks import cpu

ROOT = Path(__file__).resolve().parents[1]

#: Every workload of the harness, by the name its figures carry.
WORKLOADS = {
    "bulk-load",
    "expand",
    "validate-code",
    "imaging-join",
    "naive",
    "reload",
    "import-graph",
    "hierarchy",
}
CURVES = {"import-chain", "import-fan-out", "hierarchy-time", "hierarchy-rss"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bench_url() -> str:
    return os.environ.get(
        "THODB_BENCH_DATABASE_URL",
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
    )


def _engines() -> list[str]:
    url = _bench_url()
    try:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with engine.connect():
            return ["postgresql", "sqlite"]
    except sa.exc.OperationalError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is not reachable at {url} (CI=true)")
        return ["sqlite"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], str]:
    """The output folder, engines and stdout of one ``python -m benchmarks --quick``."""
    output = tmp_path_factory.mktemp("bench")
    engines = _engines()
    command = [sys.executable, "-m", "benchmarks", "--quick", "--output", str(output)]
    for engine in engines:
        command += ["--engine", engine]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return output, engines, done.stdout


def test_quick_run_has_figures_of_every_workload_on_every_engine(
    quick_run: tuple[Path, list[str], str],
) -> None:
    output, engines, _ = quick_run
    results = json.loads((output / "results.json").read_text())
    assert results["quick"] is True
    seen = {(f["workload"], f["engine"]) for f in results["figures"]}
    assert {(w, e) for w in WORKLOADS for e in engines} <= seen
    for figure in results["figures"]:
        assert figure["runs"] >= 1
        assert figure["median_s"] >= 0
        if figure["floor"] is not None:
            assert figure["ratio"] is not None
    assert not [e for e in results["errors"] if e["fatal"]]


def test_quick_run_draws_one_png_per_growth_curve(
    quick_run: tuple[Path, list[str], str],
) -> None:
    output, engines, _ = quick_run
    results = json.loads((output / "results.json").read_text())
    curves = {c["name"]: c for c in results["curves"]}
    assert set(curves) == CURVES
    for name, curve in curves.items():
        assert {label.split()[0] for label in curve["series"]} == set(engines)
        assert (output / f"{name}.png").read_bytes()[:8] == PNG_MAGIC


def test_quick_run_prints_the_table_on_stdout(
    quick_run: tuple[Path, list[str], str],
) -> None:
    output, _, stdout = quick_run
    assert stdout.startswith("| workload | engine | measure |")
    assert (output / "results.md").read_text().startswith("| workload |")


def test_quick_run_records_the_server_settings_and_each_load_beside_its_floor(
    quick_run: tuple[Path, list[str], str],
) -> None:
    output, engines, _ = quick_run
    results = json.loads((output / "results.json").read_text())
    settings = results["machine"]["settings"]
    if "postgresql" in engines:
        bench_server = sa.create_engine(_bench_url(), poolclass=sa.pool.NullPool)
        with bench_server.connect() as connection:
            autovacuum = connection.exec_driver_sql("SHOW autovacuum").scalar()
            shared_buffers = connection.exec_driver_sql("SHOW shared_buffers").scalar()
        assert settings["postgresql"]["autovacuum"] == autovacuum
        assert settings["postgresql"]["shared_buffers"] == shared_buffers
    assert "sqlite" not in settings
    for figure in results["figures"]:
        if figure["workload"] == "bulk-load" and "CPU time" not in figure["measure"]:
            pairs = figure["extra"]["pair_ratios"]
            assert len(pairs) == figure["runs"] == figure["floor_timing"]["runs"]
            assert all(ratio > 0 for ratio in pairs)


def test_quick_run_gives_the_cpu_time_of_each_load_and_of_its_floor(
    quick_run: tuple[Path, list[str], str],
) -> None:
    output, engines, _ = quick_run
    results = json.loads((output / "results.json").read_text())
    # A server's CPU time can be read only on the machine it runs on.
    bench_server = sa.create_engine(_bench_url(), poolclass=sa.pool.NullPool)
    if not cpu.local_server(bench_server):
        engines = [e for e in engines if e != "postgresql"]
    for engine in engines:
        (figure,) = [
            f
            for f in results["figures"]
            if f["workload"] == "bulk-load"
            and f["engine"] == engine
            and "CPU time" in f["measure"]
        ]
        parts = {"process_s", "parse_workers_s"}
        # The server's share is that of its own processes, on PostgreSQL only.
        parts |= {"server_s"} if engine == "postgresql" else set()
        assert set(figure["extra"]) == parts
        assert figure["extra"]["process_s"] > 0
        assert figure["median_s"] >= max(figure["extra"].values())
        assert figure["floor_timing"]["median_s"] > 0


def test_the_cpu_time_of_a_server_process_is_read_from_that_process(
    fresh_engine: sa.Engine, engine_kind: str
) -> None:
    if engine_kind == "sqlite":
        # No server process: SQLite works inside this one.
        assert not cpu.local_server(fresh_engine)
        return
    if not cpu.local_server(fresh_engine):
        pytest.skip("the PostgreSQL server runs on another machine")
    with fresh_engine.connect() as connection:
        pid = cpu.backend_pid(connection.connection.driver_connection)
        assert pid is not None and pid != os.getpid()
        before = cpu.backend_s(pid)
        assert before is not None
        # Work done by the server process, not by this one.
        own = cpu.own_s()
        connection.execute(sa.text("SELECT sum(g) FROM generate_series(1, 3000000) g"))
        spent = cpu.backend_s(pid)
        assert spent is not None and spent - before > 0
        assert cpu.own_s() - own < spent - before
    # This process is not PostgreSQL's.
    assert cpu.backend_s(os.getpid()) is None
