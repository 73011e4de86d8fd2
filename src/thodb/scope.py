"""What ``$validate-code`` checks a code against, and what it reads once per state.

A :class:`Scope` is the includes of a value set and of every value set it imports (or,
for ``CodeSystem/$validate-code``, one code system), with the membership rows read on
the way. :class:`Reads` is what one call reads of value sets and code systems.

Only a load changes those facts, and every load recomputes the membership and replaces
the refresh token (:class:`thodb.models.RefreshState`). So the facts are kept in this
process by (database, token), and a warm call checks that they still hold in the same
statement that reads the code's membership row and its concept (in the code system
the includes resolved to): one statement in all, and one more for the designations
when a display is checked. Facts a call reads for the first time are kept only when
the token read after the call shows that no load committed meanwhile. The answers of
calls are kept the same way: a call asked again with the same arguments in the same
state is answered by the statement that reads the token, or by no statement in a
transaction that noted the token (:func:`thodb.expand.noted_token`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session

from thodb import concepts, db, sql, versions
from thodb.canonical import canonical
from thodb.concepts import CodeSystemInfo, ConceptDetails
from thodb.expand import (
    Annotation,
    ValueSetNotExpandable,
    ValueSetRow,
    closure,
    database_of,
    default_language,
    find_value_set_row,
    listed_annotations,
    note_token,
    noted_token,
    refresh_token,
)
from thodb.kept import Kept
from thodb.languages import LanguagePreference
from thodb.models import (
    ComposeRule,
    ComposeRuleCode,
    ValueSet,
    ValueSetMember,
)
from thodb.refresh import problem_of, version_scope
from thodb.versions import VersionRules

K = TypeVar("K")
V = TypeVar("V")

#: (version, display) of a code's ``value_set_member`` row, or ``None`` when it has none.
MemberRow = tuple[str | None, str | None] | None


@dataclass(frozen=True)
class Rule:
    """An include of the scope, for one code system."""

    id: int | None
    system: str
    version: str | None
    #: The code system the include resolved to, when it is loaded.
    code_system_id: int | None = None


@dataclass(frozen=True)
class ValueSetFacts:
    """What validation uses of a ``value_set`` row."""

    id: int
    url: str
    version: str | None
    expansion_status: str | None
    expansion_error: str | None
    experimental: bool | None
    status: str | None
    compose_inactive: bool | None
    #: The display language it asks for when a request names none.
    language: LanguagePreference | None
    supplements: tuple[str, ...]

    @property
    def canonical(self) -> str:
        """``url|version``."""
        return canonical(self.url, self.version)


def _value_set_facts(row: ValueSetRow) -> ValueSetFacts:
    return ValueSetFacts(
        id=row.id,
        url=row.url,
        version=row.version,
        expansion_status=row.expansion_status,
        expansion_error=row.expansion_error,
        experimental=row.experimental,
        status=row.status,
        compose_inactive=row.compose_inactive,
        language=default_language(row),
        supplements=tuple(row.supplements or ()),
    )


@dataclass(frozen=True)
class _ScopeFacts:
    """What a value set's scope is made of, besides the membership rows."""

    rules: Mapping[str, Sequence[Rule]]
    #: Ids of the value set and of every value set it imports.
    reached: tuple[int, ...]
    annotations: Mapping[tuple[str, str], Annotation]
    flagged: tuple[tuple[str, str], ...]
    #: The systems whose includes all name one version.
    one_version: frozenset[str]
    #: The code system of each system whose includes all resolved to one.
    resolved: Mapping[str, int]


class Scope:
    """The includes a code is checked against: a value set's, or a whole code system."""

    def __init__(
        self,
        session: Session,
        name: str,
        rules: Mapping[str, Sequence[Rule]],
        value_set: ValueSetFacts | None,
        code_system: CodeSystemInfo | None = None,
        reached: Sequence[int] = (),
        annotations: Mapping[tuple[str, str], Annotation] | None = None,
        flagged: Sequence[tuple[str, str]] = (),
        rows: Mapping[tuple[str, str], MemberRow] | None = None,
        one_version: frozenset[str] | None = None,
    ) -> None:
        self.session = session
        self.name = name
        self.rules = rules
        self.value_set = value_set
        self.code_system = code_system
        #: Ids of the value set and of every value set it imports.
        self.reached = tuple(reached)
        #: What the includes of ``reached`` say of their enumerated codes.
        self.annotations: Mapping[tuple[str, str], Annotation] = annotations or {}
        #: (canonical, standards status) of the value sets of ``reached`` that are
        #: deprecated or withdrawn.
        self.flagged = tuple(flagged)
        # Membership rows already read (``rows``), by (system, code).
        self._rows: dict[tuple[str, str], MemberRow] = dict(rows or {})
        # The systems whose includes all name one version (computed when not given).
        self._one_version = _one_version(rules) if one_version is None else one_version
        #: The membership was read after the scope was made.
        self.read_membership = False

    @property
    def internal(self) -> bool:
        """True for ``CodeSystem/$validate-code``: no value set was named."""
        return self.value_set is None

    def rule_for(self, system: str, code: str) -> Rule | None:
        """The include whose version applies to ``system#code``.

        The include that selects the code, else the one with the newest version.
        """
        rules = self.rules.get(system, [])
        if not rules:
            return None
        if system in self._one_version:
            return rules[0]
        ids = [r.id for r in rules if r.id is not None]
        if ids:
            self.read_membership = True
            hit = self.session.scalars(
                sa.select(ComposeRuleCode.rule_id).where(
                    ComposeRuleCode.rule_id.in_(ids),
                    ComposeRuleCode.system == system,
                    ComposeRuleCode.code == code,
                )
            ).first()
            for rule in rules:
                if rule.id == hit:
                    return rule
        return max(rules, key=lambda r: versions.sort_key(r.version))

    def is_member(self, rules: VersionRules, cs: CodeSystemInfo, code: str) -> bool:
        """Is ``cs#code`` in scope, ``cs`` being the version the check settled on?

        The stored membership answers for the code system versions the value set
        resolved to; for another version (a coding that names it) the membership is
        recomputed for that version, in a savepoint that is rolled back.
        """
        if self.value_set is None:
            return True
        found = self.listed(cs.url, code)
        resolved = {r.code_system_id for r in self.rules.get(cs.url, [])}
        if cs.id in resolved or cs.version is None:
            return found is not None and found[0] in (None, cs.version)
        with version_scope(self.session, rules.forcing(cs.url, cs.version)):
            # Recomputed membership: read it, not what was read before.
            return self._member_row(cs.url, code) is not None

    def listed(self, system: str, code: str) -> MemberRow:
        """(version, display) of ``system#code`` in the value set's membership, if there."""
        if self.value_set is None:
            return None
        key = (system, code)
        if key not in self._rows:
            self._rows[key] = self._member_row(system, code)
        return self._rows[key]

    def _member_row(self, system: str, code: str) -> MemberRow:
        assert self.value_set is not None
        self.read_membership = True
        row = (
            self.session.connection()
            .execute(
                _MEMBER_ROW, {"vs": self.value_set.id, "system": system, "code": code}
            )
            .first()
        )
        return None if row is None else (row[0], row[1])

    def presence_status(self, system: str, code: str) -> str | None:
        """The status a value set of the scope gives ``system#code`` where it lists it.

        ``deprecated`` for a code marked ``valueset-deprecated`` (or with a
        standards-status extension) on an ``include.concept``.
        """
        found = self.annotations.get((system, code))
        return found.status if found is not None else None

    def systems_with(self, code: str) -> list[str]:
        """The systems whose ``code`` is in the value set (for ``inferSystem``)."""
        if self.value_set is None:
            return [self.code_system.url] if self.code_system else []
        self.read_membership = True
        return sorted(
            self.session.scalars(
                sa.select(ValueSetMember.system)
                .where(
                    ValueSetMember.value_set_id == self.value_set.id,
                    ValueSetMember.code == code,
                )
                .distinct()
            )
        )


_MEMBER_ROW = sa.select(ValueSetMember.version, ValueSetMember.display).where(
    ValueSetMember.value_set_id == sa.bindparam("vs"),
    ValueSetMember.system == sa.bindparam("system"),
    ValueSetMember.code == sa.bindparam("code"),
)

# The token, one membership row and the code's concept in the code system the value
# set resolved to, in one statement (so of one committed state). A warm call runs only
# this statement, through the DB-API cursor: SQLAlchemy's own work for a statement
# costs about as much as the round trip to PostgreSQL.
_PROBE_SQL = (
    "SELECT r.token, m.code, m.version, m.display, "
    + ", ".join(f"c.{column.key}" for column in concepts.DETAIL_COLUMNS)
    + " FROM {p}refresh_state r "
    "LEFT JOIN {p}value_set_member m ON m.value_set_id = ? AND m.system = ? "
    "AND m.code = ? LEFT JOIN {p}concept c ON c.code_system_id = ? AND c.code = ?"
)


class _State:
    """The facts of one membership state (database, refresh token)."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.value_sets: Kept[tuple[str, str | None], ValueSetFacts] = Kept(_KEPT)
        self.code_systems: Kept[str, tuple[CodeSystemInfo, ...]] = Kept(_KEPT * 4)
        self.scopes: Kept[int, _ScopeFacts] = Kept(_KEPT)
        # The answers of whole calls, by their arguments (see kept_answer).
        self.answers: Kept[Hashable, object] = Kept(_KEPT * 16)


#: Value sets (and scopes) kept per state; four times as many code systems.
_KEPT = 256

# The state last seen of each database (older tokens are never current again). A read
# is one dict operation; adding to a state, or replacing it, is done under the lock.
_STATES: dict[str, _State] = {}
_STATES_LOCK = threading.Lock()


def kept_answer(session: Session, answer: Hashable) -> object | None:
    """The answer kept for the call ``answer`` (its arguments) when the session's
    transaction noted a token (see :func:`thodb.expand.noted_token`) and answers of
    its state are kept: found without a statement."""
    token = noted_token(session)
    if token is None:
        return None
    kept = _STATES.get(database_of(session))
    return (
        kept.answers.get(answer) if kept is not None and kept.token == token else None
    )


class Reads:
    """What one validation reads of value sets and code systems.

    :param keep: use (and add to) the facts kept in this process; ``False`` where the
        membership is recomputed for the call (version rules).
    """

    def __init__(self, session: Session, *, keep: bool = True) -> None:
        self.session = session
        self._database = database_of(session)
        self._token: str | None = None
        self._kept: _State | None = None
        self._keep = keep
        # What this call read itself, added to the kept facts when it settles.
        self._value_sets: dict[tuple[str, str | None], ValueSetFacts] = {}
        self._code_systems: dict[str, tuple[CodeSystemInfo, ...]] = {}
        self._scopes: dict[int, _ScopeFacts] = {}
        # Membership rows read with the token, and the value set they are of.
        self._probed: dict[tuple[str, str], MemberRow] = {}
        self._probed_of: int | None = None
        # Concepts read with the token, by (code system id, code); None: not there.
        self._concepts: dict[tuple[int, str], ConceptDetails | None] = {}

    def begin(
        self,
        url: str,
        version: str | None,
        probe: tuple[str, str] | None = None,
        answer: Hashable | None = None,
    ) -> object | None:
        """Read the refresh token and, when ``url|version`` is known from an earlier
        call, the membership row of ``probe`` (system, code) with it.

        :param answer: the arguments of a call whose kept answer is wanted.
        :return: the answer kept for ``answer`` in the state of the token, if any.
        """
        kept = _STATES.get(self._database) if self._keep else None
        known = kept.value_sets.get((url, version)) if kept is not None else None
        if kept is None or known is None or probe is None:
            self._token = refresh_token(self.session)
        else:
            self._token = self._probe(kept, known.id, probe)
        if kept is None or kept.token != self._token:
            return None
        self._kept = kept
        return kept.answers.get(answer) if answer is not None else None

    def _probe(self, kept: _State, value_set_id: int, probe: tuple[str, str]) -> Any:
        """Read the token with the membership row of ``probe`` in value set
        ``value_set_id`` and, where the scope kept says which code system the code is
        of, its concept."""
        system, code = probe
        facts = kept.scopes.get(value_set_id)
        code_system = facts.resolved.get(system) if facts is not None else None
        connection = self.session.connection()
        cursor = db.kept_cursor(connection)
        epoch = db.epoch()
        cursor.execute(
            sql.for_driver(connection, _PROBE_SQL),
            (value_set_id, system, code, code_system, code),
        )
        # All rows (there is one): a statement left unfinished would keep SQLite's
        # read transaction open.
        rows = cursor.fetchall()
        row = rows[0] if rows else None
        token = row[0] if row is not None else None
        note_token(self.session, token, epoch)
        if row is not None and kept.token == token:
            self._probed[probe] = None if row[1] is None else (row[2], row[3])
            self._probed_of = value_set_id
            if code_system is not None:
                concept = None if row[4] is None else concepts.from_row(row[4:])
                self._concepts[(code_system, code)] = concept
        return token

    def locate(
        self, cs: CodeSystemInfo, code: str, *, designations: bool
    ) -> tuple[str, ConceptDetails] | None:
        """:func:`thodb.concepts.locate` without hierarchy and properties, answered
        from the concept read with the token where that is the one asked for."""
        key = (cs.id, code)
        if key in self._concepts:
            found = self._concepts.pop(key)  # designations are added to it
            if found is not None:
                if designations:
                    concepts.add_designations(self.session, [found])
                return code, found
            if cs.case_sensitive is not False:
                return None
        return concepts.locate(
            self.session,
            cs,
            code,
            hierarchy=False,
            designations=designations,
            properties=False,
        )

    def value_set(self, url: str, version: str | None) -> ValueSetFacts:
        """The value set ``url|version`` (see :func:`thodb.expand.find_value_set_row`)."""
        return self._get(
            self._value_sets,
            self._kept.value_sets if self._kept else None,
            (url, version),
            lambda: _value_set_facts(find_value_set_row(self.session, url, version)),
        )

    def code_system_versions(self, url: str) -> Sequence[CodeSystemInfo]:
        """See :func:`thodb.concepts.code_system_versions`."""
        return self._get(
            self._code_systems,
            self._kept.code_systems if self._kept else None,
            url,
            lambda: tuple(concepts.code_system_versions(self.session, url)),
        )

    def find_code_system(self, url: str, version: str | None) -> CodeSystemInfo | None:
        """See :func:`thodb.concepts.find_code_system`."""
        return concepts.pick_version(self.code_system_versions(url), version)

    def scope(self, value_set: ValueSetFacts) -> Scope:
        """The scope of ``value_set``.

        :raises ValueSetNotExpandable: when its membership could not be computed (a
            code system that is not loaded only matters for codes of that system).
        """
        if value_set.expansion_status != "expanded":
            problem = problem_of(
                self.session, self.session.get_one(ValueSet, value_set.id)
            )
            if problem.tx_type != "not-found" or "code system" not in problem.text:
                raise ValueSetNotExpandable(
                    value_set.canonical,
                    value_set.expansion_error or "it has not been expanded",
                    problem,
                )
        facts = self._get(
            self._scopes,
            self._kept.scopes if self._kept else None,
            value_set.id,
            lambda: _scope_facts(self.session, value_set.id),
        )
        return Scope(
            self.session,
            value_set.canonical,
            facts.rules,
            value_set,
            reached=facts.reached,
            annotations=facts.annotations,
            flagged=facts.flagged,
            rows=self._probed if value_set.id == self._probed_of else None,
            one_version=facts.one_version,
        )

    def keep_answer(self, key: Hashable, answer: object) -> None:
        """Keep ``answer`` of the call ``key``; only after :meth:`settle` said that it
        is of one state."""
        if not self._keep or self._token is None:
            return
        with _STATES_LOCK:
            self._state_to_keep_in(self._token).answers.update({key: answer})

    def settle(self, scope: Scope) -> bool:
        """Keep what this call read; ``False`` when a load may have committed while it
        read (the answer may mix two states: ask again).

        No statement is needed when all the call read came from the kept facts and the
        statement that read the token.
        """
        fresh = bool(self._value_sets or self._code_systems or self._scopes)
        if not fresh and self._probed and not scope.read_membership:
            return True
        if self._token != refresh_token(self.session):
            return False
        if fresh and self._keep and self._token is not None:
            with _STATES_LOCK:
                kept = self._state_to_keep_in(self._token)
                kept.value_sets.update(self._value_sets)
                kept.code_systems.update(self._code_systems)
                kept.scopes.update(self._scopes)
        return True

    def _state_to_keep_in(self, token: str) -> _State:
        """The kept state of this database for ``token``, replacing one of another
        token (older tokens are never current again). Called under the lock."""
        kept = _STATES.get(self._database)
        if kept is None or kept.token != token:
            kept = _STATES[self._database] = _State(token)
        return kept

    @staticmethod
    def _get(
        mine: dict[K, V], kept: Kept[K, V] | None, key: K, read: Callable[[], V]
    ) -> V:
        found = mine.get(key)
        if found is None and kept is not None:
            found = kept.get(key)
        if found is None:
            found = mine[key] = read()
        return found


def _one_version(rules: Mapping[str, Sequence[Rule]]) -> frozenset[str]:
    return frozenset(s for s, of in rules.items() if len({r.version for r in of}) == 1)


def _scope_facts(session: Session, value_set_id: int) -> _ScopeFacts:
    rules: dict[str, list[Rule]] = {}
    reached = closure(session, value_set_id)
    for row in session.execute(
        sa.select(
            ComposeRule.id,
            ComposeRule.system,
            ComposeRule.version,
            ComposeRule.code_system_id,
        ).where(
            ComposeRule.value_set_id.in_(reached),
            ComposeRule.kind == "include",
            ComposeRule.system.is_not(None),
        )
    ):
        system = str(row.system)
        rules.setdefault(system, []).append(
            Rule(row.id, system, row.version, row.code_system_id)
        )
    flagged = tuple(
        (canonical(row.url, row.version), str(row.standards_status))
        for row in session.execute(
            sa.select(ValueSet.url, ValueSet.version, ValueSet.standards_status)
            .where(
                ValueSet.id.in_(reached),
                ValueSet.standards_status.in_(list(FLAGGED_STANDARDS_STATUS)),
            )
            .order_by(ValueSet.url)
        )
    )
    resolved: dict[str, int] = {}
    for system, of in rules.items():
        ids = {r.code_system_id for r in of}
        if len(ids) == 1 and (only := ids.pop()) is not None:
            resolved[system] = only
    return _ScopeFacts(
        rules,
        tuple(reached),
        listed_annotations(session, reached),
        flagged,
        _one_version(rules),
        resolved,
    )


#: Standards statuses that a reference to a resource is reported for, with the message id.
FLAGGED_STANDARDS_STATUS = {
    "deprecated": "MSG_DEPRECATED",
    "withdrawn": "MSG_WITHDRAWN",
}
