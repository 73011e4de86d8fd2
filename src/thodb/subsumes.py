"""``CodeSystem/$subsumes``: how two codes of one code system relate in its hierarchy."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from thodb.canonical import canonical
from thodb.db import schema_prefix
from thodb.errors import NotFoundError
from thodb.expand import find_code_system

# The ancestors of both concepts (each itself at distance 0), walking concept_parent
# upwards from each; UNION stops at concepts already reached, so several parents cost
# nothing extra. A row (start, found) says that found is an ancestor of start.
_ANCESTORS = """
WITH RECURSIVE up(start_id, concept_id) AS (
    SELECT CAST(:a AS INTEGER), CAST(:a AS INTEGER)
    UNION
    SELECT CAST(:b AS INTEGER), CAST(:b AS INTEGER)
    UNION
    SELECT up.start_id, e.parent_id
    FROM up JOIN {p}concept_parent e ON e.concept_id = up.concept_id
)
SELECT start_id FROM up
WHERE (start_id = :b AND concept_id = :a) OR (start_id = :a AND concept_id = :b)
"""


def subsumes(
    session: Session,
    *,
    system: str,
    code_a: str,
    code_b: str,
    version: str | None = None,
) -> str:
    """The relation of ``code_a`` to ``code_b`` (FHIR ``$subsumes`` outcome).

    :returns: ``equivalent`` (the same code), ``subsumes`` (``code_a`` is an ancestor
        of ``code_b``), ``subsumed-by`` (the other way round) or ``not-subsumed``.
    :raises NotFoundError: when the code system or either code is not loaded.
    """
    code_system = find_code_system(session, system, version)
    p = schema_prefix(session)
    ids: dict[str, int] = {
        row.code: row.id
        for row in session.execute(
            sa.text(
                f"SELECT code, id FROM {p}concept "
                "WHERE code_system_id = :cs AND code IN (:a, :b)"
            ),
            {"cs": code_system.id, "a": code_a, "b": code_b},
        )
    }
    for code in (code_a, code_b):
        if code not in ids:
            raise NotFoundError(
                f"code {code!r} is not in code system "
                f"{canonical(code_system.url, code_system.version)}"
            )
    if code_a == code_b:
        return "equivalent"
    below_the_other = set(
        session.scalars(
            sa.text(_ANCESTORS.format(p=p)), {"a": ids[code_a], "b": ids[code_b]}
        )
    )
    if ids[code_b] in below_the_other:
        return "subsumes"
    if ids[code_a] in below_the_other:
        return "subsumed-by"
    return "not-subsumed"
