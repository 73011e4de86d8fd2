"""Concept details read in bulk: designations, properties and hierarchy edges.

``$expand``, ``$validate-code`` and ``$lookup`` all show more of a concept than the
membership rows hold. :func:`details` (by code) and :func:`by_id` read it for many
concepts at once (one query per kind of detail), never one query per concept. Supplements
(``CodeSystem.content = supplement``) add designations and properties to the concepts
of the code system they supplement when a request names them.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased

from thodb import versions
from thodb.canonical import split_canonical
from thodb.db import is_sqlite
from thodb.languages import Designation
from thodb.models import (
    CodeSystem,
    Concept,
    ConceptDesignation,
    ConceptParent,
    ConceptProperty,
)

#: Concept ids: given, or a statement that selects them (see :func:`id_in`).
Ids = Collection[int] | sa.Select[Any]

#: Rows per ``IN (...)`` list: below SQLite's default bound-parameter limit.
CHUNK = 500

T = TypeVar("T")


def storable(*texts: str | None) -> bool:
    """Can every text be stored in (so looked up in) a text column?

    A NUL character (PostgreSQL text cannot hold one) or a lone surrogate (not
    encodable as UTF-8) can only come from a request, never from loaded content, so
    such a name is simply not found.
    """
    for text in texts:
        if text is None:
            continue
        if "\x00" in text:
            return False
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return False
    return True


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    """``items`` in slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(frozen=True)
class Property:
    """A property value of a concept (``concept.property``).

    :param code: the property code.
    :param type: the FHIR type of the value: ``code``, ``Coding``, ``string``,
        ``integer``, ``boolean``, ``dateTime`` or ``decimal``.
    :param value: the value as text (see :class:`thodb.models.ConceptProperty`).
    :param system: the system of a ``Coding`` value.
    """

    code: str
    type: str
    value: str | None
    system: str | None = None


@dataclass(slots=True)
class ConceptDetails:
    """What :func:`details` found for one concept."""

    id: int
    code: str
    display: str | None
    definition: str | None
    status: str | None
    inactive: bool
    abstract: bool
    designations: list[Designation] = field(default_factory=list)
    properties: list[Property] = field(default_factory=list)
    #: Codes of the concept's parents and children in the code system.
    parents: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CodeSystemInfo:
    """The facts of a loaded code system that the operations report."""

    id: int
    url: str
    version: str | None
    name: str | None
    title: str | None
    status: str | None
    content: str | None
    case_sensitive: bool | None
    supplements: str | None
    value_set: str | None
    #: The language of every ``concept.display`` (``CodeSystem.language``).
    language: str | None = None
    experimental: bool | None = None
    standards_status: str | None = None

    @property
    def canonical(self) -> str:
        """``url|version``."""
        return f"{self.url}|{self.version}" if self.version else self.url


def info(row: CodeSystem) -> CodeSystemInfo:
    """The :class:`CodeSystemInfo` of a ``code_system`` row."""
    return CodeSystemInfo(
        id=row.id,
        url=row.url,
        version=row.version,
        name=row.name,
        title=row.title,
        status=row.status,
        content=row.content,
        case_sensitive=row.case_sensitive,
        supplements=row.supplements,
        value_set=row.value_set,
        language=row.language,
        experimental=row.experimental,
        standards_status=row.standards_status,
    )


def code_system_versions(session: Session, url: str) -> list[CodeSystemInfo]:
    """Every loaded version of the code system ``url`` (supplements excluded), oldest first."""
    if not storable(url):
        return []
    rows = session.scalars(
        sa.select(CodeSystem).where(
            CodeSystem.url == url,
            sa.func.coalesce(CodeSystem.content, "") != "supplement",
        )
    ).all()
    return sorted(
        (info(row) for row in rows), key=lambda cs: versions.sort_key(cs.version)
    )


def code_system_versions_of(
    session: Session, urls: Iterable[str]
) -> dict[str, list[CodeSystemInfo]]:
    """:func:`code_system_versions` of several code systems, in one statement."""
    wanted = sorted({url for url in urls if storable(url)})
    found: dict[str, list[CodeSystemInfo]] = {url: [] for url in wanted}
    for part in chunks(wanted):
        for row in session.scalars(
            sa.select(CodeSystem).where(
                CodeSystem.url.in_(part),
                sa.func.coalesce(CodeSystem.content, "") != "supplement",
            )
        ):
            found[row.url].append(info(row))
    for listed in found.values():
        listed.sort(key=lambda cs: versions.sort_key(cs.version))
    return found


def pick_version(
    found: Sequence[CodeSystemInfo], version: str | None
) -> CodeSystemInfo | None:
    """The one of ``found`` (versions of one code system) that ``version`` (a version or
    pattern; the newest when ``None``) names, or ``None``."""
    ok, picked = versions.resolve(version, [cs.version for cs in found])
    if not ok:
        return None
    return next(cs for cs in found if cs.version == picked)


def find_code_system(
    session: Session, url: str, version: str | None = None
) -> CodeSystemInfo | None:
    """The loaded code system ``url`` at ``version`` (a version or pattern; the newest
    when ``None``), or ``None`` when no loaded version matches."""
    return pick_version(code_system_versions(session, url), version)


def find_supplement(session: Session, reference: str) -> CodeSystemInfo | None:
    """The loaded supplement that ``reference`` (``url`` or ``url|version``) names."""
    url, version = split_canonical(reference)
    if not storable(url):
        return None
    rows = [
        info(row)
        for row in session.scalars(
            sa.select(CodeSystem).where(
                CodeSystem.url == url, CodeSystem.content == "supplement"
            )
        )
    ]
    ok, picked = versions.resolve(version, [cs.version for cs in rows])
    return next((cs for cs in rows if cs.version == picked), None) if ok else None


def supplements_of(
    session: Session, supplements: Iterable[CodeSystemInfo], code_system: CodeSystemInfo
) -> list[int]:
    """Ids of the given supplements that apply to ``code_system``."""
    ids = []
    for supplement in supplements:
        url, version = split_canonical(supplement.supplements or "")
        if url == code_system.url and (
            version is None or versions.matches(version, code_system.version)
        ):
            ids.append(supplement.id)
    return ids


#: What :func:`from_row` makes a ConceptDetails of, in this order.
DETAIL_COLUMNS = (
    Concept.id,
    Concept.code,
    Concept.display,
    Concept.definition,
    Concept.status,
    Concept.inactive,
    Concept.abstract,
)

# The concepts of one code system with given codes (one statement, compiled once).
_BY_CODE = sa.select(*DETAIL_COLUMNS).where(
    Concept.code_system_id == sa.bindparam("code_system"),
    Concept.code.in_(sa.bindparam("codes", expanding=True)),
)


def from_row(row: Sequence[Any]) -> ConceptDetails:
    """The details of a row of :data:`DETAIL_COLUMNS` (designations etc. not read).

    The row is unpacked by position: reading a database row's attributes by name costs
    several times more, and an expansion makes one of these per concept.
    """
    id_, code, display, definition, status, inactive, abstract = row
    return ConceptDetails(
        id_, code, display, definition, status, bool(inactive), bool(abstract)
    )


def add_designations(session: Session, found: Iterable[ConceptDetails]) -> None:
    """Read the designations of the concepts ``found`` into them."""
    by_id = {concept.id: concept for concept in found}
    for concept_id, designation in _designations(session, sorted(by_id)):
        by_id[concept_id].designations.append(designation)


def details(
    session: Session,
    code_system_id: int,
    codes: Iterable[str],
    *,
    supplements: Sequence[int] = (),
    designations: bool = True,
    properties: bool | Collection[str] = True,
    hierarchy: bool = True,
) -> dict[str, ConceptDetails]:
    """The concepts of one code system with these codes, by code (exact match).

    :param supplements: ids of supplement code systems whose designations and
        properties are added.
    :param designations: read designations.
    :param properties: read property values (given codes: only the properties with
        these codes).
    :param hierarchy: read parent and child codes.
    """
    wanted = sorted(code for code in set(codes) if storable(code))
    found: dict[str, ConceptDetails] = {}
    connection = session.connection()
    for part in chunks(wanted):
        for row in connection.execute(
            _BY_CODE, {"code_system": code_system_id, "codes": list(part)}
        ):
            details = from_row(row)
            found[details.code] = details
    if not found:
        return found
    by_id = {concept.id: concept for concept in found.values()}
    ids = sorted(by_id)
    if designations:
        add_designations(session, found.values())
    if properties:
        for concept_id, prop in _properties(session, ids, properties):
            by_id[concept_id].properties.append(prop)
    if hierarchy:
        _hierarchy(session, ids, by_id)
    add_supplements(
        session, supplements, found, designations=designations, properties=properties
    )
    return found


def by_id(
    session: Session,
    ids: Ids,
    *,
    designations: bool = False,
    properties: bool | Collection[str] = True,
    skip_plain: bool = False,
    keep_codes: Collection[str] = (),
) -> dict[int, ConceptDetails]:
    """:func:`details` of the concepts ``ids`` (of any code systems), by id.

    :param ids: the ids, or a statement selecting them (see :func:`id_in`).
    :param skip_plain: leave out the concepts that have no status, none of the
        ``properties`` and (when read) no designation, unless their code is in
        ``keep_codes``: what a caller that only needs the others would discard.

    One statement per kind of detail, whatever the number of ids (no hierarchy).
    """
    found: dict[int, ConceptDetails] = {}
    if not isinstance(ids, sa.Select) and not ids:
        return found
    props = list(_properties(session, ids, properties)) if properties else []
    named = list(_designations(session, ids)) if designations else []
    wanted = id_in(session, Concept.id, ids)
    if skip_plain:
        with_details = {concept_id for concept_id, _ in (*props, *named)}
        wanted = sa.and_(
            wanted,
            sa.or_(
                Concept.status.is_not(None),
                Concept.code.in_(sorted(keep_codes)),
                id_in(session, Concept.id, with_details),
            ),
        )
    for row in session.execute(sa.select(*DETAIL_COLUMNS).where(wanted)):
        details = from_row(row)
        found[details.id] = details
    for concept_id, designation in named:
        found[concept_id].designations.append(designation)
    for concept_id, prop in props:
        found[concept_id].properties.append(prop)
    return found


def detail_codes(session: Session, code_system_ids: Collection[int]) -> frozenset[str]:
    """The codes of the properties that some concept of these code systems has, and
    ``status`` when one has a status: without designations, what :func:`by_id` with
    ``skip_plain`` can find there (nothing, when none of them is asked for)."""
    ids = sorted(code_system_ids)
    if not ids:
        return frozenset()
    codes = set(
        session.scalars(
            sa.select(ConceptProperty.code)
            .join(Concept, Concept.id == ConceptProperty.concept_id)
            .where(Concept.code_system_id.in_(ids))
            .distinct()
        )
    )
    with_status = sa.exists().where(
        Concept.code_system_id.in_(ids), Concept.status.is_not(None)
    )
    if session.scalar(sa.select(with_status)):
        codes.add("status")
    return frozenset(codes)


def id_in(
    session: Session,
    column: InstrumentedAttribute[int],
    ids: Ids,
) -> sa.ColumnElement[bool]:
    """``column`` holds one of ``ids`` (given, or selected by a statement).

    On PostgreSQL the ids are an array (``= ANY``), probed by index: a statement's
    ids become an array in the server (an ``IN`` subquery or a join would be planned
    without knowing how many there are, and could hash a whole table); given ids are
    one array parameter. On SQLite, ``IN`` the statement, or a JSON array read by
    ``json_each``. Either way the statement does not grow with the number of ids, so
    its compiled form is cached and no parameter limit applies.
    """
    if isinstance(ids, sa.Select):
        if is_sqlite(session):
            return column.in_(ids)
        return column == sa.any_(sa.func.array(ids.scalar_subquery()))
    return _listed_in(session, column, list(ids), sa.Integer())


def text_in(
    session: Session,
    column: InstrumentedAttribute[str] | InstrumentedAttribute[str | None],
    values: Collection[str],
) -> sa.ColumnElement[bool]:
    """``column`` holds one of ``values``, bound as one parameter (see :func:`id_in`)."""
    return _listed_in(session, column, sorted(values), sa.Text())


def _listed_in(
    session: Session,
    column: InstrumentedAttribute[Any],
    values: list[Any],
    type_: sa.types.TypeEngine[Any],
) -> sa.ColumnElement[bool]:
    if is_sqlite(session):
        listed = sa.func.json_each(json.dumps(values)).table_valued("value")
        return column.in_(sa.select(listed.c.value))
    return column == sa.any_(sa.bindparam(None, values, type_=ARRAY(type_)))


def _designations(session: Session, ids: Ids) -> Iterator[tuple[int, Designation]]:
    for row in session.execute(
        sa.select(
            ConceptDesignation.concept_id,
            ConceptDesignation.value,
            ConceptDesignation.language,
            ConceptDesignation.use_system,
            ConceptDesignation.use_code,
            ConceptDesignation.standards_status,
        )
        .where(id_in(session, ConceptDesignation.concept_id, ids))
        .order_by(ConceptDesignation.id)
    ):
        yield (
            row.concept_id,
            Designation(
                row.value,
                row.language,
                row.use_system,
                row.use_code,
                row.standards_status,
            ),
        )


def _properties(
    session: Session,
    ids: Ids,
    only: bool | Collection[str] = True,
) -> Iterator[tuple[int, Property]]:
    """Property values of the concepts ``ids``: all, or those whose code is in ``only``."""
    statement = sa.select(
        ConceptProperty.concept_id,
        ConceptProperty.code,
        ConceptProperty.type,
        ConceptProperty.value,
        ConceptProperty.value_system,
    ).where(id_in(session, ConceptProperty.concept_id, ids))
    if not isinstance(only, bool):
        statement = statement.where(ConceptProperty.code.in_(sorted(only)))
    for row in session.execute(statement.order_by(ConceptProperty.id)):
        yield (
            row.concept_id,
            Property(row.code, row.type, row.value, row.value_system),
        )


def _hierarchy(
    session: Session, ids: Collection[int], by_id: dict[int, ConceptDetails]
) -> None:
    other = aliased(Concept)
    for concept_id, code in session.execute(
        sa.select(ConceptParent.concept_id, other.code)
        .join(other, other.id == ConceptParent.parent_id)
        .where(id_in(session, ConceptParent.concept_id, ids))
        .order_by(other.id)
    ):
        by_id[concept_id].parents.append(code)
    for parent_id, code in session.execute(
        sa.select(ConceptParent.parent_id, other.code)
        .join(other, other.id == ConceptParent.concept_id)
        .where(id_in(session, ConceptParent.parent_id, ids))
        .order_by(other.id)
    ):
        by_id[parent_id].children.append(code)


def add_supplements(
    session: Session,
    supplements: Sequence[int],
    found: dict[str, ConceptDetails],
    *,
    designations: bool,
    properties: bool | Collection[str],
) -> None:
    """Add the designations and properties that supplements give the concepts ``found``
    (of one code system, by code)."""
    if not (supplements and found and (designations or properties)):
        return
    extra: dict[str, list[int]] = defaultdict(list)
    for part in chunks(sorted(found)):
        for row in session.execute(
            sa.select(Concept.id, Concept.code).where(
                Concept.code_system_id.in_(supplements), Concept.code.in_(part)
            )
        ):
            extra[row.code].append(row.id)
    owner = {concept_id: code for code, ids in extra.items() for concept_id in ids}
    ids = sorted(owner)
    if designations:
        for concept_id, designation in _designations(session, ids):
            found[owner[concept_id]].designations.append(designation)
    if properties:
        for concept_id, prop in _properties(session, ids, properties):
            found[owner[concept_id]].properties.append(prop)


def locate(
    session: Session,
    code_system: CodeSystemInfo,
    code: str,
    *,
    hierarchy: bool = True,
    designations: bool = True,
    properties: bool = True,
) -> tuple[str, ConceptDetails] | None:
    """Find ``code`` in a code system, ignoring case where the system is not case-sensitive.

    :param hierarchy: read the concept's parents and children.
    :param designations: read its designations.
    :param properties: read its property values.
    :return: the code as the code system writes it and its details, or ``None``.
    """
    read = functools.partial(
        details,
        session,
        code_system.id,
        hierarchy=hierarchy,
        designations=designations,
        properties=properties,
    )
    exact = read([code])
    if code in exact:
        return code, exact[code]
    if code_system.case_sensitive is not False or not storable(code):
        return None
    match = session.scalars(
        sa.select(Concept.code)
        .where(
            Concept.code_system_id == code_system.id,
            sa.func.lower(Concept.code) == code.lower(),
        )
        .order_by(Concept.id)
        .limit(1)
    ).first()
    if match is None:
        return None
    return match, read([match])[match]
