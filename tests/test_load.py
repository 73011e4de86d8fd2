"""Loading: formats, one transaction, bad input, duplicates, and small compose cases.

Every case runs on SQLite and PostgreSQL. Expected expansions of the small cases come
from tests/reference.py applied to the same resources.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from conftest import table_checksums
from reference import ReferenceExpansionError, Terminology
from thodb.db import schema_prefix, session_scope
from thodb.errors import LoadError, NotExpandableError
from thodb.expand import expand
from thodb.load import load

CS = "http://example.org/CodeSystem/shapes"
VS = "http://example.org/ValueSet/"


def _code_system() -> dict[str, Any]:
    # shape > polygon > {triangle, square}; shape > round > circle; square also is-a
    # "regular" through a parent property (two parents).
    return {
        "resourceType": "CodeSystem",
        "url": CS,
        "version": "1",
        "status": "active",
        "content": "complete",
        "hierarchyMeaning": "is-a",
        "property": [
            {
                "code": "parent",
                "uri": "http://hl7.org/fhir/concept-properties#parent",
                "type": "code",
            },
            {"code": "sides", "type": "integer"},
        ],
        "concept": [
            {
                "code": "shape",
                "display": "Shape",
                "concept": [
                    {
                        "code": "polygon",
                        "display": "Polygon",
                        "concept": [
                            {
                                "code": "triangle",
                                "display": "Triangle",
                                "property": [{"code": "sides", "valueInteger": 3}],
                            },
                            {
                                "code": "square",
                                "display": "Square",
                                "property": [
                                    {"code": "sides", "valueInteger": 4},
                                    {"code": "parent", "valueCode": "regular"},
                                ],
                            },
                        ],
                    },
                    {
                        "code": "round",
                        "display": "Round",
                        "concept": [
                            {"code": "circle", "display": "Circle"},
                        ],
                    },
                ],
            },
            {"code": "regular", "display": "Regular shape"},
        ],
    }


def _value_set(
    name: str, *include: dict[str, Any], exclude: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    compose: dict[str, Any] = {"include": list(include)}
    if exclude:
        compose["exclude"] = exclude
    return {
        "resourceType": "ValueSet",
        "url": VS + name,
        "status": "active",
        "compose": compose,
    }


def _write(folder: Path, *resources: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, resource in enumerate(resources):
        (folder / f"r{i}.json").write_text(json.dumps(resource))
    return folder


def _codes(engine: Engine, url: str) -> set[tuple[str, str]]:
    with session_scope(engine) as session:
        return {(m.system, m.code) for m in expand(session, url).contains}


def _reference(*resources: dict[str, Any]) -> Terminology:
    terminology = Terminology()
    for resource in resources:
        terminology.add(resource)
    return terminology


SMALL_CASES = {
    "is-a": [
        {
            "system": CS,
            "filter": [{"property": "concept", "op": "is-a", "value": "polygon"}],
        }
    ],
    "descendent-of": [
        {
            "system": CS,
            "filter": [
                {"property": "concept", "op": "descendent-of", "value": "polygon"}
            ],
        }
    ],
    "is-a-multi-parent": [
        {
            "system": CS,
            "filter": [{"property": "concept", "op": "is-a", "value": "regular"}],
        }
    ],
    "property-equals": [
        {"system": CS, "filter": [{"property": "sides", "op": "=", "value": "4"}]}
    ],
    "whole-system": [{"system": CS}],
    "enumerated-unloaded-system": [
        {
            "system": "http://snomed.info/sct",
            "concept": [{"code": "85856004", "display": "Acromioclavicular joint"}],
        }
    ],
}


@pytest.mark.parametrize("case", sorted(SMALL_CASES))
def test_small_compose_cases_match_the_reference(
    fresh_engine: Engine, tmp_path: Path, case: str
) -> None:
    resources = [_code_system(), _value_set(case, *SMALL_CASES[case])]
    load(fresh_engine, [_write(tmp_path, *resources)])
    expected = set(_reference(*resources).expand(VS + case))
    assert expected  # the case selects something
    assert _codes(fresh_engine, VS + case) == expected


def test_imports_union_intersection_and_exclude(
    fresh_engine: Engine, tmp_path: Path
) -> None:
    polygons = _value_set("polygons", SMALL_CASES["is-a"][0])
    regular = _value_set("regular", SMALL_CASES["is-a-multi-parent"][0])
    resources = [
        _code_system(),
        polygons,
        regular,
        # intersection of two value sets in one include
        _value_set("both", {"valueSet": [VS + "polygons", VS + "regular"]}),
        # system part intersected with an import
        _value_set(
            "sys-and-import",
            {
                "system": CS,
                "concept": [{"code": "square"}, {"code": "circle"}],
                "valueSet": [VS + "polygons"],
            },
        ),
        # union of imports minus an exclude naming a value set
        _value_set(
            "minus",
            {"valueSet": [VS + "polygons"]},
            {"system": CS, "concept": [{"code": "circle"}]},
            exclude=[{"valueSet": [VS + "regular"]}],
        ),
        # an exclude of enumerated codes inside an imported set
        _value_set(
            "excl-codes",
            {"system": CS},
            exclude=[{"system": CS, "concept": [{"code": "shape"}]}],
        ),
        _value_set("of-excl", {"valueSet": [VS + "excl-codes"]}),
    ]
    load(fresh_engine, [_write(tmp_path, *resources)])
    ref = _reference(*resources)
    for name in ("both", "sys-and-import", "minus", "excl-codes", "of-excl"):
        assert _codes(fresh_engine, VS + name) == set(ref.expand(VS + name)), name
        with session_scope(fresh_engine) as session:
            live = {
                (m.system, m.code)
                for m in expand(session, VS + name, live=True).contains
            }
        assert live == set(ref.expand(VS + name)), name


def test_import_cycle_names_the_cycle_and_leaves_other_sets_expanded(
    fresh_engine: Engine, tmp_path: Path
) -> None:
    resources = [
        _code_system(),
        _value_set("a", {"valueSet": [VS + "b"]}),
        _value_set(
            "b",
            {"valueSet": [VS + "a"]},
            {"system": CS, "concept": [{"code": "circle"}]},
        ),
        _value_set("c", {"valueSet": [VS + "a"]}),
        _value_set("ok", {"system": CS, "concept": [{"code": "circle"}]}),
    ]
    with pytest.raises(ReferenceExpansionError) as expected:
        _reference(*resources).expand(VS + "a")
    assert expected.value.kind == "cycle"

    load(fresh_engine, [_write(tmp_path, *resources)])
    with session_scope(fresh_engine) as session:
        for name in ("a", "b"):
            with pytest.raises(NotExpandableError) as error:
                expand(session, VS + name)
            assert f"import cycle: {VS}a -> {VS}b -> {VS}a" in str(error.value)
        with pytest.raises(
            NotExpandableError,
            match=f"imports {VS}a, which cannot be expanded: import cycle",
        ):
            expand(session, VS + "c")
    assert _codes(fresh_engine, VS + "ok") == {(CS, "circle")}


def test_missing_import_names_the_url(fresh_engine: Engine, tmp_path: Path) -> None:
    load(
        fresh_engine,
        [_write(tmp_path, _value_set("m", {"valueSet": [VS + "absent|2"]}))],
    )
    with (
        session_scope(fresh_engine) as session,
        pytest.raises(
            NotExpandableError,
            match=rf"compose.include\[0\] imports {VS}absent\|2, which is not loaded",
        ),
    ):
        expand(session, VS + "m")


def test_whole_system_include_of_an_unloaded_code_system_is_not_expandable(
    fresh_engine: Engine, tmp_path: Path
) -> None:
    load(
        fresh_engine,
        [_write(tmp_path, _value_set("w", {"system": "http://loinc.org"}))],
    )
    p = schema_prefix(fresh_engine)
    with fresh_engine.connect() as connection:
        reason = connection.execute(
            sa.text(f"SELECT expansion_error FROM {p}value_set")
        ).scalar_one()
    assert (
        reason
        == "compose.include[0] includes all of code system http://loinc.org, which is not loaded"
    )


# --- one transaction, bad input ----------------------------------------------------


def _baseline(engine: Engine, tmp_path: Path) -> dict[str, str]:
    load(
        engine,
        [_write(tmp_path / "base", _code_system(), _value_set("base", {"system": CS}))],
    )
    return table_checksums(engine)


BAD_INPUT = {
    "truncated JSON": (
        "bad.json",
        '{"resourceType": "ValueSet", "compose": ',
        "",
        "not valid JSON",
    ),
    "wrong resourceType": (
        "p.json",
        json.dumps({"resourceType": "Patient"}),
        "resourceType",
        "expected CodeSystem, ValueSet or Bundle",
    ),
    "missing concept code": (
        "vs.json",
        json.dumps(
            _value_set(
                "x",
                {"system": CS, "concept": [{"code": "a"}, {"display": "no code"}]},
                {"system": CS, "concept": [{"code": "b"}]},
            )
        ),
        "compose.include[0].concept[1].code",
        "is missing or empty",
    ),
    "unknown filter operator": (
        "vs.json",
        json.dumps(
            _value_set(
                "x",
                {
                    "system": CS,
                    "filter": [{"property": "concept", "op": "like", "value": "a"}],
                },
            )
        ),
        "compose.include[0].filter[0].op",
        "unknown filter operator 'like'",
    ),
    "duplicate code": (
        "cs.json",
        json.dumps(
            {
                **_code_system(),
                "url": CS + "2",
                "concept": [{"code": "a"}, {"code": "a"}],
            }
        ),
        "concept[1].code",
        "duplicate code 'a' (first at concept[0])",
    ),
    "hierarchy cycle": (
        "cs.json",
        json.dumps(
            {
                **_code_system(),
                "url": CS + "3",
                "concept": [
                    {"code": "a", "property": [{"code": "parent", "valueCode": "b"}]},
                    {"code": "b", "property": [{"code": "parent", "valueCode": "a"}]},
                ],
            }
        ),
        "concept[",
        "concept hierarchy has a cycle",
    ),
    "XML with an entity": (
        "x.xml",
        (
            '<?xml version="1.0"?><!DOCTYPE v [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
            '<ValueSet xmlns="http://hl7.org/fhir"><id value="&e;"/></ValueSet>'
        ),
        "",
        "DTD",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_names_file_and_element_and_changes_nothing(
    fresh_engine: Engine, tmp_path: Path, case: str
) -> None:
    before = _baseline(fresh_engine, tmp_path)
    name, content, path, message = BAD_INPUT[case]
    folder = tmp_path / "bad"
    _write(folder, _value_set("good-one", {"system": CS}))
    (folder / name).write_text(content)

    with pytest.raises(LoadError) as error:
        load(fresh_engine, [folder])
    assert error.value.source == str(folder / name)
    assert error.value.path.startswith(path)
    assert message in error.value.message
    assert table_checksums(fresh_engine) == before


def test_failed_load_into_an_empty_database_leaves_it_empty(
    fresh_engine: Engine, tmp_path: Path
) -> None:
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LoadError):
        load(fresh_engine, [tmp_path])
    with fresh_engine.connect() as connection:
        schema = None if fresh_engine.dialect.name == "sqlite" else "tho"
        assert sa.inspect(connection).get_table_names(schema=schema) == []


def test_loading_the_same_content_twice_changes_nothing(
    fresh_engine: Engine, tmp_path: Path
) -> None:
    before = _baseline(fresh_engine, tmp_path)
    summary = load(fresh_engine, [tmp_path / "base"])
    assert (
        summary.code_systems_unchanged,
        summary.value_sets_unchanged,
        summary.changed,
    ) == (1, 1, False)
    assert table_checksums(fresh_engine) == before


def test_same_url_and_version_with_other_content_is_refused_unless_replaced(
    fresh_engine: Engine, tmp_path: Path
) -> None:
    before = _baseline(fresh_engine, tmp_path)
    changed = _value_set("base", {"system": CS, "concept": [{"code": "circle"}]})
    folder = _write(tmp_path / "changed", changed)
    with pytest.raises(LoadError, match="already loaded .* with different content"):
        load(fresh_engine, [folder])
    assert table_checksums(fresh_engine) == before

    summary = load(fresh_engine, [folder], replace=True)
    assert summary.value_sets_replaced == 1
    assert _codes(fresh_engine, VS + "base") == {(CS, "circle")}


def test_two_files_with_one_url_and_different_content_in_one_load(
    fresh_engine: Engine, tmp_path: Path
) -> None:
    one = _value_set("dup", {"system": CS})
    two = _value_set("dup", {"system": CS, "concept": [{"code": "circle"}]})
    duplicate = r"r2.json: url: .* is also in .*r1.json with different content"
    with pytest.raises(LoadError, match=duplicate):
        load(fresh_engine, [_write(tmp_path, _code_system(), one, two)])


def test_a_conflict_found_after_rows_were_written_leaves_the_database_as_it_was(
    fresh_engine: Engine, tmp_path: Path
) -> None:
    # Resources are written in batches as they are read (50 code systems a batch):
    # here the first batch is written before the last file repeats r0's url.
    before = _baseline(fresh_engine, tmp_path)
    systems = [
        {**_code_system(), "url": f"http://example.org/CodeSystem/batch-{n}"}
        for n in range(60)
    ]
    conflict = {**systems[0], "concept": [{"code": "other"}]}
    folder = _write(tmp_path / "many", *systems, conflict)
    stages: list[str] = []
    with pytest.raises(LoadError, match=r"r60.json: url: .* is also in .*r0.json"):
        load(fresh_engine, [folder], progress=lambda stage, _: stages.append(stage))
    assert "write" in stages
    assert table_checksums(fresh_engine) == before


# --- formats -----------------------------------------------------------------------


def test_xml_and_json_of_the_same_resource_load_the_same_rows(
    databases: Any, engine_kind: str, tmp_path: Path
) -> None:
    xml = Path(__file__).parent / "data" / "shapes-vs.xml"
    as_json = tmp_path / "json"
    as_json.mkdir()
    (as_json / "vs.json").write_text(
        (Path(__file__).parent / "data" / "shapes-vs.json").read_text()
    )
    checksums = []
    for source in (xml, as_json / "vs.json"):
        engine = databases.engine(engine_kind)
        load(engine, [_write(tmp_path / "cs", _code_system()), source])
        sums = table_checksums(engine)
        # The source file name is stored; everything else must agree.
        sums.pop("value_set")
        checksums.append(sums)
    assert checksums[0] == checksums[1]


def test_a_bundle_and_an_npm_package_load(fresh_engine: Engine, tmp_path: Path) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": _code_system()},
            {"resource": _value_set("in-bundle", {"system": CS})},
        ],
    }
    (tmp_path / "bundle.json").write_text(json.dumps(bundle))
    package = tmp_path / "example.tgz"
    with tarfile.open(package, "w:gz") as archive:
        for name, resource in (
            ("package/package.json", {"name": "example", "version": "1.0.0"}),
            (
                "package/ValueSet-in-package.json",
                _value_set("in-package", {"valueSet": [VS + "in-bundle"]}),
            ),
            (
                "package/StructureDefinition-x.json",
                {"resourceType": "StructureDefinition", "id": "x"},
            ),
        ):
            data = json.dumps(resource).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

    summary = load(fresh_engine, [tmp_path / "bundle.json", package])
    assert (
        summary.code_systems_added,
        summary.value_sets_added,
        summary.skipped_other_types,
    ) == (1, 2, 1)
    assert _codes(fresh_engine, VS + "in-package") == _codes(
        fresh_engine, VS + "in-bundle"
    )
    assert len(_codes(fresh_engine, VS + "in-package")) == 7


def test_a_package_member_outside_package_is_refused(
    fresh_engine: Engine, tmp_path: Path
) -> None:
    package = tmp_path / "evil.tgz"
    with tarfile.open(package, "w:gz") as archive:
        data = b"{}"
        info = tarfile.TarInfo("package/../../etc/evil.json")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    with pytest.raises(LoadError, match="outside package/"):
        load(fresh_engine, [package])


def test_a_resource_without_url_gets_one_from_the_canonical_base(
    fresh_engine: Engine, tmp_path: Path
) -> None:
    resource = _value_set(
        "ignored", {"system": "http://snomed.info/sct", "concept": [{"code": "1"}]}
    )
    del resource["url"]
    resource["id"] = "no-url"
    load(
        fresh_engine,
        [_write(tmp_path, resource)],
        canonical_base="http://example.org/base",
    )
    assert _codes(fresh_engine, "http://example.org/base/ValueSet/no-url") == {
        ("http://snomed.info/sct", "1")
    }
