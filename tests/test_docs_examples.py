"""Every SQL query and Python example of docs/sql.md and docs/python.md, run and checked.

A block is an example when its first lines name it: ``-- example: NAME`` and
``-- engines: sqlite postgresql`` in SQL (``-- database: v3-NullFlavor`` for the hierarchy
examples), ``# example: NAME`` in Python. SQL runs on the seeded database of each engine
with the coded items of DICOM files built here (tests/imaging_study.py) and a few
ImagingSelection resources; on PostgreSQL it runs three times, as the owner, in a
read-only transaction and as a role made by ``grant_reader``, with the same result.
Python examples run in order in one namespace with ``THODB_DATABASE_URL`` set, as a
script would. Each result is checked against the objects the test built, the DICOM JSON
files of /work/shared/data/dicom, tests/reference.py or the THO source XML; a block with
no check, or a check with no block, fails the test.
"""

from __future__ import annotations

import json
import re
import sys
import types
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from conftest import ROOT, SHARED, Databases
from imaging_study import (
    CID_7150,
    CID_7151,
    SYSTEMS,
    Study,
    build_study,
    clear_imaging,
    purposes_of_reference,
    selection_resources,
    write_selections,
)
from reference import ReferenceExpansionError, Terminology
from test_reporting import NULL_FLAVOR_XML, null_flavor_closure
from thodb.db import create_engine
from thodb.imaging import store
from thodb.imaging.schemes import SCHEMES
from thodb.load import load
from thodb.reporting import grant_reader
from thodb.seed import IMAGE_REFERENCE_TYPE, seeds_path

DOCS = ROOT / "docs"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
NULL_FLAVOR = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"
_BLOCK = re.compile(r"^```(sql|python)\n(.*?)^```", re.S | re.M)
_HEADER = re.compile(r"^(?:--|#) (example|engines|database): (.+)$")


@dataclass(frozen=True)
class Example:
    """One fenced block of a page of docs/."""

    page: str
    language: str
    name: str
    engines: tuple[str, ...]
    database: str
    code: str


def _examples(page: str) -> list[Example]:
    found = []
    for language, code in _BLOCK.findall((DOCS / page).read_text(encoding="utf-8")):
        header: dict[str, str] = {}
        for line in code.splitlines():
            match = _HEADER.match(line)
            if match is None:
                break
            header[match[1]] = match[2].strip()
        found.append(
            Example(
                page=page,
                language=language,
                name=header.get("example", ""),
                engines=tuple(header.get("engines", "sqlite postgresql").split()),
                database=header.get("database", "seeds"),
                code=code,
            )
        )
    return found


SQL_EXAMPLES = _examples("sql.md")
PYTHON_EXAMPLES = _examples("python.md")


@cache
def reference() -> Terminology:
    return Terminology.from_paths(seeds_path())


@cache
def dcm_concepts() -> dict[str, dict[str, Any]]:
    """The DCM concepts of the DICOM source data, by code."""
    path = SHARED / "data" / "dicom" / "CodeSystem-DCM.json"
    resource = json.loads(path.read_text(encoding="utf-8"))
    return {concept["code"]: concept for concept in resource["concept"]}


def _display(designator: str, code: str) -> str | None:
    """The terminology's display of a DICOM code: DCM is loaded, SNOMED CT is not."""
    concept = dcm_concepts().get(code) if designator == "DCM" else None
    return concept.get("display") if concept else None


# --- what each SQL example must return -----------------------------------------------


@dataclass
class Context:
    """What the checks compare with: the objects built for this run."""

    study: Study
    selections: dict[str, dict[str, Any]] = field(default_factory=selection_resources)

    def code_items(self) -> list[tuple[str, str, str, str]]:
        """(SOP instance, designator, value, meaning) of every code item, by pydicom."""
        found = []
        for dataset in self.study.datasets:
            for element in dataset.iterall():
                if element.VR != "SQ":
                    continue
                for item in element.value:
                    if "CodeValue" in item and "CodingSchemeDesignator" in item:
                        found.append(
                            (
                                str(dataset.SOPInstanceUID),
                                str(item.CodingSchemeDesignator),
                                str(item.CodeValue),
                                str(item.CodeMeaning),
                            )
                        )
        return found


Rows = list[tuple[Any, ...]]


def _members(url: str) -> set[tuple[str, str]]:
    return set(reference().expand(url))


def check_expand_value_set(rows: Rows, _: Context) -> None:
    expected = reference().expand(IMAGE_REFERENCE_TYPE)
    assert len(rows) == len(expected) == 1029
    assert {(s, c, d, bool(i)) for s, c, d, i in rows} == {
        (s, c, m.display, m.inactive) for (s, c), m in expected.items()
    }


def check_not_expandable(rows: Rows, _: Context) -> None:
    expected = set()
    for url, version in reference().value_set_keys():
        try:
            reference().expand(url, version)
        except ReferenceExpansionError:
            expected.add((url, version))
    assert {(url, version) for url, version, _ in rows} == expected
    assert all(error for _, _, error in rows)


def check_lookup_concept(rows: Rows, _: Context) -> None:
    concept = dcm_concepts()["121191"]
    [(system, version, code, display, definition, inactive)] = rows
    assert (system, code, display, definition, bool(inactive)) == (
        DCM,
        "121191",
        concept["display"],
        concept["definition"],
        False,
    )
    assert version is not None


def check_label_codes(rows: Rows, context: Context) -> None:
    expected = {
        (designator, value, meaning, _display(designator, value))
        for _, designator, value, meaning in context.code_items()
    }
    assert set(rows) == expected
    assert ("DCM", "113076", "Segmentation", "Segmentation") in expected


def check_count_by_value_set(rows: Rows, context: Context) -> None:
    expected = {}
    for url in (CID_7150, CID_7151, IMAGE_REFERENCE_TYPE):
        members = _members(url)
        count = sum(
            (SYSTEMS.get(designator), value) in members
            for _, designator, value, _ in context.code_items()
        )
        if count:
            expected[url] = count
    assert dict(rows) == expected
    assert set(expected) == {CID_7150, CID_7151, IMAGE_REFERENCE_TYPE}


def check_segments_outside_cid_7151(rows: Rows, context: Context) -> None:
    seg = context.study.seg
    members = _members(CID_7151)
    expected = set()
    for index, segment in enumerate(seg.SegmentSequence):
        code = segment.SegmentedPropertyTypeCodeSequence[0]
        designator, value = str(code.CodingSchemeDesignator), str(code.CodeValue)
        if (SYSTEMS.get(designator), value) not in members:
            path = f"SegmentSequence[{index}].SegmentedPropertyTypeCodeSequence[0]"
            expected.add(
                (
                    str(seg.SOPInstanceUID),
                    path,
                    designator,
                    value,
                    str(code.CodeMeaning),
                    _display(designator, value),
                )
            )
    assert set(rows) == expected
    assert [row[3] for row in rows] == ["129301"]


def _purposes_outside(context: Context) -> set[tuple[str, str, str, str]]:
    members = _members(IMAGE_REFERENCE_TYPE)
    return {
        (str(dataset.SOPInstanceUID), designator, value, meaning)
        for dataset in context.study.datasets
        for designator, value, meaning in purposes_of_reference(dataset)
        if (SYSTEMS.get(designator), value) not in members
    }


def check_purposes_outside(rows: Rows, context: Context) -> None:
    assert {(sop, d, v, m) for sop, _, d, v, m, _ in rows} == _purposes_outside(context)
    assert all(
        path.endswith("PurposeOfReferenceCodeSequence[0]") for _, path, *_ in rows
    )
    assert all(display == _display(d, v) for _, _, d, v, _, display in rows)
    assert ("DCM", "113076") in {(d, v) for _, _, d, v, _, _ in rows}
    assert "121191" not in {v for _, _, _, v, _, _ in rows}


def check_purposes_outside_function(rows: Rows, context: Context) -> None:
    assert {(sop, d, v, m) for sop, _, d, v, m in rows} == _purposes_outside(context)


def check_imaging_selection_purposes(rows: Rows, context: Context) -> None:
    members = reference().expand(IMAGE_REFERENCE_TYPE)
    expected = set()
    for rid, resource in context.selections.items():
        coding = resource["code"]["coding"][0]
        key = (coding["system"], coding["code"])
        expected.add((rid, *key, coding["display"], key in members))
    assert {(i, s, c, d, bool(flag)) for i, s, c, d, flag in rows} == expected


def check_descendants(rows: Rows, _: Context) -> None:
    expected = {(d, lo, hi) for a, d, lo, hi in null_flavor_closure() if a == "UNK"}
    assert set(rows) == expected
    assert ("UNK", 0, 0) in expected


def check_subsumes(rows: Rows, _: Context) -> None:
    subsumes = any(a == "NI" and d == "NAV" for a, d, _, _ in null_flavor_closure())
    assert [(bool(rows[0][0]),)] == [(subsumes,)]
    assert subsumes


def check_coding_schemes(rows: Rows, _: Context) -> None:
    assert set(rows) == {(s.designator, s.system, s.uid, s.name) for s in SCHEMES}


SQL_CHECKS: dict[str, Callable[[Rows, Context], None]] = {
    "expand-value-set": check_expand_value_set,
    "not-expandable": check_not_expandable,
    "lookup-concept": check_lookup_concept,
    "label-codes": check_label_codes,
    "count-by-value-set": check_count_by_value_set,
    "segments-outside-cid-7151": check_segments_outside_cid_7151,
    "purposes-outside-image-reference-type": check_purposes_outside,
    "purposes-outside-image-reference-type-function": check_purposes_outside_function,
    "imaging-selection-purposes": check_imaging_selection_purposes,
    "descendants": check_descendants,
    "subsumes": check_subsumes,
    "coding-schemes": check_coding_schemes,
}


def test_every_example_is_named_and_checked() -> None:
    for examples, checks in (
        (SQL_EXAMPLES, SQL_CHECKS),
        (PYTHON_EXAMPLES, PYTHON_CHECKS),
    ):
        names = [example.name for example in examples]
        assert all(names), f"a block without '-- example:' in {examples[0].page}"
        assert len(names) == len(set(names))
        assert set(names) == set(checks)
    assert {e.database for e in SQL_EXAMPLES} == {"seeds", "v3-NullFlavor"}
    assert all(set(e.engines) <= {"sqlite", "postgresql"} for e in SQL_EXAMPLES)


# --- running the SQL examples ----------------------------------------------------------


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Context:
    return Context(study=build_study(tmp_path_factory.mktemp("study")))


@pytest.fixture(scope="module")
def null_flavor_engines(databases: Databases) -> dict[str, Engine]:
    """Per engine, a database holding THO's v3 NullFlavor only (loaded on first use)."""
    return {}


@pytest.fixture(scope="module")
def reader_roles() -> Iterator[list[tuple[Engine, str]]]:
    """(engine, role) granted by this module, dropped at the end."""
    granted: list[tuple[Engine, str]] = []
    yield granted
    for engine, role in granted:
        with engine.begin() as connection:
            connection.exec_driver_sql(f'DROP OWNED BY "{role}"')
            connection.exec_driver_sql(f'DROP ROLE "{role}"')


def _url(engine: Engine, **changes: Any) -> str:
    return engine.url.set(**changes).render_as_string(hide_password=False)


def _query(url: str, sql: str, **connect_args: Any) -> Rows:
    engine = create_engine(url, connect_args=connect_args)
    try:
        with engine.connect() as connection:
            # Sent as it is written, with no parameters, as a reporting tool sends it.
            cursor = connection.connection.cursor()
            cursor.execute(sql)
            return [tuple(row) for row in cursor.fetchall()]
    finally:
        engine.dispose()


def _run_everywhere(engine: Engine, sql: str, roles: list[tuple[Engine, str]]) -> Rows:
    """The rows of ``sql``, the same read-only; on PostgreSQL also as a reader role."""
    if engine.dialect.name == "sqlite":
        rows = _query(_url(engine), sql)
        assert (
            _query(f"sqlite:///file:{engine.url.database}?mode=ro&uri=true", sql)
            == rows
        )
        return rows
    owner = _query(_url(engine), sql, options="-c search_path=tho")
    read_only = _query(
        _url(engine),
        sql,
        options="-c search_path=tho -c default_transaction_read_only=on",
    )
    known = [role for bound, role in roles if bound is engine]
    if not known:
        known.append(f"thodb_docs_{uuid.uuid4().hex[:8]}")
        grant_reader(engine, known[0])
        roles.append((engine, known[0]))
    # The role's own search_path (tho) is what makes the unqualified names work.
    reader = _query(_url(engine, username=known[0], password=None), sql)
    assert owner == read_only == reader
    return owner


@pytest.fixture
def seeds_with_imaging(
    seeded_engine: Engine, context: Context, tmp_path: Path
) -> Iterator[Engine]:
    """The seeded database with the study's coded items and the selections stored."""
    store.scan_and_store(seeded_engine, [context.study.root])
    write_selections(tmp_path / "selections")
    store.load_selections(seeded_engine, [tmp_path / "selections"])
    yield seeded_engine
    clear_imaging(seeded_engine)


def _cases(database: str) -> list[Any]:
    """(example, engine) for every engine an example of ``database`` names."""
    return [
        pytest.param(e, kind, id=f"{kind}-{e.name}")
        for e in SQL_EXAMPLES
        if e.database == database
        for kind in e.engines
    ]


@pytest.mark.parametrize(
    ("example", "engine_kind"), _cases("seeds"), indirect=["engine_kind"]
)
def test_sql_example_on_the_seeds(
    example: Example,
    engine_kind: str,
    seeds_with_imaging: Engine,
    context: Context,
    reader_roles: list[tuple[Engine, str]],
) -> None:
    rows = _run_everywhere(seeds_with_imaging, example.code, reader_roles)
    SQL_CHECKS[example.name](rows, context)


@pytest.mark.parametrize(
    ("example", "engine_kind"), _cases("v3-NullFlavor"), indirect=["engine_kind"]
)
def test_sql_example_on_a_hierarchy(
    example: Example,
    engine_kind: str,
    databases: Databases,
    null_flavor_engines: dict[str, Engine],
    context: Context,
    reader_roles: list[tuple[Engine, str]],
) -> None:
    if engine_kind not in null_flavor_engines:
        engine = databases.engine(engine_kind)
        load(engine, [NULL_FLAVOR_XML])
        null_flavor_engines[engine_kind] = engine
    rows = _run_everywhere(null_flavor_engines[engine_kind], example.code, reader_roles)
    SQL_CHECKS[example.name](rows, context)


# --- running the Python examples -------------------------------------------------------


def check_open_session(namespace: dict[str, Any], engine: Engine, _: Context) -> None:
    assert namespace["engine"].url == engine.url


def check_expand(namespace: dict[str, Any], _engine: Engine, _: Context) -> None:
    expected = reference().expand(IMAGE_REFERENCE_TYPE)
    assert namespace["expansion"].total == len(expected) == 1029
    assert namespace["displays"] == {key: m.display for key, m in expected.items()}


def check_expand_options(
    namespace: dict[str, Any], _engine: Engine, _: Context
) -> None:
    expected = reference().expand(IMAGE_REFERENCE_TYPE)
    active = {key for key, m in expected.items() if not m.inactive}
    assert {(m.system, m.code) for m in namespace["active"].contains} == active
    assert namespace["active"].total == len(active)
    page = namespace["page"]
    assert (page.total, len(page.contains)) == (len(expected), 20)
    words = re.compile(r"\w+")
    assert {(m.system, m.code) for m in namespace["liver"].contains} == {
        key
        for key, m in expected.items()
        if any(w.startswith("liver") for w in words.findall((m.display or "").lower()))
    }


def check_errors(namespace: dict[str, Any], _engine: Engine, _: Context) -> None:
    url = namespace["CID_101"]
    with pytest.raises(ReferenceExpansionError) as caught:
        reference().expand(url)
    assert caught.value.kind == "no-compose"
    assert "no compose" in namespace["reason"]
    assert "http://example.org/ValueSet/not-loaded" in namespace["missing"]


def check_validate_code(namespace: dict[str, Any], _engine: Engine, _: Context) -> None:
    members = reference().expand(IMAGE_REFERENCE_TYPE)
    member, outside = namespace["member"], namespace["outside"]
    assert (member.result, member.display) == (True, members[(DCM, "121191")].display)
    assert (DCM, "113076") not in members
    assert outside.result is False
    assert "113076" in outside.message


def check_validate_in_one_transaction(
    namespace: dict[str, Any], _engine: Engine, _: Context
) -> None:
    members = reference().expand(IMAGE_REFERENCE_TYPE)
    expected = [key for key in namespace["found"] if key not in members]
    assert expected  # the example shows a code that is not a member
    assert namespace["not_members"] == expected


def check_lookup(namespace: dict[str, Any], _engine: Engine, _: Context) -> None:
    concept = dcm_concepts()["113076"]
    found = namespace["segmentation"]
    assert (found.display, found.definition, found.inactive) == (
        concept["display"],
        concept["definition"],
        False,
    )


def check_join_own_table(
    namespace: dict[str, Any], _engine: Engine, _: Context
) -> None:
    members = reference().expand(IMAGE_REFERENCE_TYPE)
    expected = [
        (code, members[(DCM, code)].display)
        for code in sorted(("121191", "113076"))
        if (DCM, code) in members
    ]
    assert (
        [tuple(row) for row in namespace["typed"]]
        == expected
        == [("121191", "Referenced Segment")]
    )


def check_join_contract_view(
    namespace: dict[str, Any], _engine: Engine, _: Context
) -> None:
    members = _members(IMAGE_REFERENCE_TYPE)
    expected = [(c,) for c in sorted(("121191", "113076")) if (DCM, c) not in members]
    assert [tuple(row) for row in namespace["outside"]] == expected == [("113076",)]


def check_store_imaging(
    namespace: dict[str, Any], _engine: Engine, context: Context
) -> None:
    summary = namespace["summary"]
    assert summary.dicom_files == len(context.study.datasets)
    assert summary.store.added == len(context.code_items())
    members = reference().expand(IMAGE_REFERENCE_TYPE)
    expected = sorted(
        {
            (value, members[(SYSTEMS[designator], value)].display)
            for dataset in context.study.datasets
            for designator, value, _ in purposes_of_reference(dataset)
            if (SYSTEMS.get(designator), value) in members
        }
    )
    assert [tuple(row) for row in namespace["purposes"]] == expected
    assert ("121191", "Referenced Segment") in expected


PYTHON_CHECKS: dict[str, Callable[[dict[str, Any], Engine, Context], None]] = {
    "open-session": check_open_session,
    "expand": check_expand,
    "expand-options": check_expand_options,
    "errors": check_errors,
    "validate-code": check_validate_code,
    "validate-in-one-transaction": check_validate_in_one_transaction,
    "lookup": check_lookup,
    "join-own-table": check_join_own_table,
    "join-contract-view": check_join_contract_view,
    "store-imaging": check_store_imaging,
}


@pytest.fixture
def script_folder(
    seeded_engine: Engine,
    context: Context,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Path]:
    """A working folder with the study as ``study/``; the database as the env says."""
    (tmp_path / "study").symlink_to(context.study.root, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("THODB_DATABASE_URL", _url(seeded_engine))
    yield tmp_path
    # Leave the shared database as the seeds made it: no imaging rows, no app table.
    clear_imaging(seeded_engine)
    with seeded_engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE IF EXISTS report_finding")


def test_python_examples_run_in_order(
    seeded_engine: Engine,
    context: Context,
    script_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A module of its own, as a script is: SQLAlchemy resolves the annotations of the
    # example's models in the module they are declared in.
    script = types.ModuleType("docs_python_md")
    monkeypatch.setitem(sys.modules, script.__name__, script)
    namespace = script.__dict__
    try:
        for example in PYTHON_EXAMPLES:
            code = compile(example.code, f"docs/python.md:{example.name}", "exec")
            exec(code, namespace)  # the documentation's own examples
            PYTHON_CHECKS[example.name](namespace, seeded_engine, context)
    finally:
        if "engine" in namespace:
            namespace["engine"].dispose()
