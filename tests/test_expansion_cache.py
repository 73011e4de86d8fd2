"""The expansion cache never answers from a state that is no longer the database's.

Neither do the facts and answers validate-code keeps (value sets, code systems, scopes,
whole answers) nor what an expansion keeps of a compose. A load recomputes the
membership and replaces the refresh token; a request's own resources (loaded in a
transaction that is rolled back) give a token that is never current again. A
transaction that reads one snapshot reads the token once; its answers are those its
own SQL sees. Expected codes come from the FHIR files, read here.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from conftest import SHARED, Databases
from thodb import load as load_mod
from thodb.db import schema_prefix, session_scope
from thodb.expand import expand, set_cache_budget
from thodb.fhir.operations import RequestContext
from thodb.query import ValidateOptions, validate_code

TX = SHARED / "tx-tests"
VALUE_SET = "http://hl7.org/fhir/test/ValueSet/simple-enumerated"


def _json(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((TX / name).read_text(encoding="utf-8-sig"))
    return data


def _valid(engine: Engine, code: str) -> bool:
    with session_scope(engine) as session:
        return validate_code(session, VALUE_SET, system=SIMPLE, code=code).result


SIMPLE = "http://hl7.org/fhir/test/CodeSystem/simple"

#: What set_cache_budget documents as the default.
DEFAULT_BUDGET = 200_000


def _codes(engine: Engine, **kwargs: Any) -> set[str]:
    with session_scope(engine) as session:
        return {m.code for m in expand(session, VALUE_SET, **kwargs).contains}


def test_a_load_that_changes_a_value_set_is_seen_by_the_next_expansion(
    fresh_engine: Engine, tmp_path: Any
) -> None:
    code_system = _json("simple/codesystem-simple.json")
    value_set = _json("simple/valueset-enumerated.json")
    listed = {c["code"] for c in value_set["compose"]["include"][0]["concept"]}
    load_mod.load(fresh_engine, [TX / "simple/codesystem-simple.json"])
    first = tmp_path / "vs.json"
    first.write_text(json.dumps(value_set))
    load_mod.load(fresh_engine, [first])
    assert _codes(fresh_engine) == listed
    assert _codes(fresh_engine) == listed  # answered from the cache
    assert all(_valid(fresh_engine, code) for code in listed)

    # The same url|version with one code fewer, loaded with --replace.
    changed = copy.deepcopy(value_set)
    dropped = changed["compose"]["include"][0]["concept"].pop()["code"]
    first.write_text(json.dumps(changed))
    load_mod.load(fresh_engine, [first], replace=True)
    assert _codes(fresh_engine) == listed - {dropped}
    assert _codes(fresh_engine, cache=False) == listed - {dropped}
    assert not _valid(fresh_engine, dropped)

    # Resources of one transaction that is rolled back are not seen afterwards.
    every = {c["code"] for c in code_system["concept"]}
    whole = copy.deepcopy(value_set)
    whole["compose"]["include"][0].pop("concept")
    with session_scope(fresh_engine, write=True) as session:
        load_mod.load_resources(session, [whole], replace=True)
        inside = {m.code for m in expand(session, VALUE_SET).contains}
        valid_inside = validate_code(
            session, VALUE_SET, system=SIMPLE, code=dropped
        ).result
        session.rollback()
    assert valid_inside
    assert inside >= every and inside != listed - {dropped}
    assert _codes(fresh_engine) == listed - {dropped}
    assert not _valid(fresh_engine, dropped)


def test_what_an_expansion_reads_of_the_compose_follows_the_loads(
    fresh_engine: Engine, tmp_path: Any
) -> None:
    # The imports of a value set are kept between expansions, by refresh token.
    value_set = _json("simple/valueset-enumerated.json")
    listed = {c["code"] for c in value_set["compose"]["include"][0]["concept"]}
    imported = f"{value_set['url']}|{value_set['version']}"
    outer = {
        "resourceType": "ValueSet",
        "url": "http://example.org/ValueSet/outer",
        "version": "1",
        "status": "active",
        "compose": {"include": [{"valueSet": [VALUE_SET]}]},
    }
    load_mod.load(
        fresh_engine,
        [TX / "simple/codesystem-simple.json", TX / "simple/valueset-enumerated.json"],
    )
    path = tmp_path / "outer.json"

    def expansion() -> Any:
        with session_scope(fresh_engine) as session:
            return expand(session, outer["url"], cache=False)

    path.write_text(json.dumps(outer))
    load_mod.load(fresh_engine, [path])
    first = expansion()
    assert {m.code for m in first.contains} == listed
    assert first.used_value_sets == (imported,)
    assert expansion().used_value_sets == (imported,)

    # The same url|version, now taking one code of the code system directly.
    code = sorted(listed)[0]
    outer["compose"] = {"include": [{"system": SIMPLE, "concept": [{"code": code}]}]}
    path.write_text(json.dumps(outer))
    load_mod.load(fresh_engine, [path], replace=True)
    after = expansion()
    assert {m.code for m in after.contains} == {code}
    assert after.used_value_sets == ()


def test_validate_code_sees_a_code_system_loaded_after_its_value_set(
    fresh_engine: Engine,
) -> None:
    # Which code systems are loaded is among the facts kept between calls.
    value_set = _json("simple/valueset-enumerated.json")
    listed = value_set["compose"]["include"][0]["concept"][0]
    wrong = f"not {listed.get('display', listed['code'])}"

    def answer() -> Any:
        with session_scope(fresh_engine) as session:
            return validate_code(
                session, VALUE_SET, system=SIMPLE, code=listed["code"], display=wrong
            )

    load_mod.load(fresh_engine, [TX / "simple/valueset-enumerated.json"])
    before = answer()
    # Listed, from a code system that is not loaded: the display cannot be checked.
    assert before.result
    assert [i.tx_type for i in before.issues] == ["not-found"]
    assert answer() == before

    load_mod.load(fresh_engine, [TX / "simple/codesystem-simple.json"])
    after = answer()
    assert not after.result
    assert "invalid-display" in {i.tx_type for i in after.issues}
    assert "not-found" not in {i.tx_type for i in after.issues}


def test_a_validate_code_answer_is_kept_for_its_own_arguments_only(
    fresh_engine: Engine, tmp_path: Any
) -> None:
    # An answer kept in the process is handed out again (the same object) to the
    # same call; a call that differs in display or options gets its own answer, and
    # one made with cache=False is computed again and equal.
    code_system = _json("simple/codesystem-simple.json")
    value_set = _json("simple/valueset-enumerated.json")
    listed = {c["code"] for c in value_set["compose"]["include"][0]["concept"]}
    concept = next(c for c in code_system["concept"] if c["code"] in listed)
    code, display = concept["code"], concept["display"]
    path = tmp_path / "vs.json"
    path.write_text(json.dumps(value_set))
    load_mod.load(fresh_engine, [TX / "simple/codesystem-simple.json", path])

    def answer(**kwargs: Any) -> Any:
        with session_scope(fresh_engine) as session:
            return validate_code(session, VALUE_SET, system=SIMPLE, code=code, **kwargs)

    first = answer(display=display)
    assert first.result and first.display == display
    assert answer(display=display) is first
    computed = answer(display=display, cache=False)
    assert computed == first and computed is not first

    wrong = answer(display=f"not {display}")
    assert not wrong.result
    assert "invalid-display" in {i.tx_type for i in wrong.issues}
    lenient = answer(
        display=f"not {display}", options=ValidateOptions(lenient_display=True)
    )
    assert lenient.result
    assert answer(display=f"not {display}") is wrong
    assert answer(display=display) is first

    # The same url|version without the code, loaded with --replace.
    path.write_text(json.dumps(_without(value_set, code)))
    load_mod.load(fresh_engine, [path], replace=True)
    assert not answer(display=display).result
    assert not answer(display=display, cache=False).result


def test_the_cache_budget_bounds_what_is_kept(seeded_engine: Engine) -> None:
    # A cached answer hands out the same Member objects again; a computed one, new
    # ones. The budgets are set around the size of the expansion.
    url = "http://terminology.hl7.org/ValueSet/image-reference-type"

    def members() -> list[Any]:
        with session_scope(seeded_engine) as session:
            return list(expand(session, url).contains)

    size = len(members())
    try:
        set_cache_budget(size)
        first, second = members(), members()
        assert all(a is b for a, b in zip(first, second, strict=True))

        set_cache_budget(size - 1)  # the entry no longer fits and is dropped
        first, second = members(), members()
        assert not any(a is b for a, b in zip(first, second, strict=True))
        assert first == second

        set_cache_budget(0)
        assert not any(a is b for a, b in zip(members(), members(), strict=True))
        with pytest.raises(ValueError, match="number of codes"):
            set_cache_budget(-1)
    finally:
        set_cache_budget(DEFAULT_BUDGET)


def _walk(concepts: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for concept in concepts:
        yield concept
        yield from _walk(concept.get("concept", []))


def test_the_properties_an_expansion_shows_follow_the_loads(
    fresh_engine: Engine, tmp_path: Any
) -> None:
    # What an expansion keeps of the code systems it uses includes which properties
    # their concepts have at all; a code system loaded again with statuses must show
    # them, though it had none when that was kept.
    code_system = _json("simple/codesystem-simple.json")
    plain = copy.deepcopy(code_system)
    for concept in _walk(plain["concept"]):
        concept.pop("property", None)
    path = tmp_path / "cs.json"
    path.write_text(json.dumps(plain))
    load_mod.load(fresh_engine, [path, TX / "simple/valueset-enumerated.json"])

    def statuses() -> dict[str, str]:
        with session_scope(fresh_engine) as session:
            contains = expand(session, VALUE_SET, cache=False).contains
        return {
            m.code: str(p.value)
            for m in contains
            for p in m.properties
            if p.code == "status"
        }

    assert statuses() == {}

    path.write_text(json.dumps(code_system))
    load_mod.load(fresh_engine, [path], replace=True)
    listed = {
        c["code"]
        for c in _json("simple/valueset-enumerated.json")["compose"]["include"][0][
            "concept"
        ]
    }
    expected = {
        concept["code"]: prop["valueCode"]
        for concept in _walk(code_system["concept"])
        for prop in concept.get("property", [])
        if prop["code"] == "status" and concept["code"] in listed
    }
    assert expected  # the file gives some listed code a status
    assert statuses() == expected


@pytest.mark.parametrize(
    ("headers", "cache"),
    [
        ({}, True),
        ({"Cache-Control": "max-age=60"}, True),
        ({"cache-control": "max-age=0, No-Cache"}, False),
        ({"Cache-Control": "no-store"}, False),
    ],
)
def test_a_request_can_ask_for_answers_computed_again(
    headers: dict[str, str], cache: bool
) -> None:
    # RFC 9111: no-cache asks for an answer not served from what was kept.
    assert RequestContext.from_headers(headers).cache is cache


def _without(value_set: dict[str, Any], code: str) -> dict[str, Any]:
    changed = copy.deepcopy(value_set)
    include = changed["compose"]["include"][0]
    include["concept"] = [c for c in include["concept"] if c["code"] != code]
    return changed


def _member_rows(session: Session, code: str) -> int:
    # What the transaction's own SQL sees of the code in the value set.
    prefix = schema_prefix(session)
    return int(
        session.execute(
            sa.text(
                f"SELECT count(*) FROM {prefix}value_set_member m "
                f"JOIN {prefix}value_set v ON v.id = m.value_set_id "
                "WHERE v.url = :url AND m.code = :code"
            ),
            {"url": VALUE_SET, "code": code},
        ).scalar_one()
    )


def _simple_loaded(engine: Engine, path: Any) -> tuple[dict[str, Any], str]:
    """Load the simple code system and the enumerated value set, written to ``path``
    (which a test may change and load again); the value set and its first code."""
    value_set = _json("simple/valueset-enumerated.json")
    path.write_text(json.dumps(value_set))
    load_mod.load(engine, [TX / "simple/codesystem-simple.json", path])
    return value_set, value_set["compose"]["include"][0]["concept"][0]["code"]


def test_answers_in_one_transaction_are_those_its_own_sql_sees(
    fresh_engine: Engine, tmp_path: Any
) -> None:
    # A reading transaction sees one snapshot: a load another connection commits
    # meanwhile changes neither its SQL nor its answers; the next transaction sees it.
    path = tmp_path / "vs.json"
    value_set, code = _simple_loaded(fresh_engine, path)

    with session_scope(fresh_engine) as reader:
        assert validate_code(reader, VALUE_SET, system=SIMPLE, code=code).result
        assert code in {m.code for m in expand(reader, VALUE_SET).contains}
        path.write_text(json.dumps(_without(value_set, code)))
        load_mod.load(fresh_engine, [path], replace=True)
        assert _member_rows(reader, code) == 1
        assert validate_code(reader, VALUE_SET, system=SIMPLE, code=code).result
        assert code in {m.code for m in expand(reader, VALUE_SET).contains}
    assert not _valid(fresh_engine, code)
    assert code not in _codes(fresh_engine)


def _one_snapshot(engine: Engine) -> Engine:
    # PostgreSQL reads one snapshot per transaction at REPEATABLE READ (as thodb's
    # session_scope reads); SQLite's transactions always do.
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="REPEATABLE READ")
    return engine


def test_answers_follow_the_writes_of_their_own_transaction(
    fresh_engine: Engine, tmp_path: Any
) -> None:
    # A load in the transaction itself, in a savepoint rolled back afterwards, and
    # in another session sharing the transaction's connection.
    value_set, code = _simple_loaded(fresh_engine, tmp_path / "vs.json")
    without = _without(value_set, code)

    def valid(session: Session) -> bool:
        answer = validate_code(session, VALUE_SET, system=SIMPLE, code=code).result
        assert answer is (_member_rows(session, code) == 1)
        listed = code in {m.code for m in expand(session, VALUE_SET).contains}
        assert listed is answer
        return answer

    bind = _one_snapshot(fresh_engine)
    with Session(bind) as session, session.begin():
        assert valid(session)
        savepoint = session.begin_nested()
        load_mod.load_resources(session, [without], replace=True)
        assert not valid(session)
        savepoint.rollback()
        assert valid(session)
        load_mod.load_resources(session, [without], replace=True)
        assert not valid(session)
        session.rollback()
    assert _valid(fresh_engine, code)

    with bind.connect() as connection:
        reader, writer = Session(connection), Session(connection)
        assert valid(reader)
        load_mod.load_resources(writer, [without], replace=True)
        assert not valid(reader)
        connection.rollback()
        assert valid(reader)
        reader.close()
        writer.close()


class _Statements:
    """The statements one connection sends while tracing: SQLite's trace callback,
    libpq's trace of the messages psycopg sends to PostgreSQL."""

    def __init__(self, session: Session, folder: Any) -> None:
        self.driver: Any = session.connection().connection.dbapi_connection
        self.sqlite = session.get_bind().dialect.name == "sqlite"
        self.path = folder / "trace.txt"
        self.seen: list[str] = []

    def __enter__(self) -> _Statements:
        if self.sqlite:
            self.driver.set_trace_callback(self.seen.append)
        else:
            self.file = self.path.open("w")
            self.driver.pgconn.trace(self.file.fileno())
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.sqlite:
            self.driver.set_trace_callback(None)
            return
        self.driver.pgconn.untrace()
        self.file.close()
        # Lines of messages sent by the frontend (F) carrying a statement.
        for line in self.path.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) > 4 and fields[1] == "F" and fields[3] in {"Query", "Parse"}:
                self.seen.append(fields[4])


def test_a_repeated_call_in_one_snapshot_runs_no_statement(
    fresh_engine: Engine, tmp_path: Any
) -> None:
    # The refresh token a transaction that reads one snapshot read once holds for
    # the rest of it: a kept answer or expansion is found without asking the database.
    value_set, code = _simple_loaded(fresh_engine, tmp_path / "vs.json")

    def calls(session: Session) -> tuple[Any, list[Any]]:
        answer = validate_code(session, VALUE_SET, system=SIMPLE, code=code)
        return answer, expand(session, VALUE_SET).contains

    with session_scope(fresh_engine) as session:
        first, members = calls(session)
        with _Statements(session, tmp_path) as statements:
            again, members_again = calls(session)
    assert again is first and again.result
    assert members_again == members
    assert statements.seen == []

    # Another transaction reads the token again.
    with (
        session_scope(fresh_engine) as session,
        _Statements(session, tmp_path) as statements,
    ):
        assert calls(session)[0] is first
    assert any("refresh_state" in s for s in statements.seen)


def test_under_read_committed_every_call_reads_the_token(
    databases: Databases, tmp_path: Any
) -> None:
    # PostgreSQL's default isolation shows each statement the latest commit: a call
    # after a load another connection committed answers from the new membership.
    engine = databases.engine("postgresql")
    path = tmp_path / "vs.json"
    value_set, code = _simple_loaded(engine, path)
    with Session(engine) as reader:
        assert validate_code(reader, VALUE_SET, system=SIMPLE, code=code).result
        with _Statements(reader, tmp_path) as statements:
            assert validate_code(reader, VALUE_SET, system=SIMPLE, code=code).result
        assert any("refresh_state" in s for s in statements.seen)
        path.write_text(json.dumps(_without(value_set, code)))
        load_mod.load(engine, [path], replace=True)
        assert _member_rows(reader, code) == 0
        assert not validate_code(reader, VALUE_SET, system=SIMPLE, code=code).result
        assert code not in {m.code for m in expand(reader, VALUE_SET).contains}
