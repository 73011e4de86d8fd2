"""FHIR terminology semantics, one at a time, on SQLite and PostgreSQL.

Each test loads resources from HL7's terminology test suite (../shared/tx-tests) and
checks one rule. Expected values come from that suite's response files or from
tests/reference.py walking the same resources in plain Python; never from thodb.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from conftest import SHARED, Databases, table_checksums
from reference import Terminology
from thodb import load as load_mod
from thodb.db import schema_prefix, session_scope
from thodb.expand import ExpandOptions, Member, ValueSetNotFound, expand
from thodb.fhir import operations as fhir_operations
from thodb.languages import LanguagePreference
from thodb.outcome import TerminologyError
from thodb.query import Coding, ValidateOptions, Validation, validate_coding
from thodb.sqlfunctions import regexp
from thodb.versions import VersionRules, matches, newest, resolve

TX = SHARED / "tx-tests"
SIMPLE = "http://hl7.org/fhir/test/CodeSystem/simple"
VERSION = "http://hl7.org/fhir/test/CodeSystem/version"
VS = "http://hl7.org/fhir/test/ValueSet/"

# The resources the tests below need, from the suite's setup lists.
FILES = [
    "simple/codesystem-simple.json",
    "simple/valueset-all.json",
    "simple/valueset-filter-isa.json",
    "simple/valueset-filter-regex.json",
    "simple/valueset-filter-regex-prop.json",
    "version/codesystem-version-1.json",
    "version/codesystem-version-2.json",
    "version/valueset-all-version.json",
    "version/valueset-all-version-2.json",
    "version/valueset-version-w.json",
    "language/codesystem-en-multi.json",
    "language/valueset-en-multi.json",
    "big/codesystem-big.json",
    "big/valueset-big.json",
    "case/codesystem-case-insensitive.json",
    "case/valueset-case-insensitive.json",
    "fragment/codesystem-fragment.json",
    "fragment/valueset-fragment.json",
    "language/valueset-en-en-multi.json",
    "language/valueset-en-enlang-multi.json",
    "inactive/codesystem-inactive.json",
    "inactive/valueset-all-active.json",
    "extensions/codesystem-extensions.json",
    "extensions/codesystem-supplement.json",
    "extensions/valueset-extensions-enumerated.json",
    "extensions/valueset-extensions-bad-supplement.json",
    "deprecated/codesystem-deprecated.json",
    "deprecated/valueset-withdrawn.json",
    "deprecated/valueset-not-withdrawn.json",
]


def _json(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((TX / name).read_text(encoding="utf-8-sig"))
    return data


@cache
def _reference() -> Terminology:
    terminology = Terminology()
    for name in FILES:
        terminology.add(_json(name))
    return terminology


_loaded: dict[str, Engine] = {}


@pytest.fixture
def tx_engine(databases: Databases, engine_kind: str) -> Engine:
    """A database holding :data:`FILES` (loaded once per engine; tests must not change it)."""
    if engine_kind not in _loaded:
        engine = databases.engine(engine_kind)
        load_mod.load(engine, [TX / name for name in FILES])
        _loaded[engine_kind] = engine
    return _loaded[engine_kind]


def _expand(engine: Engine, url: str, **options: Any) -> list[Member]:
    with session_scope(engine) as session:
        return expand(session, url, options=ExpandOptions(**options)).contains


def _expected_codes(response: str) -> list[str]:
    def walk(entries: list[dict[str, Any]]) -> list[str]:
        return [c for e in entries for c in [e["code"], *walk(e.get("contains", []))]]

    return walk(_json(response)["expansion"].get("contains", []))


# --- versions and languages (no database) ---------------------------------------------


def test_versions_compare_numbers_as_numbers_and_patterns_match_parts() -> None:
    assert newest(["1.9.0", "1.10.0", None]) == "1.10.0"
    assert matches("1.x.x", "1.2.0") and matches("1.0.x", "1.0.0")
    assert not matches("1.0.x", "1.2.0")
    # A version without wildcards names that version only (HL7 tx: vs-expand-v-wb).
    assert not matches("1", "1.0.0")
    assert resolve("1.x.x", ["1.0.0", "1.2.0", "2.0.0"]) == (True, "1.2.0")
    assert resolve("3.x", ["1.0.0"]) == (False, None)


def test_force_wins_over_the_include_and_default_fills_a_missing_version() -> None:
    rules = VersionRules.from_canonicals(
        default=[f"{SIMPLE}|0.1.0"], force=[f"{VERSION}|1.0.x"]
    )
    assert rules.effective(VERSION, "1.2.0") == "1.0.x"
    assert rules.effective(SIMPLE, None) == "0.1.0"
    assert rules.effective(SIMPLE, "0.2.0") == "0.2.0"


def test_language_preference_reads_accept_language_syntax() -> None:
    hard = LanguagePreference.parse("de,*; q=0")
    assert hard.tags == ("de",) and not hard.others_ok
    ranked = LanguagePreference.parse("en-AU; q=0.4, en")
    assert ranked.tags == ("en", "en-AU") and ranked.others_ok
    assert ranked.accepts("en-GB") and not ranked.accepts("de")
    with pytest.raises(ValueError):
        LanguagePreference.parse("-")


def test_sqlite_regexp_matches_the_whole_value_and_bad_patterns_match_nothing() -> None:
    assert regexp("o[a-z]*", "old") and not regexp("o[a-z]*", "bold")
    assert not regexp("([", "anything")


# --- $expand ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value_set", "response"),
    [
        ("simple-filter-regex", "simple/simple-expand-regex-response-valueSet.json"),
        (
            "simple-filter-regex-prop",
            "simple/simple-expand-regex-prop-response-valueSet.json",
        ),
    ],
)
def test_regex_filter_matches_whole_codes_and_property_values(
    tx_engine: Engine, value_set: str, response: str
) -> None:
    expected = set(_expected_codes(response))
    assert {m.code for m in _expand(tx_engine, VS + value_set)} == expected


def test_active_only_leaves_out_inactive_codes(tx_engine: Engine) -> None:
    reference = _reference().expand(VS + "simple-all")
    active = {code for (_, code), member in reference.items() if not member.inactive}
    assert len(active) == len(reference) - 1

    assert {
        m.code for m in _expand(tx_engine, VS + "simple-all", active_only=True)
    } == active


def test_hierarchical_expansion_nests_codes_as_the_code_system_does(
    tx_engine: Engine,
) -> None:
    expected = _json(
        "parameters/parameters-expand-all-hierarchy-response-valueSet.json"
    )

    def shape(entries: list[Any]) -> list[Any]:
        return sorted(
            (
                e["code"] if isinstance(e, dict) else e.code,
                shape(
                    e.get("contains", []) if isinstance(e, dict) else list(e.contains)
                ),
            )
            for e in entries
        )

    contains = _expand(tx_engine, VS + "simple-all", hierarchical=True)
    assert shape(contains) == shape(expected["expansion"]["contains"])


def test_paging_follows_definition_order_and_reports_the_total(
    tx_engine: Engine,
) -> None:
    expected = _expected_codes("big/expand-fifty-fifty-limit-valueset.json")
    with session_scope(tx_engine) as session:
        page = expand(session, VS + "big", options=ExpandOptions(offset=50, count=50))
    # The suite's readme: array order does not matter.
    assert sorted(m.code for m in page.contains) == sorted(expected)
    # Paging follows the code system's order of definition.
    defined = [c["code"] for c in _json("big/codesystem-big.json")["concept"]]
    assert [m.code for m in page.contains] == defined[50:100]
    assert (
        page.total
        == _json("big/expand-fifty-fifty-limit-valueset.json")["expansion"]["total"]
    )


def test_count_zero_gives_the_total_only(tx_engine: Engine) -> None:
    with session_scope(tx_engine) as session:
        answer = expand(session, VS + "simple-all", options=ExpandOptions(count=0))
    assert answer.contains == [] and answer.total == len(
        _reference().expand(VS + "simple-all")
    )


def test_an_expansion_over_the_size_limit_is_too_costly_unless_paged(
    tx_engine: Engine,
) -> None:
    with session_scope(tx_engine) as session:
        with pytest.raises(TerminologyError) as error:
            expand(session, VS + "big", options=ExpandOptions(max_size=1000))
        assert error.value.issues[0].code == "too-costly"
        paged = expand(
            session, VS + "big", options=ExpandOptions(max_size=1000, count=10)
        )
    assert len(paged.contains) == 10


def test_display_language_picks_a_designation_and_hard_preferences_drop_others(
    tx_engine: Engine,
) -> None:
    concepts = {
        c["code"]: c for c in _json("language/codesystem-en-multi.json")["concept"]
    }
    german = {
        code: next(
            (d["value"] for d in c.get("designation", []) if d["language"] == "de"),
            None,
        )
        for code, c in concepts.items()
    }
    soft = _expand(tx_engine, VS + "en-multi", language=LanguagePreference.parse("de"))
    hard = _expand(
        tx_engine, VS + "en-multi", language=LanguagePreference.parse("de,*; q=0")
    )
    assert {m.code: m.display for m in soft}["code1"] == german["code1"]
    for member in hard:
        if german.get(member.code) is not None:
            assert member.display == german[member.code]


def test_force_system_version_expands_another_version_and_changes_nothing(
    tx_engine: Engine,
) -> None:
    expected = set(
        _expected_codes("version/vs-expand-all-v-force-response-valueSet.json")
    )
    before = table_checksums(tx_engine)
    rules = VersionRules.from_canonicals(force=[f"{VERSION}|1.0.x"])
    forced = _expand(tx_engine, VS + "version-all", versions=rules)
    assert {m.code for m in forced} == expected
    assert {m.version for m in forced} == {"1.0.0"}
    assert table_checksums(tx_engine) == before
    # Without the rule the newest version is used again.
    assert {m.version for m in _expand(tx_engine, VS + "version-all")} == {"1.2.0"}


def test_a_wildcard_include_version_resolves_to_the_newest_match(
    tx_engine: Engine,
) -> None:
    expected = set(_expected_codes("version/vs-expand-v-w-response-valueSet.json"))
    assert {m.code for m in _expand(tx_engine, VS + "version-w")} == expected


@pytest.mark.parametrize("live", [False, True])
def test_a_value_set_version_asked_for_is_the_one_expanded(
    tx_engine: Engine, live: bool
) -> None:
    # version-all is loaded in two versions: no version asks for the newest, a version
    # or a pattern for the newest that matches, and one that is not loaded is not
    # found. Expected versions from the two files.
    loaded = [
        _json(f"version/{name}")["version"]
        for name in ("valueset-all-version.json", "valueset-all-version-2.json")
    ]
    newest_loaded, oldest_loaded = (
        max(loaded, key=_version_key),
        min(loaded, key=_version_key),
    )
    with session_scope(tx_engine) as session:
        for asked, found in (
            (None, newest_loaded),
            (oldest_loaded, oldest_loaded),
            (oldest_loaded.rsplit(".", 1)[0] + ".x", oldest_loaded),
        ):
            expansion = expand(session, VS + "version-all", asked, live=live)
            assert (expansion.url, expansion.version) == (VS + "version-all", found)
        with pytest.raises(ValueSetNotFound):
            expand(session, VS + "version-all", "9.9.9", live=live)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


# --- $validate-code --------------------------------------------------------------------


def _issue_keys(answer: Any) -> set[tuple[str, str, str | None]]:
    return {(i.severity, i.code, i.tx_type) for i in answer.issues}


def _expected_issue_keys(response: str) -> set[tuple[str, str, str | None]]:
    found = set()
    for parameter in _json(response)["parameter"]:
        if parameter["name"] != "issues":
            continue
        for issue in parameter["resource"]["issue"]:
            coding = issue.get("details", {}).get("coding", [{}])[0]
            found.add((issue["severity"], issue["code"], coding.get("code")))
    return found


def test_a_code_of_another_version_than_the_value_set_uses_is_a_version_error(
    tx_engine: Engine,
) -> None:
    coding = Coding(VERSION, "code1", version="1.0.0")
    with session_scope(tx_engine) as session:
        answer = validate_coding(session, VS + "version-all", coding)
    assert answer.result is False
    assert _issue_keys(answer) == _expected_issue_keys(
        "version/coding-v10-vsnn-response-parameters.json"
    )


def test_a_case_insensitive_code_system_normalizes_the_code(tx_engine: Engine) -> None:
    system = "http://hl7.org/fhir/test/CodeSystem/case-insensitive"
    with session_scope(tx_engine) as session:
        answer = validate_coding(
            session, VS + "case-insensitive", Coding(system, "CODE1")
        )
    assert answer.result is True and answer.normalized_code == "code1"
    assert _issue_keys(answer) == _expected_issue_keys(
        "case/case-coding-insensitive-code1-2-response-parameters.json"
    )


def test_an_unknown_code_of_a_fragment_is_a_warning(tx_engine: Engine) -> None:
    system = "http://hl7.org/fhir/test/CodeSystem/fragment"
    with session_scope(tx_engine) as session:
        answer = validate_coding(session, VS + "fragment", Coding(system, "code1x"))
    assert answer.result is True
    assert _issue_keys(answer) == _expected_issue_keys(
        "fragment/fragment-coding-bad-code-response-parameters.json"
    )


def test_abstract_codes_are_valid_unless_the_request_forbids_them(
    tx_engine: Engine,
) -> None:
    # code2 of the simple code system is notSelectable.
    coding = Coding(SIMPLE, "code2")
    with session_scope(tx_engine) as session:
        allowed = validate_coding(session, VS + "simple-all", coding)
        refused = validate_coding(
            session,
            VS + "simple-all",
            coding,
            options=ValidateOptions(abstract_ok=False),
        )
    assert allowed.result is True and allowed.inactive is True
    assert refused.result is False
    assert ("error", "business-rule", "code-rule") in _issue_keys(refused)


# --- request resources -----------------------------------------------------------------


def test_tx_resources_serve_one_request_and_leave_the_database_unchanged(
    tx_engine: Engine,
) -> None:
    request = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "url", "valueUri": "http://example.org/ValueSet/only-code1"},
            {
                "name": "tx-resource",
                "resource": {
                    "resourceType": "ValueSet",
                    "url": "http://example.org/ValueSet/only-code1",
                    "status": "active",
                    "compose": {
                        "include": [{"system": SIMPLE, "concept": [{"code": "code1"}]}]
                    },
                },
            },
        ],
    }
    before = table_checksums(tx_engine)
    with session_scope(tx_engine) as session:
        status, resource = fhir_operations.expand(
            session, request, fhir_operations.RequestContext()
        )
    assert status == 200
    assert [c["code"] for c in resource["expansion"]["contains"]] == ["code1"]
    assert table_checksums(tx_engine) == before


def test_compose_inactive_false_leaves_inactive_codes_out_everywhere(
    tx_engine: Engine,
) -> None:
    # The code system file marks a code inactive by property or by a retired status.
    inactive = set()
    for concept in _json("inactive/codesystem-inactive.json")["concept"]:
        for prop in concept.get("property", []):
            if prop["code"] == "inactive" and prop.get("valueBoolean") is True:
                inactive.add(concept["code"])
            if prop["code"] == "status" and prop.get("valueCode") == "retired":
                inactive.add(concept["code"])
    assert _json("inactive/valueset-all-active.json")["compose"]["inactive"] is False
    every = {c["code"] for c in _json("inactive/codesystem-inactive.json")["concept"]}
    assert inactive and inactive < every

    url = VS + "inactive-all-active"
    assert {m.code for m in _expand(tx_engine, url)} == every - inactive
    with session_scope(tx_engine) as session:
        view = set(
            session.execute(
                text(
                    f"SELECT code FROM {schema_prefix(session)}value_set_expansion "
                    "WHERE value_set_url = :url"
                ),
                {"url": url},
            ).scalars()
        )
        answer = validate_coding(
            session,
            url,
            Coding("http://hl7.org/fhir/test/CodeSystem/inactive", sorted(inactive)[0]),
        )
    assert view == every - inactive
    expected = _json("inactive/validate-inactive-2a-response-parameters.json")
    _assert_answers(answer, expected)


def test_a_value_set_supplement_and_include_concept_annotations_dress_the_expansion(
    tx_engine: Engine,
) -> None:
    value_set = _json("extensions/valueset-extensions-enumerated.json")
    expected = {
        c["code"]: c
        for c in _json("extensions/expand-echo-enumerated-valueset.json")["expansion"][
            "contains"
        ]
    }
    members = {
        m.code: m
        for m in _expand(tx_engine, value_set["url"], include_designations=True)
    }
    assert set(members) == {
        c["code"] for c in value_set["compose"]["include"][0]["concept"]
    }
    for code, entry in expected.items():
        shown = {(d.language, d.value) for d in members[code].designations}
        assert {
            (d.get("language"), d["value"]) for d in entry.get("designation", [])
        } <= shown
        properties = {
            (p.code, float(p.value) if p.type == "decimal" else p.value)
            for p in members[code].properties
        }
        for prop in entry.get("property", []):
            value = prop.get(
                "valueString", prop.get("valueCode", prop.get("valueDecimal"))
            )
            assert (prop["code"], value) in properties, (code, prop)


def test_a_value_set_naming_a_supplement_that_is_not_loaded_is_an_error(
    tx_engine: Engine,
) -> None:
    expected = _json("extensions/expand-echo-bad-supplement-outcome.json")
    with session_scope(tx_engine) as session, pytest.raises(TerminologyError) as error:
        expand(session, VS + "extensions-bad-supplement")
    assert (
        error.value.issues[0].tx_type
        == expected["issue"][0]["details"]["coding"][0]["code"]
    )


@pytest.mark.parametrize(
    "test", ["simple-coding-bad-language-vs", "simple-coding-bad-language-vslang"]
)
def test_the_value_set_language_is_the_default_display_language(
    tx_engine: Engine, test: str
) -> None:
    request = _json(f"validation/{test}-request-parameters.json")
    expected = _json(f"validation/{test}-response-parameters.json")
    coding = _parameter(request, "coding")["valueCoding"]
    with session_scope(tx_engine) as session:
        answer = validate_coding(
            session,
            _parameter(request, "url")["valueUri"],
            Coding(coding["system"], coding["code"], None, coding["display"]),
        )
    _assert_answers(answer, expected)


def test_a_withdrawn_value_set_and_a_deprecated_code_system_are_reported(
    tx_engine: Engine,
) -> None:
    expected = _json("deprecated/validate-not-withdrawn-response-parameters.json")
    with session_scope(tx_engine) as session:
        answer = validate_coding(
            session,
            VS + "not-withdrawn",
            Coding("http://hl7.org/fhir/test/CodeSystem/deprecated", "code1"),
        )
    _assert_answers(answer, expected)


def _assert_answers(answer: Validation, expected: dict[str, Any]) -> None:
    """``answer`` has HL7's expected result and issues (severity, code, issue type)."""
    assert answer.result is _parameter(expected, "result")["valueBoolean"]
    assert {(i.severity, i.code, i.tx_type) for i in answer.issues} == _issues(expected)


def _parameter(parameters: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(
        p for p in parameters["parameter"] if p["name"] == name
    )
    return found


def _issues(parameters: dict[str, Any]) -> set[tuple[str, str, str]]:
    outcome = next(
        (p["resource"] for p in parameters["parameter"] if p["name"] == "issues"),
        {"issue": []},
    )
    return {
        (i["severity"], i["code"], i["details"]["coding"][0]["code"])
        for i in outcome["issue"]
    }


def test_the_test_folder_is_there() -> None:
    assert Path(TX / "test-cases.json").is_file()
