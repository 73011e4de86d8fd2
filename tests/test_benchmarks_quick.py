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


def _engines() -> list[str]:
    url = os.environ.get(
        "THODB_BENCH_DATABASE_URL",
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
    )
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
