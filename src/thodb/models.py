"""The database schema as typed SQLAlchemy 2 models.

Every table lives in the schema ``tho`` on PostgreSQL. SQLite has no schemas, so the
engine maps ``tho`` to the main database (see :func:`thodb.db.create_engine`) and the
tables keep the same names there.

The tables follow FHIR's element names: a :class:`CodeSystem` has ``concept`` rows with
``designation`` and ``property`` rows and parent edges; a :class:`ValueSet` keeps its
``compose`` as data (:class:`ComposeRule` for each ``include``/``exclude`` with its
:class:`ComposeConcept`, :class:`ComposeFilter` and :class:`ComposeImport` rows), and
:class:`ValueSetMember` holds the computed expansion of every value set that can be
expanded. The public, documented contract for SQL users is the set of views created by
the migrations (``tho.value_set_expansion`` and friends); these tables may change.

Alembic migrations are the only way the schema is created; these models must agree with
them (a test runs autogenerate and expects no difference).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

#: The PostgreSQL schema that holds every table and view.
SCHEMA = "tho"

# Predictable constraint names, so migrations can name what they drop.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every thodb table."""

    metadata = MetaData(schema=SCHEMA, naming_convention=NAMING_CONVENTION)


def _fk(target: str) -> ForeignKey:
    return ForeignKey(f"{SCHEMA}.{target}", ondelete="CASCADE")


class CodeSystem(Base):
    """A loaded FHIR CodeSystem (one row per ``url|version``)."""

    __tablename__ = "code_system"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    version: Mapped[str | None] = mapped_column(Text)
    name: Mapped[str | None] = mapped_column(Text)
    title: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str | None] = mapped_column(String(16))
    content: Mapped[str | None] = mapped_column(String(16))
    hierarchy_meaning: Mapped[str | None] = mapped_column(String(32))
    case_sensitive: Mapped[bool | None] = mapped_column(Boolean)
    supplements: Mapped[str | None] = mapped_column(Text)
    value_set: Mapped[str | None] = mapped_column(Text)
    #: The resource's ``language``: the language of every ``concept.display``.
    language: Mapped[str | None] = mapped_column(String(32))
    experimental: Mapped[bool | None] = mapped_column(Boolean)
    #: The ``structuredefinition-standards-status`` extension (e.g. ``deprecated``).
    standards_status: Mapped[str | None] = mapped_column(String(16))
    concept_count: Mapped[int] = mapped_column(Integer)
    #: SHA-256 of the resource's canonical JSON: the same content loads once.
    content_hash: Mapped[str] = mapped_column(String(64))
    #: The file the resource was read from.
    source: Mapped[str] = mapped_column(Text)

    concepts: Mapped[list[Concept]] = relationship(
        back_populates="code_system", viewonly=True
    )
    properties: Mapped[list[CodeSystemProperty]] = relationship(viewonly=True)


# A NULL version is a version of its own, so uniqueness is on coalesce(version, '').
Index(
    "uq_code_system_url_version",
    CodeSystem.url,
    func.coalesce(CodeSystem.version, ""),
    unique=True,
)


class CodeSystemProperty(Base):
    """A property a code system declares (``CodeSystem.property``)."""

    __tablename__ = "code_system_property"
    __table_args__ = (UniqueConstraint("code_system_id", "code"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code_system_id: Mapped[int] = mapped_column(_fk("code_system.id"))
    code: Mapped[str] = mapped_column(Text)
    uri: Mapped[str | None] = mapped_column(Text)
    type: Mapped[str | None] = mapped_column(String(16))
    description: Mapped[str | None] = mapped_column(Text)


class Concept(Base):
    """A concept of a code system (``CodeSystem.concept``, flattened)."""

    __tablename__ = "concept"
    __table_args__ = (UniqueConstraint("code_system_id", "code"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code_system_id: Mapped[int] = mapped_column(_fk("code_system.id"))
    code: Mapped[str] = mapped_column(Text)
    display: Mapped[str | None] = mapped_column(Text)
    definition: Mapped[str | None] = mapped_column(Text)
    #: The value of the concept's ``status`` property, when it has one.
    status: Mapped[str | None] = mapped_column(String(32))
    #: ``inactive`` property true, or status ``retired``/``inactive``.
    inactive: Mapped[bool] = mapped_column(Boolean)
    #: ``notSelectable`` (or ``abstract``) property true.
    abstract: Mapped[bool] = mapped_column(Boolean)

    code_system: Mapped[CodeSystem] = relationship(back_populates="concepts")
    designations: Mapped[list[ConceptDesignation]] = relationship(viewonly=True)
    properties: Mapped[list[ConceptProperty]] = relationship(viewonly=True)


class ConceptDesignation(Base):
    """A designation of a concept (``CodeSystem.concept.designation``)."""

    __tablename__ = "concept_designation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    concept_id: Mapped[int] = mapped_column(_fk("concept.id"), index=True)
    language: Mapped[str | None] = mapped_column(String(32))
    use_system: Mapped[str | None] = mapped_column(Text)
    use_code: Mapped[str | None] = mapped_column(Text)
    value: Mapped[str] = mapped_column(Text)
    #: The standards-status extension of the designation (e.g. ``withdrawn``).
    standards_status: Mapped[str | None] = mapped_column(String(16))


class ConceptProperty(Base):
    """A property value of a concept (``CodeSystem.concept.property``).

    ``value`` holds every value type as text (booleans as ``true``/``false``); for a
    ``valueCoding`` it is the code and ``value_system`` the coding's system.
    """

    __tablename__ = "concept_property"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    concept_id: Mapped[int] = mapped_column(_fk("concept.id"), index=True)
    code: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(16))
    value: Mapped[str | None] = mapped_column(Text)
    value_system: Mapped[str | None] = mapped_column(Text)


Index("ix_concept_property_code_value", ConceptProperty.code, ConceptProperty.value)


class ConceptParent(Base):
    """An edge of the concept hierarchy: ``concept_id`` is-a ``parent_id``.

    Edges come from nested ``concept`` elements and from ``parent``/``subsumedBy``
    (and, reversed, ``child``) properties; a concept may have several parents.
    """

    __tablename__ = "concept_parent"

    concept_id: Mapped[int] = mapped_column(_fk("concept.id"), primary_key=True)
    parent_id: Mapped[int] = mapped_column(
        _fk("concept.id"), primary_key=True, index=True
    )


class ValueSet(Base):
    """A loaded FHIR ValueSet (one row per ``url|version``) and its expansion state."""

    __tablename__ = "value_set"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    version: Mapped[str | None] = mapped_column(Text)
    name: Mapped[str | None] = mapped_column(Text)
    title: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str | None] = mapped_column(String(16))
    #: False when the resource has no ``compose`` (defined by reference elsewhere).
    has_compose: Mapped[bool] = mapped_column(Boolean)
    #: The resource's ``language``: the display language of its expansion by default.
    language: Mapped[str | None] = mapped_column(String(32))
    experimental: Mapped[bool | None] = mapped_column(Boolean)
    #: The ``structuredefinition-standards-status`` extension (e.g. ``withdrawn``).
    standards_status: Mapped[str | None] = mapped_column(String(16))
    #: ``compose.inactive``: False leaves inactive codes out of the membership.
    compose_inactive: Mapped[bool | None] = mapped_column(Boolean)
    #: Canonicals of the ``valueset-supplement`` extensions: supplements it applies.
    supplements: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    #: ``valueset-expansion-parameter`` extensions on ``compose``, as
    #: ``[[name, value], ...]``: defaults for the ``$expand`` parameters.
    expansion_parameters: Mapped[list[list[str]] | None] = mapped_column(
        JSON(none_as_null=True)
    )
    content_hash: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(Text)
    #: ``expanded`` or ``not-expandable``; set by every load.
    expansion_status: Mapped[str] = mapped_column(String(16), default="pending")
    #: Why the value set cannot be expanded (NULL when it is expanded).
    expansion_error: Mapped[str | None] = mapped_column(Text)
    #: Number of members in ``value_set_member`` (NULL when not expanded).
    member_count: Mapped[int | None] = mapped_column(Integer)
    #: The evaluation pass of the value set (see :mod:`thodb.refresh`).
    stratum: Mapped[int | None] = mapped_column(Integer, index=True)

    rules: Mapped[list[ComposeRule]] = relationship(
        viewonly=True, order_by="ComposeRule.id"
    )


Index(
    "uq_value_set_url_version",
    ValueSet.url,
    func.coalesce(ValueSet.version, ""),
    unique=True,
)


class ComposeRule(Base):
    """One ``compose.include`` or ``compose.exclude`` element of a value set."""

    __tablename__ = "compose_rule"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value_set_id: Mapped[int] = mapped_column(_fk("value_set.id"), index=True)
    #: ``include`` or ``exclude``.
    kind: Mapped[str] = mapped_column(String(8))
    #: Index of the element within ``compose.include`` (or ``compose.exclude``).
    position: Mapped[int] = mapped_column(Integer)
    system: Mapped[str | None] = mapped_column(Text)
    version: Mapped[str | None] = mapped_column(Text)
    #: How many ``valueSet`` entries the rule has (its imports).
    import_count: Mapped[int] = mapped_column(Integer)
    #: The loaded code system ``system|version`` resolves to (set by every load).
    code_system_id: Mapped[int | None] = mapped_column(
        ForeignKey(f"{SCHEMA}.code_system.id", ondelete="SET NULL")
    )

    concepts: Mapped[list[ComposeConcept]] = relationship(
        viewonly=True, order_by="ComposeConcept.position"
    )
    filters: Mapped[list[ComposeFilter]] = relationship(
        viewonly=True, order_by="ComposeFilter.position"
    )
    imports: Mapped[list[ComposeImport]] = relationship(
        viewonly=True, order_by="ComposeImport.position"
    )


# Excludes are looked up per member row by (value set, kind) during expansion.
Index("ix_compose_rule_value_set_id_kind", ComposeRule.value_set_id, ComposeRule.kind)


# The enumerated codes a value set says more of than code and display: the predicate
# of a partial index (queries give the same condition, as an or_ of the columns).
_ANNOTATED_CONCEPT = text(
    "designations IS NOT NULL OR properties IS NOT NULL OR standards_status IS NOT NULL"
)


class ComposeConcept(Base):
    """An enumerated code of a rule (``include.concept``), with the display it gives."""

    __tablename__ = "compose_concept"
    __table_args__ = (
        Index(None, "rule_id", "code"),
        # The few enumerated codes that a value set annotates (designations,
        # properties): found without reading every enumerated code of the value set.
        Index(
            "ix_compose_concept_annotated",
            "rule_id",
            postgresql_where=_ANNOTATED_CONCEPT,
            sqlite_where=_ANNOTATED_CONCEPT,
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rule_id: Mapped[int] = mapped_column(_fk("compose_rule.id"))
    position: Mapped[int] = mapped_column(Integer)
    code: Mapped[str] = mapped_column(Text)
    display: Mapped[str | None] = mapped_column(Text)
    #: ``include.concept.designation``, as ``[{"language", "use_system", "use_code",
    #: "value"}, ...]``.
    designations: Mapped[list[dict[str, Any]] | None] = mapped_column(
        JSON(none_as_null=True)
    )
    #: Properties the value set gives the code by extension (``valueset-label``,
    #: ``valueset-conceptOrder``, ``itemWeight``), as ``[{"code", "type", "value"}]``.
    properties: Mapped[list[dict[str, Any]] | None] = mapped_column(
        JSON(none_as_null=True)
    )
    #: ``deprecated`` (``valueset-deprecated``) or the standards-status extension: the
    #: status of the code's presence in this value set.
    standards_status: Mapped[str | None] = mapped_column(String(16))


class ComposeFilter(Base):
    """A filter of a rule (``include.filter``: property, op, value)."""

    __tablename__ = "compose_filter"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rule_id: Mapped[int] = mapped_column(_fk("compose_rule.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    property: Mapped[str] = mapped_column(Text)
    op: Mapped[str] = mapped_column(String(32))
    value: Mapped[str] = mapped_column(Text)


class ComposeImport(Base):
    """An imported value set of a rule (``include.valueSet``, ``url`` with ``|version``)."""

    __tablename__ = "compose_import"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rule_id: Mapped[int] = mapped_column(_fk("compose_rule.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(Text)
    version: Mapped[str | None] = mapped_column(Text)
    #: The loaded value set the canonical resolves to (set by every load).
    value_set_id: Mapped[int | None] = mapped_column(
        ForeignKey(f"{SCHEMA}.value_set.id", ondelete="SET NULL"), index=True
    )


class ComposeRuleCode(Base):
    """The codes the system part of a rule selects (its concepts, filters or all).

    Computed by every load from :class:`ComposeConcept`, :class:`ComposeFilter` and the
    code system, so that expansion and validation look codes up by index.
    """

    __tablename__ = "compose_rule_code"

    rule_id: Mapped[int] = mapped_column(_fk("compose_rule.id"), primary_key=True)
    system: Mapped[str] = mapped_column(Text, primary_key=True)
    code: Mapped[str] = mapped_column(Text, primary_key=True)
    display: Mapped[str | None] = mapped_column(Text)
    version: Mapped[str | None] = mapped_column(Text)
    inactive: Mapped[bool] = mapped_column(Boolean)
    abstract: Mapped[bool] = mapped_column(Boolean)
    #: The concept, when the code system is loaded (no foreign key: the row is
    #: recomputed with every load, in the same transaction).
    concept_id: Mapped[int | None] = mapped_column(Integer)


class ValueSetMember(Base):
    """A member of the expansion of a value set (computed by every load)."""

    __tablename__ = "value_set_member"

    value_set_id: Mapped[int] = mapped_column(_fk("value_set.id"), primary_key=True)
    system: Mapped[str] = mapped_column(Text, primary_key=True)
    code: Mapped[str] = mapped_column(Text, primary_key=True)
    #: The value set's url and version, repeated so that a query by url reads this
    #: table alone and is planned from its statistics (revision 0006).
    value_set_url: Mapped[str] = mapped_column(Text)
    value_set_version: Mapped[str | None] = mapped_column(Text)
    #: The code system's version when it is loaded, else the include's version.
    version: Mapped[str | None] = mapped_column(Text)
    #: The code system's display when it is loaded, else the value set's display.
    display: Mapped[str | None] = mapped_column(Text)
    inactive: Mapped[bool] = mapped_column(Boolean)
    abstract: Mapped[bool] = mapped_column(Boolean)
    #: The concept, when the code system is loaded: its designations, properties and
    #: place in the code system's order (no foreign key, as in ComposeRuleCode).
    concept_id: Mapped[int | None] = mapped_column(Integer)


Index("ix_value_set_member_system_code", ValueSetMember.system, ValueSetMember.code)
Index(
    "ix_value_set_member_url_system_code",
    ValueSetMember.value_set_url,
    ValueSetMember.system,
    ValueSetMember.code,
)


class RefreshState(Base):
    """One row: a token that every recomputation of the membership replaces.

    Anything derived from the membership (thodb's expansion cache) is valid for as long
    as the token it was computed under is the current one.
    """

    __tablename__ = "refresh_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: Random (uuid4 hex): a token is never current twice, not even after a rollback.
    token: Mapped[str] = mapped_column(String(32))


# --- imaging and reporting (revision 0002) -------------------------------------------


class DicomCodingScheme(Base):
    """A DICOM Coding Scheme Designator and the FHIR system its codes belong to.

    Filled by the migration from :data:`thodb.imaging.schemes.SCHEMES` (PS3.16 Table
    8-1), so that DICOM-coded rows can be joined to the terminology in SQL.
    """

    __tablename__ = "coding_scheme"

    #: Coding Scheme Designator (0008,0102), case-sensitive (``DCM``, ``SCT``, ``NCIt``).
    designator: Mapped[str] = mapped_column(Text, primary_key=True)
    #: The FHIR ``Coding.system`` URL for codes of the scheme.
    system: Mapped[str] = mapped_column(Text, index=True)
    #: Coding Scheme UID from PS3.16 Table 8-1 (NULL when the table gives none).
    uid: Mapped[str | None] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)


class ImagingCodedItem(Base):
    """A coded item found in a DICOM file (see :mod:`thodb.imaging.scan`).

    One row per code sequence item of an instance; a SOP instance is immutable in
    DICOM, so ``(sop_instance_uid, attribute_path)`` identifies a row and a rescan of
    the same files adds nothing.
    """

    __tablename__ = "imaging_coded_item"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "attribute_path"),
        Index(None, "system", "code_value"),
        Index(None, "coding_scheme_designator", "code_value"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str | None] = mapped_column(Text)
    series_instance_uid: Mapped[str | None] = mapped_column(Text)
    sop_instance_uid: Mapped[str] = mapped_column(Text)
    sop_class_uid: Mapped[str | None] = mapped_column(Text)
    #: Keywords with 0-based item indices, e.g.
    #: ``SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]``.
    attribute_path: Mapped[str] = mapped_column(Text)
    #: NULL only for an item with a URN Code Value and no designator.
    coding_scheme_designator: Mapped[str | None] = mapped_column(Text)
    coding_scheme_version: Mapped[str | None] = mapped_column(Text)
    #: Code Value, or the Long Code Value or URN Code Value the item holds instead.
    code_value: Mapped[str] = mapped_column(Text)
    code_meaning: Mapped[str] = mapped_column(Text)
    #: The FHIR system of the coding scheme (NULL when the designator is not known).
    system: Mapped[str | None] = mapped_column(Text)
    #: The file the item was read from (NULL when stored without one).
    source: Mapped[str | None] = mapped_column(Text)


class ImagingSelection(Base):
    """A coding of a FHIR ImagingSelection (R5 ``ImagingSelection.code``/``category``).

    One row per ``Coding``: ``element`` is its FHIRPath inside the resource, e.g.
    ``code.coding[0]`` or ``category[1].coding[0]``. Loading a resource again replaces
    its rows (see :mod:`thodb.imaging.store`).
    """

    __tablename__ = "imaging_selection"
    __table_args__ = (Index(None, "system", "code"),)

    #: ``ImagingSelection.id`` (else the Bundle entry's ``fullUrl``).
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    element: Mapped[str] = mapped_column(Text, primary_key=True)
    status: Mapped[str | None] = mapped_column(String(32))
    study_uid: Mapped[str | None] = mapped_column(Text)
    series_uid: Mapped[str | None] = mapped_column(Text)
    system: Mapped[str | None] = mapped_column(Text)
    version: Mapped[str | None] = mapped_column(Text)
    code: Mapped[str] = mapped_column(Text)
    display: Mapped[str | None] = mapped_column(Text)
    #: The file the resource was read from.
    source: Mapped[str] = mapped_column(Text)
