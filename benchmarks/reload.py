"""Workload 7: reloading the content after one value set changed.

The changed value set is the first DICOM CID (by file name) that image-reference-type
reaches and that lists codes: each run drops its last listed code, or puts it back, so
that every run is a real change. Two ways to pick it up are timed on the content
database, each in a child process: loading only the changed file with ``replace``,
and loading all of the content again with ``replace`` (the other files are unchanged
and skipped by their hash). The comparison is a full load into a new database (the
bulk-load workload's median, or one load when that workload did not run).

thodb's target is that only the memberships of the affected value sets are recomputed:
the refresh after one changed value set should cost a small part of a full refresh
(here: at most a tenth; a handful of value sets out of thousands are affected).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import bulk_load, content
from benchmarks.harness import ChildLoad, Context, Figure, Target, Timing, load_in_child

NAME = "reload"


def changed_file(ctx: Context) -> Path:
    """The value set file the workload changes (see the module docstring).

    :raises RuntimeError: when the content has no such file.
    """
    for folder in ctx.content_paths:
        for dicom in sorted(folder.rglob("dicom")):
            for path in content.image_reference_closure(dicom):
                with open(path, encoding="utf-8") as source:
                    resource = json.load(source)
                includes = resource.get("compose", {}).get("include", [])
                if includes and len(includes[0].get("concept", [])) >= 2:
                    return path
    raise RuntimeError("no DICOM CID with listed codes in the content")


def run(ctx: Context, engine: str) -> None:
    """Time the two reloads against a full load on ``engine``."""
    url = content.ensure(ctx, engine)
    path = changed_file(ctx)
    original = path.read_text(encoding="utf-8")
    resource = json.loads(original)
    resource["compose"]["include"][0]["concept"].pop()
    variants = [json.dumps(resource), original]
    runs = 1
    turn = 0

    def reload(paths: list[Path]) -> ChildLoad:
        nonlocal turn
        path.write_text(variants[turn % 2], encoding="utf-8")
        turn += 1
        loaded = load_in_child(url, paths, replace=True)
        if loaded.error:
            raise RuntimeError(loaded.error)
        return loaded

    try:
        one = [reload([path]) for _ in range(runs)]
        everything = [reload(ctx.content_paths) for _ in range(runs)]
    finally:
        path.write_text(original, encoding="utf-8")
    full_total, full_refresh = _full_load(ctx, engine)

    for what, loads in (
        (f"load only {path.name} (replace)", one),
        ("load all content again (replace; one file changed)", everything),
    ):
        ctx.results.add(
            Figure(
                NAME,
                engine,
                what,
                Timing([load.seconds for load in loads]),
                floor="full load into a new database",
                floor_timing=full_total,
                note="ratio to a full load",
                extra=_phases(loads),
            )
        )
    ctx.results.add(
        Figure(
            NAME,
            engine,
            f"refresh after {path.name} changed",
            Timing([load.refresh_s for load in one]),
            floor="refresh of a full load",
            floor_timing=full_refresh,
            target=Target("≤ 0.1× full refresh (affected value sets only)", 0.1),
            extra={"members": (one[-1].summary.get("refresh") or {}).get("members")},
        )
    )


def _phases(loads: list[ChildLoad]) -> dict[str, Any]:
    last = loads[-1]
    return {
        "read_s": last.read_s,
        "write_s": last.write_s,
        "refresh_s": last.refresh_s,
        "peak_rss_mb": last.peak_rss_mb,
        "value_sets_replaced": last.summary.get("value_sets_replaced"),
        "value_sets_unchanged": last.summary.get("value_sets_unchanged"),
    }


def _full_load(ctx: Context, engine: str) -> tuple[Timing, Timing]:
    for figure in ctx.results.figures:
        if figure.workload == bulk_load.NAME and figure.engine == engine:
            return figure.timing, Timing([figure.extra["refresh_s"]])
    url = ctx.databases.create(engine, "full")
    try:
        loaded = load_in_child(url, ctx.content_paths)
    finally:
        ctx.databases.drop(url)
    if loaded.error:
        raise RuntimeError(loaded.error)
    return Timing([loaded.seconds]), Timing([loaded.refresh_s])
