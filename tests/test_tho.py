"""All of THO 7.3.0 loads on both engines, with the counts its manifest states.

Expected values come from ../shared/data/tho/manifest.json and from the THO source
files, read here with the standard library's XML parser (a reading independent of
thodb's own).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from conftest import SHARED, Databases
from thodb.cli import main
from thodb.db import schema_prefix, session_scope
from thodb.errors import NotFoundError
from thodb.expand import expand
from thodb.load import LoadSummary, load
from thodb.subsumes import subsumes

THO = SHARED / "data" / "tho"
FHIR = "{http://hl7.org/fhir}"


@cache
def manifest() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((THO / "manifest.json").read_text())
    return data


@pytest.fixture(scope="module")
def _loaded() -> dict[str, tuple[Engine, LoadSummary]]:
    return {}


@pytest.fixture
def tho(
    _loaded: dict[str, tuple[Engine, LoadSummary]],
    databases: Databases,
    engine_kind: str,
) -> tuple[Engine, LoadSummary]:
    """A database holding all of THO (loaded once per engine), and the load's summary."""
    if engine_kind not in _loaded:
        engine = databases.engine(engine_kind)
        _loaded[engine_kind] = (engine, load(engine, [THO]))
    return _loaded[engine_kind]


def test_all_of_tho_loads_with_the_manifest_counts(
    tho: tuple[Engine, LoadSummary],
) -> None:
    engine, summary = tho
    counts = manifest()["summary"]
    assert (
        summary.files == manifest()["files"] + 1
    )  # and manifest.json itself, passed over
    assert summary.skipped_not_fhir == 1
    assert summary.code_systems_added == counts["codesystem"]["count"] == 929
    assert summary.value_sets_added == counts["valueset"]["count"] == 2533
    assert summary.concepts == counts["codesystem"]["total_concepts"] == 20430


def test_the_duplicate_canonical_is_kept_in_both_versions(
    tho: tuple[Engine, LoadSummary],
) -> None:
    engine, _ = tho
    ((url, entries),) = manifest()["summary"]["duplicate_urls"].items()
    p = schema_prefix(engine)
    with engine.connect() as connection:
        versions = (
            connection.execute(
                sa.text(
                    f"SELECT version FROM {p}code_system WHERE url = :url ORDER BY version"
                ),
                {"url": url},
            )
            .scalars()
            .all()
        )
    assert versions == sorted(version for _path, version, _status in entries)


def test_hierarchies_reach_the_manifest_depth(tho: tuple[Engine, LoadSummary]) -> None:
    engine, _ = tho
    deepest = manifest()["summary"]["codesystem"]["deepest"]
    p = schema_prefix(engine)
    # Levels of the longest root-to-leaf path (a flat code system has depth 1).
    depth_sql = sa.text(
        f"""
        WITH RECURSIVE walk(concept_id, depth) AS (
            SELECT c.id, 1 FROM {p}concept c
            JOIN {p}code_system cs ON cs.id = c.code_system_id
            WHERE cs.url = :url
              AND NOT EXISTS (SELECT 1 FROM {p}concept_parent e WHERE e.concept_id = c.id)
            UNION
            SELECT e.concept_id, w.depth + 1
            FROM walk w JOIN {p}concept_parent e ON e.parent_id = w.concept_id
        )
        SELECT MAX(depth) FROM walk
        """
    )
    with engine.connect() as connection:
        for depth, _roots, url in deepest:
            assert connection.execute(depth_sql, {"url": url}).scalar_one() == depth, (
                url
            )


def test_value_sets_not_expandable_name_what_is_missing(
    tho: tuple[Engine, LoadSummary],
) -> None:
    engine, summary = tho
    assert summary.refresh is not None
    p = schema_prefix(engine)
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                f"SELECT url, expansion_error FROM {p}value_set WHERE stratum IS NULL"
            )
        ).all()
        loaded_systems = set(
            connection.execute(sa.text(f"SELECT url FROM {p}code_system")).scalars()
        )
    assert rows and len(rows) == summary.refresh.not_expandable
    for url, reason in rows:
        assert (
            reason.endswith("which is not loaded")
            or "which cannot be expanded:" in reason
        ), url
    # Every THO value set whose systems are all loaded and that imports nothing expands.
    not_expandable = {url for url, _ in rows}
    for entry in manifest()["resources"]:
        if entry["resourceType"] != "ValueSet" or entry["rule_kinds"].get(
            "include:valueSet"
        ):
            continue
        if set(entry["systems"]) <= loaded_systems:
            assert entry["url_effective"] not in not_expandable, entry["path"]


def test_stats_shows_expandable_and_not_with_reasons(
    tho: tuple[Engine, LoadSummary],
) -> None:
    engine, summary = tho
    url = engine.url.render_as_string(hide_password=False)
    result = CliRunner().invoke(main, ["--database-url", url, "stats"])
    assert result.exit_code == 0, result.output
    assert f"value sets: {summary.value_sets_added}" in result.stdout
    assert (
        "http://terminology.hl7.org/ValueSet/ucum-units|1.0.0: compose.include[0] includes all of "
        "code system http://unitsofmeasure.org, which is not loaded" in result.stdout
    )


# --- spot checks against the source files --------------------------------------------


def _value(element: ET.Element, name: str) -> str | None:
    child = element.find(FHIR + name)
    return None if child is None else child.get("value")


def _hierarchy(path: Path) -> tuple[str, dict[str, set[str]]]:
    """url and children by code of a THO XML CodeSystem (nested and subsumedBy/parent)."""
    root = ET.parse(path).getroot()
    parent_codes = {
        _value(p, "code")
        for p in root.findall(FHIR + "property")
        if (_value(p, "uri") or "").endswith(("#parent", "#subsumedBy"))
        or _value(p, "code") in ("parent", "subsumedBy")
    }
    children: dict[str, set[str]] = {}

    def walk(element: ET.Element, parent: str | None) -> None:
        for concept in element.findall(FHIR + "concept"):
            code = _value(concept, "code")
            assert code is not None
            children.setdefault(code, set())
            if parent:
                children.setdefault(parent, set()).add(code)
            for prop in concept.findall(FHIR + "property"):
                if _value(prop, "code") in parent_codes:
                    value = _value(prop, "valueCode")
                    assert value is not None
                    children.setdefault(value, set()).add(code)
            walk(concept, code)

    walk(root, None)
    url = _value(root, "url")
    assert url is not None
    return url, children


def _is_a(children: dict[str, set[str]], code: str) -> set[str]:
    found, pending = {code}, [code]
    while pending:
        for child in children.get(pending.pop(), ()):
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def _is_a_value_sets(system: str) -> Iterator[tuple[str, str, set[str]]]:
    """THO value sets made of one is-a include on ``system`` and excluded concepts."""
    for path in sorted((THO / "v3" / "valueSets").glob("*.xml")):
        root = ET.parse(path).getroot()
        compose = root.find(FHIR + "compose")
        if compose is None:
            continue
        includes = compose.findall(FHIR + "include")
        if len(includes) != 1 or _value(includes[0], "system") != system:
            continue
        filters = includes[0].findall(FHIR + "filter")
        if (
            len(filters) != 1
            or _value(filters[0], "op") != "is-a"
            or includes[0].find(FHIR + "valueSet") is not None
        ):
            continue
        excluded: set[str] = set()
        for exclude in compose.findall(FHIR + "exclude"):
            if (
                _value(exclude, "system") != system
                or exclude.find(FHIR + "filter") is not None
            ):
                break
            excluded |= {
                _value(c, "code") or "" for c in exclude.findall(FHIR + "concept")
            }
        else:
            url = (
                _value(root, "url")
                or f"http://terminology.hl7.org/ValueSet/{_value(root, 'id')}"
            )
            yield url, _value(filters[0], "value") or "", excluded


def test_is_a_value_sets_on_act_code_follow_subsumed_by(
    tho: tuple[Engine, LoadSummary],
) -> None:
    engine, _ = tho
    system, children = _hierarchy(THO / "v3" / "codeSystems" / "v3-ActCode.xml")
    cases = list(_is_a_value_sets(system))
    assert len(cases) > 20
    with session_scope(engine) as session:
        for url, anchor, excluded in cases:
            expected = {(system, code) for code in _is_a(children, anchor) - excluded}
            actual = {(m.system, m.code) for m in expand(session, url).contains}
            assert actual == expected, url


def test_subsumes_follows_the_act_code_hierarchy(
    tho: tuple[Engine, LoadSummary],
) -> None:
    engine, _ = tho
    system, children = _hierarchy(THO / "v3" / "codeSystems" / "v3-ActCode.xml")
    anchor = "_ActAccountCode"
    below = sorted(_is_a(children, anchor) - {anchor})
    unrelated = sorted(set(children) - _is_a(children, anchor))[:5]
    assert below and unrelated
    with session_scope(engine) as session:
        if engine.dialect.name == "postgresql":
            # $subsumes only reads: it runs on a read-only transaction (a hot standby).
            session.execute(sa.text("SET TRANSACTION READ ONLY"))
        for code in below:
            assert (
                subsumes(session, system=system, code_a=anchor, code_b=code)
                == "subsumes"
            )
            assert (
                subsumes(session, system=system, code_a=code, code_b=anchor)
                == "subsumed-by"
            )
        for code in unrelated:
            if anchor not in _is_a(children, code):
                assert (
                    subsumes(session, system=system, code_a=anchor, code_b=code)
                    == "not-subsumed"
                )
        assert (
            subsumes(session, system=system, code_a=anchor, code_b=anchor)
            == "equivalent"
        )
        with pytest.raises(NotFoundError):
            subsumes(session, system=system, code_a=anchor, code_b="no-such-code")
