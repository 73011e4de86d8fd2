"""The checks of a code system's hierarchy when it is read, on random graphs.

A CodeSystem whose ``parent`` properties form a cycle is refused, one whose parents are
all codes of it and form no cycle is read. What decides is Python's own
``graphlib.TopologicalSorter``, which knows nothing of thodb: the hierarchy is refused
exactly when it finds a cycle, the cycle named in the message is one (each code in it
has the next as a parent), and the error names the concept the cycle was closed at.
"""

from __future__ import annotations

import graphlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thodb.errors import LoadError
from thodb.fhir.resources import parse_resource

CS = "http://example.org/CodeSystem/hierarchy-check"


@st.composite
def _parents(draw: st.DrawFn) -> list[list[int]]:
    """The parents of each of 1-12 concepts, as indices (repeats and self-loops too)."""
    size = draw(st.integers(1, 12))
    return [draw(st.lists(st.integers(0, size - 1), max_size=4)) for _ in range(size)]


def _code_system(parents: list[list[int]]) -> dict[str, object]:
    return {
        "resourceType": "CodeSystem",
        "url": CS,
        "status": "active",
        "content": "complete",
        "property": [
            {
                "code": "parent",
                "uri": "http://hl7.org/fhir/concept-properties#parent",
                "type": "code",
            }
        ],
        "concept": [
            {
                "code": f"c{i}",
                "property": [{"code": "parent", "valueCode": f"c{p}"} for p in listed],
            }
            for i, listed in enumerate(parents)
        ],
    }


def _has_cycle(parents: list[list[int]]) -> bool:
    sorter = graphlib.TopologicalSorter(
        {f"c{i}": [f"c{p}" for p in listed] for i, listed in enumerate(parents)}
    )
    try:
        sorter.prepare()
    except graphlib.CycleError:
        return True
    return False


@settings(max_examples=300, deadline=None)
@given(_parents())
def test_a_hierarchy_is_refused_exactly_when_it_has_a_cycle(
    parents: list[list[int]],
) -> None:
    resource = _code_system(parents)
    if not _has_cycle(parents):
        record = parse_resource(resource, "cs.json")
        assert [sorted(set(c.parents)) for c in record.concepts] == [
            sorted({f"c{p}" for p in listed}) for listed in parents
        ]
        return
    with pytest.raises(LoadError, match="concept hierarchy has a cycle") as error:
        parse_resource(resource, "cs.json")
    found = re.search(r"cycle: (.*)$", str(error.value))
    assert found is not None
    cycle = [int(code[1:]) for code in found.group(1).split(" -> ")]
    assert cycle[0] == cycle[-1]
    assert all(b in parents[a] for a, b in zip(cycle, cycle[1:], strict=False))
    # The concept named is the one whose parent closed the cycle.
    assert error.value.path == f"concept[{cycle[-2]}]"


def test_an_unknown_parent_is_named_with_its_concept() -> None:
    with pytest.raises(LoadError, match="parent 'c9' of 'c1' is not a code") as error:
        parse_resource(_code_system([[], [0, 9]]), "cs.json")
    assert error.value.path == "concept[1]"
