"""Property-based tests: random code systems and value-set graphs, SQL against the reference.

Hypothesis draws a code system whose hierarchy is a multi-parent DAG (edges from nested
``concept`` elements, ``parent`` properties and ``child`` properties) and a graph of value
sets that use enumerated codes, ``is-a``/``descendent-of``/``=`` filters, whole-system
includes, imports of one or several value sets (intersections), a system part together
with imports, and excludes of either. Each example is loaded into one database per engine
(emptied between examples) and every value set is expanded by thodb, from
``value_set_member`` and live, and by tests/reference.py from the same resources.

Both must agree: the same members with the same display and inactive flag, or both
report the value set not expandable with the same kind of root cause. The test runs once
per mode, and the examples of a mode hold at most one kind of problem (import cycles,
imports of value sets that are not loaded, or filters and whole-system includes of code
systems that are not loaded), so that the kind is unambiguous. ``$THODB_PROPERTY_EXAMPLES``
(default 40) is the number of examples per engine.

Examples this test found are kept as plain tests below it, so that they run every time.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from conftest import Databases
from reference import ReferenceExpansionError, Terminology
from thodb.db import session_scope
from thodb.errors import NotExpandableError
from thodb.expand import expand
from thodb.load import load

CS = "http://example.org/CodeSystem/prop"
UNLOADED = "http://example.org/CodeSystem/not-loaded"
NOT_LOADED = "http://example.org/CodeSystem/prop-not-loaded"
VS = "http://example.org/ValueSet/prop-"
MODES = ("clean", "cycle", "missing-import", "missing-code-system")
#: Examples per engine, shared out among the modes.
MAX_EXAMPLES = int(os.environ.get("THODB_PROPERTY_EXAMPLES", "40"))

_PROPERTIES = [
    {
        "code": "parent",
        "uri": "http://hl7.org/fhir/concept-properties#parent",
        "type": "code",
    },
    {
        "code": "child",
        "uri": "http://hl7.org/fhir/concept-properties#child",
        "type": "code",
    },
    {
        "code": "inactive",
        "uri": "http://hl7.org/fhir/concept-properties#inactive",
        "type": "boolean",
    },
    {"code": "color", "type": "string"},
]


# --- strategies ------------------------------------------------------------------------


def _code_system(*concept: dict[str, Any]) -> dict[str, Any]:
    """Code system CS, version 1, with these concepts (the first resource of an
    example: the one the reference does not expand)."""
    return {
        "resourceType": "CodeSystem",
        "url": CS,
        "version": "1",
        "status": "active",
        "content": "complete",
        "concept": list(concept),
    }


@st.composite
def code_systems(draw: st.DrawFn) -> dict[str, Any]:
    """A CodeSystem of 2-10 concepts whose parents all come earlier (a DAG)."""
    n = draw(st.integers(2, 10))
    codes = [f"c{i}" for i in range(n)]
    parents = [[]] + [
        draw(st.lists(st.integers(0, i - 1), max_size=3, unique=True))
        for i in range(1, n)
    ]
    concepts: list[dict[str, Any]] = []
    nested_in: dict[int, int] = {}
    for i, code in enumerate(codes):
        concept: dict[str, Any] = {"code": code}
        if draw(st.booleans()):
            concept["display"] = draw(st.sampled_from(["Alpha", "Beta", f"Code {i}"]))
        props: list[dict[str, Any]] = []
        color = draw(st.sampled_from([None, "red", "blue"]))
        if color:
            props.append({"code": "color", "valueString": color})
        if draw(st.integers(0, 4)) == 0:
            props.append({"code": "inactive", "valueBoolean": True})
        concept["property"] = props
        concepts.append(concept)
        # The first parent is given by nesting or by a property; the others by a parent
        # property on the child or a child property on the parent.
        for k, parent in enumerate(parents[i]):
            how = draw(st.sampled_from(["nested", "parent", "child"]))
            if how == "nested" and k == 0:
                nested_in[i] = parent
            elif how == "child":
                concepts[parent]["property"].append(
                    {"code": "child", "valueCode": code}
                )
            else:
                props.append({"code": "parent", "valueCode": codes[parent]})

    for concept in concepts:
        if not concept["property"]:
            del concept["property"]
    roots: list[dict[str, Any]] = []
    for i, concept in enumerate(concepts):
        if i in nested_in:
            concepts[nested_in[i]].setdefault("concept", []).append(concept)
        else:
            roots.append(concept)
    return {
        **_code_system(*roots),
        "hierarchyMeaning": "is-a",
        "property": _PROPERTIES,
    }


def _codes(code_system: dict[str, Any]) -> list[str]:
    found: list[str] = []
    pending = list(code_system["concept"])
    while pending:
        concept = pending.pop()
        found.append(concept["code"])
        pending.extend(concept.get("concept", []))
    return sorted(found)


@st.composite
def _element(
    draw: st.DrawFn, codes: list[str], i: int, count: int, mode: str
) -> dict[str, Any]:
    """One include or exclude of value set ``i`` of ``count``."""
    targets = list(range(count)) if mode == "cycle" else list(range(i + 1, count))
    kinds = ["concepts", "filters", "whole"]
    if targets or mode == "missing-import":
        kinds += ["imports", "imports", "system+imports"]
    kind = draw(st.sampled_from(kinds))
    element: dict[str, Any] = {}

    if kind in ("concepts", "filters", "whole", "system+imports"):
        part = draw(st.sampled_from(["concepts", "filters", "whole"]))
        if kind != "system+imports":
            part = kind
        systems = [CS, CS, CS] + (
            [NOT_LOADED] if part == "concepts" or mode == "missing-code-system" else []
        )
        element["system"] = draw(st.sampled_from(systems))
        if part == "concepts":
            chosen = draw(
                st.lists(
                    st.sampled_from([*codes, "zz-unknown"]), min_size=1, max_size=4
                )
            )
            element["concept"] = [
                {"code": code}
                | ({"display": f"VS {code}"} if draw(st.booleans()) else {})
                for code in dict.fromkeys(chosen)
            ]
        elif part == "filters":
            element["filter"] = draw(st.lists(_filter(codes), min_size=1, max_size=2))

    if kind in ("imports", "system+imports"):
        choices = [f"{VS}{j}" for j in targets]
        choices += [f"{VS}{j}|1" for j in targets]
        if mode == "missing-import":
            choices += [f"{VS}absent", f"{VS}0|2"]
        element["valueSet"] = list(
            dict.fromkeys(
                draw(st.lists(st.sampled_from(choices), min_size=1, max_size=3))
            )
        )
    return element


def _filter(codes: list[str]) -> st.SearchStrategy[dict[str, str]]:
    hierarchy = st.builds(
        lambda op, value: {"property": "concept", "op": op, "value": value},
        st.sampled_from(["is-a", "descendent-of"]),
        st.sampled_from([*codes, "zz-unknown"]),
    )
    by_property = st.sampled_from(
        [
            {"property": "color", "op": "=", "value": "red"},
            {"property": "color", "op": "=", "value": "blue"},
            {"property": "inactive", "op": "=", "value": "true"},
        ]
    )
    return st.one_of(hierarchy, hierarchy, by_property)


@st.composite
def scenarios(draw: st.DrawFn, mode: str) -> list[dict[str, Any]]:
    """The resources to load; ``mode`` is the one kind of problem they may contain."""
    code_system = draw(code_systems())
    codes = _codes(code_system)
    count = draw(st.integers(1, 6))
    resources: list[dict[str, Any]] = [code_system]
    for i in range(count):
        compose: dict[str, Any] = {
            "include": draw(
                st.lists(_element(codes, i, count, mode), min_size=1, max_size=3)
            )
        }
        excludes = draw(st.lists(_element(codes, i, count, mode), max_size=2))
        if excludes:
            compose["exclude"] = excludes
        resources.append(
            {
                "resourceType": "ValueSet",
                "url": f"{VS}{i}",
                "version": "1",
                "status": "active",
                "compose": compose,
            }
        )
    return resources


# --- comparing -------------------------------------------------------------------------

Members = dict[tuple[str, str], tuple[str | None, bool]]


def _kind(reason: str) -> str:
    """The reference's error kind for thodb's stored reason (root cause last)."""
    if "import cycle" in reason:
        return "cycle"
    if "code system" in reason and "which is not loaded" in reason:
        return "missing-code-system"
    if "which is not loaded" in reason:
        return "missing-import"
    if "no compose" in reason:
        return "no-compose"
    return "unsupported-filter"


def _reference(resources: list[dict[str, Any]]) -> dict[str, Members | str]:
    terminology = Terminology()
    for resource in resources:
        terminology.add(resource)
    found: dict[str, Members | str] = {}
    for resource in resources[1:]:
        try:
            members = terminology.expand(resource["url"])
        except ReferenceExpansionError as error:
            found[resource["url"]] = error.kind
        else:
            found[resource["url"]] = {
                key: (m.display, m.inactive) for key, m in members.items()
            }
    return found


def _thodb(engine: Engine, url: str, *, live: bool) -> Members | str:
    with session_scope(engine) as session:
        try:
            expansion = expand(session, url, live=live)
        except NotExpandableError as error:
            return _kind(error.reason)
    return {(m.system, m.code): (m.display, m.inactive) for m in expansion.contains}


# --- examples found by this test, kept so that they always run ----------------------


def _value_set(name: str, *include: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "ValueSet",
        "url": VS + name,
        "version": "1",
        "status": "active",
        "compose": {"include": list(include)},
    }


#: A code reached through an intersection (two imports, or a system part and an import)
#: where only one operand gives it a display: the reference keeps that display (the
#: smallest non-empty one, as for a union); thodb takes the first import's, here none.
INTERSECTION_DISPLAY = (
    "clean",
    [
        _code_system({"code": "c0"}, {"code": "c1", "display": "One"}),
        _value_set("0", {"valueSet": [VS + "1", VS + "2"]}),
        _value_set("1", {"system": CS, "concept": [{"code": "c0"}]}),
        _value_set(
            "2", {"system": CS, "concept": [{"code": "c0", "display": "VS c0"}]}
        ),
        _value_set(
            "3",
            {
                "system": CS,
                "concept": [{"code": "c0", "display": "VS c0"}],
                "valueSet": [VS + "1"],
            },
        ),
    ],
)


#: A union whose system parts list the same code of a code system that is not loaded
#: with other displays (and one without), directly and through three imports: one
#: member, with the smallest display given (the live statement reads each system
#: part's row of the code and merges them).
UNION_DISPLAYS = (
    "clean",
    [
        _code_system({"code": "c0"}),
        _value_set(
            "0",
            {"valueSet": [VS + "1"]},
            {"valueSet": [VS + "2"]},
            {"valueSet": [VS + "3"]},
            {"system": UNLOADED, "concept": [{"code": "c1"}, {"code": "c0"}]},
        ),
        _value_set(
            "1", {"system": UNLOADED, "concept": [{"code": "c0", "display": "VS zed"}]}
        ),
        _value_set(
            "2",
            {
                "system": UNLOADED,
                "concept": [
                    {"code": "c0", "display": "VS alpha"},
                    {"code": "c1", "display": "VS one"},
                ],
            },
        ),
        _value_set(
            "3", {"system": UNLOADED, "concept": [{"code": "c0", "display": "VS beta"}]}
        ),
    ],
)

# --- databases -------------------------------------------------------------------------


@dataclass
class _Reusable:
    """One database per engine, emptied between examples."""

    engine: Engine
    tables: list[sa.Table]

    def clear(self) -> None:
        with self.engine.begin() as connection:
            for table in self.tables:
                connection.execute(table.delete())


@pytest.fixture(scope="module")
def _reusable() -> dict[str, _Reusable]:
    return {}


@pytest.fixture
def reusable(
    _reusable: dict[str, _Reusable], databases: Databases, engine_kind: str
) -> _Reusable:
    if engine_kind not in _reusable:
        engine = databases.engine(engine_kind)
        load(engine, [])  # creates the schema
        metadata = sa.MetaData()
        sqlite = engine.dialect.name == "sqlite"
        with engine.connect() as connection, warnings.catch_warnings():
            # Only the tables matter here, not SQLite's expression-based indexes.
            warnings.filterwarnings("ignore", message=".*expression-based index")
            metadata.reflect(connection, schema=None if sqlite else "tho")
        # Children first, so that deleting never waits for a cascade.
        tables = [
            t for t in reversed(metadata.sorted_tables) if t.name != "alembic_version"
        ]
        _reusable[engine_kind] = _Reusable(engine, tables)
    return _reusable[engine_kind]


def _check(reusable: _Reusable, resources: list[dict[str, Any]], mode: str) -> int:
    """Load ``resources`` alone and compare every value set; the number compared."""
    expected = _reference(resources)
    reusable.clear()
    with tempfile.TemporaryDirectory() as folder:
        for i, resource in enumerate(resources):
            (Path(folder) / f"r{i}.json").write_text(json.dumps(resource))
        load(reusable.engine, [folder])
    for url, want in expected.items():
        assert _thodb(reusable.engine, url, live=False) == want, (mode, url)
        assert _thodb(reusable.engine, url, live=True) == want, (mode, url)
    return len(expected)


@pytest.mark.parametrize("mode", MODES)
def test_sql_expansion_equals_the_reference_on_random_graphs(
    reusable: _Reusable, mode: str
) -> None:
    # Shrinking reloads the database for every step and can take minutes; the failing
    # example is printed unshrunk unless THODB_PROPERTY_SHRINK is set.
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    if os.environ.get("THODB_PROPERTY_SHRINK"):
        phases.append(Phase.shrink)

    @given(resources=scenarios(mode))
    @settings(
        max_examples=max(1, MAX_EXAMPLES // len(MODES)),
        deadline=None,
        database=None,
        phases=phases,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    def check(resources: list[dict[str, Any]]) -> None:
        _check(reusable, resources, mode)

    check()


def test_a_display_reached_through_an_intersection_is_the_smallest_given(
    reusable: _Reusable,
) -> None:
    mode, resources = INTERSECTION_DISPLAY
    _check(reusable, resources, mode)


def test_a_code_several_parts_of_a_union_list_is_one_member_with_the_least_display(
    reusable: _Reusable,
) -> None:
    mode, resources = UNION_DISPLAYS
    _check(reusable, resources, mode)
