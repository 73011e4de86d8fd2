"""``$validate-code`` and ``$lookup`` over the loaded content.

Both read only (membership rows, concepts), so they work over a read-only connection
such as a PostgreSQL hot standby.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.orm import Session

from thodb.canonical import canonical
from thodb.errors import NotExpandableError, NotFoundError
from thodb.expand import find_code_system, find_value_set
from thodb.models import (
    CodeSystem,
    Concept,
    ConceptDesignation,
    ConceptParent,
    ConceptProperty,
    ValueSetMember,
)


@dataclass(frozen=True)
class Validation:
    """The answer of ``$validate-code`` (FHIR Parameters ``result``, ``message``...)."""

    result: bool
    system: str
    code: str
    display: str | None = None
    inactive: bool = False
    message: str | None = None


def validate_code(
    session: Session,
    url: str,
    *,
    system: str,
    code: str,
    display: str | None = None,
    version: str | None = None,
) -> Validation:
    """Is ``system|code`` a member of value set ``url|version``? (``ValueSet/$validate-code``)

    The result is false for a code that is not a member, and for a member whose
    ``display`` differs from the expansion's display; ``message`` says why.

    :raises NotFoundError: when the value set is not loaded.
    :raises NotExpandableError: when it cannot be expanded.
    """
    value_set = find_value_set(session, url, version)
    name = canonical(value_set.url, value_set.version)
    if value_set.expansion_status != "expanded":
        raise NotExpandableError(name, value_set.expansion_error or "not expanded")
    member = session.execute(
        sa.select(ValueSetMember.display, ValueSetMember.inactive).where(
            ValueSetMember.value_set_id == value_set.id,
            ValueSetMember.system == system,
            ValueSetMember.code == code,
        )
    ).first()
    if member is None:
        return Validation(
            False,
            system,
            code,
            message=f"the code {system}#{code} is not in the value set {name}",
        )
    if display is not None and member.display is not None and display != member.display:
        return Validation(
            False,
            system,
            code,
            member.display,
            bool(member.inactive),
            message=f"wrong display {display!r} for {system}#{code}: "
            f"should be {member.display!r}",
        )
    return Validation(True, system, code, member.display, bool(member.inactive))


@dataclass(frozen=True)
class Lookup:
    """The answer of ``CodeSystem/$lookup``."""

    name: str | None
    system: str
    version: str | None
    code: str
    display: str | None
    definition: str | None
    inactive: bool
    abstract: bool
    #: (code, value) of each concept property, ``parent`` and ``child`` included.
    properties: list[tuple[str, str | None]] = field(default_factory=list)
    #: (language, use code, value) of each designation.
    designations: list[tuple[str | None, str | None, str]] = field(default_factory=list)


def lookup(
    session: Session, *, system: str, code: str, version: str | None = None
) -> Lookup:
    """Look up ``system|code`` in a loaded code system (``CodeSystem/$lookup``).

    :raises NotFoundError: when the code system is not loaded or has no such code.
    """
    code_system: CodeSystem = find_code_system(session, system, version)
    concept = session.scalars(
        sa.select(Concept).where(
            Concept.code_system_id == code_system.id, Concept.code == code
        )
    ).first()
    if concept is None:
        raise NotFoundError(
            f"code {code!r} is not in code system "
            f"{canonical(code_system.url, code_system.version)}"
        )
    properties: list[tuple[str, str | None]] = [
        (row.code, row.value)
        for row in session.execute(
            sa.select(ConceptProperty.code, ConceptProperty.value)
            .where(ConceptProperty.concept_id == concept.id)
            .order_by(ConceptProperty.id)
        )
    ]
    parent = sa.orm.aliased(Concept)
    # Edges from nested concepts become parent/child properties; those written as
    # properties in the resource are listed once.
    properties += [
        ("parent", row[0])
        for row in session.execute(
            sa.select(parent.code)
            .join(ConceptParent, ConceptParent.parent_id == parent.id)
            .where(ConceptParent.concept_id == concept.id)
            .order_by(parent.code)
        )
        if ("parent", row[0]) not in properties
        and ("subsumedBy", row[0]) not in properties
    ]
    properties += [
        ("child", row[0])
        for row in session.execute(
            sa.select(parent.code)
            .join(ConceptParent, ConceptParent.concept_id == parent.id)
            .where(ConceptParent.parent_id == concept.id)
            .order_by(parent.code)
        )
        if ("child", row[0]) not in properties
    ]
    designations = [
        (row.language, row.use_code, row.value)
        for row in session.execute(
            sa.select(
                ConceptDesignation.language,
                ConceptDesignation.use_code,
                ConceptDesignation.value,
            )
            .where(ConceptDesignation.concept_id == concept.id)
            .order_by(ConceptDesignation.id)
        )
    ]
    return Lookup(
        name=code_system.title or code_system.name,
        system=code_system.url,
        version=code_system.version,
        code=concept.code,
        display=concept.display,
        definition=concept.definition,
        inactive=concept.inactive,
        abstract=concept.abstract,
        properties=properties,
        designations=designations,
    )
