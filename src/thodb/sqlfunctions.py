"""SQL functions that SQLite lacks and thodb's statements use.

The ``regex`` filter of a value set (R5 filter-operator ``regex``: the whole value
matches the pattern) is written ``value REGEXP pattern`` in the shared SQL. SQLite
parses the ``REGEXP`` operator but ships no function behind it; this module supplies
one, implemented with Python's :mod:`re` (:func:`re.fullmatch`). PostgreSQL has its
own operator; :func:`regex_match` gives the fragment for each dialect.

:func:`install` registers the function on every new connection of an engine (the
engine factory should call it); :func:`ensure` registers it on the connection a
session uses now, so statements work whatever created the engine.
"""

from __future__ import annotations

import functools
import re
import sqlite3
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from thodb.db import is_sqlite

# Compiled patterns, shared by all connections; value sets reuse few patterns.
_CACHE_SIZE = 256


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _compile(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except re.error:
        return None


def regexp(pattern: str | None, value: str | None) -> bool:
    """SQLite's ``value REGEXP pattern``: does the whole value match?

    A pattern that is not a valid regular expression matches nothing (the value set
    is then empty rather than the statement failing).
    """
    if pattern is None or value is None:
        return False
    compiled = _compile(pattern)
    return compiled is not None and compiled.fullmatch(value) is not None


def _register(dbapi_connection: sqlite3.Connection) -> None:
    dbapi_connection.create_function("regexp", 2, regexp, deterministic=True)


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    _register(dbapi_connection)


def install(engine: Engine) -> None:
    """Register the functions on each new SQLite connection of ``engine``."""
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _on_connect)


def ensure(session: Session) -> None:
    """Register the functions on the SQLite connection ``session`` is using."""
    if is_sqlite(session):
        raw = session.connection().connection.dbapi_connection
        if isinstance(raw, sqlite3.Connection):
            _register(raw)


def regex_match(sqlite: bool, value: str, pattern: str) -> str:
    """The SQL condition "``value`` matches ``pattern`` as a whole" for a dialect.

    :param value: SQL expression of the text (a column), from a fixed set in code.
    :param pattern: SQL expression of the pattern, from a fixed set in code.
    """
    if sqlite:
        return f"{value} REGEXP {pattern}"
    # PostgreSQL's ~ finds the pattern anywhere: anchor it to the whole value.
    return f"{value} ~ ('^(?:' || {pattern} || ')$')"
