"""Concept details read by id: any number of ids, in one statement per kind of detail.

The code system is written here; what a read must return is taken from that file: its
displays and statuses, and which concepts carry a status or a shown property. There
are more concepts than SQLite accepts parameters in one statement (32,766), so a read
that sent each id as a parameter would fail.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from thodb import concepts
from thodb.db import session_scope
from thodb.load import load
from thodb.models import CodeSystem, Concept

URL = "http://example.org/CodeSystem/many-concepts"
SIZE = 40_000


def _code_system(folder: Path) -> dict[str, Any]:
    concept_list: list[dict[str, Any]] = []
    for n in range(SIZE):
        concept: dict[str, Any] = {"code": f"c{n}", "display": f"Concept {n}"}
        if n % 1000 == 7:
            concept["property"] = [{"code": "status", "valueCode": "retired"}]
        elif n % 1000 == 11:
            concept["property"] = [{"code": "order", "valueInteger": n}]
        concept_list.append(concept)
    resource = {
        "resourceType": "CodeSystem",
        "url": URL,
        "version": "1",
        "status": "active",
        "content": "complete",
        "property": [
            {"code": "status", "type": "code"},
            {"code": "order", "type": "integer"},
        ],
        "concept": concept_list,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "CodeSystem-many.json").write_text(json.dumps(resource), "utf-8")
    return resource


def test_every_concept_is_read_by_id_past_the_parameter_limit(
    fresh_engine: Engine, tmp_path: Path
) -> None:
    resource = _code_system(tmp_path / "content")
    load(fresh_engine, [tmp_path / "content"])
    expected = {c["code"]: c for c in resource["concept"]}
    with session_scope(fresh_engine) as session:
        ids = list(
            session.scalars(
                sa.select(Concept.id)
                .join(CodeSystem, CodeSystem.id == Concept.code_system_id)
                .where(CodeSystem.url == URL)
            )
        )
        assert len(ids) == SIZE

        found = concepts.by_id(session, ids, properties={"order"})
        assert {d.code: d.display for d in found.values()} == {
            code: c["display"] for code, c in expected.items()
        }
        with_order = {
            d.code: [p.value for p in d.properties if p.code == "order"]
            for d in found.values()
            if d.properties
        }
        assert with_order == {
            code: [str(p["valueInteger"]) for p in c["property"]]
            for code, c in expected.items()
            if c.get("property", [{}])[0].get("code") == "order"
        }

        bare = concepts.by_id(
            session, ids, properties={"order"}, skip_plain=True, keep_codes={"c1"}
        )
        notable = {
            code
            for code, c in expected.items()
            if c.get("property")  # a status, or a property asked for
        }
        assert {d.code for d in bare.values()} == notable | {"c1"}
        assert {d.code: d.status for d in bare.values() if d.status} == {
            code: "retired"
            for code, c in expected.items()
            if c.get("property", [{}])[0].get("code") == "status"
        }
