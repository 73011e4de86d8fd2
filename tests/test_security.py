"""Security: hostile strings are bound values, passwords are never printed, SQL is fixed.

- Hostile strings (quotes, ``;``, ``--``, NUL, terminal escapes, line breaks, 1 MB, other
  scripts, an undecodable command-line byte) as value-set urls, versions, systems, codes
  and filter values, through the API and the CLI (expand, validate-code, lookup), on
  both engines: each answer is a clean :class:`~thodb.errors.ThodbError` or the correct
  answer, never a database error or a crash, and the database is unchanged.
- Resources whose codes, displays, designations, property values, urls and filter values
  are hostile: they load and every query returns them exactly, or the load is refused
  with a :class:`~thodb.errors.LoadError` and changes nothing.
- A database URL with a password: the password appears nowhere in the output of any
  command, with or without ``--debug`` and ``-v``, whether the server is reachable or not.
- No SQL text in src/thodb is built from input: every f-string or ``format`` that looks
  like SQL interpolates only names from a fixed list.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from conftest import ROOT, Databases, table_checksums
from thodb.cli import main
from thodb.db import session_scope
from thodb.errors import LoadError, NotFoundError, ThodbError
from thodb.expand import expand
from thodb.load import load
from thodb.query import lookup, validate_code

MIB = 1 << 20

#: name -> hostile string. Each is tried as a url, version, system, code and filter value.
HOSTILE = {
    "quote": "'",
    "two-quotes": "''",
    "double-quote": '"',
    "or-true": "' OR '1'='1",
    "drop-table": "'; DROP TABLE tho.concept; --",
    "delete-quoted": '"; DELETE FROM value_set; --',
    "comment": "-- comment",
    "semicolon": ";",
    "like-wildcards": "%_%",
    "backslash": "\\'\\",
    "nul": "a\x00b",
    "line-breaks": "first\r\nthodb: error: forged second line",
    "terminal-escape": "\x1b[2J\x1b[31mred",
    "one-mebibyte": "x" * MIB,
    "unicode": "ünïcødé ✓ 𝔘𝔫𝔦 \u202eevil 漢字 🧪",
    "undecodable-argument": "caf\udce9",
}
_NAMES = sorted(HOSTILE)

CS = "http://example.org/CodeSystem/security"
VS = "http://example.org/ValueSet/security"

# C0 control characters other than tab: none may reach the terminal in an error line.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


# --- a database with known content --------------------------------------------------------


def _plain_content(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    code_system = {
        "resourceType": "CodeSystem",
        "url": CS,
        "version": "1",
        "status": "active",
        "content": "complete",
        "concept": [{"code": "a", "display": "A"}, {"code": "b", "display": "B"}],
    }
    value_set = {
        "resourceType": "ValueSet",
        "url": VS,
        "version": "1",
        "status": "active",
        "compose": {"include": [{"system": CS}]},
    }
    (folder / "cs.json").write_text(json.dumps(code_system))
    (folder / "vs.json").write_text(json.dumps(value_set))
    return folder


@dataclass
class Known:
    """A database holding :func:`_plain_content`, and its checksums."""

    engine: Engine
    url: str
    checksums: dict[str, str]


@pytest.fixture(scope="module")
def _known() -> dict[str, Known]:
    return {}


@pytest.fixture
def known(
    _known: dict[str, Known],
    databases: Databases,
    engine_kind: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Known]:
    if engine_kind not in _known:
        engine = databases.engine(engine_kind)
        load(engine, [_plain_content(tmp_path_factory.mktemp("security"))])
        url = engine.url.render_as_string(hide_password=False)
        _known[engine_kind] = Known(engine, url, table_checksums(engine))
    found = _known[engine_kind]
    yield found
    if table_checksums(found.engine) != found.checksums:
        del _known[engine_kind]


# --- hostile strings in queries ---------------------------------------------------------


def _clean(call: Any) -> Any:
    """Run ``call``; a ThodbError is a clean answer and is returned, anything else raises."""
    try:
        return call()
    except ThodbError as error:
        return error


@pytest.mark.parametrize("name", _NAMES)
def test_hostile_strings_in_api_queries_give_clean_answers(
    known: Known, name: str
) -> None:
    hostile = HOSTILE[name]
    with session_scope(known.engine) as session:
        assert isinstance(_clean(lambda: expand(session, hostile)), NotFoundError)
        assert isinstance(_clean(lambda: expand(session, VS, hostile)), NotFoundError)
        answer = _clean(
            lambda: validate_code(session, VS, system=hostile, code=hostile)
        )
        assert isinstance(answer, ThodbError) or answer.result is False
        answer = _clean(lambda: validate_code(session, VS, system=CS, code=hostile))
        assert isinstance(answer, ThodbError) or answer.result is False
        assert isinstance(
            _clean(lambda: validate_code(session, hostile, system=CS, code="a")),
            NotFoundError,
        )
        assert isinstance(
            _clean(lambda: lookup(session, system=hostile, code="a")), NotFoundError
        )
        assert isinstance(
            _clean(lambda: lookup(session, system=CS, code=hostile)), NotFoundError
        )
        # The content is still there and answers as before.
        assert validate_code(session, VS, system=CS, code="a").result is True
    assert table_checksums(known.engine) == known.checksums


def _one_clean_error_line(result: Any) -> str:
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.stderr
    lines = result.stderr.split("\n")
    assert lines[-1] == "", repr(result.stderr[-200:])
    assert len(lines) == 2, repr(result.stderr[:500])
    assert lines[0].startswith("thodb: error: ")
    assert not _CONTROL.search(lines[0]), repr(lines[0][:500])
    return lines[0]


@pytest.mark.parametrize("name", _NAMES)
def test_hostile_strings_on_the_command_line_give_one_clean_line(
    known: Known, name: str
) -> None:
    hostile = HOSTILE[name]
    runner = CliRunner()
    base = ["--database-url", known.url, "-q"]

    # Options as --name=value and arguments after --, so that a value starting with
    # "-" is taken as a value, as a shell user would have to write it.
    for args in (
        ["expand", "--", hostile],
        ["expand", "--", f"{VS}|{hostile}"],
        ["lookup", f"--system={hostile}", "--code=a"],
        ["lookup", f"--system={CS}", f"--code={hostile}"],
        ["validate-code", f"--system={CS}", "--code=a", "--", hostile],
    ):
        result = runner.invoke(main, base + args)
        assert result.exit_code == 2, (args[0], result.stderr[:500])
        _one_clean_error_line(result)

    result = runner.invoke(
        main, [*base, "validate-code", f"--system={hostile}", f"--code={hostile}", VS]
    )
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    # 1: not a member; 2: refused as a user error. Either way one line at most.
    assert result.exit_code in (1, 2)
    if result.exit_code == 2:
        _one_clean_error_line(result)
    else:
        assert result.stdout.startswith("not a member")
    assert table_checksums(known.engine) == known.checksums


# --- hostile strings in loaded resources --------------------------------------------------


def _hostile_resources(name: str, value: str) -> list[dict[str, Any]]:
    """A code system with ``value`` as a code, display, designation and property value,
    and value sets that select it by code, by is-a and by property value, one of them
    with ``value`` in its url and as its version."""
    system = f"{CS}-{name}"
    code_system = {
        "resourceType": "CodeSystem",
        "url": system,
        "version": "1",
        "status": "active",
        "content": "complete",
        "property": [{"code": "label", "type": "string"}],
        "concept": [
            {
                "code": "root",
                "display": "Root",
                "concept": [
                    {
                        "code": value,
                        "display": value,
                        "designation": [{"language": "en", "value": value}],
                        "property": [{"code": "label", "valueString": value}],
                    }
                ],
            }
        ],
    }
    resources: list[dict[str, Any]] = [code_system]
    for how, include in (
        ("code", {"concept": [{"code": value, "display": value}]}),
        ("is-a", {"filter": [{"property": "concept", "op": "is-a", "value": value}]}),
        ("label", {"filter": [{"property": "label", "op": "=", "value": value}]}),
    ):
        resources.append(
            {
                "resourceType": "ValueSet",
                "url": f"{VS}-{name}-{how}",
                "version": "1",
                "status": "active",
                "compose": {"include": [{"system": system, **include}]},
            }
        )
    resources.append(
        {
            "resourceType": "ValueSet",
            "url": f"{VS}-{name}-url-{value}",
            "version": value,
            "status": "active",
            "compose": {"include": [{"system": system, "concept": [{"code": value}]}]},
        }
    )
    return resources


def _check_loaded(engine: Engine, name: str, value: str) -> None:
    system = f"{CS}-{name}"
    with session_scope(engine) as session:
        found = lookup(session, system=system, code=value)
        assert (found.code, found.display) == (value, value)
        assert ("label", value) in found.properties
        assert [d[2] for d in found.designations] == [value]
        for how in ("code", "is-a", "label"):
            members = expand(session, f"{VS}-{name}-{how}").contains
            assert [(m.code, m.display) for m in members] == [(value, value)], how
        by_url = expand(session, f"{VS}-{name}-url-{value}", value)
        assert [m.code for m in by_url.contains] == [value]
        answer = validate_code(session, f"{VS}-{name}-code", system=system, code=value)
        assert answer.result is True


@pytest.fixture(scope="module")
def _growing() -> dict[str, Engine]:
    return {}


@pytest.fixture
def growing(
    _growing: dict[str, Engine], databases: Databases, engine_kind: str
) -> Engine:
    """A database per engine that each hostile-resource test adds its content to."""
    if engine_kind not in _growing:
        _growing[engine_kind] = databases.engine(engine_kind)
    return _growing[engine_kind]


# The one-mebibyte string is tried in each element separately, below.
_IN_RESOURCES = [n for n in _NAMES if n != "one-mebibyte"]


@pytest.mark.parametrize("name", _IN_RESOURCES)
def test_a_resource_holding_a_hostile_string_loads_exactly_or_is_refused_cleanly(
    growing: Engine, tmp_path: Path, name: str
) -> None:
    value = HOSTILE[name]
    for i, resource in enumerate(_hostile_resources(name, value)):
        (tmp_path / f"r{i}.json").write_text(json.dumps(resource))
    before = table_checksums(growing) if _has_schema(growing) else None
    try:
        load(growing, [tmp_path])
    except LoadError as error:
        assert error.source.startswith(str(tmp_path))
        if before is not None:
            assert table_checksums(growing) == before
        return
    _check_loaded(growing, name, value)


def _has_schema(engine: Engine) -> bool:
    with engine.connect() as connection:
        schema = None if engine.dialect.name == "sqlite" else "tho"
        return bool(sa.inspect(connection).get_table_names(schema=schema))


@pytest.mark.parametrize(
    "case",
    [
        "nul-in-codes",
        "one-mebibyte-code",
        "one-mebibyte-display",
        "one-mebibyte-property-value",
        "one-mebibyte-url",
        "three-kilobyte-code",
    ],
)
def test_a_resource_with_a_long_or_nul_string_loads_exactly_or_is_refused_cleanly(
    fresh_engine: Engine, tmp_path: Path, case: str
) -> None:
    load(fresh_engine, [_plain_content(tmp_path / "prior")])
    before = table_checksums(fresh_engine)
    long = ("0123456789abcdef" * (MIB // 16))[:MIB]  # FHIR's largest string
    concept: dict[str, Any] = {"code": "c", "display": "C"}
    url = CS + "-long"
    if case == "nul-in-codes":
        concept["code"] = HOSTILE["nul"]
    elif case == "one-mebibyte-code":
        concept["code"] = long
    elif case == "three-kilobyte-code":
        concept["code"] = long[:3000]
    elif case == "one-mebibyte-display":
        concept["display"] = long
    elif case == "one-mebibyte-property-value":
        concept["property"] = [{"code": "note", "valueString": long}]
    else:
        url = "http://example.org/" + long[: MIB - 19]
    resource = {
        "resourceType": "CodeSystem",
        "url": url,
        "version": "1",
        "status": "active",
        "content": "complete",
        "concept": [concept],
    }
    (tmp_path / "long.json").write_text(json.dumps(resource))

    try:
        load(fresh_engine, [tmp_path / "long.json"])
    except LoadError as error:
        assert error.source == str(tmp_path / "long.json")
        assert error.path.startswith("concept[0]") or error.path == "url"
        assert table_checksums(fresh_engine) == before
        return
    with session_scope(fresh_engine) as session:
        found = lookup(session, system=url, code=concept["code"])
    assert (found.code, found.display) == (concept["code"], concept["display"])
    if case == "one-mebibyte-property-value":
        assert found.properties == [("note", long)]


# --- passwords --------------------------------------------------------------------------

PASSWORD = "s3cretPW"
UNREACHABLE = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:1/x"


#: Runs ``main`` once per argument list in one process, as the command would: a
#: traceback (``--debug``) is printed the way Python prints an uncaught exception.
_DRIVER = """
import json, sys, traceback
from thodb.cli import main
for args in json.loads(sys.argv[1]):
    try:
        main(args)
    except SystemExit:
        pass
    except BaseException:
        traceback.print_exc()
"""


def _run_thodb(commands: list[list[str]], *, env: dict[str, str] | None = None) -> str:
    completed = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(commands)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    return completed.stdout + completed.stderr


_FLAGS = [[], ["--debug"], ["-v"], ["-vv", "--debug"]]


@pytest.mark.parametrize("flags", _FLAGS, ids=["plain", "debug", "v", "vv-debug"])
def test_the_password_of_an_unreachable_database_is_never_printed(
    flags: list[str], tmp_path: Path
) -> None:
    content = _plain_content(tmp_path / "content")
    commands = [
        ["--database-url", UNREACHABLE, *flags, *command]
        for command in (["stats"], ["load", str(content)], ["db", "upgrade"])
    ]
    output = _run_thodb(commands)
    assert output.count("cannot connect") == len(commands), output[-3000:]
    assert PASSWORD not in output, output[-3000:]
    # The same URL from the environment.
    output = _run_thodb([[*flags, "stats"]], env={"THODB_DATABASE_URL": UNREACHABLE})
    assert "cannot connect" in output
    assert PASSWORD not in output


@pytest.mark.parametrize("flags", _FLAGS, ids=["plain", "debug", "v", "vv-debug"])
def test_the_password_of_a_reachable_database_is_never_printed(
    flags: list[str], databases: Databases, tmp_path: Path
) -> None:
    # The local server trusts every connection, so any password gets in.
    url = sa.make_url(databases.url("postgresql")).set(password=PASSWORD)
    with_password = url.render_as_string(hide_password=False)
    content = _plain_content(tmp_path / "content")
    commands = [
        ["--database-url", with_password, *flags, *command]
        for command in (
            ["db", "upgrade"],
            ["load", str(content)],
            ["stats"],
            ["expand", VS],
            ["validate-code", VS, "--system", CS, "--code", "a"],
            ["expand", "http://example.org/not-loaded"],
        )
    ]
    output = _run_thodb(commands)
    assert "2 codes" in output, output[-3000:]
    assert PASSWORD not in output, output[-3000:]


# --- SQL text is fixed ------------------------------------------------------------------

_SQL = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|FROM|WHERE|JOIN|CREATE|DROP|ALTER|GRANT|ANALYZE"
    r"|VALUES|TABLE|VIEW|SET|ROLE|DATABASE)\b"
)

#: Names an SQL f-string may interpolate anywhere: fixed by the code, never input.
_SAFE_NAMES = frozenset({"p", "prefix", "SCHEMA", "instr"})

#: Further names, per module, with why they are not input.
_SAFE_BY_MODULE = {
    # A role name checked by check_role_name and quoted by the dialect; view and table
    # names from the module's constants.
    "reporting.py": frozenset({"quoted", "name", "signature"}),
    # Test databases named from a counter and a random run id.
    "conformance/operations.py": frozenset({"name"}),
    # Conditions that a column (a fixed name) is one of the ids bound as :ids; the
    # tables and columns to analyze, from the module's constants and the loader's.
    "refresh.py": frozenset({"of_set", "of_rule", "where", "listed"}),
    "sql.py": frozenset({"column"}),
}

#: Keywords sql.render fills into statement templates (fixed fragments: the schema
#: prefix, dialect functions, the pending-only conditions of an incremental refresh).
_TEMPLATE_FIELDS = frozenset(
    {
        "p",
        "instr",
        "regex_code",
        "regex_display",
        "regex_property",
        "only_rules",
        "only_targets",
        "by_rule",
        "in_key_order",
        "into",
        "seeds",
    }
)


def _sql_interpolations(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            if _SQL.search(text):
                for value in node.values:
                    if isinstance(value, ast.FormattedValue):
                        yield node.lineno, ast.unparse(value.value)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format"
        ):
            receiver = node.func.value
            is_sql = isinstance(receiver, ast.Name) and receiver.id == "template"
            is_sql = is_sql or (
                isinstance(receiver, ast.Constant)
                and isinstance(receiver.value, str)
                and bool(_SQL.search(receiver.value))
            )
            if is_sql:
                for arg in node.args:
                    yield node.lineno, f"positional {ast.unparse(arg)}"
                for keyword in node.keywords:
                    if keyword.arg not in _TEMPLATE_FIELDS:
                        yield node.lineno, f"{keyword.arg}="
        elif (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Mod)
            and isinstance(node.left, ast.Constant)
            and isinstance(node.left.value, str)
            and _SQL.search(node.left.value)
        ):
            yield node.lineno, f"% {ast.unparse(node.right)}"


def test_sql_text_interpolates_only_fixed_names() -> None:
    package = ROOT / "src" / "thodb"
    unexpected = []
    for path in sorted(package.rglob("*.py")):
        module = path.relative_to(package).as_posix()
        allowed = _SAFE_NAMES | _SAFE_BY_MODULE.get(module, frozenset())
        for line, expression in _sql_interpolations(path):
            if expression not in allowed:
                unexpected.append(f"{module}:{line}: {expression}")
    assert unexpected == []


def test_the_sql_check_catches_an_interpolated_value(tmp_path: Path) -> None:
    example = tmp_path / "example.py"
    example.write_text(
        "def f(session, code):\n"
        "    session.execute(text(f'SELECT * FROM {p}concept WHERE code = {code}'))\n"
        "    session.execute(text('SELECT %s' % code))\n"
        "    template.format(p='', code=code)\n"
    )
    found = sorted(
        expression
        for _, expression in _sql_interpolations(example)
        if expression not in _SAFE_NAMES
    )
    assert found == sorted(["code", "% code", "code="])
