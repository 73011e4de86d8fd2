"""What is loaded: counts, and the value sets that cannot be expanded with the reason."""

from __future__ import annotations

from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.orm import Session

from thodb.canonical import canonical
from thodb.models import CodeSystem, Concept, ValueSet, ValueSetMember


@dataclass(frozen=True)
class Stats:
    """Counts of the loaded content."""

    code_systems: int
    concepts: int
    value_sets: int
    expanded: int
    members: int
    #: (``url|version``, reason) of every value set that cannot be expanded.
    not_expandable: list[tuple[str, str]] = field(default_factory=list)


def stats(session: Session) -> Stats:
    """Count what is loaded and list the value sets that cannot be expanded."""

    def count(model: type[object]) -> int:
        return session.scalar(sa.select(sa.func.count()).select_from(model)) or 0

    expanded = (
        session.scalar(
            sa.select(sa.func.count())
            .select_from(ValueSet)
            .where(ValueSet.expansion_status == "expanded")
        )
        or 0
    )
    rows = session.execute(
        sa.select(ValueSet.url, ValueSet.version, ValueSet.expansion_error)
        .where(ValueSet.expansion_status != "expanded")
        .order_by(ValueSet.url, ValueSet.version)
    )
    return Stats(
        code_systems=count(CodeSystem),
        concepts=count(Concept),
        value_sets=count(ValueSet),
        expanded=expanded,
        members=count(ValueSetMember),
        not_expandable=[
            (canonical(row.url, row.version), row.expansion_error or "not expanded")
            for row in rows
        ],
    )
