"""Synthetic FHIR content, generated from a seeded RNG so every run measures the same thing.

Each generator returns FHIR R4 JSON resources (dicts); :func:`write_resources` writes
them to a folder so that the benchmarks load them through :func:`thodb.load.load`, the
path a user's load takes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Base of every synthetic canonical url.
BASE = "http://example.org/thodb-bench"

#: The FHIR concept-property uri that makes a ``parent`` property a hierarchy edge.
PARENT_URI = "http://hl7.org/fhir/concept-properties#parent"


def code_system(
    name: str,
    concepts: list[dict[str, Any]],
    *,
    hierarchy: bool = False,
) -> dict[str, Any]:
    """A complete CodeSystem ``{BASE}/CodeSystem/{name}`` holding ``concepts``.

    :param hierarchy: declare the ``parent`` property (concept-properties#parent), so
        that ``parent`` property values are is-a edges.
    """
    resource: dict[str, Any] = {
        "resourceType": "CodeSystem",
        "id": name,
        "url": f"{BASE}/CodeSystem/{name}",
        "version": "1",
        "name": name.replace("-", "_"),
        "status": "active",
        "content": "complete",
        "concept": concepts,
    }
    if hierarchy:
        resource["hierarchyMeaning"] = "is-a"
        resource["property"] = [{"code": "parent", "uri": PARENT_URI, "type": "code"}]
    return resource


def value_set(name: str, includes: list[dict[str, Any]]) -> dict[str, Any]:
    """A ValueSet ``{BASE}/ValueSet/{name}`` whose compose has ``includes``."""
    return {
        "resourceType": "ValueSet",
        "id": name,
        "url": value_set_url(name),
        "version": "1",
        "name": name.replace("-", "_"),
        "status": "active",
        "compose": {"include": includes},
    }


def value_set_url(name: str) -> str:
    """The canonical url of the synthetic value set ``name``."""
    return f"{BASE}/ValueSet/{name}"


def flat_concepts(count: int, prefix: str = "C") -> list[dict[str, Any]]:
    """``count`` concepts without hierarchy, codes ``{prefix}0`` … ."""
    return [{"code": f"{prefix}{i}", "display": f"Concept {i}"} for i in range(count)]


def write_resources(folder: Path, resources: Iterable[dict[str, Any]]) -> Path:
    """Write each resource to ``folder/<resourceType>-<id>.json``; return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for resource in resources:
        path = folder / f"{resource['resourceType']}-{resource['id']}.json"
        with open(path, "w", encoding="utf-8") as out:
            json.dump(resource, out, separators=(",", ":"))
    return folder


# --- import graphs -----------------------------------------------------------------


@dataclass(frozen=True)
class ImportGraph:
    """Synthetic value sets importing each other, and the one to expand."""

    resources: list[dict[str, Any]]
    top_url: str
    #: The number of codes the top value set's expansion has.
    expected_total: int


def import_chain(depth: int, *, leaf_codes: int = 10) -> ImportGraph:
    """A chain ``chain-0`` imports ``chain-1`` … imports ``chain-{depth}``.

    Each link is ``compose.include.valueSet`` of the next and nothing else; the last value
    set includes ``leaf_codes`` codes of a small code system. Every value set of the chain
    therefore expands to the same ``leaf_codes`` codes, so the total number of members
    grows linearly with the depth (a chain whose every link adds codes of its own has
    depth²/2 members, which no materialising design can compute in linear time).
    """
    cs = code_system("chain-codes", flat_concepts(leaf_codes))
    sets = [
        value_set(f"chain-{i}", [{"valueSet": [value_set_url(f"chain-{i + 1}")]}])
        for i in range(depth)
    ]
    codes = [{"code": f"C{i}"} for i in range(leaf_codes)]
    sets.append(value_set(f"chain-{depth}", [{"system": cs["url"], "concept": codes}]))
    return ImportGraph([cs, *sets], value_set_url("chain-0"), leaf_codes)


def import_fan_out(width: int, *, seed: int, codes_each: int = 3) -> ImportGraph:
    """``fan-top`` includes ``width`` value sets, each a separate union include.

    Each imported value set lists ``codes_each`` codes drawn at random from a code
    system of ``codes_each * width`` concepts, so imported sets overlap the way real
    ones do.
    """
    rng = random.Random(seed)
    size = max(30, codes_each * width)
    cs = code_system("fan-codes", flat_concepts(size))
    chosen: set[str] = set()
    sets = []
    for i in range(width):
        codes = sorted(rng.sample(range(size), codes_each))
        chosen.update(f"C{c}" for c in codes)
        include = {"system": cs["url"], "concept": [{"code": f"C{c}"} for c in codes]}
        sets.append(value_set(f"fan-{i}", [include]))
    top = value_set(
        "fan-top",
        [{"valueSet": [value_set_url(f"fan-{i}")]} for i in range(width)],
    )
    return ImportGraph([cs, *sets, top], value_set_url("fan-top"), len(chosen))


# --- is-a hierarchies --------------------------------------------------------------


@dataclass(frozen=True)
class Hierarchy:
    """A code system with a multi-parent is-a hierarchy and a descendent-of value set."""

    code_system: dict[str, Any]
    value_set: dict[str, Any]
    edges: int
    #: The number of codes the value set's expansion has.
    expected_total: int


def hierarchy(concepts: int, *, seed: int, branch_max: int = 100_000) -> Hierarchy:
    """A code system of ``concepts`` concepts, each with 1 to 5 parents (3 on average).

    Concept ``R`` is the root; under it, two branches ``A`` and ``B``. Branch ``A``
    holds ``min(branch_max, concepts // 2)`` concepts; every other concept is in ``B``.
    A concept's parents are drawn uniformly among the concepts of its branch created
    before it (so the graph is acyclic and its depth grows like log n, as in real
    terminologies); the first concept of a branch has the branch's head as its parent.
    The value set ``hierarchy`` is ``descendent-of A``: every concept of branch ``A``.
    """
    rng = random.Random(seed)
    size_a = min(branch_max, concepts // 2)
    size_b = max(0, concepts - 3 - size_a)
    resources: list[dict[str, Any]] = [
        {"code": "R", "display": "Root"},
        _concept("A", "Branch A", ["R"]),
        _concept("B", "Branch B", ["R"]),
    ]
    edges = 2
    for head, size, start in (("A", size_a, 0), ("B", size_b, size_a)):
        members: list[str] = []
        for i in range(size):
            code = str(1_000_000 + start + i)
            if not members:
                parents = [head]
            else:
                wanted = min(len(members), rng.choice((1, 2, 3, 4, 5)))
                parents = [members[rng.randrange(len(members))] for _ in range(wanted)]
                parents = sorted(set(parents))
            members.append(code)
            edges += len(parents)
            resources.append(_concept(code, f"Concept {start + i}", parents))
    cs = code_system(f"hierarchy-{concepts}", resources, hierarchy=True)
    vs = value_set(
        f"hierarchy-{concepts}",
        [
            {
                "system": cs["url"],
                "filter": [
                    {"property": "concept", "op": "descendent-of", "value": "A"}
                ],
            }
        ],
    )
    return Hierarchy(cs, vs, edges, size_a)


def _concept(code: str, display: str, parents: list[str]) -> dict[str, Any]:
    return {
        "code": code,
        "display": display,
        "property": [{"code": "parent", "valueCode": p} for p in parents],
    }


# --- imaging rows ------------------------------------------------------------------


def imaging_rows(
    count: int,
    members: list[tuple[str, str]],
    others: list[tuple[str, str]],
    *,
    seed: int,
    member_share: float = 0.8,
) -> list[tuple[int, str, str]]:
    """``count`` rows ``(id, system, code)`` as a segmentation table holds them.

    ``member_share`` of the rows carry a code of ``members`` (the value set the query
    selects), the rest a code of ``others``; codes are drawn with a skew (a few segment
    types are much more common than others), as in real image collections.
    """
    rng = random.Random(seed)
    weights_m = [1 / (rank + 1) for rank in range(len(members))]
    weights_o = [1 / (rank + 1) for rank in range(len(others))]
    n_members = round(count * member_share)
    picked = rng.choices(members, weights_m, k=n_members)
    picked += rng.choices(others, weights_o, k=count - n_members)
    rng.shuffle(picked)
    return [(i, system, code) for i, (system, code) in enumerate(picked, start=1)]
