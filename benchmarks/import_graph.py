"""Workload 5: value-set import graphs, chains of depth 1 … 1000 and fan-out 10 … 10,000.

For each size the synthetic value sets (:func:`benchmarks.synth.import_chain`,
:func:`benchmarks.synth.import_fan_out`) are written as JSON files and loaded into a
new database by a child process; then the top value set is expanded from
``value_set_member``, live, and by the naive walk (workload 8). Every point goes on the
curves ``import-chain`` and ``import-fan-out``; the largest size also goes in the table.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import naive, synth
from benchmarks.harness import Context, Figure, Target, Timing, load_in_child

NAME = "import-graph"


def run(ctx: Context, engine: str) -> None:
    """Measure the chain and fan-out curves on ``engine``."""
    chains = ctx.pick((1, 10), (1, 10, 100, 1000))
    fans = ctx.pick((10, 50), (10, 100, 1000, 10_000))
    for depth in chains:
        _point(ctx, engine, "chain", depth, depth == chains[-1])
    for width in fans:
        _point(ctx, engine, "fan-out", width, width == fans[-1])


def _graph_folder(ctx: Context, kind: str, size: int) -> tuple[Path, synth.ImportGraph]:
    graph = (
        synth.import_chain(size)
        if kind == "chain"
        else synth.import_fan_out(size, seed=size)
    )
    folder = ctx.tmp / "synth" / f"{kind}-{size}"
    if not folder.exists():
        synth.write_resources(folder, graph.resources)
    return folder, graph


def _point(ctx: Context, engine: str, kind: str, size: int, largest: bool) -> None:
    folder, graph = _graph_folder(ctx, kind, size)
    url = ctx.databases.create(engine, kind.replace("-", ""))
    try:
        loaded = load_in_child(url, [folder])
        if loaded.error:
            raise RuntimeError(loaded.error)
        found = naive.time_expansions(
            ctx.databases.engine(url),
            graph.top_url,
            warmup=ctx.pick(1, 2),
            runs=ctx.pick(3, 5),
            naive_runs=ctx.pick(1, 3 if size < 1000 else 1),
            budget_s=ctx.pick(1.0, naive.BUDGET_S),
        )
    finally:
        ctx.databases.drop(url)
    if found.total != graph.expected_total:
        ctx.results.error(
            NAME,
            engine,
            f"{kind} {size}: expansion has {found.total} codes, "
            f"expected {graph.expected_total}",
            fatal=True,
        )

    label = "depth" if kind == "chain" else "imported value sets"
    curve = ctx.results.curve(
        f"import-{kind}",
        f"Import {kind}: load and expansion time",
        label,
        "seconds",
    )
    curve.add(f"{engine} load (whole)", size, loaded.seconds)
    curve.add(f"{engine} load: refresh", size, loaded.refresh_s)
    curve.add(f"{engine} expand (value_set_member)", size, found.materialised.median)
    curve.add(f"{engine} expand (live)", size, found.live.median)
    curve.add(f"{engine} naive walk", size, found.naive.median)
    if not largest:
        return

    what = f"{kind} {size:,}"
    extra = {
        "value_sets": len(graph.resources) - 1,
        "codes": found.total,
        "refresh_s": loaded.refresh_s,
        "peak_rss_mb": loaded.peak_rss_mb,
        "members": (loaded.summary.get("refresh") or {}).get("members"),
    }
    results = ctx.results
    results.add(
        Figure(NAME, engine, f"{what}: load", Timing([loaded.seconds]), extra=extra)
    )
    one_second = Target("< 1 s", max_median=1.0)
    for name, timing in (
        ("value_set_member", found.materialised),
        ("live", found.live),
    ):
        results.add(
            Figure(
                NAME,
                engine,
                f"{what}: expand ({name}, {found.total} codes)",
                timing,
                target=one_second,
            )
        )
    naive.add_figures(ctx, engine, what, found)
