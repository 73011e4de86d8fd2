"""Many files are parsed by worker processes (thodb.fhir.pool): the records, their
order, the first error and a failed load are those of a read in one process.

Expected values come from ../shared/data/tho/manifest.json (every THO file with its
url and number of concepts) and from the files these tests write.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from conftest import SHARED
from thodb import migrate
from thodb.cli import main
from thodb.db import schema_prefix
from thodb.errors import LoadError
from thodb.fhir.pool import CHUNK, MIN_FILES, records_read
from thodb.fhir.read import ReadCounts
from thodb.fhir.resources import CodeSystemRecord, Record
from thodb.load import DEFAULT_CANONICAL_BASE, load

THO = SHARED / "data" / "tho"
IN_PROCESSES = "files in 2 processes"


def _read(paths: list[Path], jobs: int) -> tuple[list[Record], ReadCounts]:
    counts = ReadCounts()
    with records_read(paths, DEFAULT_CANONICAL_BASE, counts, jobs=jobs) as read:
        records = list(read)
    return records, counts


def _code_systems(folder: Path, count: int, bad: tuple[int, ...] = ()) -> Path:
    """``count`` small CodeSystem files, in name order; those numbered in ``bad``
    have a concept without code."""
    folder.mkdir()
    for n in range(count):
        concept = {"display": "no code"} if n in bad else {"code": f"c{n}"}
        resource = {
            "resourceType": "CodeSystem",
            "url": f"http://example.org/CodeSystem/pool-{n:04d}",
            "status": "active",
            "content": "complete",
            "concept": [concept],
        }
        (folder / f"cs-{n:04d}.json").write_text(json.dumps(resource))
    return folder


def test_tho_parsed_in_processes_has_the_manifest_files_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="thodb.fhir.pool"):
        records, counts = _read([THO], jobs=2)
    assert IN_PROCESSES in caplog.text

    listed = sorted(manifest_entries(), key=lambda entry: entry["path"])
    assert [Path(r.source).relative_to(THO).as_posix() for r in records] == [
        entry["path"] for entry in listed
    ]
    for record, entry in zip(records, listed, strict=True):
        if entry["url"] is not None:
            assert record.url == entry["url"], entry["path"]
        if isinstance(record, CodeSystemRecord):
            assert len(record.concepts) == entry["concept_count"], entry["path"]
    # manifest.json itself is counted and passed over, as in one process.
    assert (counts.files, counts.skipped_not_fhir) == (len(listed) + 1, 1)


def test_tho_parsed_in_processes_equals_tho_parsed_in_one() -> None:
    assert _read([THO], jobs=2) == _read([THO], jobs=1)


def manifest_entries() -> list[dict[str, object]]:
    entries: list[dict[str, object]] = json.loads((THO / "manifest.json").read_text())[
        "resources"
    ]
    return entries


def test_the_first_bad_file_in_order_is_the_error(tmp_path: Path) -> None:
    count = MIN_FILES + 2 * CHUNK
    folder = _code_systems(tmp_path / "cs", count, bad=(count - CHUNK, MIN_FILES))
    with pytest.raises(LoadError) as raised:
        _read([folder], jobs=2)
    assert raised.value.source == str(folder / f"cs-{MIN_FILES:04d}.json")
    assert raised.value.path == "concept[0].code"


def test_a_failed_load_parsed_in_processes_writes_nothing(
    tmp_path: Path, fresh_engine: Engine
) -> None:
    with fresh_engine.begin() as connection:
        migrate.upgrade(connection)
    folder = _code_systems(tmp_path / "cs", MIN_FILES + CHUNK, bad=(MIN_FILES,))
    with pytest.raises(LoadError, match=f"cs-{MIN_FILES:04d}.json: concept\\[0\\]"):
        load(fresh_engine, [folder], jobs=2)
    p = schema_prefix(fresh_engine)
    with fresh_engine.connect() as connection:
        assert connection.scalar(sa.text(f"SELECT COUNT(*) FROM {p}code_system")) == 0


def test_a_process_with_other_threads_parses_in_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _code_systems(tmp_path / "cs", MIN_FILES + CHUNK)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with caplog.at_level(logging.DEBUG, logger="thodb.fhir.pool"):
            records, _ = _read([folder], jobs=2)
    finally:
        stop.set()
        other.join()
    assert IN_PROCESSES not in caplog.text
    assert [r.url for r in records] == [
        f"http://example.org/CodeSystem/pool-{n:04d}" for n in range(MIN_FILES + CHUNK)
    ]


def test_a_few_files_are_parsed_in_the_calling_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _code_systems(tmp_path / "cs", MIN_FILES - 1)
    with caplog.at_level(logging.DEBUG, logger="thodb.fhir.pool"):
        records, _ = _read([folder], jobs=2)
    assert IN_PROCESSES not in caplog.text
    assert len(records) == MIN_FILES - 1


def test_a_load_error_crosses_processes_whole() -> None:
    error = LoadError("cs.json", "concept[3].code", "is missing or empty")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.source, copy.path, copy.message, str(copy)) == (
        "cs.json",
        "concept[3].code",
        "is missing or empty",
        "cs.json: concept[3].code: is missing or empty",
    )


def test_load_takes_the_number_of_jobs(tmp_path: Path) -> None:
    folder = _code_systems(tmp_path / "cs", 3)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    runner = CliRunner()
    loaded = runner.invoke(
        main, ["--database-url", url, "load", "--jobs", "1", str(folder)]
    )
    assert loaded.exit_code == 0, loaded.output
    assert "code systems: 3 added" in loaded.output
    refused = runner.invoke(
        main, ["--database-url", url, "load", "--jobs", "0", str(folder)]
    )
    assert refused.exit_code == 2
    assert "--jobs" in refused.output


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(n) for n in (task / "children").read_text().split())
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
def test_the_workers_end_when_the_loading_process_is_killed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    command = "from thodb.cli import main; main()"
    process = subprocess.Popen(
        [sys.executable, "-c", command, "--database-url", url, "load", "--jobs", "2"]
        + [str(THO)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: set[int] = set()
    deadline = time.monotonic() + 60
    while len(workers) < 2 and process.poll() is None and time.monotonic() < deadline:
        workers = _children(process.pid)
        time.sleep(0.02)
    assert len(workers) == 2, "the load started no workers"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived the killed load"
        time.sleep(0.05)
