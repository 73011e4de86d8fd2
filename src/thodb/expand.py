"""Answering ``$expand`` from the membership that :mod:`thodb.refresh` computes.

:func:`expand` reads a value set's ``value_set_member`` rows (or computes them live, by
:data:`thodb.sql.EXPAND_LIVE`) and applies the request's options in Python
(:class:`ExpandOptions`: ``activeOnly``, text ``filter``, display language,
designations, properties, hierarchy, paging), keeping recent answers in a cache keyed
by the refresh token. The concepts of the members are read by id, a few statements
for any number of codes.
"""

from __future__ import annotations

import logging
import operator
import re
import threading
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import NamedTuple, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session

from thodb import collector, concepts, db, sql, versions
from thodb.canonical import canonical
from thodb.concepts import CodeSystemInfo, ConceptDetails, Property
from thodb.db import is_sqlite
from thodb.errors import NotExpandableError, NotFoundError
from thodb.kept import Kept
from thodb.languages import (
    PREFERRED_FOR_LANGUAGE,
    Designation,
    LanguagePreference,
    pick_display,
    select_designations,
)
from thodb.models import (
    CodeSystem,
    ComposeConcept,
    ComposeRule,
    ValueSet,
    ValueSetMember,
)
from thodb.outcome import Issue, TerminologyError
from thodb.refresh import problem_of, version_scope
from thodb.versions import VersionRules

log = logging.getLogger(__name__)

#: Concept properties every expansion shows, asked for or not: they describe how to
#: present the code (HL7 tx: parameters-expand-supplement-none, fragment-expansion).
SHOWN_PROPERTIES = frozenset({"status", "order", "label", "weight"})


class Member(NamedTuple):
    """One code of an expansion (``ValueSet.expansion.contains``).

    Immutable, so that the expansion cache can hand the same members to every caller;
    a named tuple rather than a frozen dataclass because an expansion makes one per
    code, and a frozen dataclass's constructor sets each of its eleven fields through
    ``object.__setattr__`` (1.2 µs a member, against 0.35 µs). A changed copy is
    ``member._replace(...)``.

    :param contains: the members below this one, when the expansion is hierarchical.
    """

    system: str
    code: str
    display: str | None
    version: str | None = None
    inactive: bool = False
    abstract: bool = False
    status: str | None = None
    definition: str | None = None
    designations: tuple[Designation, ...] = ()
    properties: tuple[Property, ...] = ()
    contains: tuple[Member, ...] = ()


@dataclass(frozen=True)
class ExpandOptions:
    """The ``$expand`` parameters (FHIR R5 ValueSet-expand OperationDefinition).

    :param active_only: ``activeOnly``: leave out inactive codes.
    :param hierarchical: nest codes under their parents where the code system has a
        hierarchy (``excludeNested`` false); the default is a flat list.
    :param include_designations: ``includeDesignations``.
    :param designations: ``designation``: which designations to include, each a
        ``urn:ietf:bcp:47|<language>`` or ``<use system>|<use code>``.
    :param include_definition: ``includeDefinition``.
    :param language: ``displayLanguage`` (or ``Accept-Language``).
    :param filter: ``filter``: text every word of which must begin a word of the
        display or of a designation.
    :param offset: ``offset``: codes to skip.
    :param count: ``count``: codes to return at most; 0 gives the total only.
    :param properties: ``property``: property codes to return for each code
        (``definition`` gives the definition as a property).
    :param versions: ``system-version``, ``check-system-version``,
        ``force-system-version``.
    :param max_size: the largest expansion returned without paging; a larger one
        fails with issue type ``too-costly``.
    :param supplements: ``useSupplement``: canonicals of supplements to apply.
    :param exclude_not_for_ui: ``excludeNotForUI``: leave out abstract codes.
    """

    active_only: bool = False
    hierarchical: bool = False
    include_designations: bool = False
    designations: tuple[str, ...] = ()
    include_definition: bool = False
    language: LanguagePreference | None = None
    filter: str | None = None
    offset: int = 0
    count: int | None = None
    properties: tuple[str, ...] = ()
    versions: VersionRules = field(default_factory=VersionRules)
    max_size: int | None = None
    supplements: tuple[str, ...] = ()
    exclude_not_for_ui: bool = False


@dataclass(frozen=True)
class Expansion:
    """The expansion of a value set (``ValueSet.expansion``).

    :param contains: the codes returned (a page of them, when paging), nested when
        the expansion is hierarchical.
    :param total: the number of codes in the whole expansion.
    :param offset: the position of the first returned code.
    :param used_code_systems: ``url|version`` of each code system the expansion used.
    :param used_value_sets: ``url|version`` of each value set it imported.
    :param issues: warnings found on the way (draft, experimental, deprecated content).
    """

    url: str
    version: str | None
    contains: list[Member]
    total: int = -1
    offset: int = 0
    name: str | None = None
    title: str | None = None
    status: str | None = None
    used_code_systems: tuple[str, ...] = ()
    used_value_sets: tuple[str, ...] = ()
    used_supplements: tuple[str, ...] = ()
    issues: tuple[Issue, ...] = ()
    #: Systems whose codes come from more than one version, in the includes or in the
    #: result: their codes should be shown with their version.
    versioned_systems: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.total < 0:
            object.__setattr__(self, "total", sum(1 for _ in self.members()))

    def members(self) -> Iterator[Member]:
        """Every returned code, nested ones included, parents first."""
        stack = list(reversed(self.contains))
        while stack:
            member = stack.pop()
            yield member
            stack.extend(reversed(member.contains))


class ValueSetNotExpandable(NotExpandableError):
    """A value set that cannot be expanded, with the issue a FHIR answer reports."""

    def __init__(self, canonical: str, reason: str, issue: Issue) -> None:
        super().__init__(canonical, reason)
        self.issue = issue


class ValueSetNotFound(NotFoundError):
    """A value set that is not loaded, with the issue a FHIR answer reports."""

    def __init__(self, message: str, issue: Issue) -> None:
        super().__init__(message)
        self.issue = issue


# --- step 2: checking the import graph ---------------------------------------------


class ValueSetRow(NamedTuple):
    """The columns of a loaded value set that expansion and validation use, read
    without the ORM (:func:`find_value_set_row`)."""

    id: int
    url: str
    version: str | None
    name: str | None
    title: str | None
    status: str | None
    experimental: bool | None
    language: str | None
    supplements: list[str] | None
    expansion_parameters: list[list[str]] | None
    compose_inactive: bool | None
    expansion_status: str
    expansion_error: str | None
    member_count: int | None


_VALUE_SET_ROW = sa.select(
    *(ValueSet.__table__.c[name] for name in ValueSetRow._fields)
).where(ValueSet.__table__.c.url == sa.bindparam("url"))


def find_value_set_row(
    session: Session, url: str, version: str | None = None
) -> ValueSetRow:
    """The loaded value set ``url|version`` (the newest version when none is given),
    as the columns :class:`ValueSetRow` names.

    An expansion reads its value set with every request the cache cannot answer: as
    a row of the table it takes a third of the time of an ORM object on PostgreSQL
    (0.19 against 0.43 ms) and a fifth on SQLite (36 against 157 µs).

    :raises ValueSetNotFound: when no such value set is loaded.
    """
    rows = (
        [
            ValueSetRow._make(row)
            for row in session.connection().execute(_VALUE_SET_ROW, {"url": url})
        ]
        if concepts.storable(url)
        else []
    )
    found, picked = versions.resolve(version, [row.version for row in rows])
    if not found:
        text = f"value set {canonical(url, version)} is not loaded"
        issue = Issue(
            "error",
            "not-found",
            "not-found",
            text,
            message_id="Unable_to_resolve_value_Set_",
        )
        raise ValueSetNotFound(text, issue)
    return next(row for row in rows if row.version == picked)


def find_code_system(
    session: Session, url: str, version: str | None = None
) -> CodeSystem:
    """The loaded code system ``url|version`` (the newest version when none is given).

    :raises NotFoundError: when no such code system is loaded.
    """
    info = concepts.find_code_system(session, url, version)
    found = session.get(CodeSystem, info.id) if info is not None else None
    if found is None:
        raise NotFoundError(f"code system {canonical(url, version)} is not loaded")
    return found


def closure(session: Session, value_set_id: int) -> list[int]:
    """Ids of ``value_set_id`` and of every value set it imports, directly or not."""
    return sql.reached(session, sql.CLOSURE, [value_set_id])


def used_code_systems(
    session: Session, value_set_ids: concepts.Ids
) -> list[CodeSystemInfo]:
    """The code systems the includes of these value sets resolve to."""
    ids = session.scalars(
        sa.select(ComposeRule.code_system_id)
        .where(
            concepts.id_in(session, ComposeRule.value_set_id, value_set_ids),
            ComposeRule.code_system_id.is_not(None),
        )
        .distinct()
    ).all()
    found = [
        concepts.info(row)
        for row in session.scalars(sa.select(CodeSystem).where(CodeSystem.id.in_(ids)))
    ]
    return sorted(found, key=lambda cs: (cs.url, versions.sort_key(cs.version)))


def check_versions(used: Iterable[CodeSystemInfo], rules: VersionRules) -> None:
    """Enforce ``check-system-version``.

    :raises TerminologyError: (``version-error``) when a code system resolved to a
        version the rules do not allow.
    """
    for cs in used:
        wanted = rules.check.get(cs.url)
        if wanted is not None and not versions.matches(wanted, cs.version):
            raise TerminologyError.single(
                "exception",
                "version-error",
                f"the value set uses {cs.canonical}, but check-system-version asks for "
                f"version {wanted}",
                message_id="VALUESET_VERSION_CHECK",
            )


def expand(
    session: Session,
    url: str,
    version: str | None = None,
    *,
    live: bool = False,
    options: ExpandOptions | None = None,
    cache: bool = True,
) -> Expansion:
    """Expand the value set ``url|version`` (FHIR ``$expand``).

    An expansion read from ``value_set_member`` is kept in a cache of this process
    (200,000 codes at most in all) and answered from there until a load recomputes the
    membership; ``live`` expansions and requests with code system version rules are
    never cached.

    :param version: the value set's version (a version or pattern; the newest when
        ``None``).
    :param live: compute the membership from the compose with the recursive statement
        (:data:`thodb.sql.EXPAND_LIVE`) instead of reading ``value_set_member``; the
        result is the same.
    :param options: the ``$expand`` parameters; the default is a flat expansion of
        every code.
    :param cache: look in (and fill) the expansion cache.
    :raises ValueSetNotFound: when the value set is not loaded.
    :raises ValueSetNotExpandable: when it cannot be expanded (the reason says why).
    :raises TerminologyError: for a bad option (unknown supplement, version check,
        too costly).
    """
    options = options or ExpandOptions()
    if live or options.versions or not cache:
        with version_scope(session, options.versions), collector.paused():
            value_set, members = _read_consistently(session, url, version, live)
            return _expand(session, value_set, members, options, stored=not live)
    # Every load replaces the token: in one token's state url|version is one value set.
    database, token = membership_state(session)
    key = (database, token, url, version, repr(options))
    found = _CACHE.get(key) if token is not None else None
    if found is not None:
        return replace(found, contains=list(found.contains))
    with collector.paused():
        value_set, members = _read_consistently(session, url, version, live)
        expansion = _expand(
            session, value_set, members, options, stored=True, state=(database, token)
        )
    # Under READ COMMITTED each statement may see a later commit: the answer is of the
    # token's state only if no recomputation committed meanwhile (tokens never repeat).
    if token is not None and refresh_token(session) == token:
        _CACHE.put(key, expansion)
        return replace(expansion, contains=list(expansion.contains))
    return expansion


def refresh_token(session: Session) -> str | None:
    """The token of the current membership (see :class:`thodb.models.RefreshState`).

    Where the transaction reads one snapshot (:func:`thodb.db.reads_one_snapshot`:
    SQLite, PostgreSQL at ``REPEATABLE READ``) the token read once is noted in the
    session and holds for the rest of the transaction: until it ends, rolls back to a
    savepoint, or a refresh replaces the token.
    """
    noted = noted_token(session)
    if noted is not None:
        return noted
    epoch = db.epoch()
    # On the DB-API cursor: a statement through the session cost twice the round trip.
    connection = session.connection()
    cursor = db.kept_cursor(connection)
    cursor.execute(sql.for_driver(connection, _TOKEN))
    found = cursor.fetchall()
    token: str | None = found[0][0] if found else None
    note_token(session, token, epoch)
    return token


def noted_token(session: Session) -> str | None:
    """The refresh token noted in the session's transaction, if it still holds."""
    noted = session.info.get(_NOTED_TOKEN)
    if noted is None:
        return None
    transaction, epoch, token = noted
    held = transaction() is session.get_transaction() and epoch == db.epoch()
    return token if held else None


def note_token(session: Session, token: str | None, epoch: int) -> None:
    """Note ``token``, read in the session's transaction when :func:`thodb.db.epoch`
    was ``epoch``, where the transaction reads one snapshot."""
    transaction = session.get_transaction()
    if token is None or transaction is None:
        return
    # Whether it does is asked once per transaction: it cannot change inside one.
    known = session.info.get(_ONE_SNAPSHOT)
    if known is not None and known[0]() is transaction:
        one_snapshot = known[1]
    else:
        one_snapshot = db.reads_one_snapshot(session.connection())
        session.info[_ONE_SNAPSHOT] = (weakref.ref(transaction), one_snapshot)
    if one_snapshot:
        # By a weak reference: an ended transaction is not kept alive by its note.
        session.info[_NOTED_TOKEN] = (weakref.ref(transaction), epoch, token)


_TOKEN = "SELECT token FROM {p}refresh_state"
_NOTED_TOKEN = "thodb.expand.noted_token"
_ONE_SNAPSHOT = "thodb.expand.one_snapshot"


def membership_state(session: Session) -> tuple[str, str | None]:
    """(database, refresh token): what a cache of answers derived from the membership
    is keyed by. Where the token is ``None`` nothing may be cached."""
    return database_of(session), refresh_token(session)


def database_of(session: Session) -> str:
    """The database ``session`` talks to, as the key of what the process keeps of it."""
    engine = session.get_bind().engine
    name = _DATABASES.get(engine)
    if name is None:
        name = _DATABASES[engine] = str(engine.url)
    return name


# The name of each engine's database, made once: rendering the URL was a third of the
# time of a validate-code answered from the answers kept in the process.
_DATABASES: weakref.WeakKeyDictionary[sa.Engine, str] = weakref.WeakKeyDictionary()


class _ExpansionCache:
    """Expansions read from ``value_set_member``, least recently used dropped first.

    An entry is keyed by the database, the refresh token it was computed under
    (:class:`thodb.models.RefreshState`), the value set's url and version as asked and
    the options; a load recomputes the membership and replaces the token, so an entry
    of an older state is never found again. At most ``budget`` codes are kept in all.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._entries: OrderedDict[tuple[object, ...], Expansion] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[object, ...]) -> Expansion | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: tuple[object, ...], expansion: Expansion) -> None:
        size = max(1, len(expansion.contains))
        if size > self.budget:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = expansion
            self._size += size
            self._shrink()

    def resize(self, budget: int) -> None:
        with self._lock:
            self.budget = budget
            self._shrink()

    def _shrink(self) -> None:
        # Called with the lock held.
        while self._size > self.budget:
            _, dropped = self._entries.popitem(last=False)
            self._size -= max(1, len(dropped.contains))


#: The expansion cache of this process (see :func:`expand`).
_CACHE = _ExpansionCache(budget=200_000)


def set_cache_budget(codes: int) -> None:
    """Keep at most ``codes`` codes of expansions in this process's cache (default
    200,000; 0 turns the cache off). Entries beyond a smaller budget are dropped, least
    recently used first; an expansion larger than the budget is never kept.

    :raises ValueError: for a negative budget.
    """
    if codes < 0:
        raise ValueError(f"the cache budget is a number of codes, not {codes}")
    _CACHE.resize(codes)


# How often to read a value set again when a load replaced it between two statements.
_READ_ATTEMPTS = 5


def _read_consistently(
    session: Session, url: str, version: str | None, live: bool
) -> tuple[ValueSetRow, list[_Row]]:
    """The value set and its members, as one committed state saw them.

    Under PostgreSQL's READ COMMITTED each statement sees the latest commit, so a
    load that replaces the value set between the two reads would leave its members
    missing; ``member_count`` tells, and the read is repeated.
    """
    for _ in range(_READ_ATTEMPTS):
        value_set = find_value_set_row(session, url, version)
        if value_set.expansion_status != "expanded":
            raise ValueSetNotExpandable(
                canonical(value_set.url, value_set.version),
                value_set.expansion_error or "it has not been expanded",
                problem_of(session, session.get_one(ValueSet, value_set.id)),
            )
        members = _read_members(session, value_set, live)
        if value_set.member_count in (None, len(members)):
            break
    return value_set, members


def default_language(value_set: ValueSetRow) -> LanguagePreference | None:
    """The display language a value set asks for when the request names none.

    Its ``displayLanguage`` expansion parameter (extension on ``compose``), else its
    ``language`` (HL7 tx: validation-simple-coding-bad-language-vs, -vslang). A value
    that is not a language tag is ignored.
    """
    stated = dict((name, value) for name, value in value_set.expansion_parameters or [])
    for value in (stated.get("displayLanguage"), value_set.language):
        if value:
            try:
                return LanguagePreference.parse(value)
            except ValueError:
                log.warning(
                    "value set %s: %r is not a language; ignored", value_set.url, value
                )
    return None


def _expand(
    session: Session,
    value_set: ValueSetRow,
    rows: list[_Row],
    options: ExpandOptions,
    *,
    stored: bool,
    state: tuple[str, str | None] | None = None,
) -> Expansion:
    """The expansion of ``value_set`` from its membership ``rows`` (``stored``: its
    ``value_set_member`` rows, not a live computation); ``state``: the
    :func:`membership_state` the caller read, if it did."""
    name = canonical(value_set.url, value_set.version)
    if options.language is None:
        options = replace(options, language=default_language(value_set))
    definition = _definition(session, value_set.id, state)
    used = definition.used
    check_versions(used, options.versions)
    supplements = [
        require_supplement(session, reference)
        for reference in dict.fromkeys(
            (*options.supplements, *(value_set.supplements or ()))
        )
    ]

    # The (system, version) of the rows: the code systems the members are of.
    pairs = {(row[0], row[3]) for row in rows}
    every = _decorate(
        session,
        rows,
        pairs,
        value_set.id if stored else None,
        options,
        supplements,
        definition,
    )
    members = _wanted_members(every, options)
    total = len(members)
    paged = options.offset > 0 or options.count is not None
    if options.max_size is not None and total > options.max_size and not paged:
        raise TerminologyError.single(
            "too-costly",
            None,
            f"the expansion of {name} has {total} codes, more than the {options.max_size} "
            "this server returns at once; use count and offset to page through it",
            message_id="VALUESET_TOO_COSTLY",
        )
    if paged:
        end = None if options.count is None else options.offset + options.count
        members = members[options.offset : end]
    shown = (
        pairs
        if members is every
        else {(member.system, member.version) for member in members}
    )
    if options.hierarchical and not paged:
        members = _nest(session, members)

    versioned = _versioned_systems(definition.versions_of, shown)
    return Expansion(
        url=value_set.url,
        version=value_set.version,
        contains=members,
        total=total,
        offset=options.offset,
        name=value_set.name,
        title=value_set.title,
        status=value_set.status,
        used_code_systems=tuple(cs.canonical for cs in used),
        used_value_sets=definition.used_value_sets,
        used_supplements=tuple(s.canonical for s in supplements),
        versioned_systems=versioned,
    )


def _versioned_systems(
    versions_of: Mapping[str, frozenset[str | None]],
    pairs: Iterable[tuple[str, str | None]],
) -> tuple[str, ...]:
    """The systems the includes name several versions of, or that the members shown
    (their (system, version) ``pairs``) have in several."""
    shown: dict[str, set[str | None]] = defaultdict(set)
    for system, version in pairs:
        shown[system].add(version)
    return tuple(
        sorted(
            s
            for s in {*versions_of, *shown}
            if len(versions_of.get(s, ())) > 1 or len(shown[s]) > 1
        )
    )


@dataclass(frozen=True)
class _Definition:
    """What an expansion reads of a value set's compose and of those it imports."""

    #: The code systems the includes of the value set and of every value set it
    #: imports resolve to.
    used: tuple[CodeSystemInfo, ...]
    #: ``url|version`` of the imported value sets.
    used_value_sets: tuple[str, ...]
    annotations: Mapping[tuple[str, str], Annotation]
    #: The versions the includes name, by system.
    versions_of: Mapping[str, frozenset[str | None]]
    #: The loaded versions of those systems (every member is of one of them).
    loaded: Mapping[str, list[CodeSystemInfo]]
    #: :func:`thodb.concepts.detail_codes` of the used code systems.
    detail_codes: frozenset[str]


def _definition(
    session: Session, value_set_id: int, state: tuple[str, str | None] | None
) -> _Definition:
    """The definition of ``value_set_id``, kept by (database, refresh token): only a
    load changes it, and every load replaces the token. ``state`` is read when not
    given."""
    database, token = state or membership_state(session)
    key = (database, token, value_set_id)
    found = _DEFINITIONS.get(key) if token is not None else None
    if found is not None:
        return found
    reached = closure(session, value_set_id)
    used = tuple(used_code_systems(session, reached))
    versions_of: dict[str, set[str | None]] = defaultdict(set)
    for system, version in session.execute(
        sa.select(ComposeRule.system, ComposeRule.version)
        .where(
            concepts.id_in(session, ComposeRule.value_set_id, reached),
            ComposeRule.kind == "include",
            ComposeRule.system.is_not(None),
        )
        .distinct()
    ):
        versions_of[str(system)].add(version)
    found = _Definition(
        used=used,
        used_value_sets=tuple(
            canonical(row.url, row.version)
            for row in session.execute(
                sa.select(ValueSet.url, ValueSet.version).where(
                    concepts.id_in(session, ValueSet.id, reached),
                    ValueSet.id != value_set_id,
                )
            )
        ),
        annotations=listed_annotations(session, reached),
        versions_of={s: frozenset(v) for s, v in versions_of.items()},
        loaded=concepts.code_system_versions_of(session, versions_of),
        detail_codes=concepts.detail_codes(session, [cs.id for cs in used]),
    )
    # Kept only if no recomputation committed while it was read (see expand).
    if token is not None and refresh_token(session) == token:
        with _DEFINITIONS_LOCK:
            _DEFINITIONS.update({key: found})
    return found


_DEFINITIONS: Kept[tuple[object, ...], _Definition] = Kept(256)
_DEFINITIONS_LOCK = threading.Lock()


def require_supplement(session: Session, reference: str) -> CodeSystemInfo:
    """The loaded supplement ``reference`` names.

    :raises TerminologyError: (``not-found``) when it is not loaded.
    """
    found = concepts.find_supplement(session, reference)
    if found is None:
        raise TerminologyError.single(
            "not-found",
            "not-found",
            f"the supplement {reference} is not loaded",
            message_id="VALUESET_SUPPLEMENT_MISSING",
        )
    return found


#: A membership row, from ``value_set_member`` or :data:`thodb.sql.EXPAND_LIVE`: system,
#: code, display, version, inactive, abstract, concept_id. The driver's own tuples: a
#: named tuple made of each costs 0.3 µs, a SQLAlchemy row more, and the rows of an
#: expansion are unpacked once where all of them is needed.
_Row = tuple[str, str, str | None, str | None, bool, bool, int | None]
_ROW_COLUMNS = (
    "system",
    "code",
    "display",
    "version",
    "inactive",
    "abstract",
    "concept_id",
)


def _read_members(session: Session, value_set: ValueSetRow, live: bool) -> list[_Row]:
    connection = session.connection()
    if not live:
        ordered = (
            not is_sqlite(connection) and (value_set.member_count or 0) > _ORDERED_ABOVE
        )
        statement = _STORED_MEMBERS_BY_ID if ordered else _STORED_MEMBERS
        # A cursor of its own, closed after: a kept one would hold the rows of the
        # last expansion (100,000 members, tens of MB) until its next statement.
        cursor = connection.connection.cursor()
        try:
            cursor.execute(sql.for_driver(connection, statement), (value_set.id,))
            return list(cursor.fetchall())
        finally:
            cursor.close()
    names, rows = sql.fetch_without_jit(
        connection,
        sql.named_for_driver(connection, sql.EXPAND_LIVE),
        {"value_set_id": value_set.id},
    )
    # By name: the live statement has more columns, in another order.
    pick = operator.itemgetter(*(names.index(name) for name in _ROW_COLUMNS))
    return _one_per_code(map(pick, rows))


def _one_per_code(rows: Iterable[_Row]) -> list[_Row]:
    """One row per (system, code) of the live statement's ``rows``: a code that
    several system parts list, merged as the refresh merges it (``sql._COLLAPSE``):
    the least version, display and concept id, inactive or abstract if one row is."""
    found: dict[tuple[str, str], _Row] = {}
    for row in rows:
        key = (row[0], row[1])
        seen = found.get(key)
        found[key] = (
            row
            if seen is None
            else (
                row[0],
                row[1],
                _least(seen[2], row[2]),
                _least(seen[3], row[3]),
                bool(seen[4] or row[4]),
                bool(seen[5] or row[5]),
                _least(seen[6], row[6]),
            )
        )
    return list(found.values())


_T = TypeVar("_T", str, int)


def _least(a: _T | None, b: _T | None) -> _T | None:
    """The lesser of two values where ``None`` is no value (SQL's MIN)."""
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


# The stored members of a value set, in the columns of _Row, read through the DB-API
# cursor: for 100,000 members SQLAlchemy's rows cost 0.15-0.2 s more than the driver's
# tuples. The ORDER BY is only for speed (_decorate orders the members), on PostgreSQL
# and for large value sets: by concept id is the order of each code system's members,
# and PostgreSQL sorts 50,000 ids in less time than Python sorts their members from
# the table's order (0.12-0.14 against 0.19-0.21 s for the hierarchy benchmark's
# descendent-of value set; 14 against 19 ms for 5,000), while for image-reference-type's
# 1,029 (854 without a concept id, tied on the id) the sort costs 0.8 ms more than it
# saves. SQLite reads the rows in primary-key order without sorting.
_STORED_MEMBERS = (
    "SELECT "
    + ", ".join(_ROW_COLUMNS)
    + " FROM {p}value_set_member WHERE value_set_id = ?"
)
_STORED_MEMBERS_BY_ID = _STORED_MEMBERS + " ORDER BY concept_id, code"
_ORDERED_ABOVE = 2_000


@dataclass(frozen=True)
class Annotation:
    """What a value set's ``include.concept`` says of a code: designations, properties
    and the status of the code's presence (``deprecated``)."""

    designations: tuple[Designation, ...] = ()
    properties: tuple[Property, ...] = ()
    status: str | None = None


def listed_annotations(
    session: Session,
    value_set_ids: concepts.Ids,
    only: tuple[str, str] | None = None,
) -> dict[tuple[str, str], Annotation]:
    """The designations and extension properties that the includes of the value sets
    ``value_set_ids`` give their enumerated codes, by (system, code).

    :param only: (system, code) of the one code wanted.
    """
    found: dict[tuple[str, str], Annotation] = {}
    statement = (
        sa.select(
            ComposeRule.system,
            ComposeConcept.code,
            ComposeConcept.designations,
            ComposeConcept.properties,
            ComposeConcept.standards_status,
        )
        .join(ComposeRule, ComposeRule.id == ComposeConcept.rule_id)
        .where(
            concepts.id_in(session, ComposeRule.value_set_id, value_set_ids),
            ComposeRule.kind == "include",
            # The predicate of the partial index ix_compose_concept_annotated.
            sa.or_(
                ComposeConcept.designations.is_not(None),
                ComposeConcept.properties.is_not(None),
                ComposeConcept.standards_status.is_not(None),
            ),
        )
        .order_by(ComposeConcept.id)
    )
    if only is not None:
        statement = statement.where(
            ComposeRule.system == only[0], ComposeConcept.code == only[1]
        )
    for row in session.execute(statement):
        key = (str(row.system), str(row.code))
        before = found.get(key, Annotation())
        found[key] = Annotation(
            before.designations
            + tuple(
                Designation(
                    d["value"],
                    d.get("language"),
                    d.get("use_system"),
                    d.get("use_code"),
                )
                for d in row.designations or ()
            ),
            before.properties
            + tuple(
                Property(p["code"], p["type"], p.get("value"))
                for p in row.properties or ()
            ),
            before.status or row.standards_status,
        )
    return found


def _decorate(
    session: Session,
    rows: list[_Row],
    pairs: set[tuple[str, str | None]],
    stored_id: int | None,
    options: ExpandOptions,
    supplements: list[CodeSystemInfo],
    definition: _Definition,
) -> list[Member]:
    """The members of membership ``rows``, with what the options ask for, ordered as
    their code systems order their concepts; ``pairs``: the (system, version) of the
    rows.

    The rows name their concepts by id, so a few statements read the details of any
    number of codes (``stored_id``: the value set whose ``value_set_member`` rows they
    are, which selects the ids in the database; None for rows computed live); a member
    is made once, when all of it is known. The annotations of listed codes, the loaded
    code system versions and which details their concepts have at all come from the
    value set's kept ``definition``: when none of those details is shown, no concept is
    read.
    """
    annotations = definition.annotations
    need_designations = bool(
        options.include_designations or options.language or options.filter
    )
    wanted_properties = {*options.properties, *SHOWN_PROPERTIES}
    # A concept with no status, none of the shown properties and no annotation adds
    # nothing to its member unless the options show its display or definition: such
    # concepts (most of a large code system) are not read at all.
    skip_plain = not (
        need_designations
        or options.include_definition
        or "definition" in options.properties
        or supplements
    )
    if (
        skip_plain
        and not annotations
        and not wanted_properties & definition.detail_codes
    ):
        # No concept of the code systems used has anything to add.
        found: dict[int, ConceptDetails] = {}
    else:
        concept_ids: concepts.Ids = (
            {row[6] for row in rows if row[6] is not None}
            if stored_id is None
            else sa.select(ValueSetMember.concept_id).where(
                ValueSetMember.value_set_id == stored_id,
                ValueSetMember.concept_id.is_not(None),
            )
        )
        found = concepts.by_id(
            session,
            concept_ids,
            designations=need_designations,
            properties=wanted_properties,
            skip_plain=skip_plain,
            keep_codes={code for _, code in annotations},
        )
    # The code system of each (system, version): the one its concepts came from.
    systems = {
        (system, version): next(
            (cs for cs in definition.loaded.get(system, []) if cs.version == version),
            None,
        )
        for system, version in pairs
    }
    if supplements:
        for (system, version), cs in systems.items():
            applied = (
                [] if cs is None else concepts.supplements_of(session, supplements, cs)
            )
            if applied:
                concepts.add_supplements(
                    session,
                    applied,
                    {
                        row[1]: found[row[6]]
                        for row in rows
                        if row[6] in found and (row[0], row[3]) == (system, version)
                    },
                    designations=need_designations,
                    properties=wanted_properties,
                )
    unloaded = 1 << 62  # after every concept of the code system, by code
    result: list[tuple[tuple[str, int, str], Member]]
    if not found:
        # Every member is its row (the common case, made in one comprehension).
        result = [
            (
                (system, unloaded if concept_id is None else concept_id, code),
                Member(system, code, display, version, bool(inactive), bool(abstract)),
            )
            for system, code, display, version, inactive, abstract, concept_id in rows
        ]
        result.sort(key=_FIRST)
        return [member for _, member in result]
    result = []
    for row in rows:
        system, code, display, version, inactive, abstract, concept_id = row
        details = None if concept_id is None else found.get(concept_id)
        if details is None:
            member = Member(
                system, code, display, version, bool(inactive), bool(abstract)
            )
            order = unloaded if concept_id is None else concept_id
            result.append(((system, order, code), member))
            continue
        annotation = annotations.get((system, code))
        if annotation is not None:
            details = annotated(details, annotation)
        cs = systems[(system, version)]
        member = _dress(row, details, options, None if cs is None else cs.language)
        result.append(((system, details.id, code), member))
    result.sort(key=_FIRST)
    return [member for _, member in result]


_FIRST = operator.itemgetter(0)


def annotated(details: ConceptDetails, annotation: Annotation) -> ConceptDetails:
    """``details`` with the value set's designations added and its properties winning."""
    given = {p.code for p in annotation.properties}
    return replace(
        details,
        designations=[
            *details.designations,
            *(d for d in annotation.designations if d not in details.designations),
        ],
        properties=[
            *annotation.properties,
            *(p for p in details.properties if p.code not in given),
        ],
    )


def _dress(
    row: _Row, details: ConceptDetails, options: ExpandOptions, language: str | None
) -> Member:
    """The member of ``row`` with what the options ask for from its concept's
    ``details``; ``language`` is its code system's display language."""
    # Without a language preference the stored display stands: it was read with the
    # membership, from the same committed state.
    system, code, stored_display, version, inactive, abstract, _ = row
    display = stored_display
    if options.language:
        display = pick_display(
            details.display, language, details.designations, options.language
        )
    if options.language and details.display is None:
        display = pick_display(
            stored_display, None, details.designations, options.language
        )
    designations: tuple[Designation, ...] = ()
    if options.include_designations:
        chosen = select_designations(details.designations, options.designations)
        if display != details.display and details.display is not None:
            # The designation shown as the display is not listed again; the code
            # system's own display still is a designation of the concept.
            chosen = [d for d in chosen if d.value != display]
            if not options.designations:
                chosen.insert(
                    0, Designation(details.display, language, *PREFERRED_FOR_LANGUAGE)
                )
        designations = tuple(chosen)
    properties: list[Property] = []
    for asked in options.properties:
        if asked == "definition" and details.definition is not None:
            properties.append(Property("definition", "string", details.definition))
    if details.properties:
        shown = {*options.properties, *SHOWN_PROPERTIES}
        properties += [p for p in details.properties if p.code in shown]
    if details.status is not None and not any(p.code == "status" for p in properties):
        properties.append(Property("status", "code", details.status))
    definition = details.definition if options.include_definition else None
    return Member(
        system,
        code,
        display,
        version,
        bool(inactive),
        bool(abstract),
        status=details.status,
        definition=definition,
        designations=designations,
        properties=tuple(properties),
    )


_WORD = re.compile(r"\w+")


def _wanted_members(members: list[Member], options: ExpandOptions) -> list[Member]:
    """The members that ``activeOnly``, ``excludeNotForUI`` and ``filter`` keep;
    ``members`` itself, without a pass over them, when none of those is asked."""
    if not (options.active_only or options.exclude_not_for_ui or options.filter):
        return members
    return [m for m in members if _wanted(m, options)]


def _wanted(member: Member, options: ExpandOptions) -> bool:
    if options.active_only and member.inactive:
        return False
    if options.exclude_not_for_ui and member.abstract:
        return False
    if options.filter:
        texts = [member.display or "", member.code] + [
            d.value for d in member.designations
        ]
        words = [w for text in texts for w in _WORD.findall(text.lower())]
        return all(
            any(word.startswith(token) for word in words)
            for token in _WORD.findall(options.filter.lower())
        )
    return True


def _nest(session: Session, members: list[Member]) -> list[Member]:
    """Put each code under its parent in the code system, when the parent is a member."""
    by_system: dict[tuple[str, str | None], list[Member]] = defaultdict(list)
    for member in members:
        by_system[(member.system, member.version)].append(member)
    parent_of: dict[tuple[str, str], str] = {}
    for (system, version), group in by_system.items():
        cs = concepts.find_code_system(session, system, version)
        if cs is None:
            continue
        codes = {m.code for m in group}
        found = concepts.details(
            session, cs.id, codes, designations=False, properties=False, hierarchy=True
        )
        for code, details in found.items():
            parent = next((p for p in details.parents if p in codes), None)
            if parent is not None:
                parent_of[(system, code)] = parent
    children: dict[tuple[str, str], list[Member]] = defaultdict(list)
    roots: list[Member] = []
    for member in members:
        parent = parent_of.get((member.system, member.code))
        if parent is None:
            roots.append(member)
        else:
            children[(member.system, parent)].append(member)

    def build(member: Member) -> Member:
        below = children.get((member.system, member.code), [])
        return (
            member._replace(contains=tuple(build(m) for m in below))
            if below
            else member
        )

    return [build(m) for m in roots]
