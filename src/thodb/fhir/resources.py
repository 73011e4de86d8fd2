"""FHIR CodeSystem and ValueSet resources in thodb's internal form.

Input arrives as FHIR JSON (XML is turned into the same dicts by :mod:`thodb.fhir.xml`);
this module checks it and turns it into records that the loader writes. Errors name the
element path, e.g. ``compose.include[2].concept[5].code``.

Element names follow FHIR R4 CodeSystem and ValueSet; R5-only elements are ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import operator
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from thodb.canonical import DEFAULT_CANONICAL_BASE, split_canonical
from thodb.errors import LoadError

#: FHIR's largest string, in characters (R5 datatypes.html#string).
MAX_STRING = 1024 * 1024

#: The largest url, version, code or property value thodb stores, in UTF-8 bytes: a
#: PostgreSQL index entry holds at most 8191 bytes (THO's longest value is 4.6 kB).
MAX_KEY_BYTES = 8000

#: Filter operators of FHIR R5 ValueSet.compose.include.filter.op (filter-operator).
FILTER_OPERATORS = frozenset(
    {
        "=",
        "is-a",
        "descendent-of",
        "is-not-a",
        "regex",
        "in",
        "not-in",
        "generalizes",
        "child-of",
        "descendent-leaf",
        "exists",
    }
)

# Concept properties with a meaning FHIR defines (R5 codesystem-concept-properties),
# known by their code or by the uri a code system declares for them.
_CONCEPT_PROPERTIES_URI = "http://hl7.org/fhir/concept-properties#"
# The concept properties of that code system that change how thodb reads a concept. A
# uri naming any other one (``#notSelectableX``) gives no meaning, so the property's
# code decides (HL7 tx: notSelectable-unprop-true).
_MEANINGFUL = frozenset(
    {"parent", "child", "subsumedBy", "inactive", "status", "notSelectable", "abstract"}
)
_HIERARCHY_UP = frozenset({"parent", "subsumedBy"})
_INACTIVE_STATUSES = frozenset({"retired", "inactive"})

_STANDARDS_STATUS = (
    "http://hl7.org/fhir/StructureDefinition/structuredefinition-standards-status"
)
_VALUESET_SUPPLEMENT = "http://hl7.org/fhir/StructureDefinition/valueset-supplement"
_EXPANSION_PARAMETER = (
    "http://hl7.org/fhir/StructureDefinition/valueset-expansion-parameter"
)

# Extensions of include.concept that thodb keeps, by the name it gives them: the
# properties a terminology service shows for them, and the code's status in the value
# set (R5 extensions registry; HL7 tx: extensions-echo-enumerated).
_COMPOSE_CONCEPT_EXTENSIONS = {
    "http://hl7.org/fhir/StructureDefinition/valueset-conceptOrder": "order",
    "http://hl7.org/fhir/StructureDefinition/valueset-label": "label",
    "http://hl7.org/fhir/StructureDefinition/itemWeight": "weight",
    "http://hl7.org/fhir/StructureDefinition/valueset-deprecated": "deprecated",
    _STANDARDS_STATUS: "status",
}

# Concept extensions read as properties (see _extension_properties).
_EXTENSION_PROPERTIES = {
    "http://hl7.org/fhir/StructureDefinition/codesystem-conceptOrder": "order",
    "http://hl7.org/fhir/StructureDefinition/codesystem-label": "label",
    "http://hl7.org/fhir/StructureDefinition/itemWeight": "weight",
    "http://hl7.org/fhir/StructureDefinition/structuredefinition-standards-status": "status",
}

_PROPERTY_VALUE_TYPES = {
    "valueCode": "code",
    "valueCoding": "Coding",
    "valueString": "string",
    "valueInteger": "integer",
    "valueBoolean": "boolean",
    "valueDateTime": "dateTime",
    "valueDecimal": "decimal",
}


_R = TypeVar("_R")


def _pickled_by_fields(cls: type[_R]) -> type[_R]:
    """Pickle the records of ``cls`` as the class and a tuple of its fields.

    The parse workers send their records to the loading process pickled (see
    :mod:`thodb.fhir.pool`); by default each record goes as a dict of its fields.
    As a tuple, THO's records pickle in 0.23 s instead of 0.32 s, unpickle in 0.15
    instead of 0.21 s, and take 12 MB instead of 16.
    """
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    fields_of = operator.attrgetter(*names)

    def reduce(record: _R) -> tuple[type[_R], tuple[Any, ...]]:
        return cls, fields_of(record)

    cls.__reduce__ = reduce  # type: ignore[assignment,method-assign]
    return cls


@_pickled_by_fields
@dataclass(slots=True)
class DesignationRecord:
    """A ``concept.designation``."""

    value: str
    language: str | None = None
    use_system: str | None = None
    use_code: str | None = None
    standards_status: str | None = None


@_pickled_by_fields
@dataclass(slots=True)
class PropertyRecord:
    """A ``concept.property`` value, as text (see :class:`thodb.models.ConceptProperty`)."""

    code: str
    type: str
    value: str | None
    value_system: str | None = None


@_pickled_by_fields
@dataclass(slots=True)
class ConceptRecord:
    """A concept of a code system, with its parents as codes."""

    code: str
    display: str | None
    definition: str | None
    status: str | None = None
    inactive: bool = False
    abstract: bool = False
    parents: list[str] = field(default_factory=list)
    designations: list[DesignationRecord] = field(default_factory=list)
    properties: list[PropertyRecord] = field(default_factory=list)


@_pickled_by_fields
@dataclass
class CodeSystemRecord:
    """A CodeSystem resource ready to be written."""

    url: str
    version: str | None
    source: str
    content_hash: str
    name: str | None = None
    title: str | None = None
    status: str | None = None
    content: str | None = None
    hierarchy_meaning: str | None = None
    case_sensitive: bool | None = None
    supplements: str | None = None
    value_set: str | None = None
    language: str | None = None
    experimental: bool | None = None
    standards_status: str | None = None
    properties: list[tuple[str, str | None, str | None, str | None]] = field(
        default_factory=list
    )
    concepts: list[ConceptRecord] = field(default_factory=list)


@_pickled_by_fields
@dataclass(slots=True)
class ComposeConceptRecord:
    """An ``include.concept`` (or ``exclude.concept``) and what the value set says of it."""

    code: str
    display: str | None = None
    designations: list[DesignationRecord] = field(default_factory=list)
    #: Extension properties (``label``, ``order``, ``weight``), as in a code system.
    properties: list[PropertyRecord] = field(default_factory=list)
    #: ``deprecated`` (``valueset-deprecated``) or the standards-status extension.
    standards_status: str | None = None


@_pickled_by_fields
@dataclass
class RuleRecord:
    """One ``compose.include`` or ``compose.exclude`` element."""

    kind: str
    position: int
    system: str | None
    version: str | None
    concepts: list[ComposeConceptRecord] = field(default_factory=list)
    filters: list[tuple[str, str, str]] = field(default_factory=list)
    imports: list[tuple[str, str | None]] = field(default_factory=list)


@_pickled_by_fields
@dataclass
class ValueSetRecord:
    """A ValueSet resource ready to be written."""

    url: str
    version: str | None
    source: str
    content_hash: str
    has_compose: bool
    name: str | None = None
    title: str | None = None
    status: str | None = None
    language: str | None = None
    experimental: bool | None = None
    standards_status: str | None = None
    compose_inactive: bool | None = None
    #: Canonicals of the ``valueset-supplement`` extensions.
    supplements: list[str] = field(default_factory=list)
    #: ``valueset-expansion-parameter`` extensions of ``compose``: (name, value).
    expansion_parameters: list[tuple[str, str]] = field(default_factory=list)
    rules: list[RuleRecord] = field(default_factory=list)


Record = CodeSystemRecord | ValueSetRecord


def content_hash(resource: dict[str, Any]) -> str:
    """SHA-256 of the resource's canonical JSON (sorted keys, no insignificant spaces)."""
    return _sha256(_canonical(resource))


def _canonical(value: Any) -> str:
    return _ENCODER.encode(value)


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sha256(text: str) -> str:
    # surrogatepass: a lone surrogate is reported, with its element path, by the
    # checks that follow, not here.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class _StreamedHash:
    """:func:`content_hash` of a resource whose ``concept`` items arrive one by one.

    The canonical text is the members sorted before ``concept``, the items, then the
    members sorted after it: the same text ``content_hash`` makes of the whole resource.
    Items are encoded a batch at a time (an array's text is its items' texts joined).
    """

    _BATCH = 1000

    def __init__(self, resource: dict[str, Any]) -> None:
        before = _canonical({k: v for k, v in resource.items() if k < "concept"})
        after = _canonical({k: v for k, v in resource.items() if k > "concept"})
        self._after = "]}" if after == "{}" else "]," + after[1:]
        self._hash = hashlib.sha256()
        self._update(before[:-1] + ("," if before != "{}" else "") + '"concept":[')
        self._pending: list[Any] = []
        self._separator = ""

    def _update(self, text: str) -> None:
        self._hash.update(text.encode("utf-8", "surrogatepass"))

    def _flush(self) -> None:
        if self._pending:
            self._update(self._separator + _canonical(self._pending)[1:-1])
            self._separator = ","
            self._pending.clear()

    def items(self, items: Iterable[Any]) -> Iterator[Any]:
        """``items``, each added to the canonical text as it passes."""
        for item in items:
            self._pending.append(item)
            if len(self._pending) == self._BATCH:
                self._flush()
            yield item

    def hexdigest(self) -> str:
        self._flush()
        self._update(self._after)
        return self._hash.hexdigest()


class _Reader:
    """Typed access to one resource's elements, raising errors that name the path."""

    def __init__(self, source: str, prefix: str) -> None:
        self.source = source
        self.prefix = prefix

    def error(self, path: str, message: str) -> LoadError:
        return LoadError(self.source, self.prefix + path, message)

    def string(self, obj: dict[str, Any], key: str, path: str) -> str | None:
        value = obj.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(_join(path, key), f"must be a string, not {_kind(value)}")
        if value.isascii() and "\x00" not in value and len(value) <= MAX_STRING:
            return value  # most strings: nothing more to check (or to name the path of)
        return self.text(value, _join(path, key))

    def text(self, value: str, path: str) -> str:
        """``value``, checked to be text a database column can hold."""
        if len(value) > MAX_STRING:
            raise self.error(
                path,
                f"is longer than {MAX_STRING:,} characters, FHIR's limit for a string",
            )
        if "\x00" in value:
            raise self.error(
                path,
                "contains a NUL character (U+0000), which FHIR strings may not hold",
            )
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise self.error(
                    path, "contains a lone surrogate: the text is not valid Unicode"
                ) from None
        return value

    def key(self, value: str | None, path: str) -> str | None:
        """``value``, checked to fit the database indexes that look it up."""
        # A character takes at most 4 bytes in UTF-8: a short value needs no encoding.
        if (
            value is not None
            and len(value) * 4 > MAX_KEY_BYTES
            and len(value.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES
        ):
            raise self.error(
                path,
                f"is longer than {MAX_KEY_BYTES:,} bytes, more than thodb can index for "
                "look-ups (urls, versions, codes and property values)",
            )
        return value

    def required(self, obj: dict[str, Any], key: str, path: str) -> str:
        value = self.string(obj, key, path)
        if value is None or not value.strip():
            raise self.error(_join(path, key), "is missing or empty")
        return value

    def boolean(self, obj: dict[str, Any], key: str, path: str) -> bool | None:
        value = obj.get(key)
        if value is None or isinstance(value, bool):
            return value
        raise self.error(_join(path, key), f"must be true or false, not {value!r}")

    def objects(self, obj: dict[str, Any], key: str, path: str) -> list[dict[str, Any]]:
        value = obj.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(_join(path, key), "must be an array of objects")
        return value

    def strings(self, obj: dict[str, Any], key: str, path: str) -> list[str]:
        value = obj.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(_join(path, key), "must be an array of strings")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise self.error(
                    f"{_join(path, key)}[{i}]", "must be a non-empty string"
                )
        return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _shared(value: str | None) -> str | None:
    """``value`` as the one string of its text (:func:`sys.intern`), for the texts a
    record repeats many times (languages, uses, property codes and systems)."""
    return None if value is None else sys.intern(value)


def _item(path: str, key: str, index: int) -> str:
    return f"{_join(path, key)}[{index}]"


def _plain_key(value: str) -> bool:
    """True for text that needs none of :meth:`_Reader.text`'s and
    :meth:`_Reader.key`'s checks: ASCII (a byte a character), no NUL, short enough to
    be indexed (most codes and values)."""
    return value.isascii() and len(value) <= MAX_KEY_BYTES and "\x00" not in value


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def parse_resource(
    resource: dict[str, Any],
    source: str,
    *,
    canonical_base: str = DEFAULT_CANONICAL_BASE,
    path_prefix: str = "",
    concepts: Iterable[Any] | None = None,
) -> Record:
    """Check a CodeSystem or ValueSet in FHIR JSON form and turn it into a record.

    :param resource: the resource as parsed JSON (or XML turned into the same form).
    :param source: the file it came from, for error messages.
    :param canonical_base: base for ``url`` when the resource has none:
        ``<canonical_base>/<resourceType>/<id>``.
    :param path_prefix: prefix of element paths (``entry[3].resource.`` in a Bundle).
    :param concepts: the items of a CodeSystem's ``concept`` array, when ``resource``
        holds its other elements only (:mod:`thodb.fhir.stream`): they are read once,
        in order, and the record is the one the whole resource would give.
    :raises LoadError: naming the file and element path of the first problem.
    """
    reader = _Reader(source, path_prefix)
    kind = resource.get("resourceType")
    if kind == "CodeSystem":
        return _code_system(reader, resource, canonical_base, concepts)
    if kind == "ValueSet":
        return _value_set(reader, resource, canonical_base)
    raise reader.error(
        "resourceType", f"expected CodeSystem or ValueSet, found {kind!r}"
    )


def _url(reader: _Reader, resource: dict[str, Any], base: str) -> str:
    url = reader.key(reader.string(resource, "url", ""), "url")
    if url:
        return url
    rid = reader.string(resource, "id", "")
    if not rid:
        raise reader.error("url", "is missing, and there is no id to derive it from")
    return f"{base.rstrip('/')}/{resource['resourceType']}/{rid}"


def _code_system(
    reader: _Reader,
    resource: dict[str, Any],
    base: str,
    streamed: Iterable[Any] | None,
) -> CodeSystemRecord:
    record = CodeSystemRecord(
        url=_url(reader, resource, base),
        version=reader.key(reader.string(resource, "version", ""), "version"),
        source=reader.source,
        content_hash="" if streamed is not None else content_hash(resource),
        name=reader.string(resource, "name", ""),
        title=reader.string(resource, "title", ""),
        status=reader.string(resource, "status", ""),
        content=reader.string(resource, "content", ""),
        hierarchy_meaning=reader.string(resource, "hierarchyMeaning", ""),
        case_sensitive=reader.boolean(resource, "caseSensitive", ""),
        supplements=reader.string(resource, "supplements", ""),
        value_set=reader.string(resource, "valueSet", ""),
        language=reader.string(resource, "language", ""),
        experimental=reader.boolean(resource, "experimental", ""),
        standards_status=_standards_status(reader, resource, ""),
    )

    meaning: dict[str, str] = {}
    for i, prop in enumerate(reader.objects(resource, "property", "")):
        path = f"property[{i}]"
        code = reader.required(prop, "code", path)
        uri = reader.string(prop, "uri", path)
        record.properties.append(
            (
                code,
                uri,
                reader.string(prop, "type", path),
                reader.string(prop, "description", path),
            )
        )
        if uri and uri.startswith(_CONCEPT_PROPERTIES_URI):
            known = uri[len(_CONCEPT_PROPERTIES_URI) :]
            if known in _MEANINGFUL:
                meaning[code] = known

    seen: dict[str, str] = {}
    children: list[tuple[str, str, str]] = []
    if streamed is None:
        concepts: Iterable[Any] = reader.objects(resource, "concept", "")
    else:
        hashed = _StreamedHash(resource)
        concepts = _objects(reader, hashed.items(streamed), "concept")
    _concepts(reader, concepts, "", None, record, meaning, seen, children)
    if streamed is not None:
        record.content_hash = hashed.hexdigest()
    _check_hierarchy(reader, record, seen, children)
    return record


def _objects(
    reader: _Reader, items: Iterable[Any], path: str
) -> Iterator[dict[str, Any]]:
    # _Reader.objects for an array read item by item.
    for item in items:
        if not isinstance(item, dict):
            raise reader.error(path, "must be an array of objects")
        yield item


def _concepts(
    reader: _Reader,
    objects: Iterable[dict[str, Any]],
    parent_path: str,
    parent_code: str | None,
    record: CodeSystemRecord,
    meaning: dict[str, str],
    seen: dict[str, str],
    children: list[tuple[str, str, str]],
) -> None:
    for i, obj in enumerate(objects):
        path = f"{_join(parent_path, 'concept')}[{i}]"
        code = str(reader.key(reader.required(obj, "code", path), f"{path}.code"))
        if code in seen:
            raise reader.error(
                f"{path}.code", f"duplicate code {code!r} (first at {seen[code]})"
            )
        seen[code] = path
        concept = ConceptRecord(
            code=code,
            display=reader.string(obj, "display", path),
            definition=reader.string(obj, "definition", path),
        )
        if parent_code is not None:
            concept.parents.append(parent_code)
        for j, designation in enumerate(reader.objects(obj, "designation", path)):
            dpath = f"{path}.designation[{j}]"
            concept.designations.append(_designation(reader, designation, dpath))
        for j, prop in enumerate(reader.objects(obj, "property", path)):
            _property(reader, prop, path, j, concept, meaning, children)
        _extension_properties(reader, obj, path, concept)
        record.concepts.append(concept)
        nested = reader.objects(obj, "concept", path)
        _concepts(reader, nested, path, code, record, meaning, seen, children)


def _designation(
    reader: _Reader, designation: dict[str, Any], path: str
) -> DesignationRecord:
    raw_use = designation.get("use")
    use: dict[str, Any] = raw_use if isinstance(raw_use, dict) else {}
    return DesignationRecord(
        value=reader.required(designation, "value", path),
        language=_shared(reader.string(designation, "language", path)),
        use_system=_shared(reader.string(use, "system", f"{path}.use")),
        use_code=_shared(reader.string(use, "code", f"{path}.use")),
        standards_status=_standards_status(reader, designation, path),
    )


def _extension_value(
    reader: _Reader, obj: dict[str, Any], path: str, urls: Mapping[str, str]
) -> list[tuple[str, str, str]]:
    """(name, FHIR type, value as text) of each extension of ``obj`` named in ``urls``.

    ``urls`` maps an extension url to the name the caller knows it by; other
    extensions are ignored, as FHIR allows.
    """
    found: list[tuple[str, str, str]] = []
    for j, extension in enumerate(reader.objects(obj, "extension", path)):
        name = urls.get(str(extension.get("url", "")))
        if name is None:
            continue
        epath = f"{_join(path, 'extension')}[{j}]"
        keys = [key for key in extension if key.startswith("value")]
        if len(keys) != 1 or isinstance(extension[keys[0]], (dict, list)):
            raise reader.error(epath, "must have exactly one primitive value[x]")
        raw = extension[keys[0]]
        value = ("true" if raw else "false") if isinstance(raw, bool) else str(raw)
        found.append((name, _PROPERTY_VALUE_TYPES.get(keys[0], "string"), value))
    return found


def _standards_status(reader: _Reader, obj: dict[str, Any], path: str) -> str | None:
    values = _extension_value(reader, obj, path, {_STANDARDS_STATUS: "status"})
    return values[0][2] if values else None


def _property(
    reader: _Reader,
    prop: dict[str, Any],
    concept_path: str,
    index: int,
    concept: ConceptRecord,
    meaning: dict[str, str],
    children: list[tuple[str, str, str]],
) -> None:
    """Read the ``index``-th property of the concept at ``concept_path``.

    A code system can have millions of properties (SNOMED CT's relationships): the
    usual one, a short text code and text value, is checked inline, and the
    property's path is only made for an error or a child (300,000 properties: 0.33
    instead of 0.55 s).
    """
    code = prop.get("code")
    if not (type(code) is str and _plain_key(code) and code.strip()):
        code = reader.required(prop, "code", _item(concept_path, "property", index))
    found = [key for key in prop if key in _PROPERTY_VALUE_TYPES]
    if len(found) != 1:
        path = _item(concept_path, "property", index)
        raise reader.error(path, "must have exactly one value[x]")
    key = found[0]
    raw = prop[key]
    system = None
    if type(raw) is str and _plain_key(raw) and key != "valueCoding":
        value: str | None = raw
    elif key == "valueCoding":
        path = f"{_item(concept_path, 'property', index)}.valueCoding"
        if not isinstance(raw, dict):
            raise reader.error(path, "must be an object")
        system = reader.string(raw, "system", path)
        value = reader.string(raw, "code", path)
    elif isinstance(raw, bool):
        value = "true" if raw else "false"
    elif isinstance(raw, str):
        path = f"{_item(concept_path, 'property', index)}.{key}"
        value = reader.key(reader.text(raw, path), path)
    elif isinstance(raw, (int, float)):
        value = str(raw)
    else:
        path = f"{_item(concept_path, 'property', index)}.{key}"
        raise reader.error(path, f"must be a primitive, not {_kind(raw)}")
    # The code of each of a million properties as one string: the records of 350,000
    # concepts held 64 MB less. Interning the values too (parents are codes) saved
    # 114 MB but took 1.5 s more of their 7 s parse.
    concept.properties.append(
        PropertyRecord(
            sys.intern(code), _PROPERTY_VALUE_TYPES[key], value, _shared(system)
        )
    )

    role = meaning.get(code, code)
    if role in _HIERARCHY_UP and value:
        concept.parents.append(value)
    elif role == "child" and value:
        path = f"{_item(concept_path, 'property', index)}.{key}"
        children.append((concept.code, value, path))
    elif role == "inactive" and value == "true":
        concept.inactive = True
    elif role == "status" and value:
        concept.status = value
        concept.inactive = concept.inactive or value in _INACTIVE_STATUSES
    elif role in ("notSelectable", "abstract") and value == "true":
        concept.abstract = True


def _extension_properties(
    reader: _Reader, obj: dict[str, Any], path: str, concept: ConceptRecord
) -> None:
    """Read the concept extensions that FHIR terminology services show as properties.

    ``codesystem-conceptOrder`` is the ``order`` property, ``codesystem-label`` the
    ``label``, ``itemWeight`` the ``weight``, and ``structuredefinition-standards-status``
    the ``status`` (R5 extensions registry; HL7 tx: parameters-expand-supplement-none).
    A property of the same code given in ``concept.property`` wins.
    """
    given = {p.code for p in concept.properties}
    for j, extension in enumerate(reader.objects(obj, "extension", path)):
        code = _EXTENSION_PROPERTIES.get(str(extension.get("url", "")))
        if code is None or code in given:
            continue
        epath = f"{path}.extension[{j}]"
        found = [key for key in _PROPERTY_VALUE_TYPES if key in extension]
        if len(found) != 1 or isinstance(extension[found[0]], (dict, list)):
            raise reader.error(epath, "must have exactly one primitive value[x]")
        raw = extension[found[0]]
        kind = (
            "decimal"
            if code in ("order", "weight")
            else _PROPERTY_VALUE_TYPES[found[0]]
        )
        value = ("true" if raw else "false") if isinstance(raw, bool) else str(raw)
        concept.properties.append(PropertyRecord(code, kind, value))
        if code == "status":
            concept.status = concept.status or value
            concept.inactive = concept.inactive or value in _INACTIVE_STATUSES


def _check_hierarchy(
    reader: _Reader,
    record: CodeSystemRecord,
    seen: dict[str, str],
    children: list[tuple[str, str, str]],
) -> None:
    by_code = {concept.code: concept for concept in record.concepts}
    for parent, child, path in children:
        if child not in by_code:
            raise reader.error(
                path, f"child {child!r} is not a code of this code system"
            )
        if parent not in by_code[child].parents:
            by_code[child].parents.append(parent)
    # All parents at once (a million for a large code system); the first concept
    # with an unknown one is looked for only if there is one.
    parents = set(itertools.chain.from_iterable(c.parents for c in record.concepts))
    if not parents <= by_code.keys():
        for concept in record.concepts:
            for parent in concept.parents:
                if parent not in by_code:
                    raise reader.error(
                        seen[concept.code],
                        f"parent {parent!r} of {concept.code!r} is not a code of "
                        "this code system",
                    )
    _reject_cycles(reader, by_code, seen)


def _reject_cycles(
    reader: _Reader, by_code: dict[str, ConceptRecord], seen: dict[str, str]
) -> None:
    # Depth-first search over parent edges, each concept's parents walked by an
    # iterator: `path` is the current path, `done` what is known to reach no cycle
    # (350,000 concepts with 1,051,602 parents: 0.7 s, 1.1-1.3 s with a stack of
    # (code, index) pairs).
    done: set[str] = set()
    for start in by_code:
        if start in done:
            continue
        path = [start]
        on_path = {start}
        stack = [iter(by_code[start].parents)]
        while stack:
            for parent in stack[-1]:
                if parent in on_path:
                    cycle = path[path.index(parent) :] + [parent]
                    raise reader.error(
                        seen[path[-1]],
                        "concept hierarchy has a cycle: " + " -> ".join(cycle),
                    )
                if parent not in done:
                    path.append(parent)
                    on_path.add(parent)
                    stack.append(iter(by_code[parent].parents))
                    break
            else:
                stack.pop()
                code = path.pop()
                on_path.discard(code)
                done.add(code)


def _value_set(reader: _Reader, resource: dict[str, Any], base: str) -> ValueSetRecord:
    compose = resource.get("compose")
    if compose is not None and not isinstance(compose, dict):
        raise reader.error("compose", "must be an object")
    record = ValueSetRecord(
        url=_url(reader, resource, base),
        version=reader.key(reader.string(resource, "version", ""), "version"),
        source=reader.source,
        content_hash=content_hash(resource),
        has_compose=compose is not None,
        name=reader.string(resource, "name", ""),
        title=reader.string(resource, "title", ""),
        status=reader.string(resource, "status", ""),
        language=reader.string(resource, "language", ""),
        experimental=reader.boolean(resource, "experimental", ""),
        standards_status=_standards_status(reader, resource, ""),
        supplements=[
            value.strip()
            for _, _, value in _extension_value(
                reader, resource, "", {_VALUESET_SUPPLEMENT: "supplement"}
            )
        ],
    )
    if compose is None:
        return record
    record.compose_inactive = reader.boolean(compose, "inactive", "compose")
    record.expansion_parameters = _expansion_parameters(reader, compose)
    for kind in ("include", "exclude"):
        for i, rule in enumerate(reader.objects(compose, kind, "compose")):
            record.rules.append(_rule(reader, rule, f"compose.{kind}[{i}]", kind, i))
    if not any(rule.kind == "include" for rule in record.rules):
        raise reader.error("compose.include", "a compose needs at least one include")
    return record


def _expansion_parameters(
    reader: _Reader, compose: dict[str, Any]
) -> list[tuple[str, str]]:
    """The ``valueset-expansion-parameter`` extensions of ``compose``: (name, value)."""
    found: list[tuple[str, str]] = []
    for i, extension in enumerate(reader.objects(compose, "extension", "compose")):
        if extension.get("url") != _EXPANSION_PARAMETER:
            continue
        path = f"compose.extension[{i}]"
        parts = {
            name: value
            for name, _, value in _extension_value(
                reader, extension, path, {"name": "name", "value": "value"}
            )
        }
        if "name" not in parts or "value" not in parts:
            raise reader.error(path, "an expansion parameter needs a name and a value")
        found.append((parts["name"], parts["value"]))
    return found


def _compose_concept(
    reader: _Reader, concept: dict[str, Any], path: str
) -> ComposeConceptRecord:
    record = ComposeConceptRecord(
        code=str(reader.key(reader.required(concept, "code", path), f"{path}.code")),
        display=reader.string(concept, "display", path),
        designations=[
            _designation(reader, d, f"{path}.designation[{j}]")
            for j, d in enumerate(reader.objects(concept, "designation", path))
        ],
    )
    for name, type_, value in _extension_value(
        reader, concept, path, _COMPOSE_CONCEPT_EXTENSIONS
    ):
        if name == "deprecated":
            if value == "true":
                record.standards_status = record.standards_status or "deprecated"
        elif name == "status":
            record.standards_status = value
        else:
            kind = "decimal" if name in ("order", "weight") else type_
            record.properties.append(PropertyRecord(name, kind, value))
    return record


def _rule(
    reader: _Reader, obj: dict[str, Any], path: str, kind: str, position: int
) -> RuleRecord:
    rule = RuleRecord(
        kind=kind,
        position=position,
        system=reader.key(reader.string(obj, "system", path), f"{path}.system"),
        version=reader.key(reader.string(obj, "version", path), f"{path}.version"),
    )
    for reference in reader.strings(obj, "valueSet", path):
        url, version = split_canonical(reference.strip())
        rule.imports.append((url, version))
    for j, concept in enumerate(reader.objects(obj, "concept", path)):
        rule.concepts.append(_compose_concept(reader, concept, f"{path}.concept[{j}]"))
    for j, flt in enumerate(reader.objects(obj, "filter", path)):
        fpath = f"{path}.filter[{j}]"
        op = reader.required(flt, "op", fpath)
        if op not in FILTER_OPERATORS:
            raise reader.error(
                f"{fpath}.op",
                f"unknown filter operator {op!r} (FHIR defines: "
                + ", ".join(sorted(FILTER_OPERATORS))
                + ")",
            )
        value = flt.get("value")
        if isinstance(value, bool):
            value = "true" if value else "false"
        if not isinstance(value, str) or not value:
            raise reader.error(f"{fpath}.value", "is missing or empty")
        if op in ("in", "not-in"):
            value = ",".join(part.strip() for part in value.split(","))
        rule.filters.append((reader.required(flt, "property", fpath), op, value))

    if rule.system is None and not rule.imports:
        raise reader.error(path, "has neither system nor valueSet")
    if rule.system is None and (rule.concepts or rule.filters):
        raise reader.error(path, "lists concepts or filters but has no system")
    if rule.concepts and rule.filters:
        raise reader.error(path, "has both concept and filter; FHIR allows one of them")
    return rule
