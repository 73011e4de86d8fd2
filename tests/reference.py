"""A reference implementation of FHIR ValueSet expansion, kept apart from thodb.

The test suite takes its expected expansions from here and compares the database's
SQL expansion with them. So that a mistake in thodb cannot hide behind the same mistake
here, this module imports nothing from thodb and shares no code with it: it works on
FHIR JSON resources held as plain dicts, in memory, with the standard library only.

Semantics follow FHIR R5 ``ValueSet.compose`` (https://hl7.org/fhir/R5/valueset.html,
"Value Set Composition"). Members are ``(system, code)`` pairs::

    expansion = union(I(include) for include) - union(I(exclude) for exclude)
    I(x)      = system part of x  ∩  expansion of every canonical in x.valueSet

where the system part is the enumerated ``x.concept`` codes, else the codes of the
loaded code system ``x.system`` that satisfy every ``x.filter``, else all codes of that
code system; an element without ``system`` puts no bound on the imports.

Choices the specification leaves open, made here and relied on by the tests:

- An enumerated code is a member even when its code system is not loaded (SNOMED CT in
  the DICOM data) or is loaded as a fragment; a code that a loaded ``complete`` code
  system does not have is left out (HL7's terminology test ``simple-expand-enum-bad``).
- Display: the loaded code system's display, else the value set's ``concept.display``;
  where several value sets give different displays for one code, the smallest non-empty
  one (``min``), so that the result does not depend on the order of traversal.
- ``inactive``: the code system marks the concept inactive (property ``inactive`` true,
  or ``status`` retired); codes of unloaded code systems are active.
- A value set asked for without a version, with several versions loaded, resolves to the
  highest version (dot-separated parts compared numerically where they are digits).
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: ``(system, code)``, the identity of a value set member.
Key = tuple[str, str]

#: ``(url, version)`` of a loaded resource; version is ``None`` when it has none.
ResourceKey = tuple[str, str | None]

DEFAULT_CANONICAL_BASE = "http://terminology.hl7.org"

FHIR_XML_NAMESPACE = "{http://hl7.org/fhir}"

#: The kinds of :class:`ReferenceExpansionError`.
ERROR_KINDS = frozenset(
    {
        "no-compose",
        "missing-import",
        "cycle",
        "missing-code-system",
        "unsupported-filter",
    }
)

# Concept properties by their FHIR R5 URI (https://hl7.org/fhir/R5/codesystem.html
# "Concept Properties"); where a code system does not declare one, it goes by this code.
_PROPERTY_URIS = {
    "inactive": "http://hl7.org/fhir/concept-properties#inactive",
    "status": "http://hl7.org/fhir/concept-properties#status",
    "parent": "http://hl7.org/fhir/concept-properties#parent",
    "child": "http://hl7.org/fhir/concept-properties#child",
    "subsumedBy": "http://hl7.org/fhir/concept-properties#subsumedBy",
}


def canonical(url: str, version: str | None) -> str:
    """Join a url and an optional version into the ``url|version`` form."""
    return f"{url}|{version}" if version else url


def split_canonical(reference: str) -> ResourceKey:
    """Split ``url|version`` into url and version (``None`` when it has no version)."""
    url, _, version = reference.partition("|")
    return url, version or None


@dataclass(frozen=True)
class Member:
    """One code of an expansion, beside its ``(system, code)`` key.

    :param display: the display chosen as described in the module docstring, or ``None``
        when neither the code system nor any value set gives one.
    :param inactive: whether the loaded code system marks the concept inactive.
    """

    display: str | None
    inactive: bool


class ReferenceExpansionError(Exception):
    """A value set that the reference cannot expand, and why.

    :param kind: one of :data:`ERROR_KINDS`; for a value set that fails because a value
        set it imports fails, the kind of that root cause.
    :param detail: a sentence naming the value set (``url|version``), the element and
        the chain of imports down to the root cause.
    :param urls: the canonicals the root cause is about: the closed cycle
        ``[a, b, a]`` for ``cycle``, the missing canonical for ``missing-import`` and
        ``missing-code-system``, the value set without compose for ``no-compose``, the
        value set holding the filter for ``unsupported-filter``.
    """

    def __init__(
        self, kind: str, detail: str, *, urls: list[str] | None = None
    ) -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(
                f"unknown error kind {kind!r}; expected one of {ERROR_KINDS}"
            )
        self.kind = kind
        self.detail = detail
        self.urls = list(urls or [])
        super().__init__(f"{kind}: {detail}")

    def copy(self, detail: str | None = None) -> ReferenceExpansionError:
        """A fresh error of the same kind and urls, optionally with a new detail."""
        return ReferenceExpansionError(self.kind, detail or self.detail, urls=self.urls)


def _version_order(version: str | None) -> tuple[tuple[int, int, str], ...]:
    if version is None:
        return ()
    parts = re.split(r"[.\-]", version)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def _property_value(prop: Mapping[str, Any]) -> str | None:
    """The value of a ``concept.property`` as a string, the way filters compare it."""
    for name, value in prop.items():
        if not name.startswith("value"):
            continue
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, dict):
            return value.get("code")
        return str(value)
    return None


@dataclass(frozen=True)
class _Concept:
    display: str | None
    inactive: bool
    properties: Mapping[str, tuple[str, ...]]


class _CodeSystem:
    """A loaded CodeSystem resource, indexed by code, with its is-a hierarchy."""

    def __init__(self, resource: Mapping[str, Any]) -> None:
        self.url: str = resource["url"]
        self.version: str | None = resource.get("version")
        self.complete: bool = resource.get("content") == "complete"
        self.concepts: dict[str, _Concept] = {}
        self.children: dict[str, set[str]] = {}

        # The codes this code system uses for the standard properties, by their URI.
        declared = {p.get("uri"): p["code"] for p in resource.get("property", [])}
        names = {name: declared.get(uri, name) for name, uri in _PROPERTY_URIS.items()}

        # Nested concepts are walked without recursion; each entry carries its parent.
        pending: list[tuple[Mapping[str, Any], str | None]] = [
            (c, None) for c in resource.get("concept", [])
        ]
        while pending:
            entry, parent = pending.pop()
            code = entry["code"]
            properties: dict[str, list[str]] = {}
            for prop in entry.get("property", []):
                value = _property_value(prop)
                if value is not None:
                    properties.setdefault(prop["code"], []).append(value)
            inactive = "true" in properties.get(names["inactive"], ()) or (
                "retired" in properties.get(names["status"], ())
            )
            self.concepts[code] = _Concept(
                entry.get("display"),
                inactive,
                {name: tuple(values) for name, values in properties.items()},
            )
            if parent is not None:
                self._edge(parent, code)
            for name in ("parent", "subsumedBy"):
                for value in properties.get(names[name], ()):
                    self._edge(value, code)
            for value in properties.get(names["child"], ()):
                self._edge(code, value)
            pending.extend((child, code) for child in entry.get("concept", []))

    def _edge(self, parent: str, child: str) -> None:
        self.children.setdefault(parent, set()).add(child)

    def descendants(self, code: str) -> set[str]:
        """Every code below ``code`` in the hierarchy, not ``code`` itself.

        A hierarchy with a cycle ends when a code is met a second time.
        """
        found: set[str] = set()
        pending = list(self.children.get(code, ()))
        while pending:
            child = pending.pop()
            if child not in found:
                found.add(child)
                pending.extend(self.children.get(child, ()))
        found.discard(code)
        return found

    def member(self, code: str, display: str | None = None) -> Member:
        """The member for ``code``; ``display`` serves when the code system has none."""
        concept = self.concepts.get(code)
        if concept is None:
            return Member(display, False)
        return Member(
            concept.display if concept.display is not None else display,
            concept.inactive,
        )


def _merge(a: Member, b: Member) -> Member:
    displays = [d for d in (a.display, b.display) if d is not None]
    return Member(min(displays) if displays else None, a.inactive or b.inactive)


def _add_member(target: dict[Key, Member], key: Key, member: Member) -> None:
    known = target.get(key)
    target[key] = member if known is None else _merge(known, member)


def _intersect(a: Mapping[Key, Member], b: Mapping[Key, Member]) -> dict[Key, Member]:
    if len(b) < len(a):
        a, b = b, a
    return {key: _merge(member, b[key]) for key, member in a.items() if key in b}


class Terminology:
    """A set of loaded CodeSystem and ValueSet resources that can expand value sets.

    :param canonical_base: the base that gives a resource without ``url`` its canonical
        url, ``<base>/ValueSet/<id>`` or ``<base>/CodeSystem/<id>`` (THO source files).
    """

    def __init__(self, canonical_base: str = DEFAULT_CANONICAL_BASE) -> None:
        self.canonical_base = canonical_base.rstrip("/")
        self._code_systems: dict[str, dict[str | None, _CodeSystem]] = {}
        self._value_sets: dict[str, dict[str | None, dict[str, Any]]] = {}
        self._expansions: dict[
            ResourceKey, dict[Key, Member] | ReferenceExpansionError
        ] = {}

    @classmethod
    def from_paths(
        cls, *paths: str | Path, canonical_base: str = DEFAULT_CANONICAL_BASE
    ) -> Terminology:
        """Load resources from files and directories (searched recursively).

        ``*.json`` files may hold a CodeSystem, a ValueSet or a Bundle of them; other
        JSON (such as a ``manifest.json``) is skipped. ``*.xml`` files must hold a FHIR
        XML ValueSet, read by :func:`parse_value_set_xml`.

        :raises ValueError: for XML that is not a ValueSet, or a resource loaded twice.
        """
        terminology = cls(canonical_base)
        for path in paths:
            for resource in _read_resources(Path(path)):
                terminology.add(resource)
        return terminology

    def add(self, resource: Mapping[str, Any]) -> None:
        """Load one CodeSystem or ValueSet given in FHIR JSON form.

        A resource without ``url`` gets ``<canonical_base>/<resourceType>/<id>``. The
        resource is copied (shallowly), not kept. Adding forgets the expansions computed
        so far.

        :raises ValueError: for another resource type, a resource with neither url nor
            id, or a ``url|version`` that is already loaded.
        """
        kind = resource.get("resourceType")
        if kind not in ("CodeSystem", "ValueSet"):
            raise ValueError(f"expected a CodeSystem or ValueSet, got {kind!r}")
        resource = dict(resource)
        if "url" not in resource:
            if "id" not in resource:
                raise ValueError(
                    f"a {kind} needs a url or an id to have a canonical url"
                )
            resource["url"] = f"{self.canonical_base}/{kind}/{resource['id']}"

        url, version = resource["url"], resource.get("version")
        loaded: Mapping[str, Mapping[str | None, object]]
        loaded = self._code_systems if kind == "CodeSystem" else self._value_sets
        if version in loaded.get(url, {}):
            raise ValueError(f"{kind} {canonical(url, version)} is loaded twice")
        if kind == "CodeSystem":
            self._code_systems.setdefault(url, {})[version] = _CodeSystem(resource)
        else:
            self._value_sets.setdefault(url, {})[version] = resource
        self._expansions.clear()

    def value_set_keys(self) -> list[ResourceKey]:
        """``(url, version)`` of every loaded value set, sorted."""
        return sorted(
            (
                (url, version)
                for url, versions in self._value_sets.items()
                for version in versions
            ),
            key=lambda key: (key[0], _version_order(key[1])),
        )

    def value_set(self, url: str, version: str | None = None) -> dict[str, Any]:
        """The loaded ValueSet resource as stored (with its url); do not change it.

        :raises KeyError: when it is not loaded.
        """
        found = self._find(self._value_sets, url, version)
        if found is None:
            raise KeyError(f"ValueSet {canonical(url, version)} is not loaded")
        return found

    def expand(self, url: str, version: str | None = None) -> dict[Key, Member]:
        """Expand a loaded value set.

        :returns: a new dict from ``(system, code)`` to :class:`Member`.
        :raises KeyError: when the value set is not loaded.
        :raises ReferenceExpansionError: when it cannot be expanded.
        """
        return dict(self._expand(self._value_set_key(url, version), []))

    def expandable(
        self,
    ) -> dict[ResourceKey, dict[Key, Member] | ReferenceExpansionError]:
        """Expand every loaded value set; each maps to its members or to its error."""
        results: dict[ResourceKey, dict[Key, Member] | ReferenceExpansionError] = {}
        for url, version in self.value_set_keys():
            try:
                results[url, version] = self.expand(url, version)
            except ReferenceExpansionError as error:
                results[url, version] = error
        return results

    def imports(self, url: str, version: str | None = None) -> list[str]:
        """The canonicals a value set imports (``compose.*.valueSet``), in order."""
        compose = self.value_set(url, version).get("compose") or {}
        found: list[str] = []
        for element in compose.get("include", []) + compose.get("exclude", []):
            found.extend(c for c in element.get("valueSet", []) if c not in found)
        return found

    def import_closure(
        self, url: str, version: str | None = None
    ) -> dict[ResourceKey, int]:
        """Every value set a value set reaches through imports, with its depth.

        The depth is the length of the longest import chain from the value set (a direct
        import is 1), so the largest depth is how many levels deep the imports go.

        :raises ReferenceExpansionError: ``missing-import`` or ``cycle``.
        """
        root = self._value_set_key(url, version)

        # Depth-first search gives a post-order; reversed, it lists every value set
        # after all that import it, so longest depths are settled in one pass.
        post_order: list[ResourceKey] = []
        edges: dict[ResourceKey, list[ResourceKey]] = {}
        path: list[ResourceKey] = []

        def visit(key: ResourceKey) -> None:
            path.append(key)
            edges[key] = []
            for reference in self.imports(*key):
                child = self._resolve_import(reference, key)
                if child in path:
                    raise _cycle_error(path, child, key)
                edges[key].append(child)
                if child not in edges:
                    visit(child)
            path.pop()
            post_order.append(key)

        visit(root)
        depth = {root: 0}
        for key in reversed(post_order):
            for child in edges[key]:
                depth[child] = max(depth.get(child, 0), depth[key] + 1)
        del depth[root]
        return depth

    # -- resolution -------------------------------------------------------------------

    @staticmethod
    def _find(
        store: Mapping[str, Mapping[str | None, T]], url: str, version: str | None
    ) -> T | None:
        versions = store.get(url)
        if not versions:
            return None
        if version is not None:
            return versions.get(version)
        return versions[max(versions, key=_version_order)]

    def _value_set_key(self, url: str, version: str | None) -> ResourceKey:
        resource = self.value_set(url, version)
        return resource["url"], resource.get("version")

    def _resolve_import(self, reference: str, owner: ResourceKey) -> ResourceKey:
        url, version = split_canonical(reference)
        if self._find(self._value_sets, url, version) is None:
            raise ReferenceExpansionError(
                "missing-import",
                f"{canonical(*owner)} imports {reference}, which is not loaded",
                urls=[reference],
            )
        return self._value_set_key(url, version)

    # -- expansion --------------------------------------------------------------------

    def _expand(self, key: ResourceKey, path: list[ResourceKey]) -> dict[Key, Member]:
        """Expand a value set; ``path`` holds the value sets whose imports led here."""
        known = self._expansions.get(key)
        if isinstance(known, ReferenceExpansionError):
            raise known.copy()
        if known is not None:
            return known

        path.append(key)
        try:
            members = self._compose(key, path)
        except ReferenceExpansionError as error:
            # Every error is a property of the value set, not of the path that reached
            # it (a value set reaching a cycle cannot be expanded from anywhere).
            self._expansions[key] = error
            raise
        finally:
            path.pop()
        self._expansions[key] = members
        return members

    def _compose(self, key: ResourceKey, path: list[ResourceKey]) -> dict[Key, Member]:
        owner = canonical(*key)
        compose = self.value_set(*key).get("compose")
        if not compose:
            raise ReferenceExpansionError(
                "no-compose", f"{owner} has no compose", urls=[owner]
            )

        members: dict[Key, Member] = {}
        for i, include in enumerate(compose.get("include", [])):
            selected = self._select(include, f"compose.include[{i}]", path)
            for member_key, member in selected.items():
                _add_member(members, member_key, member)
        for i, exclude in enumerate(compose.get("exclude", [])):
            for member_key in self._select(exclude, f"compose.exclude[{i}]", path):
                members.pop(member_key, None)
        return members

    def _select(
        self, element: Mapping[str, Any], where: str, path: list[ResourceKey]
    ) -> Mapping[Key, Member]:
        """``I(x)`` of one include or exclude element (see the module docstring)."""
        owner = path[-1]
        references = element.get("valueSet", [])
        if "system" not in element:
            if not references or element.get("concept") or element.get("filter"):
                raise ValueError(
                    f"{canonical(*owner)} {where}: needs a system, or valueSet alone"
                )
            selected = None
        else:
            selected = self._system_part(element, canonical(*owner), where)

        for reference in references:
            child = self._resolve_import(reference, owner)
            if child in path:
                raise _cycle_error(path, child, owner)
            try:
                imported = self._expand(child, path)
            except ReferenceExpansionError as error:
                raise error.copy(
                    f"{canonical(*owner)} {where} imports {reference}: {error.detail}"
                ) from None
            selected = imported if selected is None else _intersect(selected, imported)
        return selected if selected is not None else {}

    def _system_part(
        self, element: Mapping[str, Any], owner: str, where: str
    ) -> dict[Key, Member]:
        system, version = element["system"], element.get("version")
        code_system = self._find(self._code_systems, system, version)
        concepts, filters = element.get("concept"), element.get("filter")
        if concepts and filters:
            raise ValueError(
                f"{owner} {where}: has both concept and filter (FHIR vsd-3)"
            )

        if concepts:
            selected: dict[Key, Member] = {}
            for concept in concepts:
                code, display = concept["code"], concept.get("display")
                if (
                    code_system
                    and code_system.complete
                    and code not in code_system.concepts
                ):
                    continue  # not a code of the system (HL7 tx tests: enum-bad)
                member = (
                    code_system.member(code, display)
                    if code_system
                    else Member(display, False)
                )
                _add_member(selected, (system, code), member)
            return selected

        if code_system is None:
            raise ReferenceExpansionError(
                "missing-code-system",
                f"{owner} {where} takes {'codes by filter' if filters else 'all codes'}"
                f" of {canonical(system, version)}, which is not loaded",
                urls=[canonical(system, version)],
            )
        codes = set(code_system.concepts)
        for i, condition in enumerate(filters or []):
            codes &= _filter(code_system, condition, owner, f"{where}.filter[{i}]")
        return {(system, code): code_system.member(code) for code in codes}


def _filter(
    code_system: _CodeSystem, condition: Mapping[str, Any], owner: str, where: str
) -> set[str]:
    """The codes that satisfy one ``compose.include.filter``.

    ``is-a`` takes the code and everything below it, ``descendent-of`` only what is
    below it (FHIR R5 filter-operator codes); ``=`` compares a concept property's value.
    """
    prop, op, value = (
        condition.get("property"),
        condition.get("op"),
        condition.get("value"),
    )
    if op in ("is-a", "descendent-of") and prop == "concept" and value is not None:
        below = code_system.descendants(value)
        if op == "is-a" and value in code_system.concepts:
            below.add(value)
        return below
    if op == "=" and prop not in (None, "concept"):
        return {
            code
            for code, concept in code_system.concepts.items()
            if value in concept.properties.get(prop, ())
        }
    raise ReferenceExpansionError(
        "unsupported-filter",
        f"{owner} {where}: filter {prop} {op} {value} is not supported (supported: "
        "concept is-a, concept descendent-of, <property> =)",
        urls=[owner],
    )


def _cycle_error(
    path: list[ResourceKey], child: ResourceKey, owner: ResourceKey
) -> ReferenceExpansionError:
    cycle = [canonical(*key) for key in path[path.index(child) :]] + [canonical(*child)]
    return ReferenceExpansionError(
        "cycle",
        f"{canonical(*owner)} imports {canonical(*child)}, which leads back to it: "
        + " -> ".join(cycle),
        urls=cycle,
    )


# -- reading files --------------------------------------------------------------------


def _read_resources(path: Path) -> Iterator[dict[str, Any]]:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    for file in files:
        if file.suffix == ".json":
            data = json.loads(file.read_text(encoding="utf-8"))
            if data.get("resourceType") == "Bundle":
                for entry in data.get("entry", []):
                    if entry.get("resource", {}).get("resourceType") in (
                        "CodeSystem",
                        "ValueSet",
                    ):
                        yield entry["resource"]
            elif data.get("resourceType") in ("CodeSystem", "ValueSet"):
                yield data
        elif file.suffix == ".xml":
            yield parse_value_set_xml(file)


def _xml_value(element: ET.Element, name: str) -> str | None:
    child = element.find(FHIR_XML_NAMESPACE + name)
    return None if child is None else child.get("value")


def _xml_values(element: ET.Element, name: str) -> list[str]:
    return [
        value
        for child in element.findall(FHIR_XML_NAMESPACE + name)
        if (value := child.get("value")) is not None
    ]


def _xml_compose_element(element: ET.Element) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name in ("system", "version"):
        if (value := _xml_value(element, name)) is not None:
            result[name] = value
    concepts = []
    for concept in element.findall(FHIR_XML_NAMESPACE + "concept"):
        entry = {"code": _xml_value(concept, "code")}
        if (display := _xml_value(concept, "display")) is not None:
            entry["display"] = display
        concepts.append(entry)
    filters = [
        {name: _xml_value(f, name) for name in ("property", "op", "value")}
        for f in element.findall(FHIR_XML_NAMESPACE + "filter")
    ]
    for name, values in (
        ("concept", concepts),
        ("filter", filters),
        ("valueSet", _xml_values(element, "valueSet")),
    ):
        if values:
            result[name] = values
    return result


def parse_value_set_xml(path: str | Path) -> dict[str, Any]:
    """Read a FHIR XML ValueSet into FHIR JSON form, keeping only what expansion needs.

    Kept: ``id``, ``url``, ``version``, ``status`` and ``compose.include/exclude`` with
    their ``system``, ``version``, ``concept`` (code, display), ``filter`` and
    ``valueSet``. The files are trusted project data, so the standard library's parser
    is used.

    :raises ValueError: when the root element is not a FHIR ValueSet.
    """
    root = ET.parse(path).getroot()
    if root.tag != FHIR_XML_NAMESPACE + "ValueSet":
        raise ValueError(f"{path}: expected a FHIR XML ValueSet, found {root.tag}")
    resource: dict[str, Any] = {"resourceType": "ValueSet"}
    for name in ("id", "url", "version", "status"):
        if (value := _xml_value(root, name)) is not None:
            resource[name] = value
    compose = root.find(FHIR_XML_NAMESPACE + "compose")
    if compose is not None:
        resource["compose"] = {
            name: [_xml_compose_element(e) for e in elements]
            for name in ("include", "exclude")
            if (elements := compose.findall(FHIR_XML_NAMESPACE + name))
        }
    return resource
