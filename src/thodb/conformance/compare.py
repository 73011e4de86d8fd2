"""Compare a terminology operation's actual response with the test suite's expected one.

HL7's terminology ecosystem test suite (``test-cases.json`` and the files beside it) gives,
for each request, an expected response in R5 JSON. That response is a template rather
than a literal answer: strings such as ``$id$`` or ``$instant$`` stand for any value of
that kind, and objects carry directives such as ``$optional$`` and
``$optional-properties$``. The rules come from the suite's documentation (the "Test
Templates" section of the tx-ecosystem IG's test-cases page, and the readme of the test
folder, which says that array order never matters).

Two comparisons are offered, each returning human-readable differences; an empty list
means the response passes:

* :func:`compare_semantic` checks what a terminology client relies on (which codes an
  expansion holds, whether a code is valid, which issues were found) and ignores
  metadata and message wording.
* :func:`compare_strict` checks the whole resource under the suite's template rules.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: A FHIR resource (or any JSON object) as parsed by :func:`json.loads`.
JsonObject = dict[str, Any]

#: The code system of the issue types in ``OperationOutcome.issue.details.coding``.
TX_ISSUE_TYPE = "http://hl7.org/fhir/tools/CodeSystem/tx-issue-type"

#: The FHIR version thodb answers in; ``$version$`` and ``version:`` filters use it.
FHIR_VERSION = "5.0.0"

OPTIONAL = "$optional$"
ONLY = "$only$"
OPTIONAL_PROPERTIES = "$optional-properties$"
COUNT_ARRAYS = "$count-arrays$"
_DIRECTIVES = frozenset({OPTIONAL, ONLY, OPTIONAL_PROPERTIES, COUNT_ARRAYS})

# Longest value shown in a difference; responses can hold whole value sets.
_SHOW_LIMIT = 120


def _pattern(regex: str) -> Callable[[str], bool]:
    compiled = re.compile(regex)
    return lambda value: compiled.fullmatch(value) is not None


# The value kinds of ``$kind$`` templates. The id, date and instant patterns are the regular
# expressions of the FHIR R5 datatypes page; the others follow the test suite's wording.
_KINDS: dict[str, Callable[[str], bool]] = {
    "id": _pattern(r"[A-Za-z0-9\-.]{1,64}"),
    "uuid": _pattern(r"urn:uuid:[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}"),
    "instant": _pattern(
        r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)-(0[1-9]|1[0-2])"
        r"-(0[1-9]|[1-2][0-9]|3[0-1])T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)"
        r"(\.[0-9]{1,9})?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
    ),
    "date": _pattern(
        r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
        r"(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?"
    ),
    "url": _pattern(r"(https?://|www\.)\S+"),
    "token": _pattern(r"[0-9A-Za-z_][0-9A-Za-z_.\-]*"),
    "semver": _pattern(
        r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
        r"(-[0-9A-Za-z\-]+(\.[0-9A-Za-z\-]+)*)?(\+[0-9A-Za-z\-]+(\.[0-9A-Za-z\-]+)*)?"
    ),
    "string": lambda value: value == value.strip(),
}


@dataclass(frozen=True)
class MatchContext:
    """What templates and ``$optional$``/``$only$`` filters are evaluated against.

    :param modes: the runner's modes (``general``, ``flat``, ``tx.fhir.org``...); a filter
        naming a mode asks whether it is among these.
    :param fhir_version: the server's FHIR version, for ``$version$`` and ``version:``.
    :param externals: server-specific message strings by number, for ``$external:N$``;
        without an entry the template's fragments (if any) are checked instead.
    """

    modes: frozenset[str] = frozenset()
    fhir_version: str = FHIR_VERSION
    externals: Mapping[str, str] = field(default_factory=dict)


DEFAULT_CONTEXT = MatchContext()


def matches_template(
    expected: str, actual: str, context: MatchContext = DEFAULT_CONTEXT
) -> bool:
    """Tell whether an actual string matches an expected string of a test response.

    The expected string is taken literally unless it is one of the suite's templates:
    ``$$`` (anything), ``$id$``, ``$uuid$``, ``$instant$``, ``$date$``, ``$url$``,
    ``$token$``, ``$semver$``, ``$string$`` (a value of that kind), ``$version$`` (the FHIR
    version, also inside a longer string), ``$choice:a|b$`` (one of the values),
    ``$fragments:a|b$`` (contains every fragment, ignoring case) and ``$external:N$`` or
    ``$external:N:a|b$`` (string N of the externals, else the fragments, else anything).
    A literal copy of the template also matches, so that a response matches itself; an
    unknown ``$word$`` is compared literally.

    :param expected: the string in the expected response.
    :param actual: the string in the actual response.
    :param context: externals and FHIR version to use.
    :return: ``True`` when the actual string is acceptable.
    """
    if actual == expected:
        return True
    if "$version$" in expected and expected != "$version$":
        return actual == expected.replace("$version$", context.fhir_version)
    if not _is_template(expected):
        return False
    body = expected[1:-1]
    kind, colon, argument = body.partition(":")
    if not colon:
        if body == "":
            return True
        if body == "version":
            return actual == context.fhir_version
        check = _KINDS.get(body)
        return check is not None and check(actual)
    if kind == "choice":
        return actual in argument.split("|")
    if kind == "fragments":
        return _contains_all(actual, argument.split("|"))
    if kind == "external":
        key, _, fragments = argument.partition(":")
        if key in context.externals:
            return actual == context.externals[key]
        return _contains_all(actual, fragments.split("|")) if fragments else True
    return False


def _is_template(value: object) -> bool:
    return isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == "$"


def _contains_all(text: str, fragments: Sequence[str]) -> bool:
    lowered = text.lower()
    return all(fragment.lower() in lowered for fragment in fragments)


def filter_passes(value: object, context: MatchContext = DEFAULT_CONTEXT) -> bool:
    """Evaluate the filter of an ``$optional$`` or ``$only$`` directive.

    ``true``/``false`` stand for themselves; ``"warning:..."`` always passes (the entry is
    optional, the runner may mention it); ``"version:4"`` passes when the FHIR version
    starts with ``4``; ``"!mode"`` passes when the mode is off and ``"mode"`` when it is on.
    The suite's page words the plain ``"mode"`` case as "optional unless the runner is in
    that mode", which would mean the same as ``"!mode"``; we read it as the negation of
    ``"!mode"``. The files in ``tx-tests`` use only ``true``, ``"!tx.fhir.org"`` and
    ``"warning:version"``.

    :param value: the directive's value.
    :param context: the modes and FHIR version.
    :return: whether the filter passes.
    """
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        return False
    if value.startswith("warning:"):
        return True
    if value.startswith("version:"):
        return context.fhir_version.startswith(value.removeprefix("version:"))
    if value.startswith("!"):
        return value[1:] not in context.modes
    return value in context.modes


def is_optional(item: object, context: MatchContext = DEFAULT_CONTEXT) -> bool:
    """Tell whether an expected object may be left out (its ``$optional$`` passes)."""
    return (
        isinstance(item, dict)
        and OPTIONAL in item
        and filter_passes(item[OPTIONAL], context)
    )


def is_excluded(item: object, context: MatchContext = DEFAULT_CONTEXT) -> bool:
    """Tell whether an expected object must be absent (its ``$only$`` does not pass)."""
    return (
        isinstance(item, dict)
        and ONLY in item
        and not filter_passes(item[ONLY], context)
    )


def _may_be_absent(value: object, context: MatchContext) -> bool:
    if isinstance(value, list):
        # FHIR JSON has no empty arrays, so an array of optional entries may be absent.
        return all(
            is_optional(item, context) or is_excluded(item, context) for item in value
        )
    return is_optional(value, context)


def _show(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 3] + "..."


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "null"


# --- pairing the entries of two arrays, in any order ---------------------------------


@dataclass
class _Pairing:
    """How expected entries were paired with actual ones.

    :param closest: each required expected entry left without an equal actual entry,
        with the most similar actual entry still free (or ``None``) and their differences.
    :param unexpected: actual entries equal to no expected entry and not named as closest.
    """

    closest: list[tuple[int, int | None, list[str]]]
    unexpected: list[int]


def _pair_up(
    expected_count: int,
    actual_count: int,
    differ: Callable[[int, int], list[str]],
    *,
    required: Sequence[bool],
    expected_keys: Sequence[Hashable] | None = None,
    actual_keys: Sequence[Hashable] | None = None,
    allow_extra: bool = False,
) -> _Pairing:
    """Pair expected with actual entries one to one, ignoring order.

    This is a maximum bipartite matching (augmenting paths): an entry that is already
    paired stays paired when a later one needs its partner, so required entries are
    paired first and optional ones only take what is left. Keys are a hint of which
    actual entries to try first; they never decide equality.
    """
    cache: dict[tuple[int, int], list[str]] = {}

    def differences(i: int, j: int) -> list[str]:
        if (i, j) not in cache:
            cache[(i, j)] = differ(i, j)
        return cache[(i, j)]

    by_key: dict[Hashable, list[int]] = {}
    for j, key in enumerate(actual_keys or ()):
        by_key.setdefault(key, []).append(j)

    def candidates(i: int) -> list[int]:
        first = [i] if i < actual_count else []
        if expected_keys is not None:
            first += by_key.get(expected_keys[i], [])
        return list(dict.fromkeys([*first, *range(actual_count)]))

    owner: dict[int, int] = {}

    def assign(i: int, visited: set[int]) -> bool:
        for j in candidates(i):
            if j in visited or differences(i, j):
                continue
            visited.add(j)
            if j not in owner or assign(owner[j], visited):
                owner[j] = i
                return True
        return False

    left: list[int] = []
    for i in sorted(range(expected_count), key=lambda i: not required[i]):
        paired = assign(i, set())
        if not paired and required[i]:
            left.append(i)

    free = [j for j in range(actual_count) if j not in owner]
    closest: list[tuple[int, int | None, list[str]]] = []
    used: set[int] = set()
    for i in sorted(left):
        options = [j for j in free if j not in used]
        if expected_keys is not None and actual_keys is not None:
            same = [j for j in options if actual_keys[j] == expected_keys[i]]
            options = same or options
        best = min(options, key=lambda j: len(differences(i, j)), default=None)
        if best is None:
            closest.append((i, None, []))
        else:
            used.add(best)
            closest.append((i, best, differences(i, best)))
    unexpected = [] if allow_extra else [j for j in free if j not in used]
    return _Pairing(closest, unexpected)


# --- strict comparison ---------------------------------------------------------------


def compare_strict(
    expected: JsonObject, actual: JsonObject, *, context: MatchContext = DEFAULT_CONTEXT
) -> list[str]:
    """Compare a whole response with the expected one under the test suite's rules.

    The rules, as we read the suite's documentation:

    * Property order never matters, and neither does array order: the entries of an
      expected array are paired one to one with actual entries that match them.
    * Every property of the actual response must be in the expected one ("unexpected
      property"), and every expected property must be present, except those named in
      the object's ``$optional-properties$`` (``*`` for all of them), objects whose
      ``$optional$`` filter passes, and arrays made only of such objects.
    * An array entry whose ``$optional$`` passes may be missing; one whose ``$only$``
      filter fails must not be there. A property in ``$count-arrays$`` is compared by
      its number of entries only. The directives themselves are never compared.
    * Strings are compared with :func:`matches_template`; booleans, numbers and null by
      value and type. Two strings that both hold ``<div`` (narrative XHTML) are not
      compared.
    * Message texts - ``OperationOutcome.issue.details.text``, ``issue.diagnostics`` and
      the value of a Parameters ``message`` parameter - are server-specific wording: the
      literal texts in the files are tx.fhir.org's. Such a text must be present where
      expected, but it is compared only when the expected value is a template
      (``$fragments:...$``, ``$external:N:...$``, ``$choice:...$``, ``$$``), which is how
      the suite states the part of a message every server must give.
    * The HTTP status is not part of this comparison; see :func:`compare_status`.

    :param expected: the expected response, directives and templates included.
    :param actual: the response the server gave.
    :param context: modes, FHIR version and externals for templates and filters.
    :return: the differences, each naming the element path, e.g.
        ``ValueSet.expansion.contains[2:code2a].display: expected "A", got "B"``;
        array entries are numbered as in the expected response, with their ``name`` or
        ``code`` after a colon.
    """
    return _strict(expected, actual, str(expected.get("resourceType", "$")), context)


def _strict(expected: Any, actual: Any, path: str, context: MatchContext) -> list[str]:
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected an object, got {_kind(actual)}"]
        return _strict_object(expected, actual, path, context)
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return [f"{path}: expected an array, got {_kind(actual)}"]
        return _strict_array(expected, actual, path, context)
    if isinstance(expected, str):
        if not isinstance(actual, str):
            return [f"{path}: expected a string, got {_kind(actual)}"]
        if "<div" in expected and "<div" in actual:
            return []
        if matches_template(expected, actual, context):
            return []
        return [f"{path}: expected {_show(expected)}, got {_show(actual)}"]
    if isinstance(expected, bool) or expected is None:
        if type(actual) is type(expected) and actual == expected:
            return []
        return [f"{path}: expected {_show(expected)}, got {_show(actual)}"]
    if isinstance(actual, bool) or not isinstance(actual, (int, float)):
        return [f"{path}: expected a number, got {_kind(actual)}"]
    if actual != expected:
        return [f"{path}: expected {_show(expected)}, got {_show(actual)}"]
    return []


def _strict_object(
    expected: JsonObject, actual: JsonObject, path: str, context: MatchContext
) -> list[str]:
    optional = set(expected.get(OPTIONAL_PROPERTIES, ()))
    count_only = set(expected.get(COUNT_ARRAYS, ()))
    differences: list[str] = []
    for name, value in expected.items():
        if name in _DIRECTIVES:
            continue
        where = f"{path}.{name}"
        if name not in actual:
            if not (
                is_excluded(value, context)
                or "*" in optional
                or name in optional
                or _may_be_absent(value, context)
            ):
                differences.append(f"{where}: missing (expected {_show(value)})")
        elif is_excluded(value, context):
            differences.append(f"{where}: present, but $only$ excludes it here")
        elif name in count_only:
            differences += _count(value, actual[name], where)
        elif _is_message_text(path, expected, name) and not _is_template(value):
            if not isinstance(actual[name], str):
                differences.append(
                    f"{where}: expected a string, got {_kind(actual[name])}"
                )
        else:
            differences += _strict(value, actual[name], where, context)
    for name, value in actual.items():
        if name not in expected:
            differences.append(f"{path}.{name}: unexpected property ({_show(value)})")
    return differences


def _count(expected: Any, actual: Any, where: str) -> list[str]:
    expected_size = len(expected) if isinstance(expected, list) else 1
    actual_size = len(actual) if isinstance(actual, list) else 1
    if expected_size == actual_size:
        return []
    return [f"{where}: expected {expected_size} entries, got {actual_size}"]


_ISSUE = re.compile(r"\.issue\[[^\]]*\]$")
_ISSUE_DETAILS = re.compile(r"\.issue\[[^\]]*\]\.details$")
_PARAMETER = re.compile(r"\.parameter\[[^\]]*\]$")


def _is_message_text(path: str, expected: JsonObject, name: str) -> bool:
    """Tell whether ``expected[name]`` holds the wording of a message (see compare_strict)."""
    if name == "text" and _ISSUE_DETAILS.search(path):
        return True
    if name == "diagnostics" and _ISSUE.search(path):
        return True
    return (
        name.startswith("value")
        and expected.get("name") == "message"
        and _PARAMETER.search(path) is not None
    )


def _strict_array(
    expected: list[Any], actual: list[Any], path: str, context: MatchContext
) -> list[str]:
    kept = [
        (i, item) for i, item in enumerate(expected) if not is_excluded(item, context)
    ]

    def differ(k: int, j: int) -> list[str]:
        i, item = kept[k]
        return _strict(item, actual[j], _entry_path(path, i, item), context)

    pairing = _pair_up(
        len(kept),
        len(actual),
        differ,
        required=[not is_optional(item, context) for _, item in kept],
        expected_keys=[_entry_key(item) for _, item in kept],
        actual_keys=[_entry_key(item) for item in actual],
    )
    differences: list[str] = []
    for k, j, closest in pairing.closest:
        i, item = kept[k]
        if j is None:
            differences.append(f"{_entry_path(path, i, item)}: missing ({_show(item)})")
        else:
            differences += closest
    for j in pairing.unexpected:
        differences.append(f"{path}[{j}]: unexpected entry ({_show(actual[j])})")
    return differences


def _entry_label(item: object) -> str | None:
    if isinstance(item, dict):
        for name in ("name", "code"):
            value = item.get(name)
            if isinstance(value, str) and not _is_template(value):
                return value
    return None


def _entry_path(path: str, index: int, item: object) -> str:
    label = _entry_label(item)
    return f"{path}[{index}:{label}]" if label else f"{path}[{index}]"


def _entry_key(item: object) -> Hashable:
    if isinstance(item, dict):
        return tuple(
            item.get(name) if isinstance(item.get(name), str) else None
            for name in ("name", "system", "code", "url")
        )
    return item if isinstance(item, (str, int, float, bool)) else None


# --- semantic comparison -------------------------------------------------------------


def expected_status_class(
    expected: JsonObject, expected_status: str | int | None
) -> str:
    """Give the class (``"2"``, ``"4"``...) of the HTTP status a test expects.

    :param expected: the expected response; an OperationOutcome means an error.
    :param expected_status: the test's ``http-code`` (``"4xx"``, ``"422"``...), if any.
    """
    if expected_status is not None and str(expected_status):
        return str(expected_status)[0]
    return "4" if expected.get("resourceType") == "OperationOutcome" else "2"


def compare_status(
    expected: JsonObject,
    actual_status: int | None,
    expected_status: str | int | None = None,
) -> list[str]:
    """Compare the class of the actual HTTP status with the one the test expects.

    :param expected: the expected response (an OperationOutcome means 4xx by default).
    :param actual_status: the status the server gave; ``None`` skips the check.
    :param expected_status: the test's ``http-code``, which takes precedence.
    :return: one difference naming ``http status``, or none.
    """
    if actual_status is None:
        return []
    wanted = expected_status_class(expected, expected_status)
    if str(actual_status)[:1] == wanted:
        return []
    return [f"http status: expected {wanted}xx, got {actual_status}"]


def compare_semantic(
    operation: str,
    expected: JsonObject,
    actual: JsonObject,
    *,
    expected_status: str | int | None = None,
    actual_status: int | None = None,
    context: MatchContext = DEFAULT_CONTEXT,
) -> list[str]:
    """Compare what a terminology client relies on in a response, ignoring the rest.

    * All operations: the HTTP status class (from the test's ``http-code`` when given,
      else 4xx for an expected OperationOutcome and 2xx otherwise) and the resource type.
    * Errors (an expected OperationOutcome): for each expected issue, some actual issue
      has the same ``code`` and the same tx-issue-type (the ``details.coding`` of
      :data:`TX_ISSUE_TYPE`, when the expected issue has one).
    * ``expand``: ``expansion.total`` and ``expansion.offset`` where expected; the
      ``contains`` entries, flattened through nested ``contains``, as a multiset compared
      on system, code, display, inactive and abstract (absent means false), and on
      version, designations and properties where the expected entry has them. With
      ``"$count-arrays$": ["contains"]`` only the number of entries is compared.
    * ``validate-code`` and ``cs-validate-code``: ``result``, and ``display``, ``code``,
      ``system``, ``version`` and ``inactive`` where expected; the set of (severity,
      code, tx-issue-type) of the issues in the ``issues`` parameter, both ways.
    * ``lookup``: ``name``, ``version`` and ``display`` where expected, and every expected
      ``property`` and ``designation`` with its parts (the actual may have more).
    * Any other operation: :func:`compare_strict`.

    Message texts are never compared. Expected entries whose ``$optional$`` passes may be
    missing, and string values are matched as templates (``$choice:...$`` etc.).

    :param operation: the test's operation, e.g. ``expand``.
    :param expected: the expected response.
    :param actual: the response the server gave.
    :param expected_status: the test's ``http-code``, if any.
    :param actual_status: the HTTP status the server gave; ``None`` skips that check.
    :param context: modes, FHIR version and externals for templates and filters.
    :return: the differences, each naming the element, e.g. ``Parameters.result:
        expected true, got false``.
    """
    differences = compare_status(expected, actual_status, expected_status)
    expected_type = expected.get("resourceType")
    actual_type = actual.get("resourceType")
    if expected_type != actual_type:
        what = "an error" if expected_type == "OperationOutcome" else "a success"
        return differences + [
            f"resourceType: expected {expected_type} ({what}), got {actual_type}"
            + _outcome_summary(actual)
        ]
    if expected_type == "OperationOutcome":
        return differences + _semantic_outcome(expected, actual, context)
    compare = _SEMANTIC.get(operation)
    if compare is None:
        return differences + compare_strict(expected, actual, context=context)
    return differences + compare(expected, actual, context)


def _outcome_summary(resource: JsonObject) -> str:
    if resource.get("resourceType") != "OperationOutcome":
        return ""
    issues = [_issue_label(_issue_key(issue)) for issue in resource.get("issue", [])]
    return f" with issues {', '.join(issues)}" if issues else ""


def _tx_issue_type(issue: JsonObject) -> str | None:
    for coding in issue.get("details", {}).get("coding", []):
        if coding.get("system") == TX_ISSUE_TYPE:
            code = coding.get("code")
            return code if isinstance(code, str) else None
    return None


_IssueKey = tuple[str | None, str | None, str | None]


def _issue_key(issue: JsonObject) -> _IssueKey:
    return issue.get("severity"), issue.get("code"), _tx_issue_type(issue)


def _issue_label(key: _IssueKey) -> str:
    severity, code, issue_type = key
    return f"(severity={severity}, code={code}, tx-issue-type={issue_type})"


def _same(expected: Any, actual: Any, context: MatchContext) -> bool:
    return not _strict(expected, actual, "$", context)


def _same_or_unstated(
    expected: str | None, actual: str | None, context: MatchContext
) -> bool:
    if expected is None:
        return True
    return actual is not None and matches_template(expected, actual, context)


def _same_or_absent(
    expected: str | None, actual: str | None, context: MatchContext
) -> bool:
    if expected is None or actual is None:
        return expected is actual
    return matches_template(expected, actual, context)


def _semantic_outcome(
    expected: JsonObject, actual: JsonObject, context: MatchContext
) -> list[str]:
    actual_issues = actual.get("issue", [])
    differences: list[str] = []
    for issue in expected.get("issue", []):
        if is_optional(issue, context) or is_excluded(issue, context):
            continue
        code, issue_type = issue.get("code"), _tx_issue_type(issue)
        if not any(
            _same_or_unstated(code, other.get("code"), context)
            and _same_or_unstated(issue_type, _tx_issue_type(other), context)
            for other in actual_issues
        ):
            found = ", ".join(
                _issue_label(_issue_key(other)) for other in actual_issues
            )
            differences.append(
                f"OperationOutcome.issue: no issue with code {code!r} and tx-issue-type "
                f"{issue_type!r} (actual issues: {found or 'none'})"
            )
    return differences


def _compare_entries(
    where: str,
    expected: Sequence[Any],
    actual: Sequence[Any],
    differ: Callable[[Any, Any], list[str]],
    label: Callable[[Any], str],
    context: MatchContext,
    *,
    key: Callable[[Any], Hashable] | None = None,
    allow_extra: bool = False,
) -> list[str]:
    """Compare two collections of entries in any order, naming entries by ``label``."""
    kept = [item for item in expected if not is_excluded(item, context)]
    pairing = _pair_up(
        len(kept),
        len(actual),
        lambda i, j: differ(kept[i], actual[j]),
        required=[not is_optional(item, context) for item in kept],
        expected_keys=[key(item) for item in kept] if key else None,
        actual_keys=[key(item) for item in actual] if key else None,
        allow_extra=allow_extra,
    )
    differences: list[str] = []
    for i, j, closest in pairing.closest:
        if j is None:
            differences.append(f"{where}: missing {label(kept[i])}")
        else:
            differences.append(f"{where} {label(kept[i])}: {'; '.join(closest)}")
    for j in pairing.unexpected:
        differences.append(f"{where}: unexpected {label(actual[j])}")
    return differences


def _member(
    expected: JsonObject,
    actual: JsonObject,
    name: str,
    context: MatchContext,
    *,
    absent_matters: bool = False,
) -> list[str]:
    """Compare one member of two objects, honouring ``$optional-properties$``.

    :param absent_matters: when the expected object lacks the member, the actual one
        must lack it too (a missing display is an answer in the language tests).
    """
    if name not in expected:
        if absent_matters and name in actual:
            return [f"{name}: expected none, got {_show(actual[name])}"]
        return []
    if name not in actual:
        optional = expected.get(OPTIONAL_PROPERTIES, ())
        if name in optional or "*" in optional or is_optional(expected[name], context):
            return []
        return [f"{name}: missing (expected {_show(expected[name])})"]
    if _same(expected[name], actual[name], context):
        return []
    return [f"{name}: expected {_show(expected[name])}, got {_show(actual[name])}"]


def _flatten(contains: Sequence[JsonObject]) -> list[JsonObject]:
    entries: list[JsonObject] = []
    for entry in contains:
        entries.append(entry)
        entries += _flatten(entry.get("contains", []))
    return entries


def _semantic_expansion(
    expected: JsonObject, actual: JsonObject, context: MatchContext
) -> list[str]:
    wanted = expected.get("expansion", {})
    got = actual.get("expansion")
    if not isinstance(got, dict):
        return ["ValueSet.expansion: missing"]
    differences = [
        f"ValueSet.expansion.{difference}"
        for name in ("total", "offset")
        for difference in _member(wanted, got, name, context)
    ]
    if "contains" in wanted.get(COUNT_ARRAYS, ()):
        return differences + _count(
            wanted.get("contains", []),
            got.get("contains", []),
            "ValueSet.expansion.contains",
        )
    return differences + _compare_entries(
        "ValueSet.expansion.contains",
        _flatten(wanted.get("contains", [])),
        _flatten(got.get("contains", [])),
        lambda e, a: _contains_entry(e, a, context),
        lambda entry: f"{entry.get('system')}#{entry.get('code')}",
        context,
        key=lambda entry: (entry.get("system"), entry.get("code")),
    )


def _contains_entry(
    expected: JsonObject, actual: JsonObject, context: MatchContext
) -> list[str]:
    differences: list[str] = []
    for name in ("system", "code", "display"):
        differences += _member(expected, actual, name, context, absent_matters=True)
    for flag in ("inactive", "abstract"):
        wanted, got = expected.get(flag, False), actual.get(flag, False)
        if wanted != got:
            differences.append(f"{flag}: expected {_show(wanted)}, got {_show(got)}")
    differences += _member(expected, actual, "version", context)
    if "designation" in expected:
        differences += _compare_entries(
            "designation",
            expected["designation"],
            actual.get("designation", []),
            lambda e, a: _designation(e, a, context),
            _designation_label,
            context,
        )
    if "property" in expected:
        differences += _compare_entries(
            "property",
            expected["property"],
            actual.get("property", []),
            lambda e, a: _property(e, a, context),
            _property_label,
            context,
        )
    return differences


def _designation(
    expected: JsonObject, actual: JsonObject, context: MatchContext
) -> list[str]:
    differences = _member(expected, actual, "language", context, absent_matters=True)
    differences += _member(expected, actual, "value", context)
    use = expected.get("use")
    if isinstance(use, dict) and isinstance(actual.get("use"), dict):
        for name in ("system", "code"):
            differences += [
                f"use.{d}" for d in _member(use, actual["use"], name, context)
            ]
    elif isinstance(use, dict) and not is_optional(use, context):
        differences.append("use: missing")
    return differences


def _designation_label(designation: JsonObject) -> str:
    use = designation.get("use", {}).get("code", "-")
    return f"({designation.get('language', '-')}, {use}, {_show(designation.get('value'))})"


def _value_name(item: JsonObject) -> str | None:
    return next((name for name in item if name.startswith("value")), None)


def _property(
    expected: JsonObject, actual: JsonObject, context: MatchContext
) -> list[str]:
    differences = _member(expected, actual, "code", context)
    name = _value_name(expected)
    if name is not None:
        differences += _member(expected, actual, name, context)
    return differences


def _property_label(item: JsonObject) -> str:
    name = _value_name(item)
    return f"{item.get('code')}={_show(item.get(name)) if name else '?'}"


# Parameters of $validate-code and $lookup, compared as values.
_VALIDATION_VALUES = ("result", "display", "code", "system", "version", "inactive")
_LOOKUP_VALUES = ("name", "version", "display")


def _parameter(resource: JsonObject, name: str) -> JsonObject | None:
    for parameter in resource.get("parameter", []):
        if parameter.get("name") == name:
            return parameter  # type: ignore[no-any-return]
    return None


def _parameter_value(parameter: JsonObject) -> Any:
    name = _value_name(parameter)
    if name is not None:
        return parameter[name]
    return parameter.get("resource", parameter.get("part"))


def _compare_values(
    expected: JsonObject,
    actual: JsonObject,
    names: Sequence[str],
    context: MatchContext,
) -> list[str]:
    differences: list[str] = []
    for name in names:
        wanted = _parameter(expected, name)
        if wanted is None or is_excluded(wanted, context):
            continue
        got = _parameter(actual, name)
        where = f"Parameters.{name}"
        if got is None:
            if not is_optional(wanted, context):
                differences.append(
                    f"{where}: missing (expected {_show(_parameter_value(wanted))})"
                )
            continue
        value, other = _parameter_value(wanted), _parameter_value(got)
        if not _same(value, other, context):
            differences.append(f"{where}: expected {_show(value)}, got {_show(other)}")
    return differences


def _issues(resource: JsonObject) -> list[JsonObject]:
    parameter = _parameter(resource, "issues")
    outcome = parameter.get("resource", {}) if parameter else {}
    return list(outcome.get("issue", []))


def _semantic_validation(
    expected: JsonObject, actual: JsonObject, context: MatchContext
) -> list[str]:
    differences = _compare_values(expected, actual, _VALIDATION_VALUES, context)

    # Compared as sets: a required expected key is kept required even if it repeats.
    wanted: dict[_IssueKey, bool] = {}
    for issue in _issues(expected):
        if not is_excluded(issue, context):
            key = _issue_key(issue)
            wanted[key] = wanted.get(key, False) or not is_optional(issue, context)
    got = list(dict.fromkeys(_issue_key(issue) for issue in _issues(actual)))
    expected_keys = list(wanted)

    def differ(i: int, j: int) -> list[str]:
        names = ("severity", "code", "tx-issue-type")
        pairs = zip(names, expected_keys[i], got[j], strict=True)
        return [name for name, e, a in pairs if not _same_or_absent(e, a, context)]

    pairing = _pair_up(
        len(expected_keys),
        len(got),
        differ,
        required=[wanted[key] for key in expected_keys],
        expected_keys=expected_keys,
        actual_keys=got,
    )
    for i, j, _ in pairing.closest:
        label = _issue_label(expected_keys[i])
        if j is None:
            differences.append(f"Parameters.issues: missing issue {label}")
        else:
            differences.append(
                f"Parameters.issues: expected issue {label}, got {_issue_label(got[j])}"
            )
    for j in pairing.unexpected:
        differences.append(
            f"Parameters.issues: unexpected issue {_issue_label(got[j])}"
        )
    return differences


def _part_label(parameter: JsonObject) -> str:
    """Name a lookup ``property`` by its code part, a ``designation`` by its value part."""
    parts = {
        part.get("name"): _parameter_value(part) for part in parameter.get("part", [])
    }
    return _show(parts.get("code", parts.get("value")))


def _part_differences(
    expected: JsonObject, actual: JsonObject, context: MatchContext
) -> list[str]:
    differences: list[str] = []
    actual_parts = actual.get("part", [])
    for part in expected.get("part", []):
        if is_excluded(part, context):
            continue
        name = part.get("name")
        value = _parameter_value(part)
        same_name = [p for p in actual_parts if p.get("name") == name]
        if any(_same(value, _parameter_value(p), context) for p in same_name):
            continue
        if not same_name:
            if not is_optional(part, context):
                differences.append(f"part {name!r}: missing (expected {_show(value)})")
        else:
            got = _parameter_value(same_name[0])
            differences.append(
                f"part {name!r}: expected {_show(value)}, got {_show(got)}"
            )
    return differences


def _semantic_lookup(
    expected: JsonObject, actual: JsonObject, context: MatchContext
) -> list[str]:
    differences = _compare_values(expected, actual, _LOOKUP_VALUES, context)
    for name in ("property", "designation"):
        wanted = [p for p in expected.get("parameter", []) if p.get("name") == name]
        got = [p for p in actual.get("parameter", []) if p.get("name") == name]
        differences += _compare_entries(
            f"Parameters.{name}",
            wanted,
            got,
            lambda e, a: _part_differences(e, a, context),
            _part_label,
            context,
            key=_part_label,
            allow_extra=True,
        )
    return differences


_SEMANTIC: dict[str, Callable[[JsonObject, JsonObject, MatchContext], list[str]]] = {
    "expand": _semantic_expansion,
    "validate-code": _semantic_validation,
    "cs-validate-code": _semantic_validation,
    "lookup": _semantic_lookup,
}
