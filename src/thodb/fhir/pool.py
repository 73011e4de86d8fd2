"""Reading many files on several cores.

Parsing is most of a load's Python time (THO: 4,939 files, 1.7 s of a 5 s load into
PostgreSQL), and each file is parsed on its own. :func:`records_read` hands the files
that are read whole to worker processes, in chunks, and yields their records in the
order :func:`thodb.fhir.read.read_paths` reads them, so a load sees the same records,
the same duplicates and the first error in the same place as when it reads them in one
process. Packages and JSON files large enough to be streamed are read in the calling
process: their concepts are read from the file as the load writes them.

Workers are forked, which copies the caller's imports instead of starting a new
interpreter. That is only done on Linux (macOS forks too, but the system libraries a
process may have loaded are not safe to use after a fork there) and when the calling
process runs one thread (a thread holding a lock when the process forks would leave
that lock held for ever in the worker). Otherwise, or for a few files, everything is
read here. A worker ends by itself when the loading process is killed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from thodb.fhir.read import ReadCounts, Resource, files_of, read_file, read_whole
from thodb.fhir.resources import Record, parse_resource

log = logging.getLogger(__name__)

#: Files per task sent to a worker: few enough round trips, and work for every worker
#: until the end.
CHUNK = 32

#: Fewer files to read whole than this are read in the calling process: starting the
#: workers would cost more than it saves.
MIN_FILES = 4 * CHUNK


def default_jobs() -> int:
    """The processes to parse with by default: the cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextmanager
def records_read(
    paths: Sequence[str | Path],
    canonical_base: str,
    counts: ReadCounts,
    *,
    jobs: int | None = None,
) -> Iterator[Iterator[Record]]:
    """The record of every CodeSystem and ValueSet under ``paths``, in the order of
    :func:`thodb.fhir.read.read_paths`, parsed by up to ``jobs`` processes (default:
    :func:`default_jobs`; 1 parses here), as an iterator the block reads.

    The workers are forked when the block starts, so a caller can fork them before it
    opens a database transaction, and they end with it (the chunks not started yet are
    dropped when the block ends early).

    :raises LoadError: for the first file, in that order, that cannot be read or
        parsed (as the iterator reaches it).
    """
    files = [(path, in_folder, read_whole(path)) for path, in_folder in files_of(paths)]
    pooled = [
        (str(path), in_folder, canonical_base)
        for path, in_folder, whole in files
        if whole
    ]
    workers = min(default_jobs() if jobs is None else jobs, len(pooled) // CHUNK)
    if workers < 2 or len(pooled) < MIN_FILES or not _may_fork():
        yield (
            record
            for path, in_folder, _ in files
            for record in _records(path, in_folder, canonical_base, counts)
        )
        return
    log.debug("parsing %d files in %d processes", len(pooled), workers)
    executor = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_end_with,
        initargs=(os.getpid(),),
    )
    try:
        # Every chunk is handed out now: the workers fork and start at once.
        results = executor.map(_parse_file, pooled, chunksize=CHUNK)

        def in_order() -> Iterator[Record]:
            for path, in_folder, whole in files:
                if whole:
                    records, found = next(results)
                    counts.add(found)
                    yield from records
                else:
                    yield from _records(path, in_folder, canonical_base, counts)

        yield in_order()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


#: How often a worker looks whether the loading process still runs (seconds).
_WATCH_SECONDS = 0.2


def _end_with(parent: int) -> None:
    """In a worker: end as soon as the loading process ``parent`` has ended.

    A loading process that is killed (``kill -9``) cannot stop its workers, and they
    hold what it held when they were forked, its database connections among them:
    while they run, the database server does not see that the load is gone and keeps
    its transaction and locks.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_WATCH_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="thodb-parent-watch", daemon=True).start()


def _may_fork() -> bool:
    return sys.platform == "linux" and threading.active_count() == 1


def records_of(resources: Iterable[Resource], canonical_base: str) -> Iterator[Record]:
    """The record of each resource (see :func:`thodb.fhir.resources.parse_resource`)."""
    for resource in resources:
        yield parse_resource(
            resource.data,
            resource.source,
            canonical_base=canonical_base,
            path_prefix=resource.path_prefix,
            concepts=resource.concepts,
        )


def _records(
    path: Path, in_folder: bool, canonical_base: str, counts: ReadCounts
) -> Iterator[Record]:
    return records_of(read_file(path, counts, in_folder=in_folder), canonical_base)


def _parse_file(task: tuple[str, bool, str]) -> tuple[list[Record], ReadCounts]:
    """In a worker: the records of one file read whole, and what reading it counted."""
    path, in_folder, canonical_base = task
    counts = ReadCounts()
    return list(_records(Path(path), in_folder, canonical_base, counts)), counts
