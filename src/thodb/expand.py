"""Value-set expansion: computing ``value_set_member`` and reading expansions.

After every load, :func:`refresh` recomputes the membership of every value set:

1. each rule's ``system|version`` and each imported ``url|version`` is resolved to a
   loaded resource (two UPDATE statements);
2. the import graph is checked (no compose, an import that is not loaded, a cycle, a code
   system that a whole-system or filter rule needs and that is not loaded, an operator
   that is not supported); a value set that imports one that cannot be expanded cannot be
   expanded either, and the reason is stored in ``value_set.expansion_error``;
3. the system part of every rule is computed by one recursive statement
   (:data:`thodb.sql.RULE_CODES`, hierarchy filters walk ``concept_parent``);
4. the members of every expandable value set are computed by one recursive statement
   (:data:`thodb.sql.MATERIALIZE`) that resolves the whole import closure. Only the two
   FHIR constructs that are not monotone (an include that intersects several value
   sets, an exclude that names value sets) need their operands complete beforehand:
   value sets using them are put in a later *pass* (``value_set.stratum``), one more
   statement per level of such nesting. DICOM and the model case need a single pass.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.orm import Session

from thodb import sql
from thodb.canonical import canonical
from thodb.db import schema_prefix
from thodb.errors import NotExpandableError, NotFoundError
from thodb.models import CodeSystem, ValueSet, ValueSetMember

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """One code of an expansion (``ValueSet.expansion.contains``)."""

    system: str
    code: str
    display: str | None
    version: str | None = None
    inactive: bool = False
    abstract: bool = False


@dataclass(frozen=True)
class Expansion:
    """The expansion of a value set."""

    url: str
    version: str | None
    contains: list[Member]

    @property
    def total(self) -> int:
        """Number of codes in the expansion."""
        return len(self.contains)


@dataclass(frozen=True)
class RefreshSummary:
    """What :func:`refresh` computed."""

    expanded: int
    not_expandable: int
    members: int
    passes: int


# --- step 2: checking the import graph ---------------------------------------------


@dataclass
class _Node:
    id: int
    url: str
    version: str | None
    has_compose: bool
    error: str | None = None
    #: (imported value set id, weight): 1 for an operand of an intersection or of a
    #: value-set exclude, 0 for a plain include of one value set.
    edges: list[tuple[int, int]] = field(default_factory=list)


def _diagnose(session: Session) -> dict[int, _Node]:
    nodes = {
        row.id: _Node(row.id, row.url, row.version, row.has_compose)
        for row in session.execute(
            sa.select(ValueSet.id, ValueSet.url, ValueSet.version, ValueSet.has_compose)
        )
    }
    for node in nodes.values():
        if not node.has_compose:
            node.error = (
                "it has no compose: the value set is defined by reference, so its "
                "content is not in the resource"
            )

    p = schema_prefix(session)
    rules = session.execute(
        sa.text(
            f"""
            SELECT r.id, r.value_set_id, r.kind, r.position, r.system, r.version,
                   r.import_count, r.code_system_id,
                   EXISTS (SELECT 1 FROM {p}compose_concept k WHERE k.rule_id = r.id)
                       AS has_concepts
            FROM {p}compose_rule r ORDER BY r.id
            """
        )
    ).all()
    filters = defaultdict(list)
    for row in session.execute(
        sa.text(
            f"SELECT rule_id, position, property, op FROM {p}compose_filter "
            "ORDER BY rule_id, position"
        )
    ):
        filters[row.rule_id].append(row)
    imports = defaultdict(list)
    for row in session.execute(
        sa.text(
            f"SELECT rule_id, url, version, value_set_id FROM {p}compose_import "
            "ORDER BY rule_id, position"
        )
    ):
        imports[row.rule_id].append(row)

    for rule in rules:
        node = nodes[rule.value_set_id]
        where = f"compose.{rule.kind}[{rule.position}]"
        if node.error is None:
            node.error = _rule_error(rule, where, filters[rule.id])
        weight = 1 if rule.kind == "exclude" or rule.import_count > 1 else 0
        for imp in imports[rule.id]:
            if imp.value_set_id is None:
                node.error = node.error or (
                    f"{where} imports {canonical(imp.url, imp.version)}, "
                    "which is not loaded"
                )
            else:
                node.edges.append((imp.value_set_id, weight))
    _mark_cycles(nodes)
    return nodes


def _rule_error(
    rule: sa.Row[tuple[object, ...]],
    where: str,
    filters: list[sa.Row[tuple[object, ...]]],
) -> str | None:
    if rule.system is None or rule.has_concepts:
        return None
    if rule.code_system_id is None:
        needs = "filters" if filters else "includes all of"
        return (
            f"{where} {needs} code system {canonical(rule.system, rule.version)}, "
            "which is not loaded"
        )
    for flt in filters:
        properties = sql.SUPPORTED_FILTERS.get(flt.op, ())
        if properties == ():
            return (
                f"{where}.filter[{flt.position}]: operator {flt.op!r} is not supported"
            )
        if properties is not None and flt.property not in properties:
            return (
                f"{where}.filter[{flt.position}]: operator {flt.op!r} applies to the "
                f"concept hierarchy (property 'concept'), not to {flt.property!r}"
            )
    return None


def _mark_cycles(nodes: dict[int, _Node]) -> None:
    # Tarjan's strongly connected components, iteratively. A component of more than one
    # value set (or one that imports itself) is a cycle; a diamond is not.
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[int] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack.add(v)
            edges = nodes[v].edges
            if i < len(edges):
                work.append((v, i + 1))
                w = edges[i][0]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if work and work[-1][0] != v:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                self_loop = any(t == v for t, _ in nodes[v].edges)
                if len(component) > 1 or self_loop:
                    _report_cycle(nodes, set(component))


def _report_cycle(nodes: dict[int, _Node], component: set[int]) -> None:
    # Name the shortest cycle through the component's smallest url (breadth-first).
    start = min(component, key=lambda n: (nodes[n].url, nodes[n].version or ""))
    previous: dict[int, int | None] = {start: None}
    queue = [start]
    end = start
    for v in queue:
        targets = sorted({t for t, _ in nodes[v].edges}, key=lambda t: nodes[t].url)
        if start in targets:
            end = v
            break
        for t in targets:
            if t in component and t not in previous:
                previous[t] = v
                queue.append(t)
    path: list[int] = []
    step: int | None = end
    while step is not None:
        path.append(step)
        step = previous[step]
    path.reverse()
    path.append(start)
    names = " -> ".join(canonical(nodes[n].url, nodes[n].version) for n in path)
    for n in component:
        nodes[n].error = nodes[n].error or f"import cycle: {names}"


def _strata(nodes: dict[int, _Node]) -> dict[int, int]:
    """Pass of every expandable value set; value sets that cannot be expanded are left out.

    pass(v) = max over imports x of pass(x) + weight of the edge. A value set that imports
    one that cannot be expanded gets an error naming that import and the root cause.
    """
    result: dict[int, int] = {}
    root_cause: dict[int, str] = {}
    done: set[int] = set()
    for root in nodes:
        if root in done:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            done.add(v)
            edges = nodes[v].edges
            if i < len(edges):
                work.append((v, i + 1))
                if edges[i][0] not in done:
                    work.append((edges[i][0], 0))
                continue
            _settle(nodes, v, result, root_cause)
    return result


def _settle(
    nodes: dict[int, _Node], v: int, result: dict[int, int], root_cause: dict[int, str]
) -> None:
    node = nodes[v]
    if node.error is not None:
        root_cause[v] = node.error
        return
    level = 0
    for target, weight in node.edges:
        if target not in result:
            other = nodes[target]
            cause = root_cause.get(target) or other.error or "it is in an import cycle"
            root_cause[v] = cause
            node.error = (
                f"imports {canonical(other.url, other.version)}, which cannot be "
                f"expanded: {cause}"
            )
            return
        level = max(level, result[target] + weight)
    result[v] = level


# --- steps 1, 3 and 4 ------------------------------------------------------------------


def refresh(session: Session) -> RefreshSummary:
    """Recompute the membership of every loaded value set (see the module docstring)."""
    session.flush()
    session.execute(sql.render(session, sql.RESOLVE_CODE_SYSTEMS))
    session.execute(sql.render(session, sql.RESOLVE_IMPORTS))

    nodes = _diagnose(session)
    strata = _strata(nodes)
    session.execute(
        sa.update(ValueSet),
        [
            {
                "id": node.id,
                "stratum": strata.get(node.id),
                "expansion_status": "expanded"
                if node.id in strata
                else "not-expandable",
                "expansion_error": None if node.id in strata else node.error,
                "member_count": None,
            }
            for node in nodes.values()
        ],
    )

    p = schema_prefix(session)
    session.execute(sa.text(f"DELETE FROM {p}compose_rule_code"))
    session.execute(sql.render(session, sql.RULE_CODES))
    session.execute(sa.text(f"DELETE FROM {p}value_set_member"))
    passes = max(strata.values(), default=-1) + 1
    for stratum in range(passes):
        session.execute(sql.render(session, sql.MATERIALIZE), {"stratum": stratum})

    session.execute(
        sa.text(
            f"""
            UPDATE {p}value_set SET member_count = (
                SELECT COUNT(*) FROM {p}value_set_member m
                WHERE m.value_set_id = {p}value_set.id)
            WHERE stratum IS NOT NULL
            """
        )
    )
    members = (
        session.scalar(sa.select(sa.func.count()).select_from(ValueSetMember)) or 0
    )
    summary = RefreshSummary(
        expanded=len(strata),
        not_expandable=len(nodes) - len(strata),
        members=members,
        passes=passes,
    )
    log.info(
        "membership: %d value sets expanded (%d members, %d passes), %d not expandable",
        summary.expanded,
        summary.members,
        summary.passes,
        summary.not_expandable,
    )
    return summary


# --- reading ---------------------------------------------------------------------------


def find_value_set(session: Session, url: str, version: str | None = None) -> ValueSet:
    """The loaded value set ``url|version`` (the newest version when none is given).

    :raises NotFoundError: when no such value set is loaded.
    """
    query = sa.select(ValueSet).where(ValueSet.url == url)
    if version is not None:
        query = query.where(ValueSet.version == version)
    query = query.order_by(ValueSet.version.is_(None), ValueSet.version.desc()).limit(1)
    found = session.scalars(query).first()
    if found is None:
        raise NotFoundError(f"value set {canonical(url, version)} is not loaded")
    return found


def find_code_system(
    session: Session, url: str, version: str | None = None
) -> CodeSystem:
    """The loaded code system ``url|version`` (the newest version when none is given).

    :raises NotFoundError: when no such code system is loaded.
    """
    query = sa.select(CodeSystem).where(CodeSystem.url == url)
    if version is not None:
        query = query.where(CodeSystem.version == version)
    query = query.order_by(
        CodeSystem.version.is_(None), CodeSystem.version.desc()
    ).limit(1)
    found = session.scalars(query).first()
    if found is None:
        raise NotFoundError(f"code system {canonical(url, version)} is not loaded")
    return found


def expand(
    session: Session, url: str, version: str | None = None, *, live: bool = False
) -> Expansion:
    """Expand the value set ``url|version`` (FHIR ``$expand``).

    :param live: compute the expansion from the compose with the recursive statement
        (:data:`thodb.sql.EXPAND_LIVE`) instead of reading ``value_set_member``; the
        result is the same.
    :raises NotFoundError: when the value set is not loaded.
    :raises NotExpandableError: when it cannot be expanded (the reason says why).
    """
    value_set = find_value_set(session, url, version)
    if value_set.expansion_status != "expanded":
        raise NotExpandableError(
            canonical(value_set.url, value_set.version),
            value_set.expansion_error or "it has not been expanded",
        )
    if live:
        rows: Iterable[sa.Row[tuple[object, ...]]] = session.execute(
            sql.render(session, sql.EXPAND_LIVE), {"value_set_id": value_set.id}
        )
    else:
        rows = session.execute(
            sa.select(
                ValueSetMember.system,
                ValueSetMember.code,
                ValueSetMember.display,
                ValueSetMember.version,
                ValueSetMember.inactive,
                ValueSetMember.abstract,
            )
            .where(ValueSetMember.value_set_id == value_set.id)
            .order_by(ValueSetMember.system, ValueSetMember.code)
        )
    contains = [
        Member(
            system=row.system,
            code=row.code,
            display=row.display,
            version=row.version,
            inactive=bool(row.inactive),
            abstract=bool(row.abstract),
        )
        for row in rows
    ]
    return Expansion(url=value_set.url, version=value_set.version, contains=contains)
