"""Large CodeSystem files read in two passes (thodb.fhir.stream) give what a whole read gives.

The reference is the whole read: ``json.loads`` of the file, then the same checks.
"""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from conftest import SHARED, table_checksums
from thodb.errors import LoadError
from thodb.expand import expand
from thodb.fhir import stream
from thodb.fhir.read import ReadCounts, read_paths
from thodb.fhir.resources import content_hash, parse_resource
from thodb.fhir.xml import parse_xml
from thodb.load import load

THO = SHARED / "data" / "tho"


def _opener(path: Path) -> stream.Opener:
    return lambda: path.open("rb")


def _streamed(path: Path) -> Any:
    opened = stream.open_code_system(str(path), _opener(path))
    assert opened is not None, f"{path} was not streamed"
    members, concepts = opened
    return parse_resource(members, str(path), concepts=concepts)


def _whole(path: Path) -> Any:
    return parse_resource(json.loads(path.read_bytes().decode("utf-8-sig")), str(path))


def _write(path: Path, resource: Any, prefix: bytes = b"") -> Path:
    text = json.dumps(resource, ensure_ascii=False, indent=1)
    path.write_bytes(prefix + text.encode("utf-8"))
    return path


def _code_system(**extra: Any) -> dict[str, Any]:
    # Nested concepts, designations, properties of each kind, a child property, and
    # property declared after concept (so the second pass must know it).
    return {
        "resourceType": "CodeSystem",
        "url": "http://example.org/cs/streamed",
        "version": "1",
        "status": "active",
        "content": "complete",
        "concept": [
            {
                "code": "a",
                "display": "A é",
                "designation": [{"language": "de", "value": "A (de)"}],
                "property": [
                    {"code": "state", "valueCode": "retired"},
                    {"code": "rank", "valueInteger": 3},
                    {"code": "weight", "valueDecimal": 1.25},
                    {"code": "kid", "valueCode": "c"},
                ],
                "concept": [{"code": "b", "display": "B"}],
            },
            {"code": "c", "property": [{"code": "up", "valueCode": "b"}]},
        ],
        "property": [
            {
                "code": "state",
                "uri": "http://hl7.org/fhir/concept-properties#status",
                "type": "code",
            },
            {"code": "rank", "type": "integer"},
            {"code": "weight", "type": "decimal"},
            {
                "code": "kid",
                "uri": "http://hl7.org/fhir/concept-properties#child",
                "type": "code",
            },
            {
                "code": "up",
                "uri": "http://hl7.org/fhir/concept-properties#parent",
                "type": "code",
            },
        ],
        **extra,
    }


def _tho_code_system_files() -> list[Path]:
    return sorted(
        path
        for path in THO.rglob("*.xml")
        if b"<CodeSystem" in path.read_bytes()[:2000]
    )


def test_every_tho_code_system_streamed_gives_the_records_of_a_whole_read(
    tmp_path: Path,
) -> None:
    files = _tho_code_system_files()
    assert len(files) > 900
    compared = 0
    for i, xml in enumerate(files):
        resource = parse_xml(xml.read_bytes(), str(xml))
        path = _write(tmp_path / f"{i}.json", resource)
        if "concept" not in resource:  # read whole: there is nothing to stream
            assert stream.open_code_system(str(path), _opener(path)) is None
            continue
        streamed = _streamed(path)
        assert streamed == _whole(path), xml
        assert streamed.content_hash == content_hash(resource), xml
        compared += 1
    assert compared > 800


def test_dicom_code_systems_streamed_give_the_records_of_a_whole_read() -> None:
    files = sorted((SHARED / "data" / "dicom").glob("CodeSystem-*.json"))
    assert files
    for path in files:
        assert _streamed(path) == _whole(path), path


def test_property_after_concept_and_a_byte_order_mark(tmp_path: Path) -> None:
    path = _write(tmp_path / "cs.json", _code_system(), prefix=b"\xef\xbb\xbf")
    record = _streamed(path)
    assert record == _whole(path)
    by_code = {c.code: c for c in record.concepts}
    # From the file: a's status property is retired, b is nested in a, a names c as
    # its child, and c names b as its parent.
    assert by_code["a"].status == "retired" and by_code["a"].inactive
    assert by_code["b"].parents == ["a"]
    assert sorted(by_code["c"].parents) == ["a", "b"]


@pytest.mark.parametrize(
    "text",
    [
        # What ijson reads otherwise than json.loads, or cannot read: read whole.
        '{"resourceType":"CodeSystem","url":"u","concept":[{"code":"a","display":"\\ud83d\\ude00"}]}',
        '{"resourceType":"CodeSystem","url":"u","count":100000000000000000000000,"concept":[]}',
        '{"resourceType":"CodeSystem","url":"u","concept":[{"code":"a"}],"x":NaN}',
        # Two concept arrays: json.loads keeps the last.
        '{"resourceType":"CodeSystem","url":"u","concept":[{"code":"a"}],"concept":[{"code":"b"}]}',
        '{"resourceType":"CodeSystem","url":"u","concept":null}',
        '{"resourceType":"ValueSet","url":"u"}',
        '[{"resourceType":"CodeSystem"}]',
        '{"resourceType":"CodeSystem","url":"u","concept":['
        + "[" * 300
        + "]" * 300
        + "]}",
    ],
)
def test_input_a_stream_would_read_differently_is_read_whole(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "cs.json"
    path.write_text(text, encoding="utf-8")
    assert stream.open_code_system(str(path), _opener(path)) is None


def test_a_large_code_system_in_a_package_is_streamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = _write(tmp_path / "cs.json", _code_system())
    package = tmp_path / "example.tgz"
    with tarfile.open(package, "w:gz") as archive:
        archive.add(plain, "package/CodeSystem-streamed.json")
    monkeypatch.setattr(stream, "STREAM_BYTES", 0)
    # All read first: the stream opens the package again after it was closed.
    resources = list(read_paths([package], ReadCounts()))
    assert len(resources) == 1 and resources[0].concepts is not None
    found = resources[0]
    record = parse_resource(found.data, found.source, concepts=found.concepts)
    assert record.source == f"{package}!package/CodeSystem-streamed.json"
    whole = _whole(plain)
    assert dataclasses.replace(record, source=whole.source) == whole


def test_a_large_file_with_invalid_json_names_line_and_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream, "STREAM_BYTES", 0)
    path = tmp_path / "cs.json"
    path.write_text('{"resourceType": "CodeSystem",\n "concept": [}', encoding="utf-8")
    with pytest.raises(LoadError) as caught:
        list(read_paths([path], ReadCounts()))
    assert str(path) in str(caught.value)
    assert "line 2 column" in str(caught.value)


def test_a_streamed_concept_that_is_not_an_object_names_the_element(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path / "cs.json", _code_system(concept=[{"code": "a"}, 5]))
    with pytest.raises(LoadError) as caught:
        _streamed(path)
    assert caught.value.path == "concept"
    assert str(path) in str(caught.value)


def test_a_code_system_loaded_streamed_writes_the_rows_of_a_whole_load(
    databases: Any,
    engine_kind: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "content"
    folder.mkdir()
    _write(folder / "cs.json", _code_system())
    _write(
        folder / "vs.json",
        {
            "resourceType": "ValueSet",
            "url": "http://example.org/vs/streamed",
            "status": "active",
            "compose": {
                "include": [
                    {
                        "system": "http://example.org/cs/streamed",
                        "filter": [{"property": "concept", "op": "is-a", "value": "a"}],
                    }
                ]
            },
        },
    )
    engines: list[Engine] = []
    for threshold in (stream.STREAM_BYTES, 0):
        monkeypatch.setattr(stream, "STREAM_BYTES", threshold)
        engine = databases.engine(engine_kind)
        load(engine, [folder])
        engines.append(engine)
    assert table_checksums(engines[0]) == table_checksums(engines[1])
    with Session(engines[1]) as session:
        found = expand(session, "http://example.org/vs/streamed")
        codes = {m.code for m in found.members()}
    # is-a a: a, b nested in it, and c (a's child and b's child).
    assert codes == {"a", "b", "c"}
