"""CPU time spent on a measurement, by process: the measuring process, the processes
it started and waited for, and the PostgreSQL server processes of its connections.

A load's wall time is bounded below by its CPU time over the cores that can share it;
these figures show how much work a load does, and on which process, beside its floor.
The server's share is read from ``/proc/<pid>/stat`` of each connection's backend, so
it is known only when the server runs on this machine; otherwise it is ``None``.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event

#: Host names of a server on this machine (``None``: a Unix socket).
_LOCAL_HOSTS = frozenset({None, "", "localhost", "127.0.0.1", "::1"})


def own_s() -> float:
    """CPU seconds (user and system) of this process so far, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_s() -> float:
    """CPU seconds of the child processes of this process that have ended and been
    waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def backend_s(pid: int) -> float | None:
    """CPU seconds of the PostgreSQL server process ``pid`` on this machine, or
    ``None`` when there is no such process (or it is not PostgreSQL's)."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text(encoding="ascii").strip()
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return None
    if name != "postgres":
        return None
    # The fields after the command name, which is in parentheses and may hold spaces:
    # utime and stime are the 14th and 15th fields of the line.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def local_server(engine: sa.Engine) -> bool:
    """Whether ``engine`` talks to a PostgreSQL server on this machine."""
    return engine.dialect.name == "postgresql" and engine.url.host in _LOCAL_HOSTS


def backend_pid(dbapi_connection: object) -> int | None:
    """The server process id of a psycopg connection (``None`` for another driver)."""
    pid = getattr(getattr(dbapi_connection, "info", None), "backend_pid", None)
    return pid if isinstance(pid, int) else None


class ServerClock:
    """The CPU time of the server processes of every connection ``engine`` opens.

    Listens from creation on, so create it before the engine's first connection.
    :meth:`start` takes the current times; :meth:`elapsed` the time spent since, by
    the connections still open (a connection closed meanwhile is not counted).
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.pids: list[int] = []
        self._start: dict[int, float] = {}
        self.local = local_server(engine)
        if self.local:
            event.listen(engine, "connect", self._connected)

    def _connected(self, dbapi_connection: object, _record: object) -> None:
        pid = backend_pid(dbapi_connection)
        if pid is not None:
            self.pids.append(pid)

    def start(self) -> None:
        """Take the server's CPU time now; :meth:`elapsed` counts from here."""
        self._start = {pid: backend_s(pid) or 0.0 for pid in self.pids}

    def elapsed(self) -> float | None:
        """Server CPU seconds since :meth:`start` (``None`` when it cannot be read)."""
        if not self.local:
            return None
        spent = [
            now - self._start.get(pid, 0.0)
            for pid in self.pids
            if (now := backend_s(pid)) is not None
        ]
        return sum(spent) if spent else None
