"""HL7's terminology test suite (../shared/tx-tests) run by thodb on both engines.

The runner creates a fresh database per suite on the engine of the URL it is given.
The floor is the number of tests that passed the semantic comparison when it was last
raised; it only ever goes up. The per-suite lines are printed (``pytest -s`` shows
them) so that a run says where it stands.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import SHARED, Databases
from thodb.cli import main
from thodb.conformance.compare import JsonObject
from thodb.conformance.operations import DatabaseOperations
from thodb.conformance.suite import read_suites, run_suites

TX = SHARED / "tx-tests"

#: Tests passing the semantic comparison (of 478 that run; 3 need mode tx.fhir.org).
#: Most of the others need data the schema does not store yet (code system
#: language, compose.inactive, value set extensions).
SEMANTIC_FLOOR = 471

#: The same under the strict comparison.
STRICT_FLOOR = 323


_UUID = re.compile(r"urn:uuid:[0-9a-f-]{36}")


class _AskedTwice(DatabaseOperations):
    """Answers each $validate-code three times: the second answer is the one the first
    call kept, the third is computed again (``Cache-Control: no-cache``) from the facts
    the first one kept (see thodb.scope); both must be the first."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.differing: list[str] = []
        self.asked = 0

    def validate_code(
        self, request: JsonObject, *, headers: Mapping[str, str]
    ) -> tuple[int, JsonObject]:
        first = super().validate_code(request, headers=headers)
        kept = super().validate_code(request, headers=headers)
        computed = super().validate_code(
            request, headers={**headers, "Cache-Control": "no-cache"}
        )
        self.asked += 1
        # An inline value set without a url is named by a new urn:uuid each time.
        expected = _UUID.sub("urn:uuid:", json.dumps(first))
        for again in (kept, computed):
            if _UUID.sub("urn:uuid:", json.dumps(again)) != expected:
                self.differing.append(json.dumps(request)[:300])
        return first


def test_the_suite_passes_at_least_the_floor(
    databases: Databases, engine_kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with _AskedTwice(databases.url(engine_kind)) as operations:
        report = run_suites(TX, operations)
    with capsys.disabled():
        print(f"\nconformance on {engine_kind}:")
        for line in report.format_lines():
            print(f"  {line}")
        strict = report.strict
        print(f"  strict: {strict.passed} passed, {strict.failed} failed")

    assert len(report.suites) == len(read_suites(TX))
    assert report.semantic.passed >= SEMANTIC_FLOOR
    assert report.strict.passed >= STRICT_FLOOR
    assert operations.asked > 300
    assert operations.differing == []


def test_the_command_prints_a_line_per_suite_and_the_totals(
    databases: Databases, tmp_path: Path
) -> None:
    url = databases.url("sqlite")
    result = CliRunner().invoke(
        main,
        [
            "--database-url",
            url,
            "-q",
            "conformance",
            str(TX),
            "--suite",
            "case",
            "--output",
            str(tmp_path),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith("case: ") and lines[0].endswith(" skipped")
    assert lines[1].endswith(" failed") and lines[2].startswith("strict: ")
    assert len(lines) == 3


def test_an_unknown_suite_is_a_clean_error(databases: Databases) -> None:
    result = CliRunner().invoke(
        main,
        [
            "--database-url",
            databases.url("sqlite"),
            "conformance",
            str(TX),
            "--suite",
            "nope",
        ],
    )
    assert result.exit_code == 2
    assert "no suite named nope" in result.stderr
