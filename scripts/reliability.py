"""Run thodb's reliability tests with longer settings and print their figures.

The figures come from the tests themselves (tests/test_bad_input.py, tests/test_faults.py,
tests/test_properties.py): each writes JSON into ``$THODB_FIGURES_DIR``, which this script
points at a temporary folder before running pytest, then reads and prints. By default only
the load test runs, for 60 seconds per engine; ``--all`` runs the bad-input corpus, the
kill -9 points, the readers, the two-load and the property tests too.

Examples::

    .venv/bin/python scripts/reliability.py
    .venv/bin/python scripts/reliability.py --seconds 120 --clients 16 --engines postgresql,sqlite
    .venv/bin/python scripts/reliability.py --all --examples 200 --json figures.json

PostgreSQL comes from ``$THODB_TEST_DATABASE_URL`` or 127.0.0.1:5432, as for the tests.
The exit status is pytest's: non-zero when a test failed (the figures are printed anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ALL_TESTS = [
    "tests/test_bad_input.py",
    "tests/test_faults.py",
    "tests/test_properties.py",
]


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="load test length")
    parser.add_argument("--clients", type=int, default=8, help="load test clients")
    parser.add_argument(
        "--engines", default="postgresql", help="load test engines, comma-separated"
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="run every reliability test, not only the load test",
    )
    parser.add_argument(
        "--examples", type=int, default=40, help="property-test examples per engine"
    )
    parser.add_argument(
        "--json", type=Path, help="also write every figure to this file"
    )
    return parser.parse_args(argv)


def _run_tests(args: argparse.Namespace, figures: Path) -> int:
    env = {
        **os.environ,
        "THODB_FIGURES_DIR": str(figures),
        "THODB_LOAD_TEST_SECONDS": str(args.seconds),
        "THODB_LOAD_TEST_CLIENTS": str(args.clients),
        "THODB_LOAD_TEST_ENGINES": args.engines,
        "THODB_PROPERTY_EXAMPLES": str(args.examples),
    }
    selection = ALL_TESTS if args.all else ["tests/test_faults.py", "-k", "load_test"]
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        *selection,
    ]
    print("running:", " ".join(command[2:]), file=sys.stderr)
    return subprocess.run(command, cwd=ROOT, env=env).returncode


def _lines(name: str, f: dict[str, Any]) -> list[str]:
    if name == "bad-input":
        return [
            (
                f"bad inputs: {f['cases']} cases, {f['runs']} runs (CLI and API, SQLite and "
                f"PostgreSQL); rejected correctly {f['rejected_correctly']} of "
                f"{f['rejected_runs']}; loaded as not expandable with the reason "
                f"{f['not_expandable_correctly']} of {f['not_expandable_runs']}"
            ),
            (
                f"  cases correct in every run: {f.get('cases_ok', '?')} of {f['cases']}; "
                f"failing cases: {', '.join(f['failing_cases']) or 'none'}"
            ),
        ]
    if name == "kill-9":
        points = "; ".join(
            f"{p['point']} (killed at {p['killed_after_s']} s)"
            for p in f["kill_points"]
        )
        return [
            (
                f"kill -9 of a load of {f['content']}: {f['survived']} points survived "
                f"({points}); next load succeeded in {f['next_load_s']} s"
            )
        ]
    if name.startswith("readers-"):
        return [
            (
                f"readers during {f['reloads']} reloads ({f['engine']}): "
                f"{f['answers_checked']} answers checked, {f['wrong_answers']} wrong, "
                f"{f['reader_errors']} errors"
            )
        ]
    if name.startswith("two-loads-"):
        return [f"{name}: exit codes {f['outcomes']}, result equals the serial loads"]
    if name.startswith("load-test-"):
        head = (
            f"load test ({f['engine']}, {f['clients']} clients, {f['seconds']} s): "
            f"{f['requests']} requests, {f['throughput_per_s']}/s, p50 {f['p50_ms']} ms, "
            f"p99 {f['p99_ms']} ms, {f['failed']} failed"
        )
        return [head] + [
            f"  {op}: {o['requests']} requests, p50 {o['p50_ms']} ms, p99 {o['p99_ms']} ms"
            for op, o in f["operations"].items()
        ]
    return [f"{name}: {json.dumps(f)[:200]}"]


def main(argv: list[str] | None = None) -> int:
    """Run the tests, print the figures they wrote, return pytest's exit status."""
    args = _arguments(argv)
    with tempfile.TemporaryDirectory(prefix="thodb-figures-") as folder:
        status = _run_tests(args, Path(folder))
        figures = {
            path.stem: json.loads(path.read_text())
            for path in sorted(Path(folder).glob("*.json"))
        }
    print()
    for name, found in figures.items():
        for line in _lines(name, found):
            print(line)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if not figures:
        print("no figures were written (did the tests run?)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
