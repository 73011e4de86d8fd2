"""Workload 6: is-a hierarchies of 10k, 100k and 350k concepts (``--quick``: 300, 1k).

Each size is one synthetic code system (:func:`benchmarks.synth.hierarchy`, about three
parent edges per concept) and one value set ``descendent-of A`` (half of the concepts,
at most 100,000), written as JSON and loaded by a child process into a new database.
The figures: the whole load, its refresh (where thodb computes the hierarchy walk: it
has no separate closure table), the load's peak RSS, and the expansion.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from benchmarks import synth
from benchmarks.harness import Context, Figure, Target, Timing, load_in_child, measure
from thodb.expand import expand

NAME = "hierarchy"


def run(ctx: Context, engine: str) -> None:
    """Measure load, refresh, peak RSS and descendent-of expansion at each size."""
    sizes = ctx.pick((300, 1_000), (10_000, 100_000, 350_000))
    if ctx.max_concepts is not None:
        sizes = tuple(sorted({min(size, ctx.max_concepts) for size in sizes}))
    for size in sizes:
        _point(ctx, engine, size, size == sizes[-1])


def _materialise(ctx: Context, size: int) -> tuple[Path, dict[str, Any]]:
    # Generating 350k concepts takes seconds: once per run, shared by the engines.
    folder = ctx.tmp / "synth" / f"hierarchy-{size}"
    meta_path = folder.with_suffix(".json")
    if not meta_path.exists():
        graph = synth.hierarchy(size, seed=size)
        synth.write_resources(folder, [graph.code_system, graph.value_set])
        meta = {
            "url": graph.value_set["url"],
            "edges": graph.edges,
            "expected_total": graph.expected_total,
        }
        meta_path.write_text(json.dumps(meta), encoding="utf-8")
    return folder, json.loads(meta_path.read_text(encoding="utf-8"))


def _point(ctx: Context, engine: str, size: int, largest: bool) -> None:
    folder, graph = _materialise(ctx, size)
    url = ctx.databases.create(engine, "hierarchy")
    try:
        loaded = load_in_child(url, [folder])
        if loaded.error:
            raise RuntimeError(loaded.error)
        db = ctx.databases.engine(url)
        runs = ctx.pick(2, 3)
        total = 0

        def expand_once(live: bool) -> None:
            nonlocal total
            with Session(db) as session:
                total = expand(session, graph["url"], live=live, cache=False).total

        materialised = measure(lambda: expand_once(False), warmup=1, runs=runs)
        live = measure(lambda: expand_once(True), warmup=1, runs=runs)
    finally:
        ctx.databases.drop(url)
    if total != graph["expected_total"]:
        ctx.results.error(
            NAME,
            engine,
            f"{size}: {total} codes, expected {graph['expected_total']}",
            fatal=True,
        )

    times = ctx.results.curve(
        "hierarchy-time",
        "is-a hierarchy: load and expansion time",
        "concepts",
        "seconds",
    )
    times.add(f"{engine} load (whole)", size, loaded.seconds)
    times.add(f"{engine} load: refresh", size, loaded.refresh_s)
    times.add(
        f"{engine} expand descendent-of (value_set_member)", size, materialised.median
    )
    times.add(f"{engine} expand descendent-of (live)", size, live.median)
    memory = ctx.results.curve(
        "hierarchy-rss", "is-a hierarchy: peak RSS of the load", "concepts", "MB"
    )
    memory.add(f"{engine} peak RSS", size, loaded.peak_rss_mb)

    what = f"{size:,} concepts, {graph['edges']:,} edges"
    extra = {
        "read_s": loaded.read_s,
        "write_s": loaded.write_s,
        "refresh_s": loaded.refresh_s,
        "peak_rss_mb": loaded.peak_rss_mb,
        "baseline_rss_mb": loaded.baseline_rss_mb,
        "codes": total,
    }
    add = ctx.results.add
    add(Figure(NAME, engine, f"{what}: load", Timing([loaded.seconds]), extra=extra))
    if not largest:
        return
    add(
        Figure(
            NAME,
            engine,
            f"{what}: refresh (hierarchy walk)",
            Timing([loaded.refresh_s]),
            target=Target("< 60 s", max_median=60.0),
        )
    )
    add(
        Figure(
            NAME,
            engine,
            f"{what}: load peak RSS",
            Timing([loaded.peak_rss_mb]),
            target=Target("< 1 GB", max_median=1024.0),
            unit="MB",
        )
    )
    for name, timing in (("value_set_member", materialised), ("live", live)):
        add(
            Figure(
                NAME,
                engine,
                f"{what}: expand descendent-of ({name}, {total:,} codes)",
                timing,
                target=Target("< 1 s", max_median=1.0),
            )
        )
