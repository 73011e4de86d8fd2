"""The model case and every DICOM CID, expanded by the database on both engines.

Expected values come from tests/reference.py walking the seed files in plain Python,
and from facts the data's documentation states; never from thodb.
"""

from __future__ import annotations

from functools import cache

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from conftest import SHARED
from reference import Key, Member, ReferenceExpansionError, Terminology
from thodb import sql
from thodb.db import schema_prefix, session_scope
from thodb.errors import NotExpandableError
from thodb.expand import expand
from thodb.load import load
from thodb.models import ValueSet
from thodb.query import validate_code
from thodb.seed import IMAGE_REFERENCE_TYPE, seeds_path

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"
CID = "http://dicom.nema.org/medical/dicom/current/output/chtml/part16/sect_CID_{}.html"


@cache
def reference() -> Terminology:
    return Terminology.from_paths(seeds_path())


def _members(
    engine: Engine, url: str, *, live: bool = False
) -> dict[tuple[str, str], tuple[str | None, bool]]:
    with session_scope(engine) as session:
        expansion = expand(session, url, live=live)
    return {(m.system, m.code): (m.display, m.inactive) for m in expansion.contains}


def _expected(url: str) -> dict[tuple[str, str], tuple[str | None, bool]]:
    return {
        key: (member.display, member.inactive)
        for key, member in reference().expand(url).items()
    }


def test_image_reference_type_equals_the_plain_python_closure(
    seeded_engine: Engine,
) -> None:
    expected = _expected(IMAGE_REFERENCE_TYPE)
    assert len(expected) == 1029

    assert _members(seeded_engine, IMAGE_REFERENCE_TYPE) == expected


def test_live_expansion_equals_the_stored_membership(seeded_engine: Engine) -> None:
    stored = _members(seeded_engine, IMAGE_REFERENCE_TYPE)
    assert _members(seeded_engine, IMAGE_REFERENCE_TYPE, live=True) == stored


@pytest.mark.parametrize("engine_kind", ["postgresql"], indirect=True)
@pytest.mark.parametrize("setting", ["on", "off"])
def test_a_live_expansion_leaves_the_jit_setting_as_it_was(
    seeded_engine: Engine, setting: str
) -> None:
    # JIT is off while the live statement runs (its compilation costs more than the
    # statement), and as the caller had it afterwards.
    with session_scope(seeded_engine) as session:
        session.execute(sa.text(f"SET LOCAL jit = {setting}"))
        live = expand(session, IMAGE_REFERENCE_TYPE, live=True)
        assert session.scalar(sa.text("SHOW jit")) == setting
    assert len(live.contains) == len(_expected(IMAGE_REFERENCE_TYPE))


@pytest.mark.parametrize("engine_kind", ["postgresql"], indirect=True)
@pytest.mark.parametrize("setting", ["on", "off"])
def test_the_statement_run_without_jit_sees_it_off_and_the_caller_as_before(
    seeded_engine: Engine, setting: str
) -> None:
    # The live statement's helper turns JIT off, runs the statement and puts the
    # setting back in one pipeline; a statement that fails leaves the transaction
    # failed, and its rollback puts the setting back too.
    with seeded_engine.connect() as connection:
        connection.execute(sa.text(f"SET jit = {setting}"))
        connection.commit()
        try:
            names, rows = sql.fetch_without_jit(
                connection,
                "SELECT current_setting('jit') AS seen, %(n)s AS n",
                {"n": 7},
            )
            assert (names, rows) == (["seen", "n"], [("off", 7)])
            assert connection.scalar(sa.text("SHOW jit")) == setting
            with pytest.raises(psycopg.errors.DivisionByZero):
                sql.fetch_without_jit(connection, "SELECT 1 / %(n)s", {"n": 0})
            connection.rollback()
            assert connection.scalar(sa.text("SHOW jit")) == setting
        finally:
            connection.rollback()
            connection.execute(sa.text("RESET jit"))
            connection.commit()


@pytest.mark.parametrize("engine_kind", ["sqlite"], indirect=True)
def test_live_expansion_on_sqlite_keeps_its_plan_after_analyze(
    fresh_engine: Engine,
) -> None:
    # With statistics of all of THO (where a few rules list thousands of codes)
    # SQLite would build an automatic index on compose_rule_code for every live
    # expansion rather than use its primary key.
    load(fresh_engine, [SHARED / "data" / "tho", seeds_path()])
    with fresh_engine.begin() as connection:
        connection.exec_driver_sql("ANALYZE")
    with session_scope(fresh_engine) as session:
        value_set_id = session.scalar(
            sa.select(ValueSet.id).where(ValueSet.url == IMAGE_REFERENCE_TYPE)
        )
        statement = sql.render(session, sql.EXPAND_LIVE)
        plan = [
            str(row[-1])
            for row in session.execute(
                sa.text("EXPLAIN QUERY PLAN " + statement.text),
                {"value_set_id": value_set_id},
            )
        ]
    assert not [step for step in plan if "AUTOMATIC" in step and "rule_id" in step]
    assert _members(fresh_engine, IMAGE_REFERENCE_TYPE, live=True) == _expected(
        IMAGE_REFERENCE_TYPE
    )


@pytest.mark.parametrize(
    ("system", "code", "member", "inactive"),
    [
        (DCM, "121191", True, False),
        (DCM, "128228", True, False),
        # Among the reached CIDs only CID 4031 lists it: 7151 -> 7192 -> 4 -> 4030 -> 4031.
        (SCT, "85856004", True, False),
        (DCM, "111030", True, True),
        (DCM, "113076", False, False),
    ],
)
def test_model_case_examples(
    seeded_engine: Engine, system: str, code: str, member: bool, inactive: bool
) -> None:
    with session_scope(seeded_engine) as session:
        answer = validate_code(session, IMAGE_REFERENCE_TYPE, system=system, code=code)
    assert answer.result is member
    assert answer.inactive is inactive


def test_snomed_codes_expand_with_the_value_sets_displays(
    seeded_engine: Engine,
) -> None:
    members = _members(seeded_engine, IMAGE_REFERENCE_TYPE)
    snomed = {code for system, code in members if system == SCT}
    assert len(snomed) == 854
    # CID 4031 gives this code its display; SNOMED CT itself is not loaded.
    assert members[(SCT, "85856004")][0] == "Acromioclavicular joint"


def _cids() -> tuple[
    dict[str, dict[Key, Member] | ReferenceExpansionError], dict[str, dict[Key, Member]]
]:
    """Every CID of the seeds, with the reference's result, and those that expand."""
    results = {
        url: result
        for (url, _version), result in reference().expandable().items()
        if url.startswith(CID.split("{}")[0])
    }
    expandable = {
        url: r
        for url, r in results.items()
        if not isinstance(r, ReferenceExpansionError)
    }
    return results, expandable


def test_every_cid_with_a_definition_expands_to_the_plain_python_closure(
    seeded_engine: Engine,
) -> None:
    results, expandable = _cids()
    assert (len(results), len(expandable)) == (1466, 1433)

    p = schema_prefix(seeded_engine)
    with seeded_engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                f"SELECT value_set_url, system, code, display, inactive "
                f"FROM {p}value_set_expansion"
            )
        ).all()
    view: dict[str, dict[tuple[str, str], tuple[str | None, bool]]] = {}
    for row in rows:
        view.setdefault(row.value_set_url, {})[(row.system, row.code)] = (
            row.display,
            bool(row.inactive),
        )

    for url, members in expandable.items():
        expected = {k: (m.display, m.inactive) for k, m in members.items()}
        assert view.get(url, {}) == expected, url
    assert set(view) - set(expandable) == {IMAGE_REFERENCE_TYPE}


def test_every_cid_with_a_definition_expands_live_to_the_plain_python_closure(
    seeded_engine: Engine,
) -> None:
    # The live statement takes a shorter way when no value set reached excludes or
    # intersects (most CIDs); both ways are checked here against the reference.
    _, expandable = _cids()
    assert len(expandable) == 1433
    for url, members in expandable.items():
        expected = {k: (m.display, m.inactive) for k, m in members.items()}
        assert _members(seeded_engine, url, live=True) == expected, url


def test_cids_without_a_definition_are_reported_and_absent_from_the_view(
    seeded_engine: Engine,
) -> None:
    failing = {
        url: error
        for (url, _version), error in reference().expandable().items()
        if isinstance(error, ReferenceExpansionError)
    }
    assert len(failing) == 33
    p = schema_prefix(seeded_engine)
    with session_scope(seeded_engine) as session:
        stored = {
            row.url: row.expansion_error
            for row in session.execute(
                sa.text(
                    f"SELECT url, expansion_error FROM {p}value_set "
                    "WHERE expansion_status = 'not-expandable'"
                )
            )
        }
        in_view = session.execute(
            sa.text(
                f"SELECT COUNT(*) FROM {p}value_set_expansion "
                f"WHERE value_set_url IN ({', '.join(f':u{i}' for i in range(33))})"
            ),
            {f"u{i}": url for i, url in enumerate(failing)},
        ).scalar_one()
        assert set(stored) == set(failing)
        assert in_view == 0
        # CID 102 is defined by reference; CID 101 imports it.
        assert "no compose" in stored[CID.format(102)]
        assert CID.format(102) in stored[CID.format(101)]
        with pytest.raises(NotExpandableError, match="no compose"):
            expand(session, CID.format(102))


def test_a_diamond_is_not_a_cycle(seeded_engine: Engine) -> None:
    # CID 4 reaches CID 4031 through both CID 4030 and CID 4042.
    imports_4030 = reference().imports(CID.format(4030))
    imports_4042 = reference().imports(CID.format(4042))
    assert CID.format(4031) in imports_4030 and CID.format(4031) in imports_4042

    assert _members(seeded_engine, CID.format(4)) == _expected(CID.format(4))
