"""The real content the benchmarks load: THO and the seeds, or a small part for ``--quick``.

The seeds are copied to the run's temporary folder, so that the reload workload can
change one value set file without touching the checkout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks.harness import Context, load_in_child
from thodb.seed import seeds_path

#: THO's source of truth, beside the checkout (see ``../shared/README.md``).
THO_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "tho"

_DICOM_CID = (
    "http://dicom.nema.org/medical/dicom/current/output/chtml/part16/sect_CID_{}.html"
)

#: DICOM CID 7151, Segmentation Property Types (the imaging workload's value set).
CID_7151 = _DICOM_CID.format(7151)

#: The CIDs that image-reference-type includes (THO 7.3.0).
_IMAGE_REFERENCE_CIDS = (7013, 7201, 7151)


def prepare(ctx: Context) -> None:
    """Copy the content into ``ctx.tmp`` and set ``ctx.content_paths``.

    A full run loads THO and the seeds; ``--quick`` loads the THO seed, every code
    system of the seeds and only the DICOM CIDs that image-reference-type reaches.
    """
    source = seeds_path()
    if not ctx.quick:
        ctx.content_paths = [THO_PATH, *seeds_only(ctx)]
        return
    subset = ctx.tmp / "content" / "quick"
    (subset / "dicom").mkdir(parents=True)
    shutil.copytree(source / "tho", subset / "tho", copy_function=shutil.copyfile)
    files = [*(source / "dicom").glob("CodeSystem-*.json")]
    files += image_reference_closure(source / "dicom")
    for path in files:
        # copyfile, not copy: the checkout's files may be read-only.
        shutil.copyfile(path, subset / "dicom" / path.name)
    ctx.content_paths = [subset]


def seeds_only(ctx: Context) -> list[Path]:
    """The seeds, copied (writable) into the run's folder on first use.

    They are the content when THO cannot be loaded, and the folder the reload workload
    changes a file in.
    """
    seeds = ctx.tmp / "content" / "seeds"
    if not seeds.exists():
        shutil.copytree(seeds_path(), seeds, copy_function=shutil.copyfile)
    return [seeds]


def describe(paths: list[Path]) -> str:
    """A short name of the content ``paths`` hold, for the figures."""
    if THO_PATH in paths:
        return "THO 7.3.0 + seeds"
    if paths and paths[0].name == "quick":
        return "image-reference-type closure (quick)"
    return "seeds (DICOM 2026b + image-reference-type)"


def image_reference_closure(dicom: Path) -> list[Path]:
    """The files of the DICOM CIDs image-reference-type reaches, in folder ``dicom``.

    A CID's file is ``ValueSet-dicom-cid-<N>.json`` for the url ``…sect_CID_<N>.html``.
    """
    todo = [_DICOM_CID.format(n) for n in _IMAGE_REFERENCE_CIDS]
    found: dict[str, Path] = {}
    while todo:
        url = todo.pop()
        number = url.rsplit("_", 1)[-1].removesuffix(".html")
        path = dicom / f"ValueSet-dicom-cid-{number}.json"
        if url in found or not url.startswith(_DICOM_CID[:40]) or not path.exists():
            continue
        found[url] = path
        with open(path, encoding="utf-8") as source:
            compose = json.load(source).get("compose") or {}
        for kind in ("include", "exclude"):
            for rule in compose.get(kind, []):
                todo.extend(rule.get("valueSet", []))
    return sorted(found.values())


def ensure(ctx: Context, engine: str) -> str:
    """The URL of a database of ``engine`` holding the content, loaded on first use.

    The bulk-load workload normally leaves one behind; this loads one when that
    workload did not run. Falls back to the seeds when the content fails to load.

    :raises RuntimeError: when even the seeds fail to load.
    """
    if engine in ctx.content:
        return ctx.content[engine]
    url = ctx.databases.create(engine, "content")
    loaded = load_in_child(url, ctx.content_paths)
    if loaded.error and ctx.content_paths != seeds_only(ctx):
        ctx.results.error("content", engine, f"{loaded.error}; using the seeds only")
        ctx.content_paths = seeds_only(ctx)
        ctx.databases.drop(url)
        url = ctx.databases.create(engine, "content")
        loaded = load_in_child(url, ctx.content_paths)
    if loaded.error:
        raise RuntimeError(f"cannot load the content: {loaded.error}")
    ctx.content[engine] = url
    return url
