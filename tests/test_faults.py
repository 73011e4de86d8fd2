"""Faults and concurrency: killed loads, readers during reloads, two loads, a load test.

- ``thodb load`` of all of THO (``../shared/data/tho``; the seeds where it is absent) is
  killed with SIGKILL at several points on PostgreSQL; each time the database must hold
  exactly its previous state (checksums of every table), and the next load must succeed.
- Reader threads expand and validate in a loop while the writer reloads changed content
  (``replace=True``) and loads a new version: every answer must equal the answer of one of
  the states the writer committed (computed by tests/reference.py), and no reader may fail.
  On SQLite too.
- Two ``thodb load`` processes started at once: each succeeds or fails with one clear line,
  and the result equals loading the successful ones one after the other.
- A bounded load test: N clients, each with its own connection, run expand and
  validate-code for a fixed time; throughput and p99 are reported, and no request may fail.
  ``$THODB_LOAD_TEST_SECONDS`` (default 10), ``$THODB_LOAD_TEST_CLIENTS`` (default 8) and
  ``$THODB_LOAD_TEST_ENGINES`` (default ``postgresql``) set it; scripts/reliability.py
  runs it for longer.

Figures go to ``<pytest basetemp>/figures/`` (or ``$THODB_FIGURES_DIR``) as JSON and to the
terminal summary.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from conftest import SHARED, Databases, table_checksums
from reference import Terminology
from thodb.db import create_engine, session_scope
from thodb.expand import expand
from thodb.load import load
from thodb.models import CodeSystem, ValueSet, ValueSetMember
from thodb.query import lookup, validate_code
from thodb.seed import IMAGE_REFERENCE_TYPE, seeds_path

THO = SHARED / "data" / "tho"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
LOAD_TEST_SECONDS = float(os.environ.get("THODB_LOAD_TEST_SECONDS", "10"))
LOAD_TEST_CLIENTS = int(os.environ.get("THODB_LOAD_TEST_CLIENTS", "8"))
LOAD_TEST_ENGINES = os.environ.get("THODB_LOAD_TEST_ENGINES", "postgresql").split(",")
_APPLICATION = "thodb-fault-test"


# --- figures ---------------------------------------------------------------------------


class _TerminalSummary:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.write_sep("-", "fault and concurrency figures")
        for line in self.lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def publish(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, dict[str, Any], list[str]], None]:
    """Write one test's figures as JSON and add its lines to the terminal summary."""
    folder = Path(
        os.environ.get("THODB_FIGURES_DIR")
        or tmp_path_factory.getbasetemp() / "figures"
    )
    folder.mkdir(parents=True, exist_ok=True)
    name = "thodb-fault-figures"
    summary = request.config.pluginmanager.get_plugin(name)
    if summary is None:
        summary = _TerminalSummary()
        request.config.pluginmanager.register(summary, name)

    def write(key: str, figures: dict[str, Any], lines: list[str]) -> None:
        (folder / f"{key}.json").write_text(json.dumps(figures, indent=2))
        summary.lines.extend(lines)

    return write


# --- running thodb as a process ---------------------------------------------------------


def _process_url(engine: Engine) -> str:
    # The application name lets the test find the load's server process after a kill.
    url = engine.url
    if url.get_backend_name() == "postgresql":
        url = url.update_query_dict({"application_name": _APPLICATION})
    return url.render_as_string(hide_password=False)


def _thodb(url: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from thodb.cli import main; main()",
        "--database-url",
        url,
        *args,
    ]


class _Lines:
    """Collects a process's stderr lines in a thread, with the time each arrived."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.all: list[str] = []
        assert process.stderr is not None
        self._thread = threading.Thread(
            target=self._read, args=(process.stderr,), daemon=True
        )
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.all.append(line)
            self.lines.put((time.monotonic(), line))

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                _, line = self.lines.get(timeout=left)
            except queue.Empty:
                return False
            if text in line:
                return True
        return False

    def join(self) -> str:
        self._thread.join(timeout=30)
        return "".join(self.all)


def _server_processes(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(
            sa.text(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = :name "
                "AND datname = current_database()"
            ),
            {"name": _APPLICATION},
        ).scalar_one()


def _wait_for_server_processes_to_end(engine: Engine, timeout: float = 120) -> float:
    # A killed client's server process notices only when it next talks to the client,
    # that is when its running statement ends; until then it holds its locks.
    start = time.monotonic()
    while _server_processes(engine):
        if time.monotonic() - start > timeout:
            pytest.fail("the killed load's server process did not end")
        time.sleep(0.2)
    return time.monotonic() - start


# --- kill -9 --------------------------------------------------------------------------

#: (description, stderr text to wait for or None, seconds to wait after it).
KILL_POINTS = [
    ("1 s after start, reading files", None, 1.0),
    ("at the first 'wrote' line, writing rows", "wrote ", 0.0),
    (
        "2 s into 'computing value-set membership'",
        "computing value-set membership",
        2.0,
    ),
]


def _small_content(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    code_system = {
        "resourceType": "CodeSystem",
        "url": "http://example.org/CodeSystem/faults",
        "version": "1",
        "status": "active",
        "content": "complete",
        "concept": [
            {"code": "a", "display": "A", "concept": [{"code": "b", "display": "B"}]}
        ],
    }
    value_set = {
        "resourceType": "ValueSet",
        "url": "http://example.org/ValueSet/faults",
        "version": "1",
        "status": "active",
        "compose": {"include": [{"system": "http://example.org/CodeSystem/faults"}]},
    }
    (folder / "cs.json").write_text(json.dumps(code_system))
    (folder / "vs.json").write_text(json.dumps(value_set))
    return folder


def test_kill_9_during_a_load_leaves_the_previous_state_and_the_next_load_succeeds(
    databases: Databases,
    tmp_path: Path,
    publish: Callable[[str, dict[str, Any], list[str]], None],
) -> None:
    content = THO if THO.is_dir() else seeds_path()
    engine = databases.engine("postgresql")
    load(engine, [_small_content(tmp_path / "prior")])
    before = table_checksums(engine)
    url = _process_url(engine)

    survived: list[dict[str, Any]] = []
    for description, text, delay in KILL_POINTS:
        process = subprocess.Popen(
            _thodb(url, "load", str(content)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines = _Lines(process)
        started = time.monotonic()
        if text is not None:
            assert lines.wait_for(text, timeout=300), lines.join()
        time.sleep(delay)
        assert process.poll() is None, f"the load ended before {description}"
        killed_after = time.monotonic() - started
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        lines.join()
        ended_after = _wait_for_server_processes_to_end(engine)
        assert table_checksums(engine) == before, description
        survived.append(
            {
                "point": description,
                "killed_after_s": round(killed_after, 1),
                "server_process_ended_after_s": round(ended_after, 1),
            }
        )

    started = time.monotonic()
    result = subprocess.run(
        _thodb(url, "-q", "load", str(content)), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seconds = time.monotonic() - started
    with session_scope(engine) as session:
        loaded = session.scalar(sa.select(sa.func.count()).select_from(ValueSet))
    assert loaded and loaded > 1

    publish(
        "kill-9",
        {
            "content": str(content),
            "kill_points": survived,
            "survived": len(survived),
            "next_load_succeeded": True,
            "next_load_s": round(seconds, 1),
        },
        [
            (
                f"kill -9 of `thodb load {content.name}`: {len(survived)} of "
                f"{len(KILL_POINTS)} kill points left the previous state; next load "
                f"succeeded in {seconds:.0f} s"
            ),
        ],
    )


# --- readers during reloads -----------------------------------------------------------

READER_CS = "http://example.org/CodeSystem/readers"
READER_VS = "http://example.org/ValueSet/readers-"


def _reader_code_system() -> dict[str, Any]:
    # n0..n4 each with 12 children n<i>.<j>; every third child is inactive.
    return {
        "resourceType": "CodeSystem",
        "url": READER_CS,
        "version": "1",
        "status": "active",
        "content": "complete",
        "concept": [
            {
                "code": f"n{i}",
                "display": f"Node {i}",
                "concept": [
                    {
                        "code": f"n{i}.{j}",
                        "display": f"Leaf {i}.{j}",
                        **(
                            {"property": [{"code": "inactive", "valueBoolean": True}]}
                            if j % 3 == 0
                            else {}
                        ),
                    }
                    for j in range(12)
                ],
            }
            for i in range(5)
        ],
    }


def _reader_value_set(
    name: str, compose: dict[str, Any], version: str = "1"
) -> dict[str, Any]:
    return {
        "resourceType": "ValueSet",
        "url": READER_VS + name,
        "version": version,
        "status": "active",
        "compose": compose,
    }


def _is_a(code: str) -> dict[str, Any]:
    return {
        "system": READER_CS,
        "filter": [{"property": "concept", "op": "is-a", "value": code}],
    }


def _target(variant: str) -> dict[str, Any]:
    """The value set the readers ask about, in three contents.

    A and B are one ``url|version`` (B replaces A); C is version 2. Every variant holds
    n0.1 and none holds n4.1, so a validate-code answer other than true or false for those
    is a mix of states.
    """
    common = {"system": READER_CS, "concept": [{"code": "n0.1"}, {"code": "n3.5"}]}
    if variant == "A":
        compose = {
            "include": [{"valueSet": [READER_VS + "n1|1"]}, common, _is_a("n2")],
            "exclude": [{"system": READER_CS, "concept": [{"code": "n2.4"}]}],
        }
        return _reader_value_set("target", compose)
    if variant == "B":
        compose = {
            "include": [
                {"valueSet": [READER_VS + "n1|1", READER_VS + "odd|1"]},
                common,
            ]
        }
        return _reader_value_set("target", compose)
    compose = {"include": [common, _is_a("n3")], "exclude": [_is_a("n1")]}
    return _reader_value_set("target", compose, version="2")


def _reader_resources(*variants: str) -> list[dict[str, Any]]:
    odd = {
        "system": READER_CS,
        "concept": [{"code": f"n{i}.{j}"} for i in range(5) for j in range(1, 12, 2)],
    }
    return [
        _reader_code_system(),
        _reader_value_set("n1", {"include": [_is_a("n1")]}),
        _reader_value_set("odd", {"include": [odd]}),
        *(_target(v) for v in variants),
    ]


def _write(folder: Path, resources: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.json"):
        old.unlink()
    for i, resource in enumerate(resources):
        (folder / f"r{i}.json").write_text(json.dumps(resource))
    return folder


Answer = tuple[str | None, frozenset[tuple[str, str, str | None, bool]]]


def _expected_answer(resources: list[dict[str, Any]], version: str | None) -> Answer:
    terminology = Terminology()
    for resource in resources:
        terminology.add(resource)
    members = terminology.expand(READER_VS + "target", version)
    found = max(
        (r.get("version") for r in resources if r["url"] == READER_VS + "target"),
        key=lambda v: v or "",
    )
    return (
        version or found,
        frozenset((s, c, m.display, m.inactive) for (s, c), m in members.items()),
    )


@dataclass
class _Readers:
    """Reader threads and what they saw."""

    engine: Engine
    allowed: dict[str, set[Any]]
    stop: threading.Event = field(default_factory=threading.Event)
    checked: int = 0
    wrong: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        questions = sorted(self.allowed)
        while not self.stop.is_set():
            question = rng.choice(questions)
            try:
                with session_scope(self.engine) as session:
                    answer = _ask(session, question)
            except Exception as exc:  # any failure of a reader is recorded, not lost
                with self.lock:
                    self.errors.append(f"{question}: {exc!r}"[:500])
                continue
            with self.lock:
                self.checked += 1
                if answer not in self.allowed[question]:
                    self.wrong.append(f"{question}: {answer!r}"[:500])


def _ask(session: Session, question: str) -> Any:
    if question.startswith("expand"):
        _, version, mode = question.split(":")
        expansion = expand(
            session, READER_VS + "target", version or None, live=mode == "live"
        )
        return (
            expansion.version,
            frozenset(
                (m.system, m.code, m.display, m.inactive) for m in expansion.contains
            ),
        )
    _, code = question.split(":")
    return validate_code(
        session, READER_VS + "target", system=READER_CS, code=code
    ).result


@pytest.mark.parametrize("engine_kind", ["postgresql", "sqlite"])
def test_readers_see_before_or_after_never_a_mix_during_reloads(
    engine_kind: str,
    databases: Databases,
    tmp_path: Path,
    publish: Callable[[str, dict[str, Any], list[str]], None],
) -> None:
    engine = databases.engine(engine_kind)
    states = {v: _reader_resources(v) for v in ("A", "B")}
    with_new = {v: _reader_resources(v, "C") for v in ("A", "B")}
    answers_v1 = {_expected_answer(states[v], "1") for v in states}
    answer_v2 = _expected_answer(with_new["A"], None)
    allowed: dict[str, set[Any]] = {
        "expand:1:stored": answers_v1,
        "expand:1:live": answers_v1,
        "expand::stored": answers_v1 | {answer_v2},
        "expand::live": answers_v1 | {answer_v2},
        "validate:n0.1": {True},
        "validate:n4.1": {False},
        "validate:n2.3": {True, False},
    }
    assert len(answers_v1) == 2
    load(engine, [_write(tmp_path / "content", states["A"])])

    readers = _Readers(engine, allowed)
    threads = [
        threading.Thread(target=readers.run, args=(seed,), daemon=True)
        for seed in range(3)
    ]
    for thread in threads:
        thread.start()
    reloads = 0
    try:
        # Replace A and B in turn, then add version 2 and go on replacing version 1.
        for step in range(24):
            variant = "B" if step % 2 == 0 else "A"
            resources = with_new[variant] if step >= 16 else states[variant]
            load(engine, [_write(tmp_path / "content", resources)], replace=True)
            reloads += 1
            time.sleep(0.05)
    finally:
        readers.stop.set()
        for thread in threads:
            thread.join(timeout=60)

    publish(
        f"readers-{engine_kind}",
        {
            "engine": engine_kind,
            "reloads": reloads,
            "answers_checked": readers.checked,
            "wrong_answers": len(readers.wrong),
            "reader_errors": len(readers.errors),
            "examples": (readers.wrong + readers.errors)[:5],
        },
        [
            (
                f"readers during {reloads} reloads ({engine_kind}): {readers.checked} "
                f"answers checked, {len(readers.wrong)} wrong, {len(readers.errors)} errors"
            ),
        ],
    )
    assert readers.errors == []
    assert readers.wrong == []
    assert readers.checked > 100


# --- two loads at once ------------------------------------------------------------------


def _bulk_content(folder: Path, name: str) -> Path:
    """A code system of 1,500 concepts and 150 value sets that import one another."""
    folder.mkdir(parents=True, exist_ok=True)
    system = f"http://example.org/CodeSystem/bulk-{name}"
    concepts = [
        {
            "code": f"g{i}",
            "display": f"Group {i}",
            "concept": [
                {"code": f"g{i}.{j}", "display": f"Item {i}.{j}"} for j in range(14)
            ],
        }
        for i in range(100)
    ]
    resources: list[dict[str, Any]] = [
        {
            "resourceType": "CodeSystem",
            "url": system,
            "version": "1",
            "status": "active",
            "content": "complete",
            "concept": concepts,
        }
    ]
    for i in range(150):
        include: list[dict[str, Any]] = [
            {
                "system": system,
                "filter": [
                    {"property": "concept", "op": "is-a", "value": f"g{i % 100}"}
                ],
            }
        ]
        if i >= 10:
            include.append(
                {"valueSet": [f"http://example.org/ValueSet/bulk-{name}-{i // 10 - 1}"]}
            )
        resources.append(
            {
                "resourceType": "ValueSet",
                "url": f"http://example.org/ValueSet/bulk-{name}-{i}",
                "version": "1",
                "status": "active",
                "compose": {"include": include},
            }
        )
    for i, resource in enumerate(resources):
        (folder / f"r{i:03}.json").write_text(json.dumps(resource))
    return folder


def _fingerprint(engine: Engine) -> dict[str, Any]:
    """What is loaded, without row ids (which depend on the order of writes)."""
    with session_scope(engine) as session:
        code_systems = sorted(
            tuple(row)
            for row in session.execute(
                sa.select(
                    CodeSystem.url,
                    CodeSystem.version,
                    CodeSystem.content_hash,
                    CodeSystem.concept_count,
                )
            )
        )
        value_sets = sorted(
            tuple(str(v) for v in row)
            for row in session.execute(
                sa.select(
                    ValueSet.url,
                    ValueSet.version,
                    ValueSet.content_hash,
                    ValueSet.expansion_status,
                    ValueSet.expansion_error,
                    ValueSet.member_count,
                )
            )
        )
        members = sorted(
            tuple(str(v) for v in row)
            for row in session.execute(
                sa.select(
                    ValueSet.url,
                    ValueSetMember.system,
                    ValueSetMember.code,
                    ValueSetMember.display,
                    ValueSetMember.inactive,
                ).join(ValueSet, ValueSet.id == ValueSetMember.value_set_id)
            )
        )
    counts = {
        table: checksum.split(":")[0]
        for table, checksum in table_checksums(engine).items()
    }
    return {
        "code_systems": code_systems,
        "value_sets": value_sets,
        "members": members,
        "row_counts": counts,
    }


@pytest.mark.parametrize("same_content", [True, False], ids=["same", "different"])
@pytest.mark.parametrize("engine_kind", ["postgresql", "sqlite"])
def test_two_loads_at_once_wait_or_fail_clearly_and_never_corrupt(
    engine_kind: str,
    same_content: bool,
    databases: Databases,
    tmp_path: Path,
    publish: Callable[[str, dict[str, Any], list[str]], None],
) -> None:
    engine = databases.engine(engine_kind)
    load(engine, [_small_content(tmp_path / "prior")])
    first = _bulk_content(tmp_path / "x", "x")
    second = first if same_content else _bulk_content(tmp_path / "y", "y")
    url = _process_url(engine)

    processes = [
        subprocess.Popen(
            _thodb(url, "-q", "load", str(folder)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for folder in (first, second)
    ]
    outcomes = []
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        outcomes.append((process.returncode, stderr))

    succeeded = []
    for folder, (code, stderr) in zip((first, second), outcomes, strict=True):
        if code == 0:
            succeeded.append(folder)
            continue
        assert code == 2, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        lines = stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("thodb: error: "), stderr
    assert succeeded, outcomes

    expected = databases.engine(engine_kind)
    load(expected, [tmp_path / "prior"])
    for folder in succeeded:
        load(expected, [folder])
    assert _fingerprint(engine) == _fingerprint(expected)

    key = f"two-loads-{engine_kind}-{'same' if same_content else 'different'}"
    publish(
        key,
        {
            "outcomes": [code for code, _ in outcomes],
            "messages": [e for _, e in outcomes],
        },
        [
            (
                f"two loads at once ({engine_kind}, "
                f"{'same' if same_content else 'different'} content): exit codes "
                f"{[code for code, _ in outcomes]}, result equals serial loads"
            ),
        ],
    )


# --- load test --------------------------------------------------------------------------


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class _Client:
    """One client of the load test, with its own connection."""

    engine: Engine
    expected: dict[str, Any]
    seed: int
    latencies: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def run(self, until: float) -> None:
        rng = random.Random(self.seed)
        operations = ["expand", "validate-member", "validate-other", "lookup"]
        with self.engine.connect() as connection:
            while time.monotonic() < until:
                operation = rng.choice(operations)
                started = time.perf_counter()
                try:
                    with Session(connection) as session, session.begin():
                        answer = _load_test_request(session, operation)
                except Exception as exc:  # any failure is counted, not lost
                    self.failures.append(f"{operation}: {exc!r}"[:300])
                    continue
                elapsed = time.perf_counter() - started
                if answer != self.expected[operation]:
                    self.failures.append(f"{operation}: wrong answer {answer!r}"[:300])
                self.latencies.setdefault(operation, []).append(elapsed)


def _load_test_request(session: Session, operation: str) -> Any:
    if operation == "expand":
        return expand(session, IMAGE_REFERENCE_TYPE).total
    if operation == "validate-member":
        return validate_code(
            session, IMAGE_REFERENCE_TYPE, system=DCM, code="121191"
        ).result
    if operation == "validate-other":
        return validate_code(
            session, IMAGE_REFERENCE_TYPE, system=DCM, code="113076"
        ).result
    return lookup(session, system=DCM, code="121191").display


@pytest.mark.parametrize("engine_kind", LOAD_TEST_ENGINES)
def test_load_test_concurrent_clients_expand_and_validate_without_failures(
    engine_kind: str,
    seeded_engine: Engine,
    publish: Callable[[str, dict[str, Any], list[str]], None],
) -> None:
    with session_scope(seeded_engine) as session:
        expected = {
            op: _load_test_request(session, op)
            for op in ("expand", "validate-member", "validate-other", "lookup")
        }
    assert expected["expand"] == 1029
    assert (expected["validate-member"], expected["validate-other"]) == (True, False)

    # Each client holds one of the pool's connections for the whole run.
    engine = create_engine(
        seeded_engine.url.render_as_string(hide_password=False),
        pool_size=LOAD_TEST_CLIENTS,
        max_overflow=0,
    )
    clients = [_Client(engine, expected, seed) for seed in range(LOAD_TEST_CLIENTS)]
    until = time.monotonic() + LOAD_TEST_SECONDS
    threads = [threading.Thread(target=c.run, args=(until,)) for c in clients]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=LOAD_TEST_SECONDS + 120)
    elapsed = time.monotonic() - started
    engine.dispose()

    by_operation: dict[str, list[float]] = {}
    for client in clients:
        for operation, values in client.latencies.items():
            by_operation.setdefault(operation, []).extend(values)
    everything = [v for values in by_operation.values() for v in values]
    failures = [f for client in clients for f in client.failures]
    figures = {
        "engine": engine_kind,
        "clients": LOAD_TEST_CLIENTS,
        "seconds": round(elapsed, 1),
        "requests": len(everything) + len(failures),
        "failed": len(failures),
        "throughput_per_s": round(len(everything) / elapsed, 1),
        "p50_ms": round(1000 * _percentile(everything, 0.50), 2),
        "p99_ms": round(1000 * _percentile(everything, 0.99), 2),
        "operations": {
            operation: {
                "requests": len(values),
                "p50_ms": round(1000 * _percentile(values, 0.50), 2),
                "p99_ms": round(1000 * _percentile(values, 0.99), 2),
            }
            for operation, values in sorted(by_operation.items())
        },
        "failure_examples": failures[:5],
    }
    publish(
        f"load-test-{engine_kind}",
        figures,
        [
            (
                f"load test ({engine_kind}, {LOAD_TEST_CLIENTS} clients, "
                f"{elapsed:.0f} s): {figures['requests']} requests, "
                f"{figures['throughput_per_s']}/s, p99 {figures['p99_ms']} ms, "
                f"{len(failures)} failed"
            )
        ]
        + [
            f"  {op}: {f['requests']} requests, p50 {f['p50_ms']} ms, "
            f"p99 {f['p99_ms']} ms"
            for op, f in figures["operations"].items()
        ],
    )
    assert failures == []
    assert all(values for values in by_operation.values())
