"""Workload 8: the expansion a service developer would write first, beside thodb's.

The naive approach reads the stored compose through the ORM, one query per value set
and one lazy load per rule part, and walks imports in Python, keeping sets of codes:
union of the includes, minus the excludes; inside one include, the system part and
every imported value set intersected; ``is-a``/``descendent-of`` walked one query per
hierarchy level. It memoises value sets within one expansion (a diamond is expanded
once). It is a baseline for the benchmarks, not part of thodb.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from benchmarks import content
from benchmarks.harness import Context, Figure, Timing, measure
from thodb.expand import expand
from thodb.models import (
    CodeSystem,
    ComposeFilter,
    ComposeRule,
    Concept,
    ConceptParent,
    ConceptProperty,
    ValueSet,
)
from thodb.seed import IMAGE_REFERENCE_TYPE

NAME = "naive"

#: Seconds each measurement may take at most (then it has fewer samples).
BUDGET_S = 10.0

Codes = frozenset[tuple[str, str]]


class NaiveUnsupportedError(Exception):
    """The naive walk does not handle this compose (thodb does)."""


def naive_expand(session: Session, url: str) -> Codes:
    """The ``(system, code)`` pairs of value set ``url``, computed the naive way."""
    return _Walker(session).value_set(url, None)


Key = tuple[str, str | None]


class _Walker:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.found: dict[Key, ValueSet] = {}
        self.done: dict[Key, Codes] = {}

    def value_set(self, url: str, version: str | None) -> Codes:
        # Imports are expanded before their importers with an explicit stack: a chain
        # 1,000 deep is deeper than Python's recursion limit.
        stack: list[Key] = [(url, version)]
        open_keys: set[Key] = set()
        while stack:
            key = stack[-1]
            if key in self.done:
                stack.pop()
                continue
            found = self.lookup(key)
            waiting = [
                (i.url, i.version)
                for rule in found.rules
                for i in rule.imports
                if (i.url, i.version) not in self.done
            ]
            if waiting:
                if key in open_keys:
                    raise NaiveUnsupportedError(f"import cycle through {key[0]}")
                open_keys.add(key)
                stack.extend(waiting)
                continue
            included: set[tuple[str, str]] = set()
            excluded: set[tuple[str, str]] = set()
            for rule in found.rules:
                codes = self.rule(rule)
                (included if rule.kind == "include" else excluded).update(codes)
            self.done[key] = frozenset(included - excluded)
            stack.pop()
        return self.done[(url, version)]

    def lookup(self, key: Key) -> ValueSet:
        if key not in self.found:
            url, version = key
            query = sa.select(ValueSet).where(ValueSet.url == url)
            if version is not None:
                query = query.where(ValueSet.version == version)
            found = self.session.scalars(
                query.order_by(ValueSet.version.desc()).limit(1)
            ).first()
            if found is None:
                raise NaiveUnsupportedError(f"value set {url} is not loaded")
            self.found[key] = found
        return self.found[key]

    def rule(self, rule: ComposeRule) -> set[tuple[str, str]]:
        parts: list[set[tuple[str, str]]] = []
        if rule.system is not None:
            parts.append({(rule.system, code) for code in self.system_part(rule)})
        parts += [set(self.done[(i.url, i.version)]) for i in rule.imports]
        result = parts[0]
        for part in parts[1:]:
            result &= part
        return result

    def system_part(self, rule: ComposeRule) -> set[str]:
        if rule.concepts:
            return {concept.code for concept in rule.concepts}
        query = sa.select(CodeSystem.id).where(CodeSystem.url == rule.system)
        if rule.version is not None:
            query = query.where(CodeSystem.version == rule.version)
        cs_id = self.session.scalars(
            query.order_by(CodeSystem.version.desc()).limit(1)
        ).first()
        if cs_id is None:
            raise NaiveUnsupportedError(f"code system {rule.system} is not loaded")
        if not rule.filters:
            return set(
                self.session.scalars(
                    sa.select(Concept.code).where(Concept.code_system_id == cs_id)
                )
            )
        result: set[str] | None = None
        for flt in rule.filters:
            codes = self.filter(cs_id, flt)
            result = codes if result is None else result & codes
        return result or set()

    def filter(self, cs_id: int, flt: ComposeFilter) -> set[str]:
        if flt.op in ("is-a", "descendent-of") and flt.property in ("concept", "code"):
            return self.below(cs_id, flt.value, include_self=flt.op == "is-a")
        if flt.op == "=" and flt.property in ("concept", "code"):
            return {flt.value}
        if flt.op == "=":
            return set(
                self.session.scalars(
                    sa.select(Concept.code)
                    .join(ConceptProperty, ConceptProperty.concept_id == Concept.id)
                    .where(
                        Concept.code_system_id == cs_id,
                        ConceptProperty.code == flt.property,
                        ConceptProperty.value == flt.value,
                    )
                )
            )
        raise NaiveUnsupportedError(f"filter {flt.property} {flt.op}")

    def below(self, cs_id: int, code: str, *, include_self: bool) -> set[str]:
        start = self.session.scalars(
            sa.select(Concept.id).where(
                Concept.code_system_id == cs_id, Concept.code == code
            )
        ).first()
        if start is None:
            return set()
        seen = {start}
        level = [start]
        while level:
            children = self.session.scalars(
                sa.select(ConceptParent.concept_id).where(
                    ConceptParent.parent_id.in_(level)
                )
            )
            level = [c for c in set(children) if c not in seen]
            seen.update(level)
        if not include_self:
            seen.discard(start)
        codes: set[str] = set()
        ids = sorted(seen)
        # Bound the IN list: SQLite refuses more than 32,766 parameters.
        for i in range(0, len(ids), 10_000):
            codes.update(
                self.session.scalars(
                    sa.select(Concept.code).where(Concept.id.in_(ids[i : i + 10_000]))
                )
            )
        return codes


@dataclass(frozen=True)
class Expansions:
    """Timings of one value set's expansion three ways, and whether they agree."""

    total: int
    materialised: Timing
    live: Timing
    naive: Timing
    agrees: bool


def time_expansions(
    db: Engine,
    url: str,
    *,
    warmup: int,
    runs: int,
    naive_runs: int,
    budget_s: float = BUDGET_S,
) -> Expansions:
    """Time thodb's expand (materialised and live) and the naive walk of ``url``.

    Every call runs in a new session, as a request of a service would. The naive walk
    gets one warm-up call only when ``naive_runs`` is above 1 (at the largest sizes one
    call takes seconds). The codes of the last call of each way are compared.

    :param budget_s: the most each of the three measurements may take (see
        :func:`benchmarks.harness.measure`).
    """
    answers: dict[str, Codes] = {}

    def thodb_expand(live: bool) -> None:
        with Session(db) as session:
            found = expand(session, url, live=live, cache=False)
            codes = frozenset((m.system, m.code) for m in found.contains)
        answers["live" if live else "materialised"] = codes

    def naive() -> None:
        with Session(db) as session:
            answers["naive"] = naive_expand(session, url)

    materialised = measure(
        lambda: thodb_expand(False), warmup=warmup, runs=runs, budget_s=budget_s
    )
    live = measure(
        lambda: thodb_expand(True), warmup=warmup, runs=runs, budget_s=budget_s
    )
    slow = measure(
        naive,
        warmup=min(warmup, naive_runs - 1, 1),
        runs=naive_runs,
        budget_s=budget_s,
    )
    expected = answers["materialised"]
    return Expansions(
        total=len(expected),
        materialised=materialised,
        live=live,
        naive=slow,
        agrees=answers["live"] == expected and answers["naive"] == expected,
    )


def add_figures(
    ctx: Context, engine: str, label: str, found: Expansions, *, workload: str = NAME
) -> None:
    """Record the naive walk against thodb's two expansions (ratio = naive / thodb)."""
    if not found.agrees:
        ctx.results.error(
            workload, engine, f"{label}: the naive walk and thodb disagree"
        )
    for name, timing in (
        ("value_set_member", found.materialised),
        ("live", found.live),
    ):
        ctx.results.add(
            Figure(
                workload,
                engine,
                f"{label}: naive ORM walk vs thodb expand ({name})",
                found.naive,
                floor=f"thodb expand ({name})",
                floor_timing=timing,
                note="ratio = naive / thodb",
                extra={"codes": found.total, "same_codes": found.agrees},
            )
        )


def run(ctx: Context, engine: str) -> None:
    """Compare the naive walk with thodb on image-reference-type and CID 7151."""
    db = ctx.databases.engine(content.ensure(ctx, engine))
    targets = [("image-reference-type", IMAGE_REFERENCE_TYPE)]
    if not ctx.quick:
        targets.append(("CID 7151", content.CID_7151))
    for label, url in targets:
        found = time_expansions(
            db,
            url,
            warmup=ctx.pick(1, 10),
            runs=ctx.pick(2, 50),
            naive_runs=ctx.pick(1, 20),
            budget_s=ctx.pick(1.0, BUDGET_S),
        )
        add_figures(ctx, engine, label, found)
