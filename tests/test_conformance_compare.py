"""Tests of the conformance comparisons, on the real expected responses of ``tx-tests``.

Each expected response is turned into a plausible actual response (templates replaced by
values of their kind, directives removed) and then perturbed one element at a time; the
comparisons must accept the plausible response and name the element that was changed.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from thodb.conformance.compare import (
    COUNT_ARRAYS,
    OPTIONAL_PROPERTIES,
    TX_ISSUE_TYPE,
    JsonObject,
    compare_semantic,
    compare_status,
    compare_strict,
    is_excluded,
    is_optional,
    matches_template,
)
from thodb.conformance.suite import (
    Outcome,
    Report,
    Suite,
    SuiteReport,
    TestCase,
    TestResult,
    load_expected,
    load_request,
    load_resource,
    read_suites,
)

TX_TESTS = Path(__file__).resolve().parents[2] / "shared" / "tx-tests"


@pytest.fixture(scope="module")
def suites() -> list[Suite]:
    """The suites of ``shared/tx-tests/test-cases.json``."""
    return read_suites(TX_TESTS)


Case = tuple[str, TestCase, JsonObject]


@pytest.fixture(scope="module")
def cases(suites: list[Suite]) -> list[Case]:
    """Every expected response (alternatives included) with its file name and test."""
    found = []
    for suite in suites:
        for test in suite.tests:
            for name in dict.fromkeys([test.response, *test.responses.values()]):
                found.append((name, test, load_resource(TX_TESTS, name)))
    return found


def _is_error(test: TestCase, expected: JsonObject) -> bool:
    if test.http_code:
        return test.http_code.startswith("4")
    return bool(expected["resourceType"] == "OperationOutcome")


def _status(test: TestCase, expected: JsonObject) -> int:
    """An HTTP status of the class the test expects."""
    return 422 if _is_error(test, expected) else 200


def _semantic(test: TestCase, expected: JsonObject, actual: JsonObject) -> list[str]:
    return compare_semantic(
        test.operation,
        expected,
        actual,
        expected_status=test.http_code,
        actual_status=_status(test, expected),
    )


# --- turning an expected response into a plausible actual one ------------------------

_KIND_VALUES = {
    "$$": "anything at all",
    "$id$": "a-different-id.7",
    "$uuid$": "urn:uuid:0b9e4c84-5f1d-4d0e-9a5c-3f0e2a7d9c11",
    "$instant$": "2031-05-06T07:08:09.123+02:00",
    "$date$": "2030-01-02",
    "$url$": "http://example.org/fhir/x",
    "$token$": "a-token",
    "$string$": "some string",
    "$semver$": "1.2.3",
    "$version$": "5.0.0",
}


def _template_value(value: str) -> str:
    if value in _KIND_VALUES:
        return _KIND_VALUES[value]
    kind, _, argument = value[1:-1].partition(":")
    if kind == "choice":
        return argument.split("|")[-1]
    if kind == "fragments":
        return "Server wording: " + " and ".join(argument.split("|")) + "."
    if kind == "external":
        fragments = argument.partition(":")[2]
        return f"Server wording about {fragments.replace('|', ' and ')}."
    raise AssertionError(f"template {value} not known to the test")


def _instantiate(value: Any, *, keep_optional: bool) -> Any:
    """Give a response the expected one allows: templates filled in, directives gone.

    :param keep_optional: keep optional entries and properties, else leave them out.
    """
    if isinstance(value, dict):
        optional = set(value.get(OPTIONAL_PROPERTIES, ()))
        result = {}
        for name, item in value.items():
            if name.startswith("$") and name.endswith("$"):
                continue
            if is_excluded(item):
                continue
            if not keep_optional and (name in optional or is_optional(item)):
                continue
            result[name] = _instantiate(item, keep_optional=keep_optional)
        return result
    if isinstance(value, list):
        return [
            _instantiate(item, keep_optional=keep_optional)
            for item in value
            if not is_excluded(item) and (keep_optional or not is_optional(item))
        ]
    if isinstance(value, str) and len(value) > 1 and value[0] == value[-1] == "$":
        return _template_value(value)
    return copy.deepcopy(value)


def _issues_of(resource: JsonObject) -> Iterator[list[JsonObject]]:
    """Give the issue lists of a response: its own, or those of its ``issues`` parameter."""
    if resource.get("resourceType") == "OperationOutcome":
        yield resource.setdefault("issue", [])
    for parameter in resource.get("parameter", []):
        if parameter.get("name") == "issues":
            yield parameter["resource"].setdefault("issue", [])


def _reword(resource: JsonObject) -> JsonObject:
    """Replace every literal message text with other wording (templates are kept)."""
    reworded = copy.deepcopy(resource)

    def other(text: Any) -> Any:
        literal = isinstance(text, str) and not text.startswith("$")
        return f"Our own wording ({len(text)})" if literal else text

    for issues in _issues_of(reworded):
        for issue in issues:
            if "text" in issue.get("details", {}):
                issue["details"]["text"] = other(issue["details"]["text"])
            if "diagnostics" in issue:
                issue["diagnostics"] = other(issue["diagnostics"])
    for parameter in reworded.get("parameter", []):
        if parameter.get("name") == "message":
            parameter["valueString"] = other(parameter["valueString"])
    return reworded


def _plausible(expected: JsonObject) -> JsonObject:
    result = _instantiate(expected, keep_optional=True)
    assert isinstance(result, dict)
    return result


# --- (a) every expected response matches itself --------------------------------------


def test_every_expected_response_matches_itself(cases: list[Case]) -> None:
    failures = []
    for name, test, expected in cases:
        strict = compare_strict(expected, copy.deepcopy(expected))
        semantic = _semantic(test, expected, copy.deepcopy(expected))
        if strict or semantic:
            failures.append((name, strict[:2], semantic[:2]))
    assert len(cases) == 501
    assert failures == []


# --- (c) what the templates and directives allow -------------------------------------


@pytest.mark.parametrize(
    "keep_optional", [True, False], ids=["with-optional", "without"]
)
def test_a_response_the_templates_allow_passes_both(
    cases: list[Case], keep_optional: bool
) -> None:
    failures = []
    for name, test, expected in cases:
        actual = _instantiate(_reword(expected), keep_optional=keep_optional)
        strict = compare_strict(expected, actual)
        semantic = _semantic(test, expected, actual)
        if strict or semantic:
            failures.append((name, strict[:2], semantic[:2]))
    assert failures == []


def test_optional_content_left_out_is_really_left_out(cases: list[Case]) -> None:
    # Guards the test above: leaving optional content out changes most responses.
    changed = sum(
        _instantiate(expected, keep_optional=False)
        != _instantiate(expected, keep_optional=True)
        for _, _, expected in cases
    )
    assert changed > 400


def test_a_different_id_and_timestamp_pass_strict(cases: list[Case]) -> None:
    checked = 0
    for name, _, expected in cases:
        expansion = expected.get("expansion", {})
        if expansion.get("timestamp") != "$instant$" or expected.get("id") != "$id$":
            continue
        actual = _plausible(expected)
        actual["id"] = "another-id-42"
        actual["expansion"]["identifier"] = (
            "urn:uuid:11111111-2222-3333-4444-555555555555"
        )
        actual["expansion"]["timestamp"] = "2024-02-29T23:59:60Z"
        assert compare_strict(expected, actual) == [], name
        checked += 1
    assert checked > 100


@pytest.mark.parametrize(
    ("element", "value"),
    [
        ("id", "not an id!"),
        ("identifier", "0b9e4c84-5f1d-4d0e-9a5c-3f0e2a7d9c11"),
        ("timestamp", "yesterday"),
    ],
)
def test_a_value_of_the_wrong_kind_fails_strict(
    cases: list[Case], element: str, value: str
) -> None:
    checked = 0
    for name, _, expected in cases:
        if not isinstance(expected.get("expansion", {}).get(element), str):
            continue
        actual = _plausible(expected)
        actual["expansion"][element] = value
        differences = compare_strict(expected, actual)
        assert any(f"expansion.{element}" in d for d in differences), (
            name,
            differences,
        )
        checked += 1
    assert checked > 100


def test_an_unknown_property_fails_strict_but_not_semantic(cases: list[Case]) -> None:
    for name, test, expected in cases:
        actual = _plausible(expected)
        actual["x-server-note"] = "made by us"
        differences = compare_strict(expected, actual)
        assert any("x-server-note: unexpected property" in d for d in differences), name
        assert _semantic(test, expected, actual) == [], name


def test_array_order_does_not_matter(cases: list[Case]) -> None:
    for name, test, expected in cases:
        actual = _plausible(expected)
        for key in ("parameter", "issue"):
            actual.get(key, []).reverse()
        actual.get("expansion", {}).get("contains", []).reverse()
        assert compare_strict(expected, actual) == [], name
        assert _semantic(test, expected, actual) == [], name


def test_a_flat_expansion_is_semantically_the_hierarchical_one(
    suites: list[Suite],
) -> None:
    checked = 0
    for test in (t for suite in suites for t in suite.tests if "flat" in t.responses):
        flat = load_expected(TX_TESTS, test, ["flat"])
        # Leave optional content out: the flat files omit some of it.
        nested = _instantiate(load_expected(TX_TESTS, test), keep_optional=False)
        assert _semantic(test, flat, nested) == [], test.name
        checked += 1
    assert checked == 18


@pytest.mark.parametrize(
    ("template", "good", "bad"),
    [
        ("$$", "", None),
        ("$id$", "abc-1.2", "abc_1"),
        ("$uuid$", "urn:uuid:0B9E4C84-5F1D-4D0E-9A5C-3F0E2A7D9C11", "0b9e4c84"),
        ("$instant$", "2023-04-01T10:00:00Z", "2023-04-01"),
        ("$date$", "2023-04", "2023-13"),
        ("$semver$", "1.0.0-ballot", "1.0"),
        ("$string$", "x y", " x"),
        ("$choice:business-rule|not-found$", "not-found", "invalid"),
        ("$fragments:supplement|CodeSystem/x$", "Supplement codesystem/X missing", "x"),
        ("$external:2:Display 1X$", "Wrong display 'Display 1X'", "Wrong display"),
        ("$external:4$", "anything", None),
        (
            "http://x/ValueSet/y|$version$",
            "http://x/ValueSet/y|5.0.0",
            "http://x/y|4.0.1",
        ),
    ],
)
def test_templates(template: str, good: str, bad: str | None) -> None:
    assert matches_template(template, good)
    if bad is not None:
        assert not matches_template(template, bad)


# --- (b) one change to a plausible response fails, naming the element ----------------


def _assert_named(
    cases: list[Case],
    change: Callable[[TestCase, JsonObject], bool],
    element: str,
    *,
    at_least: int,
) -> None:
    """Change each plausible response (``change`` says whether it applied) and check
    that both comparisons fail with a difference naming ``element``."""
    checked = 0
    for name, test, expected in cases:
        actual = _plausible(expected)
        if not change(test, actual):
            continue
        checked += 1
        semantic = _semantic(test, expected, actual)
        strict = compare_strict(expected, actual)
        assert any(element in d for d in semantic), (name, semantic)
        assert any(element in d for d in strict), (name, strict)
    assert checked >= at_least


def _contains(actual: JsonObject) -> list[JsonObject] | None:
    """The ``contains`` of an expansion compared entry by entry (not by count)."""
    expansion = actual.get("expansion", {})
    return expansion.get("contains") or None


def _compared_by_entry(expected: JsonObject) -> bool:
    return "contains" not in expected.get("expansion", {}).get(COUNT_ARRAYS, ())


def _entry_changed(
    change: Callable[[JsonObject], None],
) -> Callable[[TestCase, JsonObject], bool]:
    def apply(test: TestCase, actual: JsonObject) -> bool:
        contains = _contains(actual)
        if contains is None:
            return False
        change(contains[len(contains) // 2])
        return True

    return apply


def _by_entry(cases: list[Case]) -> list[Case]:
    return [case for case in cases if _compared_by_entry(case[2])]


def test_removing_a_contains_entry_fails(cases: list[Case]) -> None:
    def remove(test: TestCase, actual: JsonObject) -> bool:
        contains = _contains(actual)
        if contains is None:
            return False
        contains.pop()
        return True

    _assert_named(_by_entry(cases), remove, "contains", at_least=130)


def test_changing_a_contains_display_fails(cases: list[Case]) -> None:
    def change(entry: JsonObject) -> None:
        entry["display"] = "A display nobody expects"

    _assert_named(_by_entry(cases), _entry_changed(change), "display", at_least=130)


def test_flipping_a_contains_inactive_fails(cases: list[Case]) -> None:
    def flip(entry: JsonObject) -> None:
        entry["inactive"] = not entry.get("inactive", False)

    _assert_named(_by_entry(cases), _entry_changed(flip), "inactive", at_least=130)


def _parameter_changed(
    name: str, change: Callable[[Any], Any]
) -> Callable[[TestCase, JsonObject], bool]:
    def apply(test: TestCase, actual: JsonObject) -> bool:
        for parameter in actual.get("parameter", []):
            if parameter.get("name") == name and test.operation != "lookup":
                value = next(key for key in parameter if key.startswith("value"))
                parameter[value] = change(parameter[value])
                return True
        return False

    return apply


def test_flipping_result_fails(cases: list[Case]) -> None:
    flip = _parameter_changed("result", lambda value: not value)
    _assert_named(cases, flip, "result", at_least=280)


def test_flipping_an_inactive_parameter_fails(cases: list[Case]) -> None:
    flip = _parameter_changed("inactive", lambda value: not value)
    _assert_named(cases, flip, "inactive", at_least=8)


def test_changing_a_display_parameter_fails(cases: list[Case]) -> None:
    change = _parameter_changed("display", lambda value: value + " (changed)")
    _assert_named(cases, change, "display", at_least=150)


def _issue_key(issue: JsonObject) -> tuple[Any, ...]:
    coding = issue.get("details", {}).get("coding", [])
    issue_type = [c.get("code") for c in coding if c.get("system") == TX_ISSUE_TYPE]
    return issue.get("severity"), issue.get("code"), tuple(issue_type)


def _unique_issue(issues: list[JsonObject]) -> int | None:
    """An issue no other issue of the list could stand in for (same code and type)."""
    for index, issue in enumerate(issues):
        key = _issue_key(issue)
        if sum(_issue_key(other)[1:] == key[1:] for other in issues) == 1:
            return index
    return None


def _issue_changed(
    change: Callable[[list[JsonObject], int], None],
) -> Callable[[TestCase, JsonObject], bool]:
    def apply(test: TestCase, actual: JsonObject) -> bool:
        for issues in _issues_of(actual):
            index = _unique_issue(issues)
            if index is not None:
                change(issues, index)
                return True
        return False

    return apply


def _required_issues_only(cases: list[Case]) -> list[Case]:
    """Cases where every issue is required, so that any issue we change is one."""
    kept = []
    for case in cases:
        issues = [i for found in _issues_of(copy.deepcopy(case[2])) for i in found]
        if issues and not any(is_optional(issue) for issue in issues):
            kept.append(case)
    return kept


def test_dropping_an_expected_issue_fails(cases: list[Case]) -> None:
    def drop(issues: list[JsonObject], index: int) -> None:
        del issues[index]

    _assert_named(
        _required_issues_only(cases), _issue_changed(drop), "issue", at_least=200
    )


def test_changing_an_issue_code_fails(cases: list[Case]) -> None:
    def change(issues: list[JsonObject], index: int) -> None:
        issues[index]["code"] = "security"

    _assert_named(
        _required_issues_only(cases), _issue_changed(change), "issue", at_least=200
    )


def test_an_http_status_of_the_other_class_fails(cases: list[Case]) -> None:
    for name, test, expected in cases:
        other = 200 if _is_error(test, expected) else 404
        actual = _plausible(expected)
        semantic = compare_semantic(
            test.operation,
            expected,
            actual,
            expected_status=test.http_code,
            actual_status=other,
        )
        assert any(d.startswith("http status") for d in semantic), name
        assert compare_status(expected, other, test.http_code), name
        assert (
            compare_status(expected, _status(test, expected), test.http_code) == []
        ), name


def test_a_success_instead_of_an_error_fails(cases: list[Case]) -> None:
    success = {"resourceType": "ValueSet", "expansion": {"contains": []}}
    errors = [case for case in cases if case[2]["resourceType"] == "OperationOutcome"]
    for name, test, expected in errors:
        differences = compare_semantic(test.operation, expected, success)
        assert any(d.startswith("resourceType") for d in differences), name
    assert len(errors) == 51


# --- (d) reading test-cases.json -----------------------------------------------------


def test_the_suites_and_tests_are_all_read(suites: list[Suite]) -> None:
    assert len(suites) == 15
    assert sum(len(suite.tests) for suite in suites) == 481
    assert {suite.mode for suite in suites} == {"general"}
    operations: dict[str, int] = {}
    for test in (t for suite in suites for t in suite.tests):
        operations[test.operation] = operations.get(test.operation, 0) + 1
    assert operations == {
        "validate-code": 323,
        "expand": 148,
        "lookup": 5,
        "cs-validate-code": 5,
    }


def test_every_referenced_file_exists(suites: list[Suite]) -> None:
    missing = [
        name
        for suite in suites
        for name in suite.files()
        if not (TX_TESTS / name).is_file()
    ]
    assert missing == []
    assert sum(len(suite.files()) for suite in suites) > 1000


def test_every_test_key_of_the_file_is_read(suites: list[Suite]) -> None:
    raw = json.loads((TX_TESTS / "test-cases.json").read_text(encoding="utf-8-sig"))
    assert all(not test.extra for suite in suites for test in suite.tests)
    assert all(not suite.extra for suite in suites)
    tests = {t.name: t for suite in suites for t in suite.tests}
    assert tests["big-echo-no-limit"].headers() == {"X-TOO-COSTLY-THRESHOLD": "1000"}
    assert tests["language-echo-de-de-header"].headers() == {"Accept-Language": "de"}
    assert tests["simple-expand-isa-o2"].mode == "tx.fhir.org"
    assert tests["parameters-expand-supplement-bad"].http_code == "4xx"
    assert (
        tests["big-echo-zero-fifty-limit"]
        .response_for(["tx.fhir.org"])
        .endswith("precise.json")
    )
    flat = tests["parameters-expand-all-hierarchy"]
    assert flat.response_for(["flat"]) == flat.responses["flat"] != flat.response
    assert len(raw["suites"]) == len(suites)


def test_a_profile_adds_its_parameters_to_the_request(suites: list[Suite]) -> None:
    test = next(
        t for s in suites for t in s.tests if t.name == "coding-v10-vsbb-default"
    )
    names = [p["name"] for p in load_request(TX_TESTS, test)["parameter"]]
    assert names[-2:] == ["uuid", "system-version"]
    assert len(names) == len(load_resource(TX_TESTS, test.request)["parameter"]) + 2


def test_a_report_has_a_line_per_suite_and_a_total() -> None:
    def result(name: str, semantic: Outcome, strict: Outcome) -> TestResult:
        return TestResult("simple-cases", name, "expand", semantic, strict)

    report = Report(
        [
            SuiteReport(
                "simple-cases",
                [
                    result("a", Outcome.PASSED, Outcome.FAILED),
                    result("b", Outcome.FAILED, Outcome.FAILED),
                    result("c", Outcome.SKIPPED, Outcome.SKIPPED),
                ],
            ),
            SuiteReport("case", [result("d", Outcome.PASSED, Outcome.PASSED)]),
        ]
    )
    assert report.format_lines() == [
        "simple-cases: 1 passed, 1 failed, 1 skipped",
        "case: 1 passed, 0 failed, 0 skipped",
        "2 passed, 1 failed",
    ]
    assert report.format_lines(strict=True)[-1] == "1 passed, 2 failed"
    assert [r.name for r in report.failures()] == ["b"]
