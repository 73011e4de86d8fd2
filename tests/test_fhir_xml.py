"""Tests of :mod:`thodb.fhir.xml`: FHIR XML read into the FHIR JSON form."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from thodb.errors import LoadError
from thodb.fhir.xml import parse_xml

# shared/ sits beside the project root on every developer machine and in CI.
THO = Path(__file__).resolve().parents[2] / "shared" / "data" / "tho"

CODE_SYSTEM_XML = """\
<?xml version="1.0" encoding="UTF-8"?>
<CodeSystem xmlns="http://hl7.org/fhir">
  <id value="example-colors"/>
  <text>
    <status value="generated"/>
    <div xmlns="http://www.w3.org/1999/xhtml"><p>Colors &amp; <b>shades</b></p></div>
  </text>
  <extension url="http://hl7.org/fhir/StructureDefinition/structuredefinition-wg">
    <valueCode value="vocab"/>
  </extension>
  <url value="http://example.org/CodeSystem/colors"/>
  <identifier>
    <system value="urn:ietf:rfc:3986"/>
    <value value="urn:oid:2.16.840.1.113883.4.642.4.9999"/>
  </identifier>
  <version value="1.0.0"/>
  <name value="Colors"/>
  <status value="active"/>
  <experimental value="false"/>
  <contact>
    <telecom>
      <system value="url"/>
      <value value="http://hl7.org"/>
    </telecom>
  </contact>
  <description value="Colors for testing">
    <extension url="http://example.org/note">
      <valueString value="a note on the description"/>
    </extension>
  </description>
  <caseSensitive value="true"/>
  <hierarchyMeaning value="is-a"/>
  <content value="complete"/>
  <count value="3"/>
  <filter>
    <code value="concept"/>
    <operator value="is-a"/>
    <value value="a code"/>
  </filter>
  <property>
    <code value="order"/>
    <type value="integer"/>
  </property>
  <concept>
    <code value="red"/>
    <display value="Red"/>
    <designation>
      <language value="de"/>
      <use>
        <system value="http://snomed.info/sct"/>
        <code value="900000000000013009"/>
      </use>
      <value value="Rot"/>
    </designation>
    <property>
      <code value="order"/>
      <valueInteger value="1"/>
    </property>
    <property>
      <code value="status"/>
      <valueCode value="active"/>
    </property>
    <concept>
      <code value="crimson"/>
      <display value="Crimson"/>
      <property>
        <code value="notSelectable"/>
        <valueBoolean value="true"/>
      </property>
      <property>
        <code value="weight"/>
        <valueDecimal value="0.25"/>
      </property>
    </concept>
  </concept>
  <concept id="c2">
    <code value="blue"/>
  </concept>
</CodeSystem>
"""

CODE_SYSTEM_JSON = """\
{
  "resourceType": "CodeSystem",
  "id": "example-colors",
  "text": {
    "status": "generated",
    "div": "<div xmlns=\\"http://www.w3.org/1999/xhtml\\"><p>Colors &amp; <b>shades</b></p></div>"
  },
  "extension": [
    {
      "url": "http://hl7.org/fhir/StructureDefinition/structuredefinition-wg",
      "valueCode": "vocab"
    }
  ],
  "url": "http://example.org/CodeSystem/colors",
  "identifier": [
    {"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.16.840.1.113883.4.642.4.9999"}
  ],
  "version": "1.0.0",
  "name": "Colors",
  "status": "active",
  "experimental": false,
  "contact": [{"telecom": [{"system": "url", "value": "http://hl7.org"}]}],
  "description": "Colors for testing",
  "_description": {
    "extension": [
      {"url": "http://example.org/note", "valueString": "a note on the description"}
    ]
  },
  "caseSensitive": true,
  "hierarchyMeaning": "is-a",
  "content": "complete",
  "count": 3,
  "filter": [{"code": "concept", "operator": ["is-a"], "value": "a code"}],
  "property": [{"code": "order", "type": "integer"}],
  "concept": [
    {
      "code": "red",
      "display": "Red",
      "designation": [
        {
          "language": "de",
          "use": {"system": "http://snomed.info/sct", "code": "900000000000013009"},
          "value": "Rot"
        }
      ],
      "property": [
        {"code": "order", "valueInteger": 1},
        {"code": "status", "valueCode": "active"}
      ],
      "concept": [
        {
          "code": "crimson",
          "display": "Crimson",
          "property": [
            {"code": "notSelectable", "valueBoolean": true},
            {"code": "weight", "valueDecimal": 0.25}
          ]
        }
      ]
    },
    {"id": "c2", "code": "blue"}
  ]
}
"""

VALUE_SET_XML = """\
<ValueSet xmlns="http://hl7.org/fhir">
  <id value="example-warm"/>
  <url value="http://example.org/ValueSet/warm"/>
  <version value="2.1"/>
  <status value="draft"/>
  <immutable value="false"/>
  <jurisdiction>
    <coding>
      <system value="http://unstats.un.org/unsd/methods/m49/m49.htm"/>
      <code value="001"/>
    </coding>
  </jurisdiction>
  <compose>
    <lockedDate value="2024-01-31"/>
    <inactive value="true"/>
    <include>
      <system value="http://example.org/CodeSystem/colors"/>
      <concept>
        <code value="red"/>
        <designation>
          <language value="fr"/>
          <value value="Rouge"/>
        </designation>
      </concept>
      <concept>
        <code value="orange"/>
      </concept>
    </include>
    <include>
      <system value="http://example.org/CodeSystem/colors"/>
      <filter>
        <property value="concept"/>
        <op value="is-a"/>
        <value value="red"/>
      </filter>
    </include>
    <include>
      <valueSet value="http://example.org/ValueSet/sunset"/>
    </include>
    <exclude>
      <system value="http://example.org/CodeSystem/colors"/>
      <concept>
        <code value="crimson"/>
      </concept>
    </exclude>
  </compose>
</ValueSet>
"""

VALUE_SET_JSON = """\
{
  "resourceType": "ValueSet",
  "id": "example-warm",
  "url": "http://example.org/ValueSet/warm",
  "version": "2.1",
  "status": "draft",
  "immutable": false,
  "jurisdiction": [
    {"coding": [{"system": "http://unstats.un.org/unsd/methods/m49/m49.htm", "code": "001"}]}
  ],
  "compose": {
    "lockedDate": "2024-01-31",
    "inactive": true,
    "include": [
      {
        "system": "http://example.org/CodeSystem/colors",
        "concept": [
          {"code": "red", "designation": [{"language": "fr", "value": "Rouge"}]},
          {"code": "orange"}
        ]
      },
      {
        "system": "http://example.org/CodeSystem/colors",
        "filter": [{"property": "concept", "op": "is-a", "value": "red"}]
      },
      {"valueSet": ["http://example.org/ValueSet/sunset"]}
    ],
    "exclude": [
      {"system": "http://example.org/CodeSystem/colors", "concept": [{"code": "crimson"}]}
    ]
  }
}
"""

BUNDLE_XML = """\
<Bundle xmlns="http://hl7.org/fhir">
  <id value="terminology"/>
  <type value="collection"/>
  <total value="2"/>
  <link>
    <relation value="self"/>
    <url value="http://example.org/Bundle/terminology"/>
  </link>
  <entry>
    <fullUrl value="http://example.org/CodeSystem/colors"/>
    <resource>
      <CodeSystem>
        <id value="colors"/>
        <status value="active"/>
        <content value="complete"/>
        <concept>
          <code value="red"/>
        </concept>
      </CodeSystem>
    </resource>
  </entry>
  <entry>
    <fullUrl value="http://example.org/ValueSet/warm"/>
    <resource>
      <ValueSet>
        <id value="warm"/>
        <status value="active"/>
        <compose>
          <include>
            <system value="http://example.org/CodeSystem/colors"/>
          </include>
        </compose>
      </ValueSet>
    </resource>
    <search>
      <score value="1"/>
    </search>
  </entry>
</Bundle>
"""

BUNDLE_JSON = """\
{
  "resourceType": "Bundle",
  "id": "terminology",
  "type": "collection",
  "total": 2,
  "link": [{"relation": "self", "url": "http://example.org/Bundle/terminology"}],
  "entry": [
    {
      "fullUrl": "http://example.org/CodeSystem/colors",
      "resource": {
        "resourceType": "CodeSystem",
        "id": "colors",
        "status": "active",
        "content": "complete",
        "concept": [{"code": "red"}]
      }
    },
    {
      "fullUrl": "http://example.org/ValueSet/warm",
      "resource": {
        "resourceType": "ValueSet",
        "id": "warm",
        "status": "active",
        "compose": {"include": [{"system": "http://example.org/CodeSystem/colors"}]}
      },
      "search": {"score": 1}
    }
  ]
}
"""

PARAMETERS_XML = """\
<Parameters xmlns="http://hl7.org/fhir">
  <parameter>
    <name value="result"/>
    <valueBoolean value="true"/>
  </parameter>
  <parameter>
    <name value="property"/>
    <part>
      <name value="code"/>
      <valueCode value="parent"/>
    </part>
  </parameter>
  <parameter>
    <name value="return"/>
    <resource>
      <ValueSet>
        <status value="active"/>
      </ValueSet>
    </resource>
  </parameter>
</Parameters>
"""

PARAMETERS_JSON = """\
{
  "resourceType": "Parameters",
  "parameter": [
    {"name": "result", "valueBoolean": true},
    {"name": "property", "part": [{"name": "code", "valueCode": "parent"}]},
    {"name": "return", "resource": {"resourceType": "ValueSet", "status": "active"}}
  ]
}
"""


def parse(text: str) -> dict[str, Any]:
    """Parse XML given as text, named ``test.xml`` in errors."""
    return parse_xml(text.encode(), "test.xml")


def load_error(data: bytes | str) -> LoadError:
    """Return the :class:`LoadError` that parsing ``data`` raises."""
    raw = data.encode() if isinstance(data, str) else data
    with pytest.raises(LoadError) as caught:
        parse_xml(raw, "bad.xml")
    assert caught.value.source == "bad.xml"
    return caught.value


def code_system(body: str) -> str:
    """Wrap elements in a FHIR CodeSystem root element."""
    return f'<CodeSystem xmlns="http://hl7.org/fhir">{body}</CodeSystem>'


def count_concepts(concepts: list[dict[str, Any]]) -> int:
    """Count concepts and all the concepts nested in them."""
    return sum(1 + count_concepts(concept.get("concept", [])) for concept in concepts)


@pytest.fixture(scope="module")
def tho_manifest() -> list[dict[str, Any]]:
    """The per-file entries of ``shared/data/tho/manifest.json``."""
    path = THO / "manifest.json"
    if not path.is_file():
        pytest.fail(
            f"{path} is missing; these tests need shared/ beside the project root"
        )
    resources: list[dict[str, Any]] = json.loads(path.read_text())["resources"]
    return resources


@pytest.mark.parametrize(
    ("xml_text", "json_text"),
    [
        (CODE_SYSTEM_XML, CODE_SYSTEM_JSON),
        (VALUE_SET_XML, VALUE_SET_JSON),
        (BUNDLE_XML, BUNDLE_JSON),
        (PARAMETERS_XML, PARAMETERS_JSON),
    ],
    ids=["CodeSystem", "ValueSet", "Bundle", "Parameters"],
)
def test_xml_gives_the_same_dict_as_the_json_form(
    xml_text: str, json_text: str
) -> None:
    assert parse(xml_text) == json.loads(json_text)


def test_decimal_becomes_what_json_loads_gives() -> None:
    concept = """<concept><code value="a"/>
      <property><code value="p"/><valueDecimal value="{}"/></property></concept>"""
    for text in ["1.50", "3", "-0.5", "1e3"]:
        result = parse(code_system(concept.format(text)))
        assert result["concept"][0]["property"][0] == json.loads(
            f'{{"code": "p", "valueDecimal": {text}}}'
        )


def test_element_repeated_in_the_document_becomes_a_list_outside_the_table() -> None:
    # ValueSet.publisher is 0..1, but a few THO files repeat it; nothing may be lost.
    result = parse(
        '<ValueSet xmlns="http://hl7.org/fhir"><publisher value="A"/>'
        '<status value="active"/><publisher value="B"/></ValueSet>'
    )
    assert result == {
        "resourceType": "ValueSet",
        "publisher": ["A", "B"],
        "status": "active",
    }


def test_repeating_primitive_with_extension_on_one_item_uses_nulls() -> None:
    result = parse(
        '<ValueSet xmlns="http://hl7.org/fhir"><compose><include>'
        '<valueSet value="http://a"/>'
        '<valueSet id="v2"><extension url="http://x"><valueCode value="c"/></extension>'
        "</valueSet></include></compose></ValueSet>"
    )
    include = result["compose"]["include"][0]
    assert include["valueSet"] == ["http://a", None]
    assert include["_valueSet"] == [
        None,
        {"id": "v2", "extension": [{"url": "http://x", "valueCode": "c"}]},
    ]


def test_comments_and_schema_location_are_ignored() -> None:
    result = parse(
        '<CodeSystem xmlns="http://hl7.org/fhir"'
        ' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
        ' xsi:schemaLocation="http://hl7.org/fhir ../codesystem.xsd">'
        '<!-- <valueSet value="x"/> --><status value="active"/></CodeSystem>'
    )
    assert result == {"resourceType": "CodeSystem", "status": "active"}


def test_bom_crlf_and_no_xml_declaration_parse() -> None:
    crlf = CODE_SYSTEM_XML.replace("\n", "\r\n").encode()
    no_declaration = CODE_SYSTEM_XML.split("\n", 1)[1].encode()
    expected = json.loads(CODE_SYSTEM_JSON)
    for data in [
        b"\xef\xbb\xbf" + crlf,
        b"\xef\xbb\xbf" + no_declaration,
        no_declaration,
    ]:
        assert parse_xml(data, "quirk.xml") == expected


def test_five_thousand_concepts_parse() -> None:
    concept = (
        '<concept><code value="c{0}"/><display value="Concept {0}"/>'
        '<definition value="The concept numbered {0}"/>'
        '<property><code value="status"/><valueCode value="active"/></property>'
        '<property><code value="order"/><valueInteger value="{0}"/></property></concept>'
    )
    body = "".join(concept.format(number) for number in range(5000))
    data = code_system(f'<content value="complete"/>{body}').encode()

    result = parse_xml(data, "big.xml")

    assert len(result["concept"]) == 5000
    assert result["concept"][4999]["property"][1] == {
        "code": "order",
        "valueInteger": 4999,
    }


def test_every_tho_xml_file_parses_and_matches_the_manifest(
    tho_manifest: list[dict[str, Any]],
) -> None:
    xml_entries = [entry for entry in tho_manifest if entry["format"] == "xml"]
    mismatches: list[str] = []
    for entry in xml_entries:
        resource = parse_xml((THO / entry["path"]).read_bytes(), entry["path"])
        for key in ["resourceType", "id", "url", "version"]:
            if resource.get(key) != entry[key]:
                mismatches.append(f"{entry['path']}: {key} {resource.get(key)!r}")
        if entry["resourceType"] == "CodeSystem":
            concepts = count_concepts(resource.get("concept", []))
            if concepts != entry["concept_count"]:
                mismatches.append(f"{entry['path']}: {concepts} concepts")

    assert len(xml_entries) > 3000
    assert mismatches == []


@pytest.mark.parametrize(
    ("quirk", "shows_in"),
    [
        ("utf8-bom", lambda data: data.startswith(b"\xef\xbb\xbf")),
        ("crlf-line-endings", lambda data: b"\r\n" in data),
        (
            "no-xml-declaration",
            lambda data: not data.lstrip(b"\xef\xbb\xbf").startswith(b"<?xml"),
        ),
    ],
)
def test_tho_files_with_a_quirk_parse(
    tho_manifest: list[dict[str, Any]], quirk: str, shows_in: Callable[[bytes], bool]
) -> None:
    entries = [
        entry
        for entry in tho_manifest
        if entry["format"] == "xml" and quirk in entry.get("quirks", [])
    ]
    assert entries, f"the manifest lists no XML file with {quirk}"
    for entry in entries:
        data = (THO / entry["path"]).read_bytes()
        assert shows_in(data), entry["path"]
        resource = parse_xml(data, entry["path"])
        assert resource["resourceType"] == entry["resourceType"]
        assert resource.get("id") == entry["id"]


def test_truncated_xml_is_not_well_formed() -> None:
    error = load_error(CODE_SYSTEM_XML[: len(CODE_SYSTEM_XML) // 2])
    assert error.path == ""
    assert error.message.startswith("XML is not well-formed: ")
    assert "line" in error.message


def test_empty_file_is_not_well_formed() -> None:
    assert load_error(b"").message.startswith("XML is not well-formed: ")


def test_dtd_is_refused() -> None:
    error = load_error(
        '<?xml version="1.0"?><!DOCTYPE CodeSystem [<!ELEMENT CodeSystem ANY>]>'
        + code_system('<status value="active"/>')
    )
    assert error.path == ""
    assert "DTD or entity declarations is not accepted" in error.message


def test_external_entity_is_refused_without_reading_the_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do-not-leak")
    for target in [secret.as_uri(), "file:///etc/passwd"]:
        error = load_error(
            f'<?xml version="1.0"?><!DOCTYPE CodeSystem [<!ENTITY xxe SYSTEM "{target}">]>'
            + code_system('<status value="&xxe;"/>')
        )
        assert "DTD or entity declarations is not accepted" in error.message
        assert "do-not-leak" not in str(error)
        assert "root:" not in str(error)


BILLION_LAUGHS = (
    '<?xml version="1.0" encoding="{encoding}"?><!DOCTYPE CodeSystem ['
    '<!ENTITY lol0 "lol">'
    + "".join(f'<!ENTITY lol{n} "{f"&lol{n - 1};" * 10}">' for n in range(1, 10))
    + "]>"
    + code_system('<status value="&lol9;"/>')
)


def test_billion_laughs_is_refused() -> None:
    error = load_error(BILLION_LAUGHS.format(encoding="UTF-8"))
    assert "DTD or entity declarations is not accepted" in error.message


@pytest.mark.parametrize(
    ("encoding", "codec"),
    [("UTF-16", "utf-16"), ("UTF-16LE", "utf-16-le"), ("ISO-8859-1", "latin-1")],
)
def test_dtd_is_refused_in_other_encodings(encoding: str, codec: str) -> None:
    # In UTF-16 the bytes of "<!DOCTYPE" are not the ASCII ones: no byte search finds
    # them, and the DTD must still be refused.
    data = BILLION_LAUGHS.format(encoding=encoding).encode(codec)
    assert "DTD or entity declarations is not accepted" in load_error(data).message


@pytest.mark.parametrize(
    ("encoding", "codec"),
    [("UTF-16", "utf-16"), ("UTF-16BE", "utf-16-be"), ("ISO-8859-1", "latin-1")],
)
def test_other_encodings_give_the_same_dict(encoding: str, codec: str) -> None:
    text = CODE_SYSTEM_XML.replace('encoding="UTF-8"', f'encoding="{encoding}"')
    text = text.replace("Colors for testing", "Farben für Tests")
    expected = json.loads(
        CODE_SYSTEM_JSON.replace("Colors for testing", "Farben für Tests")
    )
    assert parse_xml(text.encode(codec), "other.xml") == expected


def test_doctype_in_a_comment_is_no_dtd() -> None:
    result = parse(
        '<?xml version="1.0"?><!-- no <!DOCTYPE here -->'
        '<CodeSystem xmlns="http://hl7.org/fhir"><status value="active"/></CodeSystem>'
    )
    assert result == {"resourceType": "CodeSystem", "status": "active"}


def test_tho_files_parse_alike_through_defusedxml(
    tho_manifest: list[dict[str, Any]],
) -> None:
    # A comment naming <!DOCTYPE sends a document to defusedxml's parser instead of
    # ElementTree's C parser; every tenth THO XML file must give the same dict both ways.
    entries = [entry for entry in tho_manifest if entry["format"] == "xml"][::10]
    different: list[str] = []
    for entry in entries:
        data = (THO / entry["path"]).read_bytes()
        end = data.find(b"?>") + 2 if b"<?xml" in data[:8] else data.find(b"<")
        commented = data[:end] + b"<!-- <!DOCTYPE -->" + data[end:]
        if parse_xml(commented, entry["path"]) != parse_xml(data, entry["path"]):
            different.append(entry["path"])
    assert len(entries) > 300
    assert different == []


@pytest.mark.parametrize(
    ("document", "found"),
    [
        ('<CodeSystem><status value="active"/></CodeSystem>', "no namespace"),
        (
            '<CodeSystem xmlns="urn:hl7-org:v3"><status value="active"/></CodeSystem>',
            "namespace urn:hl7-org:v3",
        ),
    ],
)
def test_root_outside_the_fhir_namespace_is_refused(document: str, found: str) -> None:
    error = load_error(document)
    assert error.path == ""
    assert error.message == (
        f"the root element <CodeSystem> has {found}; a FHIR resource must be in the "
        'FHIR namespace (xmlns="http://hl7.org/fhir")'
    )


def test_invalid_boolean_names_the_element() -> None:
    error = load_error(code_system('<caseSensitive value="yes"/>'))
    assert error.path == "caseSensitive"
    assert error.message == '"yes" is not a boolean; use "true" or "false"'
    assert (
        str(error)
        == 'bad.xml: caseSensitive: "yes" is not a boolean; use "true" or "false"'
    )


def test_error_path_has_indices_of_repeating_elements() -> None:
    error = load_error(
        code_system(
            '<concept><code value="a"/></concept>'
            '<concept><code value="b"/><property><code value="p"/></property>'
            '<property><code value="q"/><valueInteger value="two"/></property></concept>'
        )
    )
    assert error.path == "concept[1].property[1].valueInteger"
    assert error.message == '"two" is not a valid integer'


def test_error_path_inside_a_bundle_entry() -> None:
    error = load_error(
        BUNDLE_XML.replace('<content value="complete"/>', '<experimental value="no"/>')
    )
    assert error.path == "entry[0].resource.experimental"


@pytest.mark.parametrize(
    ("body", "path", "message_part"),
    [
        ("<status>active</status>", "status", "puts a primitive's value in its value"),
        (
            '<status value="active" lang="en"/>',
            "status",
            'unexpected attribute lang="en"',
        ),
        ('<status value="a"><code value="x"/></status>', "status", "only extension"),
        ('<x:status xmlns:x="urn:other" value="a"/>', "", "not in the FHIR namespace"),
        (
            '<property><CodeSystem/><code value="a"/></property>',
            "property[0].CodeSystem",
            "must be the only element",
        ),
    ],
)
def test_elements_breaking_fhir_xml_rules_are_refused(
    body: str, path: str, message_part: str
) -> None:
    error = load_error(code_system(body))
    assert error.path == path
    assert message_part in error.message


def test_root_that_is_not_a_resource_is_refused() -> None:
    error = load_error(
        '<concept xmlns="http://hl7.org/fhir"><code value="a"/></concept>'
    )
    assert "is not a FHIR resource" in error.message


def test_narrative_that_cannot_be_written_back_is_dropped_not_fatal() -> None:
    result = parse(
        code_system(
            '<text><status value="generated"/>'
            '<div xmlns="http://www.w3.org/1999/xhtml"><p xmlns="">odd</p></div></text>'
            '<status value="active"/>'
        )
    )
    assert result == {
        "resourceType": "CodeSystem",
        "text": {"status": "generated"},
        "status": "active",
    }
