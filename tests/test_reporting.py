"""The SQL contract: views, membership functions, the reader role, read-only use.

DICOM files are built with highdicom (tests/imaging_study.py builds them), scanned
into the shared seeded database and removed after each test. Expected values come from
the objects built, the seed files read as plain JSON, tests/reference.py (the plain-Python
expander) and the THO source XML of v3 NullFlavor; never from thodb.
"""

from __future__ import annotations

import json
import uuid
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
from imaging_study import (
    CID_7151,
    DCM,
    SEGMENTATION,
    SYSTEMS,
    Study,
    build_study,
    clear_imaging,
    purposes_of_reference,
    selection_resources,
    write_selections,
)
from reference import ReferenceExpansionError, Terminology
from thodb import migrate
from thodb.cli import main
from thodb.db import create_engine, schema_prefix, session_scope
from thodb.expand import expand
from thodb.imaging import store
from thodb.imaging.schemes import SCHEMES
from thodb.load import load
from thodb.query import lookup, validate_code
from thodb.reporting import (
    CONTRACT_TABLES,
    CONTRACT_VIEWS,
    ReaderRoleError,
    check_role_name,
    grant_reader,
)
from thodb.seed import IMAGE_REFERENCE_TYPE, seeds_path

# Tests of one engine only, on the shared seeded database of that engine.
POSTGRESQL_ONLY = pytest.mark.parametrize("engine_kind", ["postgresql"], indirect=True)
SQLITE_ONLY = pytest.mark.parametrize("engine_kind", ["sqlite"], indirect=True)

NULL_FLAVOR_XML = SHARED / "data" / "tho" / "v3" / "codeSystems" / "v3-NullFlavor.xml"
FHIR = "{http://hl7.org/fhir}"


@cache
def reference() -> Terminology:
    return Terminology.from_paths(seeds_path())


def _members(url: str) -> set[tuple[str, str]]:
    return set(reference().expand(url))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return build_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def selections_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("selections")
    write_selections(folder)
    return folder


@pytest.fixture
def imaging_engine(
    seeded_engine: Engine, study: Study, selections_folder: Path
) -> Iterator[Engine]:
    """The seeded database with the study's coded items and the selections stored."""
    store.scan_and_store(seeded_engine, [study.root])
    store.load_selections(seeded_engine, [selections_folder])
    yield seeded_engine
    clear_imaging(seeded_engine)


def _rows(
    bind: Engine | sa.Connection, sql: str, **params: Any
) -> list[tuple[Any, ...]]:
    if isinstance(bind, Engine):
        with bind.connect() as connection:
            return _rows(connection, sql, **params)
    p = schema_prefix(bind)
    return [tuple(row) for row in bind.execute(sa.text(sql.format(p=p)), params)]


# --- joins of imaging rows with value sets ---------------------------------------------

SEGMENT_TYPES_OUTSIDE = """
SELECT i.attribute_path, i.code_value, i.code_meaning
FROM {p}imaging_coded_item i
WHERE i.attribute_path LIKE 'SegmentSequence[%].SegmentedPropertyTypeCodeSequence[0]'
  AND NOT EXISTS (
      SELECT 1 FROM {p}value_set_expansion e
      WHERE e.value_set_url = :value_set
        AND e.system = i.system AND e.code = i.code_value)
"""

PURPOSES_OUTSIDE = """
SELECT i.coding_scheme_designator, i.code_value, i.code_meaning
FROM {p}imaging_coded_item i
WHERE i.attribute_path LIKE '%PurposeOfReferenceCodeSequence[%]'
  AND NOT EXISTS (
      SELECT 1 FROM {p}value_set_expansion e
      WHERE e.value_set_url = :value_set
        AND e.system = i.system AND e.code = i.code_value)
"""


def _expected_segment_types_outside(study: Study) -> set[tuple[str, str, str]]:
    members = _members(CID_7151)
    expected = set()
    for index, segment in enumerate(study.seg.SegmentSequence):
        code = segment.SegmentedPropertyTypeCodeSequence[0]
        if (SYSTEMS.get(code.CodingSchemeDesignator), code.CodeValue) not in members:
            path = f"SegmentSequence[{index}].SegmentedPropertyTypeCodeSequence[0]"
            expected.add((path, code.CodeValue, code.CodeMeaning))
    return expected


def _expected_purposes_outside(study: Study) -> set[tuple[str, str, str]]:
    members = _members(IMAGE_REFERENCE_TYPE)
    return {
        purpose
        for dataset in study.datasets
        for purpose in purposes_of_reference(dataset)
        if (SYSTEMS.get(purpose[0]), purpose[1]) not in members
    }


def test_segments_whose_property_type_is_not_in_cid_7151(
    imaging_engine: Engine, study: Study
) -> None:
    found = _rows(imaging_engine, SEGMENT_TYPES_OUTSIDE, value_set=CID_7151)

    assert set(found) == _expected_segment_types_outside(study)
    assert [code for _, code, _ in found] == ["129301"]


def test_references_whose_purpose_is_outside_image_reference_type(
    imaging_engine: Engine, study: Study
) -> None:
    found = _rows(imaging_engine, PURPOSES_OUTSIDE, value_set=IMAGE_REFERENCE_TYPE)

    assert set(found) == _expected_purposes_outside(study)
    assert ("DCM", SEGMENTATION.value, SEGMENTATION.meaning) in set(found)
    assert all(code != "121191" for _, code, _ in found)


@POSTGRESQL_ONLY
def test_in_value_set_gives_the_same_answers_as_the_join(
    imaging_engine: Engine, study: Study
) -> None:
    by_system = _rows(
        imaging_engine,
        "SELECT i.coding_scheme_designator, i.code_value, i.code_meaning "
        "FROM tho.imaging_coded_item i "
        "WHERE i.attribute_path LIKE '%PurposeOfReferenceCodeSequence[%]' "
        "AND NOT tho.in_value_set(:value_set, i.system, i.code_value)",
        value_set=IMAGE_REFERENCE_TYPE,
    )
    by_designator = _rows(
        imaging_engine,
        "SELECT i.attribute_path, i.code_value, i.code_meaning "
        "FROM tho.imaging_coded_item i "
        "WHERE i.attribute_path LIKE 'SegmentSequence[%].SegmentedPropertyType%[0]' "
        "AND NOT tho.in_value_set_dicom(:value_set, i.coding_scheme_designator, "
        "i.code_value)",
        value_set=CID_7151,
    )

    assert set(by_system) == _expected_purposes_outside(study)
    assert set(by_designator) == _expected_segment_types_outside(study)


def test_imaging_selections_joined_against_image_reference_type(
    imaging_engine: Engine,
) -> None:
    found = _rows(
        imaging_engine,
        """
        SELECT s.id, s.code, e.display
        FROM {p}imaging_selection s
        LEFT JOIN {p}value_set_expansion e
          ON e.value_set_url = :value_set AND e.system = s.system AND e.code = s.code
        WHERE s.element LIKE 'code.%'
        """,
        value_set=IMAGE_REFERENCE_TYPE,
    )

    members = reference().expand(IMAGE_REFERENCE_TYPE)
    expected = set()
    for rid, resource in selection_resources().items():
        coding = resource["code"]["coding"][0]
        member = members.get((coding["system"], coding["code"]))
        expected.add((rid, coding["code"], member.display if member else None))
    assert set(found) == expected
    assert {rid for rid, _, display in found if display is None} == {"sel-seg"}


# --- tho.in_value_set ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value_set", "system", "code", "expected"),
    [
        (IMAGE_REFERENCE_TYPE, DCM, "121191", True),
        (IMAGE_REFERENCE_TYPE, DCM, "113076", False),
        (IMAGE_REFERENCE_TYPE + "|1.0.0", DCM, "121191", True),
        (IMAGE_REFERENCE_TYPE + "|9.9.9", DCM, "121191", None),
        ("http://example.org/ValueSet/not-loaded", DCM, "121191", None),
    ],
)
@POSTGRESQL_ONLY
def test_in_value_set_is_true_false_or_unknown(
    seeded_engine: Engine, value_set: str, system: str, code: str, expected: bool | None
) -> None:
    with seeded_engine.connect() as connection:
        answer = connection.scalar(
            sa.text("SELECT tho.in_value_set(:vs, :system, :code)"),
            {"vs": value_set, "system": system, "code": code},
        )
    assert answer is expected
    # The seed file says so: the model case is version 1.0.0 and holds DCM 121191.
    assert (DCM, "121191") in _members(IMAGE_REFERENCE_TYPE)


@POSTGRESQL_ONLY
def test_in_value_set_is_unknown_for_a_value_set_that_cannot_be_expanded(
    seeded_engine: Engine,
) -> None:
    broken = next(
        url for url, _ in reference().value_set_keys() if not _expandable(url)
    )
    with seeded_engine.connect() as connection:
        answer = connection.scalar(
            sa.text("SELECT tho.in_value_set(:vs, :system, :code)"),
            {"vs": broken, "system": DCM, "code": "121191"},
        )
    assert answer is None


def _expandable(url: str) -> bool:
    try:
        reference().expand(url)
    except ReferenceExpansionError:
        return False
    return True


@pytest.mark.parametrize(
    ("designator", "code", "expected"),
    [("DCM", "121191", True), ("SCT", "121191", False), ("99PRIVATE", "1", False)],
)
@POSTGRESQL_ONLY
def test_in_value_set_dicom_resolves_the_designator(
    seeded_engine: Engine, designator: str, code: str, expected: bool
) -> None:
    with seeded_engine.connect() as connection:
        answer = connection.scalar(
            sa.text("SELECT tho.in_value_set_dicom(:vs, :designator, :code)"),
            {"vs": IMAGE_REFERENCE_TYPE, "designator": designator, "code": code},
        )
    assert answer is expected


# --- the views and coding_scheme -------------------------------------------------------


def _seed_code_systems() -> list[dict[str, Any]]:
    files = sorted((seeds_path() / "dicom").glob("CodeSystem-*.json"))
    return [json.loads(path.read_text(encoding="utf-8")) for path in files]


def _flat(concepts: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for concept in concepts:
        yield concept
        yield from _flat(concept.get("concept", []))


def test_code_systems_view_lists_the_seed_code_systems(seeded_engine: Engine) -> None:
    found = _rows(
        seeded_engine, "SELECT url, version, concept_count FROM {p}code_systems"
    )

    expected = {
        (cs["url"], cs.get("version"), len(list(_flat(cs.get("concept", [])))))
        for cs in _seed_code_systems()
    }
    assert set(found) == expected


def test_value_sets_view_says_which_can_be_expanded(seeded_engine: Engine) -> None:
    found = {
        url: (status, count)
        for url, status, count in _rows(
            seeded_engine,
            "SELECT url, expansion_status, member_count FROM {p}value_sets",
        )
    }

    keys = reference().value_set_keys()
    assert len(found) == len(keys)
    for url, _ in keys:
        if _expandable(url):
            assert found[url] == ("expanded", len(reference().expand(url))), url
        else:
            assert found[url] == ("not-expandable", None), url


def test_concepts_view_has_display_definition_and_inactive(
    seeded_engine: Engine,
) -> None:
    dcm = next(cs for cs in _seed_code_systems() if cs["url"] == DCM)
    by_code = {c["code"]: c for c in _flat(dcm["concept"])}
    found = {
        code: (display, definition, bool(inactive))
        for code, display, definition, inactive in _rows(
            seeded_engine,
            "SELECT code, display, definition, inactive FROM {p}concepts "
            "WHERE system = :system",
            system=DCM,
        )
    }

    assert set(found) == set(by_code)
    for code in ("121191", "113076", "129301"):
        concept = by_code[code]
        assert found[code][:2] == (concept.get("display"), concept.get("definition"))
    retired = {
        c["code"]
        for c in by_code.values()
        if any(
            p["code"] == "status" and p.get("valueCode") == "retired"
            for p in c.get("property", [])
        )
        or any(
            p["code"] == "inactive" and p.get("valueBoolean") is True
            for p in c.get("property", [])
        )
    }
    assert {code for code, row in found.items() if row[2]} == retired


def test_coding_scheme_holds_every_designator_of_the_table(
    seeded_engine: Engine,
) -> None:
    found = _rows(
        seeded_engine, "SELECT designator, system, uid, name FROM {p}coding_scheme"
    )

    assert set(found) == {(s.designator, s.system, s.uid, s.name) for s in SCHEMES}


def null_flavor_closure() -> set[tuple[str, str, int, int]]:
    """(ancestor, descendant, min, max distance) from the THO XML, by plain walking."""

    def value(element: ET.Element, name: str) -> str:
        child = element.find(f"{FHIR}{name}")
        return "" if child is None else child.get("value", "")

    parents: dict[str, set[str]] = {}
    for concept in ET.parse(NULL_FLAVOR_XML).getroot().iter(f"{FHIR}concept"):
        found = parents.setdefault(value(concept, "code"), set())
        for prop in concept.findall(f"{FHIR}property"):
            if value(prop, "code") == "subsumedBy":
                found.add(value(prop, "valueCode"))
    distances: dict[tuple[str, str], list[int]] = {}

    def walk(descendant: str, code: str, depth: int) -> None:
        distances.setdefault((code, descendant), []).append(depth)
        for parent in parents[code]:
            walk(descendant, parent, depth + 1)

    for code in parents:
        walk(code, code, 0)
    return {(a, d, min(ds), max(ds)) for (a, d), ds in distances.items()}


def test_concept_ancestor_is_the_closure_of_a_tho_hierarchy(
    databases: Databases, engine_kind: str
) -> None:
    engine = databases.engine(engine_kind)
    load(engine, [NULL_FLAVOR_XML])

    found = _rows(
        engine,
        "SELECT system, version, ancestor_code, descendant_code, "
        "min_levels_of_separation, max_levels_of_separation FROM {p}concept_ancestor",
    )

    expected = null_flavor_closure()
    assert {row[:2] for row in found} == {
        ("http://terminology.hl7.org/CodeSystem/v3-NullFlavor", "4.0.0")
    }
    assert {row[2:] for row in found} == expected
    assert len(found) == len(expected)
    # NAV sits under ASKU and NAVU, both under UNK, under NI: one distance, two paths.
    assert ("NI", "NAV", 3, 3) in expected


def test_downgrade_removes_the_contract_and_upgrade_restores_it(
    fresh_engine: Engine,
) -> None:
    migrate.upgrade(fresh_engine)

    migrate.downgrade(fresh_engine, "0001")
    names = _object_names(fresh_engine)
    assert not names & {*CONTRACT_VIEWS, *CONTRACT_TABLES} - {"value_set_expansion"}
    assert "value_set_expansion" in names

    migrate.upgrade(fresh_engine)
    assert {*CONTRACT_VIEWS, *CONTRACT_TABLES} <= _object_names(fresh_engine)
    assert len(_rows(fresh_engine, "SELECT designator FROM {p}coding_scheme")) == len(
        SCHEMES
    )


def _object_names(engine: Engine) -> set[str]:
    schema = None if engine.dialect.name == "sqlite" else "tho"
    inspector = sa.inspect(engine)
    return set(inspector.get_table_names(schema=schema)) | set(
        inspector.get_view_names(schema=schema)
    )


# --- read-only use -----------------------------------------------------------------------

CONTRACT_QUERIES = [
    f"SELECT * FROM {{p}}{name}" for name in (*CONTRACT_VIEWS, *CONTRACT_TABLES)
]


def _query_operations(engine: Engine) -> None:
    """Every query operation, checked against the reference and the seed files."""
    members = reference().expand(IMAGE_REFERENCE_TYPE)
    with session_scope(engine) as session:
        stored = expand(session, IMAGE_REFERENCE_TYPE)
        live = expand(session, IMAGE_REFERENCE_TYPE, live=True)
        member = validate_code(session, IMAGE_REFERENCE_TYPE, system=DCM, code="121191")
        outside = validate_code(
            session, IMAGE_REFERENCE_TYPE, system=DCM, code="113076"
        )
        found = lookup(session, system=DCM, code="121191")
    assert {(m.system, m.code) for m in stored.contains} == set(members)
    assert live.contains == stored.contains
    assert (member.result, outside.result) == (True, False)
    assert found.display == members[(DCM, "121191")].display
    with engine.connect() as connection:
        for sql in CONTRACT_QUERIES:
            _rows(connection, sql + " LIMIT 1")


@POSTGRESQL_ONLY
def test_query_operations_work_in_a_read_only_postgresql_transaction(
    seeded_engine: Engine,
) -> None:
    # What a hot standby imposes: every transaction is read-only.
    read_only = create_engine(
        seeded_engine.url.render_as_string(hide_password=False),
        connect_args={"options": "-c default_transaction_read_only=on"},
    )
    try:
        _query_operations(read_only)
        with (
            pytest.raises(sa.exc.InternalError, match="read-only transaction"),
            read_only.begin() as connection,
        ):
            connection.exec_driver_sql("DELETE FROM tho.imaging_selection")
    finally:
        read_only.dispose()


@SQLITE_ONLY
def test_query_operations_work_on_a_read_only_sqlite_file(
    seeded_engine: Engine,
) -> None:
    path = seeded_engine.url.database
    read_only = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    try:
        _query_operations(read_only)
        with (
            pytest.raises(sa.exc.OperationalError, match="readonly"),
            read_only.begin() as connection,
        ):
            connection.exec_driver_sql("DELETE FROM imaging_selection")
    finally:
        read_only.dispose()


# --- the reader role (PostgreSQL) ------------------------------------------------------


@pytest.fixture(scope="module")
def reader_roles() -> Iterator[list[tuple[Engine, str]]]:
    """Roles created by the tests, dropped (with their grants) at the end."""
    created: list[tuple[Engine, str]] = []
    yield created
    for engine, role in created:
        with engine.begin() as connection:
            connection.exec_driver_sql(f'DROP OWNED BY "{role}"')
            connection.exec_driver_sql(f'DROP ROLE "{role}"')


def _new_reader(
    engine: Engine, roles: list[tuple[Engine, str]], *, include_tables: bool = False
) -> Engine:
    role = f"thodb_reader_{uuid.uuid4().hex[:8]}"
    assert grant_reader(engine, role, include_tables=include_tables) is True
    roles.append((engine, role))
    return create_engine(
        engine.url.set(username=role, password=None).render_as_string(
            hide_password=False
        )
    )


@POSTGRESQL_ONLY
def test_the_reader_reads_the_contract(
    imaging_engine: Engine, study: Study, reader_roles: list[tuple[Engine, str]]
) -> None:
    reader = _new_reader(imaging_engine, reader_roles)
    try:
        with reader.connect() as connection:
            for sql in CONTRACT_QUERIES:
                assert _rows(connection, sql + " LIMIT 1"), sql
            found = _rows(connection, PURPOSES_OUTSIDE, value_set=IMAGE_REFERENCE_TYPE)
            assert set(found) == _expected_purposes_outside(study)
            assert connection.scalar(
                sa.text("SELECT tho.in_value_set_dicom(:vs, 'DCM', '121191')"),
                {"vs": IMAGE_REFERENCE_TYPE},
            )
    finally:
        reader.dispose()


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM tho.concept LIMIT 1",
        "SELECT * FROM tho.value_set_member LIMIT 1",
        "SELECT * FROM tho.alembic_version",
        (
            "INSERT INTO tho.imaging_selection (id, element, code, source) "
            "VALUES ('x', 'code.coding[0]', 'c', 's')"
        ),
        "DELETE FROM tho.coding_scheme",
        "UPDATE tho.imaging_coded_item SET code_meaning = 'x'",
        "CREATE TABLE tho.reader_table (x int)",
        "CREATE VIEW tho.reader_view AS SELECT 1 AS x",
        "DROP VIEW tho.concepts",
        "CREATE SCHEMA reader_schema",
    ],
)
@POSTGRESQL_ONLY
def test_the_reader_cannot_write_create_or_read_the_tables(
    seeded_engine: Engine, reader_roles: list[tuple[Engine, str]], statement: str
) -> None:
    reader = _new_reader(seeded_engine, reader_roles)
    try:
        with (
            pytest.raises(
                sa.exc.ProgrammingError, match="permission denied|must be owner"
            ),
            reader.begin() as connection,
        ):
            connection.exec_driver_sql(statement)
    finally:
        reader.dispose()


@POSTGRESQL_ONLY
def test_a_reader_with_tables_runs_the_query_operations_but_cannot_write(
    seeded_engine: Engine, reader_roles: list[tuple[Engine, str]]
) -> None:
    reader = _new_reader(seeded_engine, reader_roles, include_tables=True)
    try:
        _query_operations(reader)
        with (
            pytest.raises(sa.exc.ProgrammingError, match="permission denied"),
            reader.begin() as connection,
        ):
            connection.exec_driver_sql("DELETE FROM tho.value_set_member")
    finally:
        reader.dispose()


@POSTGRESQL_ONLY
def test_granting_again_changes_nothing(
    seeded_engine: Engine, reader_roles: list[tuple[Engine, str]]
) -> None:
    reader = _new_reader(seeded_engine, reader_roles)
    role = reader.url.username
    assert role is not None
    reader.dispose()

    assert grant_reader(seeded_engine, role) is False

    with seeded_engine.connect() as connection:
        granted = connection.execute(
            sa.text(
                "SELECT table_name, privilege_type FROM information_schema.role_table_grants "
                "WHERE grantee = :role"
            ),
            {"role": role},
        ).all()
    assert sorted(granted) == sorted(
        (name, "SELECT") for name in (*CONTRACT_VIEWS, *CONTRACT_TABLES)
    )


@pytest.mark.parametrize(
    "role",
    ["", "Reporter", "reader;drop", 'x"y', "pg_reader", "public", "1reader", "a" * 64],
)
def test_a_role_name_that_is_not_a_plain_identifier_is_refused(role: str) -> None:
    with pytest.raises(ReaderRoleError):
        check_role_name(role)


@POSTGRESQL_ONLY
def test_a_reserved_word_is_refused_as_role_name(seeded_engine: Engine) -> None:
    with pytest.raises(ReaderRoleError, match="reserved SQL keyword"):
        grant_reader(seeded_engine, "select")


@SQLITE_ONLY
def test_sqlite_has_no_reader_role(seeded_engine: Engine) -> None:
    with pytest.raises(ReaderRoleError, match="SQLite has no roles"):
        grant_reader(seeded_engine, "reporting")

    url = seeded_engine.url.render_as_string(hide_password=False)
    result = CliRunner().invoke(
        main, ["--database-url", url, "grant-reader", "reporting"]
    )
    assert result.exit_code == 2
    assert "SQLite has no roles" in result.stderr


@POSTGRESQL_ONLY
def test_the_grant_reader_command(
    seeded_engine: Engine, reader_roles: list[tuple[Engine, str]]
) -> None:
    role = f"thodb_reader_{uuid.uuid4().hex[:8]}"
    url = seeded_engine.url.render_as_string(hide_password=False)

    result = CliRunner().invoke(main, ["--database-url", url, "grant-reader", role])
    reader_roles.append((seeded_engine, role))

    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert f"created role {role}" in result.stderr
