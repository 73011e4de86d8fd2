"""Runs the workloads on each engine, then writes the results, the charts and the table."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks import (
    bulk_load,
    charts,
    content,
    expand_warm,
    hierarchy,
    imaging_join,
    import_graph,
    naive,
    reload,
)
from benchmarks.harness import (
    ROOT,
    Context,
    Databases,
    Results,
    format_curves,
    format_table,
    machine_info,
    start_load_server,
    stop_load_server,
)

log = logging.getLogger(__name__)

Workload = Callable[[Context, str], None]

#: Every workload by name, in the order a run measures them. bulk-load comes first (it
#: leaves the content databases the next four use); reload changes that content, so it
#: comes after them.
WORKLOADS: dict[str, Workload] = {
    bulk_load.NAME: bulk_load.run,
    expand_warm.NAME: expand_warm.run,
    imaging_join.NAME: imaging_join.run,
    naive.NAME: naive.run,
    reload.NAME: reload.run,
    import_graph.NAME: import_graph.run,
    hierarchy.NAME: hierarchy.run,
}


def run(
    *,
    quick: bool,
    engines: Sequence[str],
    output: Path,
    only: Sequence[str] = (),
    max_concepts: int | None = None,
) -> Results:
    """Run the workloads named in ``only`` (all when empty) on ``engines``.

    Writes ``results.json``, ``results.md`` (the tables) and one PNG per curve to
    ``output``. Every database the run creates is dropped at the end.

    :param max_concepts: cap of the is-a hierarchy sizes (None: no cap).
    """
    output.mkdir(parents=True, exist_ok=True)
    results = Results(quick=quick)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="thodb-bench-") as tmp:
        databases = Databases(Path(tmp))
        ctx = Context(quick, Path(tmp), output, databases, results)
        ctx.max_concepts = max_concepts
        try:
            # The load server imports thodb while this process gathers the rest.
            start_load_server()
            results.machine = machine_info(databases, engines)
            results.machine["thodb_commit"] = _commit()
            content.prepare(ctx)
            for name, workload in WORKLOADS.items():
                if only and name not in only:
                    continue
                for engine in engines:
                    _run_one(ctx, name, workload, engine)
        finally:
            try:
                stop_load_server()
            finally:
                databases.drop_all()
    results.machine["seconds"] = time.perf_counter() - started
    results.machine["load_average_at_end"] = list(os.getloadavg())
    _write(results, output)
    return results


def _run_one(ctx: Context, name: str, workload: Workload, engine: str) -> None:
    log.info("%s on %s", name, engine)
    start = time.perf_counter()
    try:
        workload(ctx, engine)
    except Exception as exc:
        # A benchmark run reports a workload that fails and measures the others; the
        # error is in the results and makes the run's exit status non-zero.
        log.exception("%s on %s failed", name, engine)
        ctx.results.error(name, engine, f"{type(exc).__name__}: {exc}", fatal=True)
    log.info("%s on %s: %.1f s", name, engine, time.perf_counter() - start)


def _commit() -> str:
    # Read-only: which thodb the figures are of, and whether the tree had local changes.
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} (with local changes)" if dirty else head


def _write(results: Results, output: Path) -> None:
    with open(output / "results.json", "w", encoding="utf-8") as out:
        json.dump(results.to_json(), out, indent=1)
    for curve in results.curves.values():
        charts.draw(curve, output)
    tables = format_table(results.figures)
    if results.curves:
        tables += "\n\n" + format_curves(list(results.curves.values()))
    (output / "results.md").write_text(tables + "\n", encoding="utf-8")
