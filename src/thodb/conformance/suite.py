"""Read HL7's terminology ecosystem test suite and run it against a terminology service.

The suite is a folder holding ``test-cases.json`` and the resources it names. The file
lists suites; each suite names the setup resources (code systems and value sets) its
tests need, and each test names an operation, a request Parameters resource and the
expected response (all R5 JSON, paths relative to the folder)::

    {"suites": [{"name": "simple-cases", "mode": "general", "setup": ["simple/..."],
                 "tests": [{"name": "simple-expand-all", "operation": "expand",
                            "request": "simple/...-request-parameters.json",
                            "response": "simple/...-response-valueSet.json"}]}]}

:func:`run_suites` loads each suite's setup into a fresh service, runs the tests through
an object implementing :class:`Operations` and compares each response with
:mod:`thodb.conformance.compare`. It knows no test by name.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Protocol

from thodb.conformance.compare import (
    JsonObject,
    MatchContext,
    compare_semantic,
    compare_status,
    compare_strict,
    expected_status_class,
)
from thodb.errors import LoadError, ThodbError

logger = logging.getLogger(__name__)

#: The file that lists the suites, at the top of the test folder.
TEST_CASES = "test-cases.json"

#: The mode every runner is in; suites and tests of other modes run only when asked for.
GENERAL = "general"

_SUITE_KEYS = frozenset(
    {
        "name",
        "description",
        "mode",
        "setup",
        "tests",
        "notes",
        "extensions-handled-doco",
    }
)
_TEST_KEYS = frozenset(
    {
        "name",
        "description",
        "operation",
        "request",
        "response",
        "profile",
        "http-code",
        "mode",
        "Accept-Language",
        "header",
        "explanation",
    }
)


class SuiteSelectionError(ThodbError):
    """A suite asked for by name is not in ``test-cases.json``."""


@dataclass(frozen=True)
class Header:
    """An extra HTTP header a test sends, e.g. ``X-TOO-COSTLY-THRESHOLD: 1000``.

    :param mode: the header is sent only in this mode, when given.
    """

    name: str
    value: str
    mode: str | None = None


@dataclass(frozen=True)
class TestCase:
    """One test of a suite: an operation, its request and the expected response.

    Paths are relative to the test folder, as written in ``test-cases.json``.

    :param name: the test's name (unique within its suite, except for two repeated tests).
    :param operation: ``expand``, ``validate-code``, ``cs-validate-code``, ``lookup``...
    :param request: the request Parameters file.
    :param response: the expected response file.
    :param description: what the test checks.
    :param http_code: the expected HTTP status (``"4xx"``, ``"2xx"``...) from
        ``http-code``; ``None`` means 2xx, or 4xx for an OperationOutcome.
    :param profile: a Parameters file whose parameters are added to the request
        (``system-version``, ``check-system-version``, ``force-system-version``...).
    :param mode: the test runs only in this mode, when given.
    :param accept_language: the ``Accept-Language`` header to send.
    :param header: an extra header to send.
    :param explanation: a longer note on why the test is as it is.
    :param requests: alternative request files by mode (``request:{mode}``).
    :param responses: alternative expected responses by mode (``response:flat``,
        ``response:tx.fhir.org``).
    :param extra: any other key of the test, kept as read.
    """

    # The class name starts with "Test"; tell pytest it holds no tests.
    __test__: ClassVar[bool] = False

    name: str
    operation: str
    request: str
    response: str
    description: str = ""
    http_code: str | None = None
    profile: str | None = None
    mode: str | None = None
    accept_language: str | None = None
    header: Header | None = None
    explanation: str | None = None
    requests: Mapping[str, str] = field(default_factory=dict)
    responses: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def request_for(self, modes: Sequence[str] = ()) -> str:
        """Give the request file to use: that of the first mode with one, else the default."""
        return next(
            (self.requests[m] for m in modes if m in self.requests), self.request
        )

    def response_for(self, modes: Sequence[str] = ()) -> str:
        """Give the expected response to use, e.g. ``response:flat`` in mode ``flat``."""
        return next(
            (self.responses[m] for m in modes if m in self.responses), self.response
        )

    def headers(self, modes: Collection[str] = ()) -> dict[str, str]:
        """Give the HTTP headers the test sends (``Accept-Language`` and its ``header``)."""
        headers: dict[str, str] = {}
        if self.accept_language is not None:
            headers["Accept-Language"] = self.accept_language
        if self.header is not None and (
            self.header.mode is None or self.header.mode in modes
        ):
            headers[self.header.name] = self.header.value
        return headers

    def files(self) -> list[str]:
        """Give every file the test names: request, responses and profile."""
        names = [
            self.request,
            self.response,
            *self.requests.values(),
            *self.responses.values(),
        ]
        return names + ([self.profile] if self.profile else [])


@dataclass(frozen=True)
class Suite:
    """A suite of tests sharing one set of setup resources.

    :param name: the suite's name, as given to ``--suite``.
    :param mode: the suite runs only in this mode (``general`` for all of ours).
    :param description: what the suite is for.
    :param setup: the files of the resources to load before the tests, in order.
    :param tests: the tests, in order.
    :param notes: a pointer to further documentation, if any.
    :param extensions_handled_doco: extension urls the suite's tests cover.
    :param extra: any other key of the suite, kept as read.
    """

    name: str
    mode: str
    description: str
    setup: tuple[str, ...]
    tests: tuple[TestCase, ...]
    notes: str | None = None
    extensions_handled_doco: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def files(self) -> list[str]:
        """Give every file the suite names: setup resources and each test's files."""
        return [*self.setup, *(name for test in self.tests for name in test.files())]


def read_suites(directory: Path | str) -> list[Suite]:
    """Read ``test-cases.json`` of a test folder.

    :param directory: the folder holding ``test-cases.json``.
    :return: the suites in file order.
    :raises LoadError: when the file is missing, not JSON, or a suite or test lacks a
        required key (the message names it, e.g. ``suites[3].tests[5]``).
    """
    source = Path(directory) / TEST_CASES
    data = _read_json(source)
    suites = data.get("suites")
    if not isinstance(suites, list):
        raise LoadError(str(source), "suites", "expected an array of suites")
    return [_suite(item, str(source), f"suites[{i}]") for i, item in enumerate(suites)]


def _text(data: Mapping[str, Any], key: str, source: str, path: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise LoadError(source, f"{path}.{key}", "missing, or not a string")
    return value


def _optional_text(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return None if value is None else str(value)


def _suite(data: Any, source: str, path: str) -> Suite:
    if not isinstance(data, dict):
        raise LoadError(source, path, "expected a suite object")
    tests = data.get("tests", [])
    setup = data.get("setup", [])
    if not isinstance(tests, list) or not isinstance(setup, list):
        raise LoadError(source, path, "'tests' and 'setup' must be arrays")
    return Suite(
        name=_text(data, "name", source, path),
        mode=str(data.get("mode", GENERAL)),
        description=str(data.get("description", "")),
        setup=tuple(str(name) for name in setup),
        tests=tuple(
            _test(t, source, f"{path}.tests[{i}]") for i, t in enumerate(tests)
        ),
        notes=_optional_text(data, "notes"),
        extensions_handled_doco=tuple(data.get("extensions-handled-doco", ())),
        extra={k: v for k, v in data.items() if k not in _SUITE_KEYS},
    )


def _by_mode(data: Mapping[str, Any], prefix: str) -> dict[str, str]:
    return {
        key.removeprefix(prefix): str(value)
        for key, value in data.items()
        if key.startswith(prefix)
    }


def _test(data: Any, source: str, path: str) -> TestCase:
    if not isinstance(data, dict):
        raise LoadError(source, path, "expected a test object")
    header = data.get("header")
    if header is not None and not isinstance(header, dict):
        raise LoadError(
            source, f"{path}.header", "expected an object with name and value"
        )
    return TestCase(
        name=_text(data, "name", source, path),
        operation=_text(data, "operation", source, path),
        request=_text(data, "request", source, path),
        response=_text(data, "response", source, path),
        description=str(data.get("description", "")),
        http_code=_optional_text(data, "http-code"),
        profile=_optional_text(data, "profile"),
        mode=_optional_text(data, "mode"),
        accept_language=_optional_text(data, "Accept-Language"),
        header=(
            Header(
                _text(header, "name", source, f"{path}.header"),
                str(header.get("value", "")),
                _optional_text(header, "mode"),
            )
            if header
            else None
        ),
        explanation=_optional_text(data, "explanation"),
        requests=_by_mode(data, "request:"),
        responses=_by_mode(data, "response:"),
        extra={k: v for k, v in data.items() if k not in _TEST_KEYS and ":" not in k},
    )


def _read_json(path: Path) -> JsonObject:
    try:
        # 49 of the files start with a UTF-8 byte order mark.
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise LoadError(str(path), "", f"cannot read: {error.strerror}") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise LoadError(str(path), "", f"not JSON: {error}") from error
    if not isinstance(data, dict):
        raise LoadError(str(path), "", "expected a JSON object")
    return data


def load_resource(directory: Path | str, name: str) -> JsonObject:
    """Read one JSON resource of the test folder.

    :param directory: the test folder.
    :param name: the file's path relative to it, as written in ``test-cases.json``.
    :raises LoadError: when the file cannot be read or is not a JSON object.
    """
    return _read_json(Path(directory) / name)


def load_setup(directory: Path | str, suite: Suite) -> list[JsonObject]:
    """Read a suite's setup resources, in the order the suite lists them."""
    return [load_resource(directory, name) for name in suite.setup]


def load_request(
    directory: Path | str, test: TestCase, modes: Sequence[str] = ()
) -> JsonObject:
    """Read a test's request Parameters, with its profile's parameters appended.

    The profile (``version/parameters-*-version.json``) is a Parameters resource of
    parameters that apply to the request (``uuid``, and ``system-version``,
    ``check-system-version`` or ``force-system-version``); they are appended to the
    request's own parameters, so the service sees them as ordinary request parameters.

    :param modes: the runner's modes, to choose a ``request:{mode}`` alternative.
    """
    request = load_resource(directory, test.request_for(modes))
    if test.profile is not None:
        profile = load_resource(directory, test.profile)
        request = {
            **request,
            "parameter": [*request.get("parameter", []), *profile.get("parameter", [])],
        }
    return request


def load_expected(
    directory: Path | str, test: TestCase, modes: Sequence[str] = ()
) -> JsonObject:
    """Read a test's expected response (``response:{mode}`` for the first mode with one)."""
    return load_resource(directory, test.response_for(modes))


class Operations(Protocol):
    """The terminology service under test, as the runner sees it.

    Each operation gets the request Parameters resource (R5 JSON, as in the test files)
    and the HTTP headers the test would send (``Accept-Language`` and the like), and
    returns the HTTP status it would answer with and the response resource: a
    ValueSet or Parameters on success, an OperationOutcome on error.
    """

    def reset(self, setup: list[JsonObject]) -> None:
        """Start from an empty service holding only these resources (CodeSystem, ValueSet)."""

    def expand(
        self, request: JsonObject, *, headers: Mapping[str, str]
    ) -> tuple[int, JsonObject]:
        """Run ``ValueSet/$expand``."""

    def validate_code(
        self, request: JsonObject, *, headers: Mapping[str, str]
    ) -> tuple[int, JsonObject]:
        """Run ``ValueSet/$validate-code``."""

    def cs_validate_code(
        self, request: JsonObject, *, headers: Mapping[str, str]
    ) -> tuple[int, JsonObject]:
        """Run ``CodeSystem/$validate-code``."""

    def lookup(
        self, request: JsonObject, *, headers: Mapping[str, str]
    ) -> tuple[int, JsonObject]:
        """Run ``CodeSystem/$lookup``."""


_Handler = Callable[..., tuple[int, JsonObject]]


def _handlers(operations: Operations) -> dict[str, _Handler]:
    return {
        "expand": operations.expand,
        "validate-code": operations.validate_code,
        "cs-validate-code": operations.cs_validate_code,
        "lookup": operations.lookup,
    }


#: The operations the runner can run; tests of any other operation are skipped.
SUPPORTED_OPERATIONS = frozenset(
    {"expand", "validate-code", "cs-validate-code", "lookup"}
)


class Outcome(Enum):
    """The result of one test under one comparison."""

    #: The response matched the expected one.
    PASSED = "passed"
    #: The response differed, or the operation raised a thodb error.
    FAILED = "failed"
    #: The test was not run (operation not supported, or mode not enabled).
    SKIPPED = "skipped"


@dataclass(frozen=True)
class TestResult:
    """The result of one test.

    :param suite: the suite's name.
    :param name: the test's name.
    :param operation: the test's operation.
    :param semantic: the outcome of :func:`~thodb.conformance.compare.compare_semantic`.
    :param strict: the outcome of :func:`~thodb.conformance.compare.compare_strict`
        (with the HTTP status class checked too).
    :param semantic_differences: what the semantic comparison found.
    :param strict_differences: what the strict comparison found.
    :param status: the HTTP status the service gave, when it ran.
    :param skip_reason: why the test was skipped, when it was.
    """

    __test__: ClassVar[bool] = False

    suite: str
    name: str
    operation: str
    semantic: Outcome
    strict: Outcome
    semantic_differences: tuple[str, ...] = ()
    strict_differences: tuple[str, ...] = ()
    status: int | None = None
    skip_reason: str | None = None


@dataclass
class Counts:
    """How many tests passed, failed and were skipped."""

    passed: int = 0
    failed: int = 0
    skipped: int = 0

    def add(self, outcome: Outcome) -> None:
        """Count one more test with this outcome."""
        setattr(self, outcome.value, getattr(self, outcome.value) + 1)


@dataclass
class SuiteReport:
    """The results of one suite's tests, in order."""

    name: str
    results: list[TestResult] = field(default_factory=list)

    @property
    def semantic(self) -> Counts:
        """Counts under the semantic comparison."""
        return _count(result.semantic for result in self.results)

    @property
    def strict(self) -> Counts:
        """Counts under the strict comparison."""
        return _count(result.strict for result in self.results)


def _count(outcomes: Iterable[Outcome]) -> Counts:
    counts = Counts()
    for outcome in outcomes:
        counts.add(outcome)
    return counts


@dataclass
class Report:
    """The results of a run, suite by suite."""

    suites: list[SuiteReport] = field(default_factory=list)

    @property
    def semantic(self) -> Counts:
        """Counts of all suites under the semantic comparison."""
        return _count(r.semantic for suite in self.suites for r in suite.results)

    @property
    def strict(self) -> Counts:
        """Counts of all suites under the strict comparison."""
        return _count(r.strict for suite in self.suites for r in suite.results)

    def failures(self, *, strict: bool = False) -> list[TestResult]:
        """Give the failed tests under the semantic (or the strict) comparison."""
        return [
            result
            for suite in self.suites
            for result in suite.results
            if (result.strict if strict else result.semantic) is Outcome.FAILED
        ]

    def format_lines(self, *, strict: bool = False) -> list[str]:
        """Summarise the run in one line per suite and a line for the whole run.

        Suite lines read ``name: P passed, F failed, S skipped``; the last line reads
        ``P passed, F failed``.

        :param strict: count under the strict comparison instead of the semantic one.
        """
        lines = []
        for suite in self.suites:
            counts = suite.strict if strict else suite.semantic
            lines.append(
                f"{suite.name}: {counts.passed} passed, {counts.failed} failed, "
                f"{counts.skipped} skipped"
            )
        total = self.strict if strict else self.semantic
        lines.append(f"{total.passed} passed, {total.failed} failed")
        return lines


def run_suites(
    directory: Path | str,
    operations: Operations,
    *,
    suites: Collection[str] | None = None,
    modes: Sequence[str] = (),
    output: Path | str | None = None,
) -> Report:
    """Run the test suites of a test folder against a terminology service.

    Suites of mode ``general`` run, and those whose mode is in ``modes``; every other
    suite is reported with all its tests skipped. Each suite that runs starts with
    ``operations.reset(setup)``. A test is skipped when its operation is not one of
    :data:`SUPPORTED_OPERATIONS` or its ``mode`` is not enabled.

    :param directory: the folder holding ``test-cases.json``.
    :param operations: the service under test.
    :param suites: run only the suites of these names (all when ``None``).
    :param modes: modes to enable besides ``general``, e.g. ``flat`` (which selects the
        ``response:flat`` answers) or ``tx.fhir.org``.
    :param output: a folder to write, for each failing test, the actual response
        (``{suite}/{test}.json``) and a readable diff (``{suite}/{test}.diff.txt``).
    :return: the results, suite by suite.
    :raises SuiteSelectionError: when a name in ``suites`` is not a suite.
    :raises LoadError: when a test file is missing or not JSON.
    """
    root = Path(directory)
    selected = _select(read_suites(root), suites)
    enabled = frozenset({GENERAL, *modes})
    run = _Run(
        root=root,
        operations=operations,
        modes=tuple(modes),
        enabled=enabled,
        context=MatchContext(modes=enabled),
        output=Path(output) if output is not None else None,
    )
    report = Report([run.suite(suite) for suite in selected])
    logger.info("%s", report.format_lines()[-1])
    return report


def _select(suites: list[Suite], names: Collection[str] | None) -> list[Suite]:
    if names is None:
        return suites
    known = {suite.name for suite in suites}
    unknown = sorted(set(names) - known)
    if unknown:
        raise SuiteSelectionError(
            f"no suite named {', '.join(unknown)} in {TEST_CASES}; "
            f"the suites are: {', '.join(suite.name for suite in suites)}"
        )
    return [suite for suite in suites if suite.name in names]


@dataclass(frozen=True)
class _Run:
    """One run's settings, shared by its suites and tests."""

    root: Path
    operations: Operations
    modes: tuple[str, ...]
    enabled: frozenset[str]
    context: MatchContext
    output: Path | None

    def skip_reason(self, suite: Suite, test: TestCase) -> str | None:
        if suite.mode not in self.enabled:
            return f"suite mode {suite.mode!r} is not enabled"
        if test.operation not in SUPPORTED_OPERATIONS:
            return f"operation {test.operation!r} is not supported"
        if test.mode is not None and test.mode not in self.enabled:
            return f"test mode {test.mode!r} is not enabled"
        return None

    def suite(self, suite: Suite) -> SuiteReport:
        report = SuiteReport(suite.name)
        reasons = [self.skip_reason(suite, test) for test in suite.tests]
        if any(reason is None for reason in reasons):
            self.operations.reset(load_setup(self.root, suite))
        file_names: dict[str, int] = {}
        for test, reason in zip(suite.tests, reasons, strict=True):
            if reason is not None:
                logger.debug("%s/%s skipped: %s", suite.name, test.name, reason)
                report.results.append(_skipped(suite, test, reason))
                continue
            # Two tests of the version suite share a name; give their files distinct names.
            seen = file_names[test.name] = file_names.get(test.name, 0) + 1
            stem = test.name if seen == 1 else f"{test.name}-{seen}"
            report.results.append(self.test(suite, test, stem))
        counts = report.semantic
        logger.info(
            "%s: %d passed, %d failed, %d skipped",
            suite.name,
            counts.passed,
            counts.failed,
            counts.skipped,
        )
        return report

    def test(self, suite: Suite, test: TestCase, stem: str) -> TestResult:
        request = load_request(self.root, test, self.modes)
        expected = load_expected(self.root, test, self.modes)
        handler = _handlers(self.operations)[test.operation]
        actual: JsonObject | None
        try:
            status, actual = handler(request, headers=test.headers(self.enabled))
        except ThodbError as error:
            # A service should answer errors with an OperationOutcome; one that raises
            # instead fails this test without stopping the run.
            status, actual = None, None
            semantic = strict = [f"operation raised {type(error).__name__}: {error}"]
        else:
            semantic = compare_semantic(
                test.operation,
                expected,
                actual,
                expected_status=test.http_code,
                actual_status=status,
                context=self.context,
            )
            strict = compare_status(expected, status, test.http_code)
            strict += compare_strict(expected, actual, context=self.context)
        result = TestResult(
            suite=suite.name,
            name=test.name,
            operation=test.operation,
            semantic=Outcome.FAILED if semantic else Outcome.PASSED,
            strict=Outcome.FAILED if strict else Outcome.PASSED,
            semantic_differences=tuple(semantic),
            strict_differences=tuple(strict),
            status=status,
        )
        logger.debug("%s/%s: %s", suite.name, test.name, result.semantic.value)
        if self.output is not None and (semantic or strict):
            _write_failure(
                self.output / suite.name, stem, test, result, expected, actual
            )
        return result


def _skipped(suite: Suite, test: TestCase, reason: str) -> TestResult:
    return TestResult(
        suite=suite.name,
        name=test.name,
        operation=test.operation,
        semantic=Outcome.SKIPPED,
        strict=Outcome.SKIPPED,
        skip_reason=reason,
    )


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _write_failure(
    folder: Path,
    stem: str,
    test: TestCase,
    result: TestResult,
    expected: JsonObject,
    actual: JsonObject | None,
) -> None:
    """Write a failing test's actual response and a readable diff into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = _UNSAFE.sub("_", stem)
    if actual is not None:
        (folder / f"{stem}.json").write_text(_dump(actual) + "\n", encoding="utf-8")
    (folder / f"{stem}.diff.txt").write_text(
        _diff_text(test, result, expected, actual), encoding="utf-8"
    )


def _dump(resource: JsonObject) -> str:
    return json.dumps(resource, indent=2, ensure_ascii=False, sort_keys=True)


def _diff_text(
    test: TestCase, result: TestResult, expected: JsonObject, actual: JsonObject | None
) -> str:
    wanted = expected_status_class(expected, test.http_code)
    lines = [
        f"{result.suite}/{result.name} ({result.operation})",
        f"request: {test.request}",
        f"expected: {test.response} (http status {wanted}xx)",
        f"actual http status: {result.status}",
        "",
        f"semantic: {result.semantic.value}",
        *(f"  - {d}" for d in result.semantic_differences),
        f"strict: {result.strict.value}",
        *(f"  - {d}" for d in result.strict_differences),
        "",
    ]
    if actual is not None:
        # Keys are sorted on both sides so that the diff shows content, not key order.
        lines += difflib.unified_diff(
            _dump(expected).splitlines(),
            _dump(actual).splitlines(),
            fromfile=f"expected/{test.response}",
            tofile="actual",
            lineterm="",
        )
    return "\n".join(lines) + "\n"
