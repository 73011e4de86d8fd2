"""Broken inputs: every case of tests/bad_input/cases.json, through the CLI and the API.

Each case runs four times: ``thodb load`` (click's CliRunner) and :func:`thodb.load.load`,
on SQLite and on PostgreSQL, into a database already holding the prior content
(``tests/bad_input/prior``). A rejected case must exit non-zero with exactly one line on
stderr naming the file and the element path, raise no other exception (no traceback),
and leave every table's checksum as it was. A case that loads but cannot be expanded
(import cycle, unresolvable import, filter on an unknown property) must store the reason,
where ``thodb stats``, ``expand`` and SQL can read it.

While a case loads, an audit hook watches for the file an XXE entity names being opened
and for any socket being connected: the XML reader must neither read nor fetch.

The figures (cases and runs tried, handled correctly) are written to
``<pytest basetemp>/figures/bad-input.json`` (or ``$THODB_FIGURES_DIR``) and shown in the
terminal summary; ``scripts/reliability.py`` collects them.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from conftest import Databases, table_checksums
from thodb.cli import main
from thodb.db import create_engine, schema_prefix, session_scope
from thodb.errors import LoadError, NotExpandableError
from thodb.expand import expand
from thodb.load import load
from thodb.query import validate_code
from thodb.stats import stats

CORPUS = Path(__file__).parent / "bad_input"
_DOCUMENT = json.loads((CORPUS / "cases.json").read_text(encoding="utf-8"))
PRIOR = CORPUS / _DOCUMENT["prior"]
CASES: list[dict[str, Any]] = _DOCUMENT["cases"]
REJECTED = [c for c in CASES if c.get("expect", "rejected") == "rejected"]
NOT_EXPANDABLE = [c for c in CASES if c.get("expect") == "not-expandable"]
VIAS = ("api", "cli")

# Files an XXE entity in the corpus names, by file name (a parser may open them by a
# relative path): opening either during a load is a failure.
_FORBIDDEN_OPENS = frozenset({"passwd", "xxe-secret.txt"})
_SECRET_MARKER = "THODB-XXE-SECRET"


def _cli_url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


# --- inputs built by the test (too big, too deep or binary to check in) ----------------


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _value_set_bytes(name: str) -> bytes:
    return json.dumps(
        {
            "resourceType": "ValueSet",
            "url": f"http://example.org/ValueSet/bad-input-{name}",
            "status": "active",
            "compose": {"include": [{"system": "http://loinc.org"}]},
        }
    ).encode()


def npm_member_outside_package(folder: Path) -> Path:
    """A package whose second member would be written two folders above package/."""
    path = folder / "evil.tgz"
    with tarfile.open(path, "w:gz") as archive:
        _add_member(archive, "package/package.json", b'{"name": "evil"}')
        _add_member(archive, "package/../../evil.json", _value_set_bytes("evil"))
    return path


def npm_absolute_member(folder: Path) -> Path:
    """A package with a member whose name is an absolute path."""
    path = folder / "absolute.tgz"
    with tarfile.open(path, "w:gz") as archive:
        _add_member(archive, "package/package.json", b'{"name": "absolute"}')
        _add_member(archive, "/tmp/thodb-evil.json", _value_set_bytes("absolute"))
    return path


def npm_symlink_member(folder: Path) -> Path:
    """A package with a member that is a symbolic link to /etc/passwd."""
    path = folder / "symlink.tgz"
    with tarfile.open(path, "w:gz") as archive:
        _add_member(archive, "package/package.json", b'{"name": "symlink"}')
        link = tarfile.TarInfo("package/ValueSet-link.json")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
    return path


def huge_display(folder: Path) -> Path:
    """A code system whose one concept has a 50 MB display."""
    path = folder / "huge-display.json"
    with path.open("w", encoding="utf-8") as out:
        out.write(
            '{"resourceType": "CodeSystem", "url": '
            '"http://example.org/CodeSystem/bad-input-huge", "status": "active", '
            '"content": "complete", "concept": [{"code": "a", "display": "'
        )
        chunk = "0123456789abcdef" * 65536  # 1 MiB
        for _ in range(50):
            out.write(chunk)
        out.write('"}]}\n')
    return path


def json_nested_100k(folder: Path) -> Path:
    """A ValueSet with an extension value nested in 100,000 arrays."""
    path = folder / "json-nested-100k.json"
    depth = 100_000
    path.write_text(
        '{"resourceType": "ValueSet", "url": "http://example.org/ValueSet/bad-input-'
        'deep", "status": "active", "extension": ' + "[" * depth + "]" * depth + "}"
    )
    return path


_DEEP = 10_000


def concepts_nested_10k_json(folder: Path) -> Path:
    """A code system whose concepts nest 10,000 deep (c0 > c1 > ... > c9999)."""
    path = folder / "concepts-nested-10k.json"
    opening = "".join(f'{{"code": "c{i}", "concept": [' for i in range(_DEEP - 1))
    path.write_text(
        '{"resourceType": "CodeSystem", "url": '
        '"http://example.org/CodeSystem/bad-input-deep-json", "status": "active", '
        '"content": "complete", "concept": ['
        + opening
        + f'{{"code": "c{_DEEP - 1}"}}'
        + "]}" * (_DEEP - 1)
        + "]}\n"
    )
    return path


def concepts_nested_10k_xml(folder: Path) -> Path:
    """The same hierarchy as :func:`concepts_nested_10k_json`, in FHIR XML."""
    path = folder / "concepts-nested-10k.xml"
    path.write_text(
        '<CodeSystem xmlns="http://hl7.org/fhir">'
        '<url value="http://example.org/CodeSystem/bad-input-deep-xml"/>'
        '<status value="active"/><content value="complete"/>'
        + "".join(f'<concept><code value="c{i}"/>' for i in range(_DEEP))
        + "</concept>" * _DEEP
        + "</CodeSystem>\n"
    )
    return path


BUILDERS: dict[str, Callable[[Path], Path]] = {
    f.__name__: f
    for f in (
        npm_member_outside_package,
        npm_absolute_member,
        npm_symlink_member,
        huge_display,
        json_nested_100k,
        concepts_nested_10k_json,
        concepts_nested_10k_xml,
    )
}


class Inputs:
    """Where each case's input is: in the corpus, or built once per module."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.built: dict[str, Path] = {}

    def resolve(self, case: dict[str, Any]) -> tuple[Path, str]:
        """The path to load, and the ``source`` the error must name."""
        if "build" in case:
            name = case["build"]
            if name not in self.built:
                self.built[name] = BUILDERS[name](self.folder)
            base = self.folder
            path = self.built[name]
        else:
            base = CORPUS
            path = CORPUS / case["input"]
        file, bang, member = case.get("source", "").partition("!")
        return path, str(base / file) + bang + member


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    return Inputs(tmp_path_factory.mktemp("bad_input_built"))


# --- watching what a load touches --------------------------------------------------------


@dataclass
class _Watch:
    active: bool = False
    opened: list[str] = field(default_factory=list)
    connected: list[str] = field(default_factory=list)


_watch = _Watch()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _watch.active:
        return
    if event == "open" and isinstance(args[0], str | Path):
        if Path(args[0]).name in _FORBIDDEN_OPENS:
            _watch.opened.append(str(args[0]))
    elif event in ("socket.connect", "urllib.Request"):
        _watch.connected.append(f"{event} {args[1]!r}")


sys.addaudithook(_audit)


@pytest.fixture
def watch() -> Iterator[_Watch]:
    """Records forbidden opens, socket connections and URL requests while active."""
    _watch.opened.clear()
    _watch.connected.clear()
    yield _watch
    _watch.active = False


# --- databases holding the prior content ------------------------------------------------


@dataclass
class Prior:
    """A database holding the prior content, and its checksums."""

    engine: Engine
    url: str
    checksums: dict[str, str]


@pytest.fixture(scope="module")
def _priors() -> dict[str, Prior]:
    return {}


@pytest.fixture
def prior(
    _priors: dict[str, Prior], databases: Databases, engine_kind: str
) -> Iterator[Prior]:
    """A database of ``engine_kind`` with the prior content, shared by the rejected cases.

    A rejected case leaves it unchanged; if a test changed it anyway, the next test gets a
    new one, so that one failure does not spread to the cases after it.
    """
    if engine_kind not in _priors:
        engine = databases.engine(engine_kind)
        load(engine, [PRIOR])
        _priors[engine_kind] = Prior(engine, _cli_url(engine), table_checksums(engine))
    found = _priors[engine_kind]
    yield found
    if table_checksums(found.engine) != found.checksums:
        del _priors[engine_kind]


# --- figures --------------------------------------------------------------------------


class Figures:
    """Outcome of every run, written as JSON and shown in the terminal summary."""

    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []

    def add(self, case: str, expect: str, kind: str, via: str, ok: bool) -> None:
        self.runs.append(
            {"case": case, "expect": expect, "engine": kind, "via": via, "ok": ok}
        )

    def summary(self) -> dict[str, Any]:
        rejected = [r for r in self.runs if r["expect"] == "rejected"]
        failing = sorted({r["case"] for r in self.runs if not r["ok"]})
        loaded = [r for r in self.runs if r["expect"] == "not-expandable"]
        return {
            "cases": len({r["case"] for r in self.runs}),
            "runs": len(self.runs),
            "runs_ok": sum(r["ok"] for r in self.runs),
            "rejected_runs": len(rejected),
            "rejected_correctly": sum(r["ok"] for r in rejected),
            "not_expandable_runs": len(loaded),
            "not_expandable_correctly": sum(r["ok"] for r in loaded),
            "failing_cases": failing,
            "cases_ok": len({r["case"] for r in self.runs}) - len(failing),
            "runs_by_case": self.runs,
        }


class _TerminalSummary:
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.write_sep("-", "bad-input figures")
        for line in self.lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def figures(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Figures]:
    found = Figures()
    yield found
    if not found.runs:
        return
    summary = found.summary()
    folder = Path(
        os.environ.get("THODB_FIGURES_DIR")
        or tmp_path_factory.getbasetemp() / "figures"
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bad-input.json").write_text(json.dumps(summary, indent=2))
    lines = [
        (
            f"bad inputs: {summary['cases']} cases, {summary['runs']} runs "
            "(CLI and API, per engine)"
        ),
        (
            f"  rejected correctly: {summary['rejected_correctly']} of "
            f"{summary['rejected_runs']} runs"
        ),
        (
            f"  loaded, not expandable, reason stored: "
            f"{summary['not_expandable_correctly']} of {summary['not_expandable_runs']}"
        ),
        f"  cases correct in every run: {summary['cases_ok']} of {summary['cases']}",
        f"  failing cases: {', '.join(summary['failing_cases']) or 'none'}",
        f"  figures: {folder / 'bad-input.json'}",
    ]
    name = "thodb-bad-input-figures"
    if not request.config.pluginmanager.has_plugin(name):
        request.config.pluginmanager.register(_TerminalSummary(lines), name)


@pytest.fixture
def outcome(
    request: pytest.FixtureRequest, figures: Figures, engine_kind: str
) -> Iterator[dict[str, bool]]:
    """Set ``["ok"]`` at the end of a test; the run is counted either way."""
    found = {"ok": False}
    yield found
    case = request.node.callspec.params["case"]
    figures.add(
        case["name"],
        case.get("expect", "rejected"),
        engine_kind,
        request.node.callspec.params["via"],
        found["ok"],
    )


# --- the tests -------------------------------------------------------------------------


def _check_error_line(stderr: str, source: str, case: dict[str, Any]) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr[:2000]
    line = lines[0]
    assert "Traceback" not in stderr
    head = f"thodb: error: {source}: "
    assert line.startswith(head), line[:500]
    rest = line[len(head) :]
    assert rest.startswith(case["path"]), line[:500]
    assert case["message"] in rest, line[:500]


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("case", REJECTED, ids=[c["name"] for c in REJECTED])
def test_bad_input_is_rejected_naming_file_and_element_and_changes_nothing(
    case: dict[str, Any],
    via: str,
    prior: Prior,
    inputs: Inputs,
    watch: _Watch,
    outcome: dict[str, bool],
) -> None:
    path, source = inputs.resolve(case)

    watch.active = True
    if via == "api":
        with pytest.raises(LoadError) as error:
            load(prior.engine, [path])
        watch.active = False
        assert error.value.source == source
        assert error.value.path.startswith(case["path"]), error.value.path
        assert case["message"] in error.value.message, error.value.message[:500]
    else:
        result = CliRunner().invoke(
            main, ["--database-url", prior.url, "-q", "load", str(path)]
        )
        watch.active = False
        # Anything but SystemExit is an exception the CLI did not turn into a message.
        assert isinstance(result.exception, SystemExit), repr(result.exception)
        assert result.exit_code == 2
        assert result.stdout == ""
        _check_error_line(result.stderr, source, case)
        assert _SECRET_MARKER not in result.stderr

    assert watch.opened == []
    assert watch.connected == []
    assert table_checksums(prior.engine) == prior.checksums
    outcome["ok"] = True


def _stored(engine: Engine, url: str, version: str) -> tuple[str, str | None]:
    p = schema_prefix(engine)
    with engine.connect() as connection:
        row = connection.execute(
            sa.text(
                f"SELECT expansion_status, expansion_error FROM {p}value_set "
                "WHERE url = :url AND version = :version"
            ),
            {"url": url, "version": version},
        ).one()
    return row.expansion_status, row.expansion_error


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize(
    "case", NOT_EXPANDABLE, ids=[c["name"] for c in NOT_EXPANDABLE]
)
def test_value_set_that_cannot_be_expanded_loads_with_a_queryable_reason(
    case: dict[str, Any],
    via: str,
    fresh_engine: Engine,
    outcome: dict[str, bool],
) -> None:
    load(fresh_engine, [PRIOR])
    path = CORPUS / case["input"]
    url = _cli_url(fresh_engine)
    runner = CliRunner()
    if via == "api":
        load(fresh_engine, [path])
    else:
        result = runner.invoke(main, ["--database-url", url, "-q", "load", str(path)])
        assert result.exit_code == 0, result.stderr

    for expected in case["value_sets"]:
        reference = f"{expected['url']}|{expected['version']}"
        status, reason = _stored(fresh_engine, expected["url"], expected["version"])
        assert status == "not-expandable", reference
        assert reason is not None
        for fragment in expected["reason"]:
            assert fragment in reason, reason

        if via == "api":
            with session_scope(fresh_engine) as session:
                with pytest.raises(NotExpandableError) as error:
                    expand(session, expected["url"], expected["version"])
                assert error.value.reason == reason
                with pytest.raises(NotExpandableError):
                    validate_code(
                        session,
                        expected["url"],
                        version=expected["version"],
                        system="http://example.org/CodeSystem/bad-input-shapes",
                        code="square",
                    )
                assert (reference, reason) in stats(session).not_expandable
        else:
            listed = runner.invoke(
                main, ["--database-url", url, "stats", "--format", "json"]
            )
            assert listed.exit_code == 0, listed.stderr
            assert {"value_set": reference, "reason": reason} in json.loads(
                listed.stdout
            )["not_expandable"]
            expanded = runner.invoke(main, ["--database-url", url, "expand", reference])
            assert expanded.exit_code == 2
            assert expanded.stderr.splitlines() == [
                f"thodb: error: {reference} cannot be expanded: {reason}"
            ]

    # The prior content is still expanded.
    with session_scope(fresh_engine) as session:
        assert (
            expand(
                session, "http://example.org/ValueSet/bad-input-round-or-square"
            ).total
            == 3
        )
    outcome["ok"] = True


def test_every_case_names_an_existing_input_or_builder() -> None:
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names))
    for case in CASES:
        if "build" in case:
            assert case["build"] in BUILDERS, case["name"]
        else:
            assert (CORPUS / case["input"]).exists(), case["name"]


def test_the_cli_engine_url_is_the_fixture_database(prior: Prior) -> None:
    # The CLI runs must write into the same database whose checksums are compared.
    engine = create_engine(prior.url)
    try:
        assert engine.dialect.name == prior.engine.dialect.name
        assert table_checksums(engine) == prior.checksums
    finally:
        engine.dispose()
