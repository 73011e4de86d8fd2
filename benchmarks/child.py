"""Timed :func:`thodb.load.load` calls, each in a process of its own (run by the harness).

``python -m benchmarks.child`` is a small fork server: it imports thodb once, then for
each job line on stdin (``{"url", "paths", "replace"}``) forks a process that creates
the schema (untimed, so the figure is the load itself), loads, and answers one JSON
line on stdout: the wall time, the time of each phase (read and parse, while the
records parsed are written; the writing left after; refresh and commit, taken from the
loader's progress callback), the process's peak RSS and that
of the largest process that parsed files for it, and the CPU time of the load's
process, of the processes that parsed files for it and of its PostgreSQL server
processes (see :mod:`benchmarks.cpu`).

A forked process starts with the server's resident set (an interpreter that has
imported thodb, like a fresh ``thodb load``) and its own high-water mark, so its
``VmHWM`` is the peak of that one load. A :class:`thodb.errors.ThodbError` is reported
in ``error``; anything else ends the process and the answer says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import cpu
from thodb.db import create_engine, session_scope
from thodb.errors import ThodbError
from thodb.load import ensure_schema, load


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def run(job: dict[str, Any]) -> dict[str, Any]:
    """Run the load ``job`` and return what it measured (see the module docstring)."""
    baseline = _status_mb("VmRSS")
    engine = create_engine(job["url"])
    server = cpu.ServerClock(engine)
    with session_scope(engine, write=True) as session:
        ensure_schema(session.connection())
    marks: dict[str, float] = {}

    def progress(stage: str, _count: int) -> None:
        marks[stage] = time.perf_counter()

    server.start()
    own_start = cpu.own_s()
    start = time.perf_counter()
    error = None
    summary: dict[str, Any] = {}
    try:
        result = load(
            engine,
            [Path(p) for p in job["paths"]],
            replace=job["replace"],
            progress=progress,
        )
        summary = dataclasses.asdict(result)
        summary.pop("duplicates", None)
    except ThodbError as exc:
        error = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter()
    cpu_s = {
        "process": cpu.own_s() - own_start,
        # The forked process has no other children: they are the parse workers.
        "parse_workers": cpu.children_s(),
        "server": server.elapsed(),
    }
    engine.dispose()

    read_end = marks.get("read", start)
    write_end = marks.get("expand", read_end)
    return {
        "seconds": end - start,
        "read_s": read_end - start,
        "write_s": write_end - read_end,
        "refresh_s": end - write_end if "expand" in marks else 0.0,
        "peak_rss_mb": _status_mb("VmHWM"),
        # The processes that parsed files for it (thodb.fhir.pool), the largest one.
        "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        / 1024,
        "baseline_rss_mb": baseline,
        "cpu_s": cpu_s,
        "summary": summary,
        "error": error,
    }


def _fork(job: dict[str, Any]) -> str:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code = 0
        try:
            with os.fdopen(write_end, "w", encoding="utf-8") as out:
                json.dump(run(job), out)
        except BaseException:
            # The forked process must never return into the server's loop: print the
            # bug and end, and the server answers with the exit status.
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, encoding="utf-8") as answer:
        data = answer.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        return json.dumps({"crash": f"the load process ended with status {status}"})
    return data


def serve() -> None:
    """Answer each job line of stdin with one line, each job in a forked process."""
    for line in sys.stdin:
        if line.strip():
            sys.stdout.write(_fork(json.loads(line)) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    serve()
