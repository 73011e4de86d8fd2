"""Convert FHIR XML into the FHIR JSON form, as Python dicts.

The loader reads JSON and XML into one internal form, the FHIR JSON representation
(https://hl7.org/fhir/R4/json.html), so that a single code path writes to the database.
:func:`parse_xml` is the XML side. It follows https://hl7.org/fhir/R4/xml.html, which
R5 leaves unchanged:

- a primitive element carries its value in a ``value`` attribute and becomes a JSON
  string, boolean or number; its ``id`` and extensions go under ``_name``, as in JSON;
- any other element becomes an object; ``id`` and an extension's ``url`` are attributes;
- an element that may repeat becomes an array even when it occurs once (see
  ``_REPEATING``), and so does any element that occurs more than once;
- a resource inside another (``Bundle.entry.resource``, ``Parameters.parameter.resource``,
  ``contained``) is wrapped in an element named after its type, which becomes
  ``resourceType``;
- the narrative ``div`` is XHTML and is kept as its serialized text, as in JSON.

Decimals become what :func:`json.loads` makes of the same number in FHIR JSON: an
``int`` when the text has no fraction or exponent, else a ``float``. The XML and JSON
paths therefore give equal dicts; both lose trailing zeros (``1.50`` becomes ``1.5``),
and both must switch together if exact decimals are ever needed (``Decimal`` here and
``parse_float=Decimal`` there).

An element without a ``value`` attribute is taken to be complex. FHIR XML cannot tell a
primitive that has only extensions (no value) from a complex element that has only
extensions without a type table, so a lone ``<birthDate><extension .../></birthDate>``
becomes ``"birthDate": {"extension": [...]}`` rather than ``"_birthDate"``. Among
repeats of one element, one ``value`` attribute makes them all primitives.
"""

from __future__ import annotations

import codecs
import copy
import logging
import re
from typing import Any, Final
from xml.etree.ElementTree import Element, ParseError, XMLParser, tostring

# defusedxml ships no type information; types-defusedxml on PyPI has it.
from defusedxml import DefusedXmlException  # type: ignore[import-untyped]
from defusedxml import ElementTree as safe_etree

from thodb.errors import LoadError

logger = logging.getLogger(__name__)

_FHIR_NAMESPACE: Final = "http://hl7.org/fhir"
_XHTML_NAMESPACE: Final = "http://www.w3.org/1999/xhtml"
_FHIR_PREFIX: Final = "{" + _FHIR_NAMESPACE + "}"
_FHIR_PREFIX_LENGTH: Final = len(_FHIR_PREFIX)
_XHTML_DIV: Final = "{" + _XHTML_NAMESPACE + "}div"

_DTD_MESSAGE: Final = (
    "XML with a DTD or entity declarations is not accepted (it could fetch or expand "
    "content); FHIR XML never needs one, so remove the <!DOCTYPE ...> part"
)

# Elements whose maximum cardinality is "*", by the local name of their parent element;
# the children of a resource are listed under the resource type. Taken from the element
# definitions of CodeSystem, ValueSet, Bundle, Parameters and OperationOutcome in
# FHIR R4 (4.0.1) and R5 (5.0.0), e.g. https://hl7.org/fhir/R4/codesystem-definitions.html
# and https://hl7.org/fhir/R5/valueset-definitions.html, and of the datatypes they use
# (ContactDetail, CodeableConcept, Meta). Keying by the parent's name rather than its
# full path covers the recursive elements (concept.concept, contains.contains, part.part)
# and resources nested at any depth; in these resources no parent name listed here has
# two meanings that disagree. To add a resource, read the "Card." column of its
# definitions page in both releases.
_REPEATING_EVERYWHERE: Final = frozenset(
    {"extension", "modifierExtension", "contained", "coding"}
)
_METADATA_REPEATING: Final = frozenset(
    {
        "identifier",
        "contact",
        "useContext",
        "jurisdiction",
        # R5 only:
        "topic",
        "author",
        "editor",
        "reviewer",
        "endorser",
        "relatedArtifact",
    }
)
_INCLUDE_REPEATING: Final = frozenset({"valueSet", "concept", "filter"})
_CONTACT_REPEATING: Final = frozenset({"telecom"})
_REPEATING: Final[dict[str, frozenset[str]]] = {
    "CodeSystem": _METADATA_REPEATING | {"filter", "property", "concept"},
    "ValueSet": _METADATA_REPEATING,
    # CodeSystem.concept (nested concepts) and ValueSet.compose.include.concept.
    "concept": frozenset({"designation", "property", "concept"}),
    "designation": frozenset({"additionalUse"}),  # R5
    "filter": frozenset({"operator"}),  # CodeSystem.filter; include.filter.op is single
    "compose": frozenset({"include", "exclude", "property"}),  # property: R5
    "include": _INCLUDE_REPEATING,
    "exclude": _INCLUDE_REPEATING,
    "expansion": frozenset({"parameter", "property", "contains"}),  # property: R5
    "contains": frozenset({"designation", "property", "contains"}),  # property: R5
    "property": frozenset({"subProperty"}),  # R5 ValueSet.expansion.contains.property
    "Bundle": frozenset({"link", "entry"}),
    "entry": frozenset({"link"}),
    "Parameters": frozenset({"parameter"}),
    "parameter": frozenset({"part"}),
    "part": frozenset({"part"}),
    "OperationOutcome": frozenset({"issue"}),
    "issue": frozenset({"location", "expression"}),
    "meta": frozenset({"profile", "security", "tag"}),
    # ContactDetail; R5 uses it for author, editor, reviewer and endorser too.
    "contact": _CONTACT_REPEATING,
    "author": _CONTACT_REPEATING,
    "editor": _CONTACT_REPEATING,
    "reviewer": _CONTACT_REPEATING,
    "endorser": _CONTACT_REPEATING,
}
_NOTHING: Final[frozenset[str]] = frozenset()

# Primitive elements whose JSON form is not a string, from the same definitions:
# boolean; integer, unsignedInt and positiveInt; decimal. R5's integer64 is a string in JSON and
# stays one. Every other primitive (code, uri, date, dateTime, ...) is a string.
_BOOLEAN: Final = "boolean"
_INTEGER: Final = "integer"
_DECIMAL: Final = "decimal"
_PRIMITIVE_TYPES: Final[dict[str, str]] = {
    "experimental": _BOOLEAN,
    "caseSensitive": _BOOLEAN,
    "compositional": _BOOLEAN,
    "versionNeeded": _BOOLEAN,
    "immutable": _BOOLEAN,
    "inactive": _BOOLEAN,  # ValueSet.compose.inactive, ValueSet.expansion.contains
    "abstract": _BOOLEAN,
    "userSelected": _BOOLEAN,
    "valueBoolean": _BOOLEAN,
    "count": _INTEGER,  # CodeSystem.count
    "total": _INTEGER,  # ValueSet.expansion.total, Bundle.total
    "offset": _INTEGER,  # ValueSet.expansion.offset
    "rank": _INTEGER,  # ContactPoint.rank
    "valueInteger": _INTEGER,
    "valueUnsignedInt": _INTEGER,
    "valuePositiveInt": _INTEGER,
    "valueDecimal": _DECIMAL,
}
# "value" and "score" are strings in most places, so these go by parent: Quantity.value
# (and its kinds, and Range.low/high, Ratio), and Bundle.entry.search.score.
_DECIMAL_BY_PARENT: Final = frozenset(
    {
        ("valueQuantity", "value"),
        ("valueAge", "value"),
        ("valueCount", "value"),
        ("valueDistance", "value"),
        ("valueDuration", "value"),
        ("valueMoney", "value"),
        ("low", "value"),
        ("high", "value"),
        ("numerator", "value"),
        ("denominator", "value"),
        ("search", "score"),
    }
)
_INTEGER_TEXT: Final = re.compile(r"[-+]?[0-9]+")
# The regular expression of FHIR's decimal type, which is also JSON's number syntax.
_DECIMAL_TEXT: Final = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")

_COMPLEX_ATTRIBUTES: Final = frozenset({"id", "url"})
_PRIMITIVE_ATTRIBUTES: Final = frozenset({"id", "value"})


def parse_xml(data: bytes, source: str) -> dict[str, Any]:
    """Read a FHIR resource in XML into its FHIR JSON form.

    A DTD and entity declarations are refused, so a file can neither read other files
    (XXE) nor expand into gigabytes (billion laughs). A byte order mark, CRLF line ends and
    a missing XML declaration are fine.

    :param data: the bytes of the XML document.
    :param source: where the document came from, for error messages.
    :return: the resource as ``json.loads`` would return its FHIR JSON form, starting with
        ``resourceType``.
    :raises LoadError: if the XML is not well-formed, has a DTD, is not a FHIR resource, or
        breaks a FHIR XML rule; ``path`` names the element, e.g. ``concept[3].property[0]``.
    """
    root = _parse_document(data, source)
    if not root.tag.startswith(_FHIR_PREFIX):
        namespace, _, name = root.tag.rpartition("}")
        found = f"namespace {namespace[1:]}" if namespace else "no namespace"
        raise LoadError(
            source,
            "",
            f"the root element <{name}> has {found}; a FHIR resource must be in the "
            f'FHIR namespace (xmlns="{_FHIR_NAMESPACE}")',
        )
    try:
        return _Converter(source).resource(root, "")
    except RecursionError:
        raise LoadError(source, "", "XML is nested too deeply") from None


def _parse_document(data: bytes, source: str) -> Element:
    """Parse ``data`` with DTDs and entities refused; raise :class:`LoadError` if it fails.

    A document that cannot hold a DTD goes to ElementTree's C parser; any other one to
    defusedxml, which refuses DTDs and entities as it meets them but runs ElementTree's
    pure-Python parser (about twice the time on THO's XML files).
    """
    if _without_dtd(data):
        parser = XMLParser()
        try:
            parser.feed(data)
            root: Element = parser.close()
        except ParseError as exc:
            raise LoadError(source, "", f"XML is not well-formed: {exc}") from exc
        return root
    try:
        root = safe_etree.fromstring(
            data, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except DefusedXmlException as exc:
        raise LoadError(source, "", _DTD_MESSAGE) from exc
    except ParseError as exc:
        raise LoadError(source, "", f"XML is not well-formed: {exc}") from exc
    return root


# Encodings in which expat reads every ASCII character as the byte of that character (it
# knows these four itself; Python adds single-byte encodings, EBCDIC among them).
_ASCII_ENCODINGS: Final = frozenset({b"utf-8", b"utf8", b"us-ascii", b"iso-8859-1"})
_ENCODING: Final = re.compile(rb"""\sencoding\s*=\s*["']([^"']*)["']""")
# Optional white space, then "<": as an ASCII-compatible document starts.
_STARTS_WITH_MARKUP: Final = re.compile(rb"[ \t\r\n]*<")


def _without_dtd(data: bytes) -> bool:
    """True when ``data`` surely declares no DTD, and so no entity.

    Entities can only be declared in a DTD, which starts with the characters
    ``<!DOCTYPE``. In an encoding that writes ASCII as single bytes, a document
    without those bytes has no DTD; one with them (maybe only in a comment), or in
    another encoding (UTF-16, an EBCDIC code page), is left to defusedxml.
    """
    # Offsets rather than slices: a slice would copy the whole document.
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    if not _STARTS_WITH_MARKUP.match(data, start) or b"\x00" in data[start : start + 4]:
        return False  # UTF-16 or UTF-32 (with or without a byte order mark), EBCDIC
    if data.startswith(b"<?xml", start):
        end = data.find(b"?>", start)
        if end < 0:
            return False
        declared = _ENCODING.search(data, start, end)
        if declared and declared.group(1).lower() not in _ASCII_ENCODINGS:
            return False
    return b"<!DOCTYPE" not in data


def _blank(text: str | None) -> bool:
    """True for no text, or only white space (the indentation between elements)."""
    return not text or text.isspace()


def _resource_inside(element: Element) -> Element | None:
    """Return the resource that ``element`` wraps, or ``None`` if it is not a wrapper.

    FHIR element names start in lower case and resource names in upper case, so a single
    child with an upper-case name is a nested resource (``<resource><CodeSystem>``).
    """
    if len(element) != 1:
        return None
    child = element[0]
    if (
        child.tag.startswith(_FHIR_PREFIX)
        and child.tag[_FHIR_PREFIX_LENGTH:][:1].isupper()
    ):
        return child
    return None


def _number(kind: str, text: str) -> int | float | None:
    """Convert the text of an integer or decimal; ``None`` if it is not a valid number."""
    if kind == _INTEGER:
        return int(text) if _INTEGER_TEXT.fullmatch(text) else None
    if not _DECIMAL_TEXT.fullmatch(text):
        return None
    # The same int-or-float choice that json.loads makes for a JSON number.
    return float(text) if any(c in text for c in ".eE") else int(text)


class _Converter:
    """Turns the elements of one document into JSON values, naming ``source`` in errors.

    Each method takes the element's path (FHIRPath-like, 0-based indices on repeating
    elements, no resource type in front) for its error messages.
    """

    def __init__(self, source: str) -> None:
        self.source = source

    def resource(self, element: Element, path: str) -> dict[str, Any]:
        """Convert a resource element; its local name becomes ``resourceType``."""
        resource_type = element.tag[_FHIR_PREFIX_LENGTH:]
        if not resource_type[:1].isupper():
            raise LoadError(
                self.source,
                path,
                f"<{resource_type}> is not a FHIR resource (resource names start with an "
                "upper-case letter, like CodeSystem or ValueSet)",
            )
        obj: dict[str, Any] = {"resourceType": resource_type}
        self._check_text(element, resource_type, path)
        self._read_attributes(element, path, _NOTHING, obj)
        self._add_children(element, resource_type, path, obj)
        return obj

    def _complex(self, element: Element, name: str, path: str) -> dict[str, Any]:
        """Convert an element without a ``value`` attribute into an object."""
        self._check_text(element, name, path)
        nested = _resource_inside(element)
        if nested is not None:
            if nested.tail and not nested.tail.isspace():
                self._check_text(nested, name, path, nested.tail)
            return self.resource(nested, path)

        obj: dict[str, Any] = {}
        self._read_attributes(element, path, _COMPLEX_ATTRIBUTES, obj)
        self._add_children(element, name, path, obj)
        return obj

    def _add_children(
        self, element: Element, name: str, path: str, obj: dict[str, Any]
    ) -> None:
        """Convert the child elements of ``element`` into members of ``obj``."""
        repeating_here = _REPEATING.get(name, _NOTHING)
        for child_name, children in self._group_children(
            element, name, path, obj
        ).items():
            child_path = f"{path}.{child_name}" if path else child_name
            if child_name in obj:
                raise LoadError(
                    self.source,
                    child_path,
                    f"<{name}> has both an attribute and an element named {child_name}",
                )
            repeating = (
                len(children) > 1
                or child_name in _REPEATING_EVERYWHERE
                or child_name in repeating_here
            )
            if not repeating:
                child = children[0]
                attributes = child.attrib
                if "value" not in attributes:
                    obj[child_name] = self._complex(child, child_name, child_path)
                elif len(attributes) == 1 and not len(child) and _blank(child.text):
                    # Most elements: one primitive with nothing but its value.
                    obj[child_name] = self._primitive(
                        attributes["value"], child_name, name, child_path
                    )
                else:
                    self._add_primitive(
                        children, child_name, name, child_path, obj, repeating=False
                    )
            elif any("value" in child.attrib for child in children):
                self._add_primitive(
                    children, child_name, name, child_path, obj, repeating=repeating
                )
            else:
                obj[child_name] = [
                    self._complex(child, child_name, f"{child_path}[{index}]")
                    for index, child in enumerate(children)
                ]

    def _group_children(
        self, element: Element, name: str, path: str, obj: dict[str, Any]
    ) -> dict[str, list[Element]]:
        """Group the FHIR child elements by local name, in order of first occurrence.

        Repeats of an element need not be adjacent (some THO files put an ``extension``
        after other elements). A narrative ``div`` goes straight into ``obj``.
        """
        groups: dict[str, list[Element]] = {}
        for child in element:
            tail = child.tail
            if tail and not tail.isspace():
                self._check_text(child, name, path, tail)
            tag = child.tag
            if tag.startswith(_FHIR_PREFIX):
                local = tag[_FHIR_PREFIX_LENGTH:]
                group = groups.get(local)
                if group is None:
                    groups[local] = [child]
                else:
                    group.append(child)
            elif tag == _XHTML_DIV:
                self._add_div(child, f"{path}.div" if path else "div", obj)
            else:
                raise LoadError(
                    self.source,
                    path,
                    f"<{name}> contains {tag}, which is not in the FHIR namespace "
                    f"{_FHIR_NAMESPACE} (only a narrative div may be XHTML)",
                )

        for child_name in groups:
            if child_name[:1].isupper():
                raise LoadError(
                    self.source,
                    f"{path}.{child_name}" if path else child_name,
                    f"the resource <{child_name}> must be the only element in its "
                    f"wrapper <{name}>",
                )
        return groups

    def _add_primitive(
        self,
        elements: list[Element],
        name: str,
        parent: str,
        path: str,
        obj: dict[str, Any],
        *,
        repeating: bool,
    ) -> None:
        """Add primitive ``elements``: values under ``name``, extensions under ``_name``.

        This is how FHIR JSON writes a primitive with an ``id`` or extensions; in a
        repeating element the two arrays line up, with ``null`` where an item has none.
        """
        values: list[Any] = []
        extras: list[dict[str, Any] | None] = []
        for index, element in enumerate(elements):
            item_path = f"{path}[{index}]" if repeating else path
            text = element.get("value")
            values.append(
                None if text is None else self._primitive(text, name, parent, item_path)
            )
            extras.append(self._primitive_extras(element, name, item_path))

        if not repeating:
            if values[0] is not None:
                obj[name] = values[0]
            if extras[0] is not None:
                obj["_" + name] = extras[0]
            return
        if any(value is not None for value in values):
            obj[name] = values
        if any(extra is not None for extra in extras):
            obj["_" + name] = extras

    def _primitive(self, text: str, name: str, parent: str, path: str) -> Any:
        """Convert the ``value`` attribute of a primitive element to its JSON type."""
        kind = _PRIMITIVE_TYPES.get(name)
        if kind is None:
            if (parent, name) not in _DECIMAL_BY_PARENT:
                return text
            kind = _DECIMAL
        if kind == _BOOLEAN:
            if text == "true":
                return True
            if text == "false":
                return False
            raise LoadError(
                self.source, path, f'"{text}" is not a boolean; use "true" or "false"'
            )
        number = _number(kind, text)
        if number is None:
            raise LoadError(self.source, path, f'"{text}" is not a valid {kind}')
        return number

    def _primitive_extras(
        self, element: Element, name: str, path: str
    ) -> dict[str, Any] | None:
        """Return the ``id`` and extensions of a primitive element, or ``None``."""
        self._check_text(element, name, path)
        if len(element) == 0 and len(element.attrib) == 1:
            return None  # the usual case: only the value attribute
        extras: dict[str, Any] = {}
        self._read_attributes(element, path, _PRIMITIVE_ATTRIBUTES, extras)
        self._add_children(element, name, path, extras)
        for key in extras:
            if key not in ("id", "extension"):
                raise LoadError(
                    self.source,
                    path,
                    f"<{name}> has a value attribute, so it is a primitive and may "
                    f"contain only extension elements, not <{key}>",
                )
        return extras or None

    def _read_attributes(
        self, element: Element, path: str, allowed: frozenset[str], obj: dict[str, Any]
    ) -> None:
        """Copy the ``id`` and ``url`` attributes into ``obj``; refuse unknown ones."""
        for key, text in element.attrib.items():
            if key in allowed:
                if key != "value":
                    obj[key] = text
            elif not key.startswith("{"):
                # Attributes in another namespace, such as xsi:schemaLocation, carry no
                # FHIR content; an unknown plain one would be silently lost data.
                raise LoadError(
                    self.source,
                    path,
                    f'unexpected attribute {key}="{text}"; FHIR XML uses only value, '
                    "id and (on extensions) url",
                )

    def _add_div(self, div: Element, path: str, obj: dict[str, Any]) -> None:
        """Keep a narrative's XHTML ``div`` as its serialized text, as FHIR JSON does."""
        alone = copy.copy(div)
        alone.tail = None  # tostring would write the text that follows the div
        try:
            obj["div"] = tostring(
                alone, encoding="unicode", default_namespace=_XHTML_NAMESPACE
            )
        except ValueError:
            # ElementTree cannot write an element without a namespace inside one with a
            # default namespace; the narrative is for people, so the load goes on.
            logger.warning(
                "%s: %s: narrative dropped: it holds an element outside XHTML",
                self.source,
                path,
            )

    def _check_text(
        self, element: Element, name: str, path: str, text: str | None = None
    ) -> None:
        """Refuse text content in a FHIR element (``text`` defaults to the element's)."""
        if text is None:
            text = element.text
        if text and not text.isspace():
            snippet = text.strip()
            if len(snippet) > 40:
                snippet = snippet[:40] + "..."
            raise LoadError(
                self.source,
                path,
                f'<{name}> contains the text "{snippet}"; FHIR XML puts a primitive\'s '
                'value in its value attribute, e.g. <code value="abc"/>',
            )
