"""The thodb command: help, output formats, exit codes, errors, and the README's commands."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from conftest import table_checksums
from reference import Terminology
from thodb.cli import main
from thodb.seed import IMAGE_REFERENCE_TYPE, seeds_path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DCM = "http://dicom.nema.org/resources/ontology/DCM"


def _url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def _run(*args: str) -> click.testing.Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in sorted(group.commands.items()):
        found.append((f"{prefix}{name}", command))
        if isinstance(command, click.Group):
            found += _commands(command, f"{prefix}{name} ")
    return found


@pytest.mark.parametrize("name", [name for name, _ in _commands(main)])
def test_every_command_has_help_with_an_example_and_is_in_the_readme(name: str) -> None:
    result = _run(*name.split(), "--help")
    assert result.exit_code == 0
    assert "Example" in result.output
    assert f"thodb {name.split()[0]}" in README


def test_readme_first_command_runs_for_a_new_user(tmp_path: Path) -> None:
    # The first shell block of the README: install, seed, expand.
    block = re.search(r"```sh\n(.*?)\n```", README, re.S)
    assert block is not None
    command = block.group(1)
    assert command.startswith("python3 -m venv .venv && .venv/bin/pip install . && ")
    # The install part is what `scripts/test` did for this environment already; the
    # rest runs as written, in a fresh folder with a fresh home, with this environment's
    # thodb as .venv/bin/thodb.
    job = command.split(" && ", 2)[2]
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    thodb = shutil.which("thodb", path=str(Path(sys.executable).parent))
    assert thodb is not None
    (bin_dir / "thodb").symlink_to(thodb)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("THODB_", "XDG_"))}
    env["HOME"] = str(tmp_path / "home")

    done = subprocess.run(
        job,
        shell=True,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["system", "code", "display", "inactive"]
    assert len(lines) == 1 + 1029
    assert "1029 codes" in done.stderr
    assert (tmp_path / "home" / ".local" / "share" / "thodb" / "thodb.sqlite").exists()


@pytest.fixture
def seeded_url(seeded_engine: Engine) -> str:
    return _url(seeded_engine)


def test_expand_csv_and_fhir_formats(seeded_url: str) -> None:
    expected = Terminology.from_paths(seeds_path()).expand(IMAGE_REFERENCE_TYPE)

    result = _run(
        "--database-url", seeded_url, "expand", IMAGE_REFERENCE_TYPE, "--format", "csv"
    )
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == ["system", "code", "display", "inactive"]
    assert {(r["system"], r["code"]) for r in rows} == set(expected)
    assert {r["inactive"] for r in rows} == {"true", "false"}

    result = _run(
        "--database-url", seeded_url, "expand", IMAGE_REFERENCE_TYPE, "--format", "fhir"
    )
    resource = json.loads(result.stdout)
    assert resource["resourceType"] == "ValueSet"
    assert resource["expansion"]["total"] == len(expected)
    contains = {(c["system"], c["code"]): c for c in resource["expansion"]["contains"]}
    assert set(contains) == set(expected)
    assert contains[(DCM, "111030")]["inactive"] is True


def test_validate_code_exit_codes(seeded_url: str) -> None:
    base = [
        "--database-url",
        seeded_url,
        "validate-code",
        IMAGE_REFERENCE_TYPE,
        "--system",
        DCM,
    ]
    member = _run(*base, "--code", "121191")
    assert (member.exit_code, member.stdout.strip()) == (
        0,
        f"member: {DCM}#121191 Referenced Segment",
    )
    outside = _run(*base, "--code", "113076")
    assert outside.exit_code == 1
    assert outside.stdout.startswith("not a member:")
    wrong_display = _run(*base, "--code", "121191", "--display", "Something else")
    assert wrong_display.exit_code == 1
    missing = _run(
        "--database-url",
        seeded_url,
        "validate-code",
        "http://example.org/none",
        "--system",
        DCM,
        "--code",
        "1",
    )
    assert missing.exit_code == 2
    assert (
        missing.stderr
        == "thodb: error: value set http://example.org/none is not loaded\n"
    )


def test_lookup_shows_the_code_system_content(seeded_url: str) -> None:
    concepts = json.loads((seeds_path() / "dicom" / "CodeSystem-DCM.json").read_text())[
        "concept"
    ]
    expected = next(c for c in concepts if c["code"] == "111030")
    result = _run(
        "--database-url",
        seeded_url,
        "lookup",
        "--system",
        DCM,
        "--code",
        "111030",
        "--format",
        "json",
    )
    found = json.loads(result.stdout)
    assert (found["display"], found["definition"], found["inactive"]) == (
        expected["display"],
        expected["definition"],
        True,
    )


def test_stats_lists_the_value_sets_that_cannot_be_expanded(seeded_url: str) -> None:
    found = json.loads(
        _run("--database-url", seeded_url, "stats", "--format", "json").stdout
    )
    assert (found["value_sets"], found["expanded"]) == (1467, 1434)
    assert len(found["not_expandable"]) == 33
    assert all(entry["reason"] for entry in found["not_expandable"])


def test_a_bad_file_is_one_line_on_stderr_and_exit_2(
    fresh_engine: Engine, tmp_path: Path
) -> None:
    bad = tmp_path / "vs.json"
    bad.write_text(
        json.dumps(
            {
                "resourceType": "ValueSet",
                "url": "http://x/vs",
                "compose": {
                    "include": [
                        {
                            "system": "http://x/cs",
                            "concept": [{"code": "a"}, {"display": "b"}],
                        }
                    ]
                },
            }
        )
    )
    result = _run("--database-url", _url(fresh_engine), "load", str(bad))
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (
        f"thodb: error: {bad}: compose.include[0].concept[1].code: is missing or empty"
    )
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_db_commands(fresh_engine: Engine) -> None:
    url = _url(fresh_engine)
    assert _run("--database-url", url, "db", "current").stdout == ""
    assert _run("--database-url", url, "db", "upgrade").exit_code == 0
    head = _run("--database-url", url, "db", "current").stdout.strip()
    assert re.fullmatch(r"\d{4}", head)
    assert _run("--database-url", url, "db", "downgrade", "base").exit_code == 0
    assert _run("--database-url", url, "db", "current").stdout == ""


def test_an_unreachable_database_is_one_line_without_the_password() -> None:
    result = _run(
        "--database-url", "postgresql+psycopg://u:s3cret@127.0.0.1:1/x", "stats"
    )
    assert result.exit_code == 2
    assert result.stderr.startswith(
        "thodb: error: cannot connect to postgresql+psycopg://u:***@"
    )
    assert "s3cret" not in result.stderr + result.stdout


def test_expand_options_page_filter_and_leave_out_inactive_codes(
    seeded_url: str,
) -> None:
    expected = Terminology.from_paths(seeds_path()).expand(IMAGE_REFERENCE_TYPE)
    base = ["--database-url", seeded_url, "expand", IMAGE_REFERENCE_TYPE]

    active = _run(*base, "--active-only", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(active.stdout)))
    assert {(r["system"], r["code"]) for r in rows} == {
        key for key, member in expected.items() if not member.inactive
    }

    page = json.loads(
        _run(*base, "--offset", "10", "--count", "5", "--format", "json").stdout
    )
    assert (page["total"], page["offset"], len(page["contains"])) == (
        len(expected),
        10,
        5,
    )

    # Every word of the filter begins a word of the display (the seeds' value sets give
    # the displays of codes whose code systems are not loaded).
    words = re.compile(r"\w+")
    liver = {
        key
        for key, member in expected.items()
        if any(
            w.startswith("liver") for w in words.findall((member.display or "").lower())
        )
    }
    found = json.loads(_run(*base, "--filter", "liver", "--format", "json").stdout)
    assert liver and {(c["system"], c["code"]) for c in found["contains"]} == liver

    bad = _run(*base, "--display-language", "-")
    assert bad.exit_code == 2 and "--display-language" in bad.stderr


def _tx_database(fresh_engine: Engine, *names: str) -> str:
    from thodb.load import load

    load(fresh_engine, [TX / name for name in names])
    return _url(fresh_engine)


TX = ROOT.parent / "shared" / "tx-tests"


def test_operation_answers_fhir_parameters_as_a_server_does(
    fresh_engine: Engine,
) -> None:
    url = _tx_database(
        fresh_engine,
        "simple/codesystem-simple.json",
        "simple/valueset-all.json",
        "simple/valueset-filter-isa.json",
    )
    before = table_checksums(fresh_engine)

    def expected_codes(name: str) -> set[str]:
        def walk(entries: list[dict[str, object]]) -> set[str]:
            return {str(e["code"]) for e in entries} | {
                c
                for e in entries
                for c in walk(e.get("contains", []))  # type: ignore[arg-type]
            }

        response = json.loads((TX / name).read_text(encoding="utf-8-sig"))
        return walk(response["expansion"]["contains"])

    # An inline value set that imports a contained one: loaded for this request only.
    request = TX / "simple/simple-expand-contained-request-parameters.json"
    answer = _run("--database-url", url, "operation", "expand", str(request))
    assert answer.exit_code == 0
    contains = json.loads(answer.stdout)["expansion"]["contains"]
    assert {c["code"] for c in contains} == expected_codes(
        "simple/simple-expand-contained-response-valueSet.json"
    )
    assert table_checksums(fresh_engine) == before

    request = TX / "simple/simple-expand-all-request-parameters.json"
    answer = _run("--database-url", url, "operation", "expand", str(request))
    assert answer.exit_code == 0
    contains = json.loads(answer.stdout)["expansion"]["contains"]
    codes = {c["code"] for c in contains} | {
        c["code"] for e in contains for c in e.get("contains", [])
    }
    assert codes == expected_codes("simple/simple-expand-all-response-valueSet.json")

    def result(answer: click.testing.Result | str) -> object:
        # The result parameter of thodb's answer, or of HL7's expected response file.
        text = (
            (TX / answer).read_text(encoding="utf-8-sig")
            if isinstance(answer, str)
            else answer.stdout
        )
        found = [p for p in json.loads(text)["parameter"] if p["name"] == "result"]
        return found[0]["valueBoolean"]

    # HL7's cases: a code not in the value set, and a code of the code system.
    for name, case, valid, exit_code in (
        ("validate-code", "simple-code-bad-code", False, 1),
        ("cs-validate-code", "cs-code-good", True, 0),
    ):
        request = TX / f"validation/{case}-request-parameters.json"
        answer = _run("--database-url", url, "operation", name, str(request))
        expected = result(f"validation/{case}-response-parameters.json")
        assert result(answer) is expected is valid
        assert answer.exit_code == exit_code


def test_operation_refuses_what_is_not_a_parameters_resource(
    fresh_engine: Engine, tmp_path: Path
) -> None:
    url = _tx_database(fresh_engine, "simple/codesystem-simple.json")
    not_json = tmp_path / "request.json"
    not_json.write_text("{ nope")
    answer = _run("--database-url", url, "operation", "expand", str(not_json))
    assert answer.exit_code == 2
    assert answer.stderr.startswith(f"thodb: error: {not_json}: not a JSON document")

    code_system = TX / "simple/codesystem-simple.json"
    answer = CliRunner().invoke(
        main,
        ["--database-url", url, "operation", "lookup", "-"],
        input=code_system.read_bytes(),
    )
    assert answer.exit_code == 2
    assert answer.stderr == (
        "thodb: error: stdin: resourceType: expected a FHIR Parameters resource\n"
    )


_MODULES_AFTER = """
import sys
from thodb.cli import main
try:
    main(sys.argv[1:])
except SystemExit as end:
    code = end.code
unused = ("alembic", "psycopg", "thodb.load", "thodb.fhir.operations", "thodb.conformance")
print(code, [m for m in unused if m in sys.modules])
"""


@pytest.mark.parametrize("engine_kind", ["sqlite"], indirect=True)
def test_the_commands_that_read_sqlite_leave_out_migrations_driver_and_loader(
    seeded_engine: Engine,
) -> None:
    # Migrations and the PostgreSQL driver are a fifth of a second of imports that a
    # command reading an SQLite database does not need; the loader, the FHIR resource
    # builders and the conformance suite another tenth.
    for command in (
        ["expand", IMAGE_REFERENCE_TYPE, "--format", "json"],
        ["validate-code", IMAGE_REFERENCE_TYPE, "--system", DCM, "--code", "128224"],
        ["lookup", "--system", DCM, "--code", "128224"],
    ):
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                _MODULES_AFTER,
                "--database-url",
                _url(seeded_engine),
            ]
            + command,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        assert done.stdout.splitlines()[-1] == "0 []", (command, done.stderr[-2000:])
