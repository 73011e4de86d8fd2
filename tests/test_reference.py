"""Checks of the reference expansion (tests/reference.py) itself.

The expected numbers come from the data's documentation
(``shared/data/dicom/README.md``) and from the project's specification, not from running
any code, so that the reference can be trusted as the source of expected values for the
database's expansion.
"""

from __future__ import annotations

import ast
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

from reference import (
    Member,
    ReferenceExpansionError,
    Terminology,
    parse_value_set_xml,
    split_canonical,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
DICOM_DIR = SHARED / "data" / "dicom"
IMAGE_REFERENCE_TYPE_XML = (
    SHARED / "data" / "tho" / "fhir" / "valueSets" / "valueSet-image-reference-type.xml"
)

IMAGE_REFERENCE_TYPE = "http://terminology.hl7.org/ValueSet/image-reference-type"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED_CT = "http://snomed.info/sct"

# shared/data/dicom/README.md, "Known gaps": the CIDs with no content and no compose.
CIDS_WITHOUT_COMPOSE = {
    61, 82, 102, 103, 104, 105, 106, 107, 628, 633, 3082, 3264, 3672, 3673, 3675, 3679,
    3681, 3682, 3683, 3684, 3685, 3686, 3692, 3720, 3780, 5000, 5001, 5002, 7007, 7020,
    9232,
}  # fmt: skip


def cid(number: int) -> str:
    """The canonical url of a DICOM Context Group."""
    return (
        "http://dicom.nema.org/medical/dicom/current/output/chtml/part16/"
        f"sect_CID_{number}.html"
    )


def cid_number(url: str) -> int:
    """The number of a DICOM Context Group from its canonical url."""
    return int(url.rsplit("_", 1)[1].removesuffix(".html"))


@pytest.fixture(scope="module")
def dicom() -> Terminology:
    """DICOM 2026b: the code systems, all CIDs and THO's image-reference-type."""
    return Terminology.from_paths(DICOM_DIR, IMAGE_REFERENCE_TYPE_XML)


# -- the THO value set image-reference-type over DICOM 2026b ---------------------------


def test_image_reference_type_xml_gets_its_url_from_the_canonical_base() -> None:
    resource = parse_value_set_xml(IMAGE_REFERENCE_TYPE_XML)
    assert "url" not in resource
    terminology = Terminology()
    terminology.add(resource)
    stored = terminology.value_set(IMAGE_REFERENCE_TYPE)
    assert (stored["id"], stored["version"]) == ("image-reference-type", "1.0.0")

    first, *imports = stored["compose"]["include"]
    assert first["system"] == DCM
    assert len(first["concept"]) == 36
    assert not any("display" in concept for concept in first["concept"])
    assert [include["valueSet"] for include in imports] == [
        [cid(7013)],
        [cid(7201)],
        [cid(7151)],
    ]


def test_image_reference_type_expands_to_1029_codes(dicom: Terminology) -> None:
    assert len(dicom.expand(IMAGE_REFERENCE_TYPE)) == 1029


def test_image_reference_type_has_854_snomed_ct_codes(dicom: Terminology) -> None:
    systems = Counter(system for system, _ in dicom.expand(IMAGE_REFERENCE_TYPE))
    assert systems[SNOMED_CT] == 854


def test_image_reference_type_import_closure(dicom: Terminology) -> None:
    closure = {
        cid_number(url): depth
        for (url, _), depth in dicom.import_closure(IMAGE_REFERENCE_TYPE).items()
    }
    direct = {cid_number(url) for url in dicom.imports(IMAGE_REFERENCE_TYPE)}
    assert direct == {7013, 7201, 7151}
    assert direct <= set(closure)
    assert max(closure.values()) <= 5


def test_image_reference_type_reaches_84_cids(dicom: Terminology) -> None:
    # "CID 7013, 7201, 7151 and the 84 CIDs they reach": 84 in the closure, the three
    # named ones included (3 direct + 81 further), in DICOM 2026b.
    closure = dicom.import_closure(IMAGE_REFERENCE_TYPE)
    assert len(closure) == 84


def test_image_reference_type_members(dicom: Terminology) -> None:
    members = dicom.expand(IMAGE_REFERENCE_TYPE)
    assert (DCM, "121191") in members
    assert (DCM, "128228") in members
    assert (SNOMED_CT, "85856004") in members
    assert members[DCM, "111030"].inactive
    assert (DCM, "113076") not in members


def test_image_reference_type_display_comes_from_the_code_system(
    dicom: Terminology,
) -> None:
    # The THO file gives no display for its DCM codes.
    members = dicom.expand(IMAGE_REFERENCE_TYPE)
    assert members[DCM, "121191"] == Member("Referenced Segment", inactive=False)


def test_snomed_85856004_is_listed_only_by_cid_4031(dicom: Terminology) -> None:
    listing = set()
    for url, version in dicom.import_closure(IMAGE_REFERENCE_TYPE):
        for include in dicom.value_set(url, version)["compose"]["include"]:
            codes = {concept["code"] for concept in include.get("concept", [])}
            if include.get("system") == SNOMED_CT and "85856004" in codes:
                listing.add(cid_number(url))
    assert listing == {4031}

    chain = [7151, 7192, 4, 4030, 4031]
    for parent, child in pairwise(chain):
        assert cid(child) in dicom.imports(cid(parent))
    assert cid(7151) in dicom.imports(IMAGE_REFERENCE_TYPE)


# -- all 1466 DICOM Context Groups -----------------------------------------------------


def test_1433_cids_expand_and_33_do_not(dicom: Terminology) -> None:
    results = {
        cid_number(url): result
        for (url, _), result in dicom.expandable().items()
        if url != IMAGE_REFERENCE_TYPE
    }
    failed = {
        n: r for n, r in results.items() if isinstance(r, ReferenceExpansionError)
    }
    assert len(results) == 1466
    assert len(results) - len(failed) == 1433
    assert set(failed) == CIDS_WITHOUT_COMPOSE | {101, 623}
    assert {error.kind for error in failed.values()} == {"no-compose"}
    # Both import a CID without compose, and fail for that reason.
    assert split_canonical(failed[101].urls[0])[0] == cid(102)
    assert split_canonical(failed[623].urls[0])[0] == cid(628)


def test_cid_4_reaches_4031_twice_which_is_not_a_cycle(dicom: Terminology) -> None:
    assert cid(4031) in dicom.imports(cid(4030))
    assert cid(4031) in dicom.imports(cid(4042))
    assert {cid(4030), cid(4042)} <= set(dicom.imports(cid(4)))
    assert (SNOMED_CT, "85856004") in dicom.expand(cid(4))


# -- small hand-made resources ---------------------------------------------------------

BASE = "http://example.org/fhir"
SYSTEM = f"{BASE}/CodeSystem/shapes"


def value_set(name: str, *include: dict, exclude: tuple[dict, ...] = ()) -> dict:
    """A ValueSet resource with url ``<BASE>/ValueSet/<name>``."""
    compose: dict = {"include": list(include)}
    if exclude:
        compose["exclude"] = list(exclude)
    return {
        "resourceType": "ValueSet",
        "url": f"{BASE}/ValueSet/{name}",
        "compose": compose,
    }


def vs_url(name: str) -> str:
    return f"{BASE}/ValueSet/{name}"


def codes(system: str, *code: str) -> dict:
    """An include of enumerated codes."""
    return {"system": system, "concept": [{"code": c} for c in code]}


def imports(*name: str) -> dict:
    """An include that imports value sets and nothing else."""
    return {"valueSet": [vs_url(n) for n in name]}


def keys(members: dict) -> set[str]:
    return {code for _, code in members}


@pytest.fixture
def shapes() -> Terminology:
    """A code system with a nested hierarchy, a parent property and a retired code.

    shape > polygon > (triangle, square); shape > round > circle (by property);
    ``oval`` is retired.
    """
    terminology = Terminology()
    terminology.add({
        "resourceType": "CodeSystem",
        "url": SYSTEM,
        "version": "1",
        "concept": [
            {"code": "shape", "display": "Shape", "concept": [
                {"code": "polygon", "display": "Polygon", "concept": [
                    {"code": "triangle", "display": "Triangle",
                     "property": [{"code": "sides", "valueInteger": 3}]},
                    {"code": "square", "display": "Square",
                     "property": [{"code": "sides", "valueInteger": 4}]},
                ]},
                {"code": "round", "display": "Round"},
            ]},
            {"code": "circle", "display": "Circle",
             "property": [{"code": "parent", "valueCode": "round"}]},
            {"code": "oval", "display": "Oval",
             "property": [{"code": "status", "valueCode": "retired"}]},
        ],
    })  # fmt: skip
    return terminology


def test_import_cycle_names_both_value_sets(shapes: Terminology) -> None:
    shapes.add(value_set("a", imports("b")))
    shapes.add(value_set("b", imports("a")))
    with pytest.raises(ReferenceExpansionError) as raised:
        shapes.expand(vs_url("a"))
    assert raised.value.kind == "cycle"
    assert raised.value.urls == [vs_url("a"), vs_url("b"), vs_url("a")]
    assert shapes.expandable()[vs_url("b"), None].kind == "cycle"


def test_value_set_importing_a_cycle_fails_with_kind_cycle(shapes: Terminology) -> None:
    shapes.add(value_set("a", imports("b")))
    shapes.add(value_set("b", imports("a")))
    shapes.add(value_set("c", codes(SYSTEM, "square"), imports("a")))
    with pytest.raises(ReferenceExpansionError, match="cycle") as raised:
        shapes.expand(vs_url("c"))
    assert raised.value.kind == "cycle"


def test_missing_import_names_the_url(shapes: Terminology) -> None:
    shapes.add(value_set("a", imports("absent")))
    with pytest.raises(ReferenceExpansionError) as raised:
        shapes.expand(vs_url("a"))
    assert raised.value.kind == "missing-import"
    assert raised.value.urls == [vs_url("absent")]
    assert vs_url("absent") in str(raised.value)


def test_no_compose_propagates_to_importers(shapes: Terminology) -> None:
    shapes.add({"resourceType": "ValueSet", "url": vs_url("empty")})
    shapes.add(value_set("a", imports("empty")))
    with pytest.raises(ReferenceExpansionError) as raised:
        shapes.expand(vs_url("a"))
    assert raised.value.kind == "no-compose"
    assert raised.value.urls == [vs_url("empty")]


def test_exclude_subtracts(shapes: Terminology) -> None:
    shapes.add(
        value_set(
            "polygons",
            {
                "system": SYSTEM,
                "filter": [{"property": "concept", "op": "is-a", "value": "polygon"}],
            },
        )
    )
    shapes.add(
        value_set(
            "a",
            {"system": SYSTEM},
            exclude=(imports("polygons"), codes(SYSTEM, "oval")),
        )
    )
    assert keys(shapes.expand(vs_url("a"))) == {"shape", "round", "circle"}


def test_include_with_system_and_value_set_intersects(shapes: Terminology) -> None:
    shapes.add(value_set("b", codes(SYSTEM, "square", "circle", "oval")))
    shapes.add(
        value_set(
            "a",
            {**codes(SYSTEM, "square", "triangle", "oval"), "valueSet": [vs_url("b")]},
        )
    )
    assert keys(shapes.expand(vs_url("a"))) == {"square", "oval"}


def test_include_with_two_value_sets_intersects(shapes: Terminology) -> None:
    shapes.add(value_set("b", codes(SYSTEM, "square", "circle")))
    shapes.add(value_set("c", codes(SYSTEM, "circle", "oval")))
    shapes.add(value_set("a", imports("b", "c")))
    assert keys(shapes.expand(vs_url("a"))) == {"circle"}


def test_versioned_import_resolves_that_version(shapes: Terminology) -> None:
    shapes.add({**value_set("b", codes(SYSTEM, "square")), "version": "1.0"})
    shapes.add({**value_set("b", codes(SYSTEM, "circle")), "version": "2.0"})
    shapes.add(value_set("a", {"valueSet": [f"{vs_url('b')}|1.0"]}))
    shapes.add(value_set("latest", imports("b")))
    assert keys(shapes.expand(vs_url("a"))) == {"square"}
    assert keys(shapes.expand(vs_url("latest"))) == {"circle"}


@pytest.mark.parametrize(
    ("op", "value", "expected"),
    [
        ("is-a", "polygon", {"polygon", "triangle", "square"}),
        ("descendent-of", "polygon", {"triangle", "square"}),
        ("is-a", "round", {"round", "circle"}),
        (
            "descendent-of",
            "shape",
            {"polygon", "triangle", "square", "round", "circle"},
        ),
        ("is-a", "unknown", set()),
    ],
)
def test_hierarchy_filters(
    shapes: Terminology, op: str, value: str, expected: set[str]
) -> None:
    shapes.add(
        value_set(
            "a",
            {
                "system": SYSTEM,
                "filter": [{"property": "concept", "op": op, "value": value}],
            },
        )
    )
    assert keys(shapes.expand(vs_url("a"))) == expected


def test_filters_combine_by_intersection(shapes: Terminology) -> None:
    shapes.add(
        value_set(
            "a",
            {
                "system": SYSTEM,
                "filter": [
                    {"property": "concept", "op": "is-a", "value": "shape"},
                    {"property": "sides", "op": "=", "value": "4"},
                ],
            },
        )
    )
    assert keys(shapes.expand(vs_url("a"))) == {"square"}


def test_unsupported_filter(shapes: Terminology) -> None:
    shapes.add(
        value_set(
            "a",
            {
                "system": SYSTEM,
                "filter": [{"property": "concept", "op": "regex", "value": "s.*"}],
            },
        )
    )
    with pytest.raises(ReferenceExpansionError) as raised:
        shapes.expand(vs_url("a"))
    assert raised.value.kind == "unsupported-filter"


@pytest.mark.parametrize(
    "include",
    [
        {"system": "http://snomed.info/sct"},
        {"system": SYSTEM, "version": "2"},
        {
            "system": "http://snomed.info/sct",
            "filter": [{"property": "concept", "op": "is-a", "value": "404684003"}],
        },
    ],
)
def test_whole_or_filtered_system_must_be_loaded(
    shapes: Terminology, include: dict
) -> None:
    shapes.add(value_set("a", include))
    with pytest.raises(ReferenceExpansionError) as raised:
        shapes.expand(vs_url("a"))
    assert raised.value.kind == "missing-code-system"


def test_enumerated_codes_of_an_unloaded_system_are_members(
    shapes: Terminology,
) -> None:
    shapes.add(
        value_set(
            "b",
            {
                "system": SNOMED_CT,
                "concept": [{"code": "1", "display": "Zebra"}, {"code": "2"}],
            },
        )
    )
    shapes.add(
        value_set(
            "c",
            {
                "system": SNOMED_CT,
                "concept": [{"code": "1", "display": "Aardvark"}, {"code": "2"}],
            },
        )
    )
    shapes.add(value_set("a", imports("b"), imports("c")))
    assert shapes.expand(vs_url("a")) == {
        (SNOMED_CT, "1"): Member("Aardvark", inactive=False),
        (SNOMED_CT, "2"): Member(None, inactive=False),
    }


def test_code_system_gives_display_and_inactive(shapes: Terminology) -> None:
    shapes.add(
        value_set(
            "a",
            {
                "system": SYSTEM,
                "concept": [
                    {"code": "oval", "display": "Ellipse"},
                    {"code": "unknown", "display": "?"},
                ],
            },
        )
    )
    assert shapes.expand(vs_url("a")) == {
        (SYSTEM, "oval"): Member("Oval", inactive=True),
        (SYSTEM, "unknown"): Member("?", inactive=False),
    }


def test_reference_imports_nothing_from_thodb() -> None:
    # The reference is the source of expected values only while it is independent.
    source = (Path(__file__).parent / "reference.py").read_text(encoding="utf-8")
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module or "")
    assert not {m for m in modules if m.split(".")[0] == "thodb"}
