"""A load recomputes only the value sets it affects, and ends where a full load ends.

One CID of the seeds is changed and loaded again with --replace. The value sets that
must be recomputed are read from the seed files (the changed CID and every value set
that imports it, directly or not); the resulting database must hold what a database
loaded from scratch with the changed file holds, value set by value set.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from conftest import Databases
from thodb import load as load_mod
from thodb.canonical import split_canonical
from thodb.db import schema_prefix, session_scope
from thodb.models import Concept, ValueSet, ValueSetMember
from thodb.seed import seeds_path

CHANGED = "ValueSet-dicom-cid-12104.json"


def _importers_in_files(folder: Path, url: str) -> set[str]:
    """``url`` and the urls of every value set that imports it, from the files."""
    imported_by: dict[str, set[str]] = defaultdict(set)
    for path in folder.rglob("*.json"):
        resource = json.loads(path.read_text(encoding="utf-8-sig"))
        if resource.get("resourceType") != "ValueSet":
            continue
        compose = resource.get("compose") or {}
        for rule in compose.get("include", []) + compose.get("exclude", []):
            for reference in rule.get("valueSet", []):
                imported_by[split_canonical(reference)[0]].add(resource["url"])
    fhir = "{http://hl7.org/fhir}"
    for path in folder.rglob("*.xml"):
        root = ElementTree.parse(path).getroot()
        if root.tag != f"{fhir}ValueSet":
            continue
        # THO's files give no url: it is the canonical base, the type and the id.
        given = root.find(f"{fhir}url")
        rid = root.find(f"{fhir}id")
        assert given is not None or rid is not None
        own = (
            given.get("value", "")
            if given is not None
            else f"http://terminology.hl7.org/ValueSet/{rid.get('value')}"  # type: ignore[union-attr]
        )
        for kind in ("include", "exclude"):
            for rule in root.iterfind(f"{fhir}compose/{fhir}{kind}"):
                for reference in rule.iterfind(f"{fhir}valueSet"):
                    imported_by[split_canonical(reference.get("value", ""))[0]].add(own)
    found, work = {url}, [url]
    while work:
        for importer in imported_by[work.pop()] - found:
            found.add(importer)
            work.append(importer)
    return found


def _state(engine: Engine) -> dict[tuple[str, str | None], Any]:
    """Every value set's status, error, count and members (with their concepts)."""
    with session_scope(engine) as session:
        concept_code = dict(session.execute(sa.select(Concept.id, Concept.code)).all())
        members: dict[int, set[tuple[Any, ...]]] = defaultdict(set)
        for row in session.execute(sa.select(ValueSetMember)).scalars():
            members[row.value_set_id].add(
                (
                    row.system,
                    row.code,
                    row.version,
                    row.display,
                    bool(row.inactive),
                    bool(row.abstract),
                    concept_code.get(row.concept_id),
                )
            )
        return {
            (vs.url, vs.version): (
                vs.expansion_status,
                vs.expansion_error,
                vs.member_count,
                vs.stratum,
                frozenset(members[vs.id]),
            )
            for vs in session.execute(sa.select(ValueSet)).scalars()
        }


def _seeds_copy(tmp_path: Path) -> tuple[Path, Path, dict[str, Any]]:
    """A copy of the seeds, the path of the CID to change in it, and that CID."""
    seeds = tmp_path / "seeds"
    shutil.copytree(seeds_path(), seeds)
    changed = seeds / "dicom" / CHANGED
    return seeds, changed, json.loads(changed.read_text(encoding="utf-8"))


def test_a_changed_value_set_recomputes_itself_and_its_importers_only(
    databases: Databases, engine_kind: str, tmp_path: Path
) -> None:
    seeds, changed, resource = _seeds_copy(tmp_path)
    dropped = resource["compose"]["include"][0]["concept"].pop()
    affected = _importers_in_files(seeds, resource["url"])
    assert len(affected) > 1  # the CID is imported

    incremental = databases.engine(engine_kind)
    load_mod.load(incremental, [seeds])
    before = _state(incremental)
    changed.write_text(json.dumps(resource), encoding="utf-8")
    summary = load_mod.load(incremental, [changed], replace=True)

    after = _state(incremental)
    assert summary.refresh is not None
    # Counted as value sets (url|version): a url may be loaded in two versions.
    assert summary.refresh.recomputed == len([k for k in after if k[0] in affected])
    assert summary.refresh.recomputed < len(after) / 10
    full = databases.engine(engine_kind)
    load_mod.load(full, [seeds])
    assert after == _state(full)
    assert _members_misnaming_their_value_set(incremental) == 0

    # What changed is what the files say: the dropped code left the CID and its
    # importers' membership was recomputed; the rest is as before.
    assert {key for key in after if after[key] != before[key]} <= {
        key for key in after if key[0] in affected
    }
    cid = next(key for key in after if key[0] == resource["url"])
    assert dropped["code"] in {m[1] for m in before[cid][4]}
    assert dropped["code"] not in {m[1] for m in after[cid][4]}
    # The members the summary reports are the rows there are.
    assert summary.refresh.members == sum(len(state[4]) for state in after.values())


def _members_misnaming_their_value_set(engine: Engine) -> int:
    """Membership rows whose repeated url or version is not their value set's."""
    with session_scope(engine) as session:
        return int(
            session.scalar(
                sa.select(sa.func.count())
                .select_from(ValueSetMember)
                .join(ValueSet, ValueSet.id == ValueSetMember.value_set_id)
                .where(
                    sa.or_(
                        ValueSetMember.value_set_url != ValueSet.url,
                        sa.func.coalesce(ValueSetMember.value_set_version, "")
                        != sa.func.coalesce(ValueSet.version, ""),
                    )
                )
            )
            or 0
        )


def _member_rows(engine: Engine) -> dict[tuple[str, str, str], tuple[str, str | None]]:
    """(value set url, system, code) -> (physical row, display) of every member.

    The physical row is PostgreSQL's ``xmin`` (the transaction that wrote the row
    version) or SQLite's ``rowid``: both change when a row is deleted and written
    again, and stay when it is left alone.
    """
    physical = "rowid" if engine.dialect.name == "sqlite" else "xmin::text"
    with session_scope(engine) as session:
        prefix = schema_prefix(engine)
        rows = session.execute(
            sa.text(
                f"SELECT value_set_url, system, code, {physical}, display "
                f"FROM {prefix}value_set_member"
            )
        ).all()
    return {
        (url, system, code): (str(row), display)
        for url, system, code, row, display in rows
    }


def test_recomputed_importers_keep_the_member_rows_that_did_not_change(
    databases: Databases, engine_kind: str, tmp_path: Path
) -> None:
    seeds, changed, resource = _seeds_copy(tmp_path)
    include = resource["compose"]["include"][0]
    concept = include["concept"][0]
    concept["display"] = "Renamed in this test"
    # The importers recomputed with the CID (the CID itself is a new row, with new ids).
    importers = _importers_in_files(seeds, resource["url"]) - {resource["url"]}
    assert importers

    engine = databases.engine(engine_kind)
    load_mod.load(engine, [seeds])
    before = _member_rows(engine)
    changed.write_text(json.dumps(resource), encoding="utf-8")
    load_mod.load(engine, [changed], replace=True)
    after = _member_rows(engine)

    assert before.keys() == after.keys()
    renamed = {
        key
        for key in after
        if key[1] == include["system"] and key[2] == concept["code"]
    }
    for key in after:
        if key[0] not in importers:
            continue
        if key in renamed:
            assert after[key][1] == "Renamed in this test"
            assert after[key][0] != before[key][0]
        else:
            assert after[key] == before[key], key
    assert {key[0] for key in renamed} >= importers

    full = databases.engine(engine_kind)
    load_mod.load(full, [seeds])
    assert _state(engine) == _state(full)


_CS = "http://example.org/CodeSystem/graph"
_VS = "http://example.org/ValueSet/graph-"


def _graph_value_set(name: str, codes: list[str], imports: list[str]) -> dict[str, Any]:
    include: list[dict[str, Any]] = []
    if codes:
        include.append({"system": _CS, "concept": [{"code": c} for c in codes]})
    include += [{"valueSet": [_VS + other]} for other in imports]
    return {
        "resourceType": "ValueSet",
        "url": _VS + name,
        "status": "active",
        "compose": {"include": include},
    }


def test_loads_that_change_the_import_graph_end_where_a_full_load_ends(
    databases: Databases, engine_kind: str, tmp_path: Path
) -> None:
    # Each step loads one file into the same database; its value sets' outcomes are
    # what the files say, and the whole state is that of a new database loaded with
    # all the files of that step at once. An incremental refresh checks only the
    # value sets a load reaches and what they import.
    folder = tmp_path / "content"
    folder.mkdir()
    code_system = {
        "resourceType": "CodeSystem",
        "url": _CS,
        "status": "active",
        "content": "complete",
        "concept": [{"code": c, "display": c.upper()} for c in "abc"],
    }
    (folder / "cs.json").write_text(json.dumps(code_system))

    def write(name: str, codes: list[str], imports: list[str]) -> Path:
        path = folder / f"vs-{name}.json"
        path.write_text(json.dumps(_graph_value_set(name, codes, imports)))
        return path

    write("a", ["a"], ["b"])
    write("b", ["b"], [])
    write("c", [], ["a"])
    write("d", [], ["e"])  # e is not loaded yet
    incremental = databases.engine(engine_kind)
    load_mod.load(incremental, [folder])

    def outcome(name: str) -> tuple[str, str | None, set[str]]:
        state = _state(incremental)[(_VS + name, None)]
        return state[0], state[1], {member[1] for member in state[4]}

    def same_as_a_full_load() -> None:
        full = databases.engine(engine_kind)
        load_mod.load(full, [folder])
        assert _state(incremental) == _state(full)

    assert outcome("c") == ("expanded", None, {"a", "b"})
    assert outcome("d")[0] == "not-expandable" and "not loaded" in str(outcome("d")[1])

    # The import of d is loaded: d can be expanded; e and d are all it recomputes.
    summary = load_mod.load(incremental, [write("e", ["c"], [])])
    assert summary.refresh is not None and summary.refresh.recomputed == 2
    assert outcome("d") == ("expanded", None, {"c"})
    same_as_a_full_load()

    # b now imports c: a -> b -> c -> a is a cycle; d and e are not part of it.
    load_mod.load(incremental, [write("b", ["b"], ["c"])], replace=True)
    for name in "abc":
        status, error, _ = outcome(name)
        assert status == "not-expandable" and "import cycle" in str(error)
    assert outcome("d") == ("expanded", None, {"c"})
    same_as_a_full_load()

    # b imports e instead: the cycle is gone.
    load_mod.load(incremental, [write("b", ["b"], ["e"])], replace=True)
    assert outcome("c") == ("expanded", None, {"a", "b", "c"})
    same_as_a_full_load()


def test_a_new_version_loaded_later_is_what_existing_includes_resolve_to(
    databases: Databases, engine_kind: str, tmp_path: Path
) -> None:
    # An include and an import that name no version resolve to the newest loaded
    # (R5 valueset.html#compose): a later load of a newer version changes what the
    # value sets already there contain, although the load does not touch them.
    folder = tmp_path / "content"
    folder.mkdir()

    def code_system(version: str, codes: str) -> dict[str, Any]:
        return {
            "resourceType": "CodeSystem",
            "url": _CS,
            "version": version,
            "status": "active",
            "content": "complete",
            "concept": [{"code": c} for c in codes],
        }

    whole = {"include": [{"system": _CS}]}
    imported = {
        "resourceType": "ValueSet",
        "url": _VS + "imported",
        "version": "1",
        "status": "active",
        "compose": {"include": [{"system": _CS, "concept": [{"code": "a"}]}]},
    }
    importer = _graph_value_set("importer", [], ["imported"])
    every = {"resourceType": "ValueSet", "url": _VS + "all", "status": "active"}
    for name, resource in (
        ("cs-1", code_system("1", "ab")),
        ("imported-1", imported),
        ("importer", importer),
        ("all", {**every, "compose": whole}),
    ):
        (folder / f"{name}.json").write_text(json.dumps(resource))
    engine = databases.engine(engine_kind)
    load_mod.load(engine, [folder])

    def codes(url: str) -> set[str]:
        state = _state(engine)
        key = next(k for k in state if k[0] == url)
        return {member[1] for member in state[key][4]}

    assert codes(_VS + "all") == {"a", "b"}
    assert codes(_VS + "importer") == {"a"}

    newer_cs = folder / "cs-2.json"
    newer_cs.write_text(json.dumps(code_system("2", "abc")))
    load_mod.load(engine, [newer_cs])
    assert codes(_VS + "all") == {"a", "b", "c"}

    newer_vs = folder / "imported-2.json"
    imported["version"] = "2"
    imported["compose"]["include"][0]["concept"] = [{"code": "b"}]
    newer_vs.write_text(json.dumps(imported))
    load_mod.load(engine, [newer_vs])
    assert codes(_VS + "importer") == {"b"}

    full = databases.engine(engine_kind)
    load_mod.load(full, [folder])
    assert _state(engine) == _state(full)


def test_a_filter_loaded_later_is_checked_against_the_properties_concepts_carry(
    databases: Databases, engine_kind: str, tmp_path: Path
) -> None:
    # A code system need not declare the properties its concepts carry (THO's often
    # do not). A value set loaded after it that filters on such a property expands to
    # the concepts the file gives that value; one that filters on a property no concept
    # carries cannot be expanded. Both end as a full load of the same files ends.
    folder = tmp_path / "content"
    folder.mkdir()
    colors = {"a": "red", "b": "blue", "c": "red"}
    code_system = {
        "resourceType": "CodeSystem",
        "url": _CS,
        "status": "active",
        "content": "complete",
        "concept": [
            {"code": code, "property": [{"code": "color", "valueCode": color}]}
            for code, color in colors.items()
        ],
    }
    (folder / "cs.json").write_text(json.dumps(code_system))
    (folder / "vs-listed.json").write_text(json.dumps(_graph_value_set("x", ["a"], [])))
    incremental = databases.engine(engine_kind)
    load_mod.load(incremental, [folder])

    def filtered(name: str, prop: str) -> Path:
        path = folder / f"vs-{name}.json"
        value_set = {
            "resourceType": "ValueSet",
            "url": _VS + name,
            "status": "active",
            "compose": {
                "include": [
                    {
                        "system": _CS,
                        "filter": [{"property": prop, "op": "=", "value": "red"}],
                    }
                ]
            },
        }
        path.write_text(json.dumps(value_set))
        return path

    summary = load_mod.load(
        incremental, [filtered("red", "color"), filtered("round", "shape")]
    )
    assert summary.refresh is not None and summary.refresh.recomputed == 2
    state = _state(incremental)
    status, error, _, _, members = state[(_VS + "red", None)]
    assert (status, error) == ("expanded", None)
    assert {member[1] for member in members} == {
        code for code, color in colors.items() if color == "red"
    }
    status, error, *_ = state[(_VS + "round", None)]
    assert status == "not-expandable" and "'shape'" in str(error)
    full = databases.engine(engine_kind)
    load_mod.load(full, [folder])
    assert _state(full) == state
