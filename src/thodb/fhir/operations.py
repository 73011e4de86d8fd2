"""FHIR terminology operations: a Parameters resource in, a FHIR resource out.

``$expand``, ``$validate-code`` (value set and code system forms) and ``$lookup`` as a
FHIR server answers them: each function reads the request's Parameters (R5 JSON), runs
the library operation (:mod:`thodb.expand`, :mod:`thodb.query`) and returns the HTTP
status with the response resource - a ValueSet or Parameters, or an OperationOutcome
when the request cannot be answered.

Resources that come with the request (``tx-resource``, an inline ``valueSet`` and the
resources it contains) are loaded into the caller's session inside a savepoint that is
rolled back before the function returns, so they serve that request only.

Parameter names are those of the R5 OperationDefinitions ValueSet-expand,
ValueSet-validate-code, CodeSystem-validate-code and CodeSystem-lookup, plus the
``tx.fhir.org`` extensions HL7's test suite uses (``lenient-display-validation``,
``valueset-membership-only``, ``useSupplement``, ``inferSystem``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from thodb import load as load_mod
from thodb import query
from thodb.canonical import split_canonical
from thodb.concepts import Property
from thodb.errors import LoadError, NotFoundError
from thodb.expand import (
    ExpandOptions,
    Expansion,
    Member,
    ValueSetNotExpandable,
    ValueSetNotFound,
)
from thodb.expand import expand as expand_value_set
from thodb.languages import Designation, LanguagePreference
from thodb.outcome import Issue, TerminologyError, outcome
from thodb.query import Coding, Lookup, ValidateOptions, Validation
from thodb.versions import VersionRules

JsonObject = dict[str, Any]

#: The system of ``designation.use`` for a display that is the preferred one.
_HL7_TERM_MAINT = "http://terminology.hl7.org/CodeSystem/hl7TermMaintInfra"

# $expand parameters that are echoed in ValueSet.expansion.parameter.
_EXPANSION_PARAMETERS = (
    "activeOnly",
    "count",
    "designation",
    "displayLanguage",
    "excludeNested",
    "excludeNotForUI",
    "filter",
    "includeDefinition",
    "includeDesignations",
    "offset",
    "property",
    "system-version",
    "check-system-version",
    "force-system-version",
)

# FHIR types of concept property values and the value[x] element of each.
_VALUE_ELEMENTS = {
    "code": "valueCode",
    "Coding": "valueCoding",
    "string": "valueString",
    "integer": "valueInteger",
    "boolean": "valueBoolean",
    "dateTime": "valueDateTime",
    "decimal": "valueDecimal",
}


@dataclass(frozen=True)
class RequestContext:
    """What a request carries besides its parameters (HTTP headers).

    :param accept_language: the ``Accept-Language`` header: the display language when
        the request has no ``displayLanguage``.
    :param too_costly_threshold: the largest expansion to return without paging
        (``X-TOO-COSTLY-THRESHOLD``, a header HL7's test suite sends).
    :param cache: answer from the expansions and validate-code answers kept in the
        process; ``Cache-Control: no-cache`` (or ``no-store``) computes them again.
    """

    accept_language: str | None = None
    too_costly_threshold: int | None = None
    cache: bool = True

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RequestContext:
        """Read the headers thodb understands (names are case-insensitive)."""
        lowered = {name.lower(): value for name, value in headers.items()}
        threshold = lowered.get("x-too-costly-threshold", "").strip()
        directives = {
            d.strip().lower() for d in lowered.get("cache-control", "").split(",")
        }
        return cls(
            accept_language=lowered.get("accept-language"),
            too_costly_threshold=int(threshold) if threshold.isdigit() else None,
            cache=not directives & {"no-cache", "no-store"},
        )


class _Parameters:
    """Typed access to the parameters of a request."""

    def __init__(self, request: JsonObject) -> None:
        if request.get("resourceType") != "Parameters":
            raise TerminologyError.single(
                "invalid",
                "invalid-data",
                "the request must be a Parameters resource",
                status=400,
            )
        self.entries: list[JsonObject] = [
            p for p in request.get("parameter", []) if isinstance(p, dict)
        ]

    def values(self, name: str) -> list[Any]:
        found = []
        for entry in self.entries:
            if entry.get("name") != name:
                continue
            for key, value in entry.items():
                if key.startswith("value") or key == "resource":
                    found.append(value)
        return found

    def value(self, name: str) -> Any:
        values = self.values(name)
        return values[0] if values else None

    def text(self, name: str) -> str | None:
        value = self.value(name)
        return None if value is None else str(value)

    def texts(self, name: str) -> tuple[str, ...]:
        return tuple(str(v) for v in self.values(name))

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.value(name)
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return value.lower() == "true"
        return default

    def number(self, name: str) -> int | None:
        value = self.value(name)
        if value is None:
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            raise TerminologyError.single(
                "invalid",
                "invalid-data",
                f"parameter {name} must be an integer",
                status=400,
            ) from None

    def echo(self, names: Sequence[str]) -> list[JsonObject]:
        return [entry for entry in self.entries if entry.get("name") in names]


# --- request-scoped resources ----------------------------------------------------------


@contextmanager
def _request_resources(session: Session, resources: list[JsonObject]) -> Iterator[None]:
    """Load ``resources`` for the duration of the block (a savepoint rolled back)."""
    if not resources:
        yield
        return
    savepoint = session.begin_nested()
    try:
        try:
            load_mod.load_resources(session, resources, source="request", replace=True)
        except LoadError as error:
            raise TerminologyError.single(
                "invalid",
                "invalid-data",
                f"a resource of the request is not valid: {error}",
                status=400,
            ) from error
        yield
    finally:
        savepoint.rollback()


def _inline(resource: JsonObject) -> tuple[JsonObject, list[JsonObject]]:
    """An inline resource with a url, and the resources it contains.

    References ``#id`` to contained value sets become their urls.
    """
    resource = dict(resource)
    resource.setdefault("url", f"urn:uuid:{uuid.uuid4()}")
    contained: list[JsonObject] = []
    local: dict[str, str] = {}
    for inner in resource.pop("contained", []) or []:
        if isinstance(inner, dict) and inner.get("resourceType") in (
            "ValueSet",
            "CodeSystem",
        ):
            inner = dict(inner)
            inner.setdefault("url", f"urn:uuid:{uuid.uuid4()}")
            if inner.get("id"):
                local[f"#{inner['id']}"] = str(inner["url"])
            contained.append(inner)
    compose = resource.get("compose")
    if isinstance(compose, dict) and local:
        compose = dict(compose)
        for kind in ("include", "exclude"):
            rules = []
            for rule in compose.get(kind, []) or []:
                if isinstance(rule, dict) and "valueSet" in rule:
                    rule = {
                        **rule,
                        "valueSet": [local.get(v, v) for v in rule["valueSet"]],
                    }
                rules.append(rule)
            if rules:
                compose[kind] = rules
        resource["compose"] = compose
    return resource, contained


def _with_request(
    params: _Parameters, inline_name: str
) -> tuple[list[JsonObject], JsonObject | None]:
    """The resources to load for a request, and its inline resource (if any)."""
    resources = [r for r in params.values("tx-resource") if isinstance(r, dict)]
    inline = params.value(inline_name)
    if not isinstance(inline, dict):
        return resources, None
    main, contained = _inline(inline)
    return resources + contained + [main], main


# --- errors ----------------------------------------------------------------------------


def _failure(error: Exception) -> tuple[int, JsonObject]:
    if isinstance(error, TerminologyError):
        return error.status, outcome(error.issues)
    if isinstance(error, (ValueSetNotFound, ValueSetNotExpandable)):
        status = 404 if isinstance(error, ValueSetNotFound) else 422
        return status, outcome([error.issue])
    issue = Issue("error", "not-found", "not-found", str(error))
    return 404, outcome([issue])


def _answering(
    run: Callable[[], tuple[int, JsonObject]],
) -> tuple[int, JsonObject]:
    try:
        return run()
    except (
        TerminologyError,
        ValueSetNotFound,
        ValueSetNotExpandable,
        NotFoundError,
    ) as error:
        return _failure(error)


def _language(
    params: _Parameters, context: RequestContext
) -> LanguagePreference | None:
    value = params.text("displayLanguage") or context.accept_language
    if not value:
        return None
    try:
        return LanguagePreference.parse(value)
    except ValueError as error:
        raise TerminologyError.single(
            "processing", "invalid-display", f"displayLanguage: {error}", status=400
        ) from error


def _version_rules(params: _Parameters) -> VersionRules:
    return VersionRules.from_canonicals(
        default=params.texts("system-version"),
        check=params.texts("check-system-version"),
        force=params.texts("force-system-version"),
    )


# --- $expand ---------------------------------------------------------------------------


def expand(
    session: Session, request: JsonObject, context: RequestContext
) -> tuple[int, JsonObject]:
    """Answer ``ValueSet/$expand``: a ValueSet with its expansion, or an OperationOutcome.

    :param session: a session whose transaction may take a savepoint (request
        resources are loaded into it and rolled back).
    :param request: the Parameters resource.
    :param context: the request's headers.
    :return: the HTTP status and the response resource.
    """

    def run() -> tuple[int, JsonObject]:
        params = _Parameters(request)
        resources, inline = _with_request(params, "valueSet")
        with _request_resources(session, resources):
            if inline is not None:
                url, version = str(inline["url"]), inline.get("version")
            else:
                url, version = _value_set_reference(params)
            options = _expand_options(params, context)
            expansion = expand_value_set(
                session, url, version, options=options, cache=context.cache
            )
        return 200, expansion_resource(
            expansion,
            parameters=params.echo(_EXPANSION_PARAMETERS),
            show_url=inline is None or not expansion.url.startswith("urn:uuid:"),
            paged=params.value("offset") is not None
            or params.value("count") is not None,
        )

    return _answering(run)


def _value_set_reference(params: _Parameters) -> tuple[str, str | None]:
    reference = params.text("url")
    if not reference:
        raise TerminologyError.single(
            "invalid",
            "invalid-data",
            "give the value set as url or valueSet",
            status=400,
        )
    url, version = split_canonical(reference)
    return url, params.text("valueSetVersion") or version


def _expand_options(params: _Parameters, context: RequestContext) -> ExpandOptions:
    offset = params.number("offset") or 0
    return ExpandOptions(
        active_only=params.flag("activeOnly"),
        hierarchical=not params.flag("excludeNested"),
        include_designations=params.flag("includeDesignations"),
        designations=params.texts("designation"),
        include_definition=params.flag("includeDefinition"),
        language=_language(params, context),
        filter=params.text("filter"),
        offset=offset,
        count=params.number("count"),
        properties=params.texts("property"),
        versions=_version_rules(params),
        max_size=context.too_costly_threshold,
        supplements=params.texts("useSupplement"),
        exclude_not_for_ui=params.flag("excludeNotForUI"),
    )


def expansion_resource(
    expansion: Expansion,
    *,
    parameters: Sequence[JsonObject] = (),
    show_url: bool = True,
    paged: bool = False,
) -> JsonObject:
    """The FHIR ValueSet of an expansion (``ValueSet.expansion`` with its ``contains``).

    :param parameters: request parameters to echo in ``expansion.parameter``; the code
        systems and value sets used are added.
    :param show_url: give ``ValueSet.url`` (not for an inline value set without one).
    :param paged: give ``expansion.offset``.
    """
    resource: JsonObject = {"resourceType": "ValueSet"}
    if show_url:
        resource["url"] = expansion.url
    for name in ("version", "name", "title", "status"):
        value = getattr(expansion, name)
        if value is not None:
            resource[name] = value
    parameters = list(parameters)
    parameters += [
        {"name": "used-codesystem", "valueUri": u} for u in expansion.used_code_systems
    ]
    parameters += [
        {"name": "used-valueset", "valueUri": u} for u in expansion.used_value_sets
    ]
    parameters += [
        {"name": "used-supplement", "valueUri": u} for u in expansion.used_supplements
    ]
    body: JsonObject = {
        "identifier": f"urn:uuid:{uuid.uuid4()}",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "total": expansion.total,
    }
    if paged:
        body["offset"] = expansion.offset
    if parameters:
        body["parameter"] = parameters
    versioned = frozenset(expansion.versioned_systems)
    contains = [_contains(m, versioned) for m in expansion.contains]
    if contains:
        body["contains"] = contains
    resource["expansion"] = body
    return resource


def _contains(member: Member, versioned: frozenset[str]) -> JsonObject:
    entry: JsonObject = {"system": member.system}
    if member.version and member.system in versioned:
        entry["version"] = member.version
    if member.abstract:
        entry["abstract"] = True
    if member.inactive:
        entry["inactive"] = True
    entry["code"] = member.code
    if member.display is not None:
        entry["display"] = member.display
    if member.designations:
        entry["designation"] = [_designation(d) for d in member.designations]
    if member.properties:
        entry["property"] = [_property(p) for p in member.properties]
    if member.contains:
        entry["contains"] = [_contains(m, versioned) for m in member.contains]
    return entry


def _designation(designation: Designation) -> JsonObject:
    entry: JsonObject = {}
    if designation.language:
        entry["language"] = designation.language
    if designation.use_code:
        use: JsonObject = {"code": designation.use_code}
        if designation.use_system:
            use = {"system": designation.use_system, **use}
        entry["use"] = use
    entry["value"] = designation.value
    return entry


def _typed_value(prop: Property) -> tuple[str, Any]:
    element = _VALUE_ELEMENTS.get(prop.type, "valueString")
    value: Any = prop.value
    if prop.type == "Coding":
        value = (
            {"system": prop.system, "code": prop.value}
            if prop.system
            else {"code": prop.value}
        )
    elif prop.type == "boolean":
        value = prop.value == "true"
    elif prop.type == "integer" and prop.value is not None:
        value = int(prop.value)
    elif prop.type == "decimal" and prop.value is not None:
        value = float(prop.value)
    return element, value


def _property(prop: Property) -> JsonObject:
    element, value = _typed_value(prop)
    return {"code": prop.code, element: value}


# --- $validate-code --------------------------------------------------------------------


def _coding(value: Any) -> Coding:
    if not isinstance(value, dict):
        raise TerminologyError.single(
            "invalid", "invalid-data", "a coding must be a Coding", status=400
        )
    return Coding(
        system=value.get("system"),
        code=value.get("code"),
        version=value.get("version"),
        display=value.get("display"),
    )


def _coded_value(params: _Parameters, code_system: bool) -> tuple[str, list[Coding]]:
    """The mode (``code``, ``coding``, ``codeableConcept``) and the codings to check."""
    concept = params.value("codeableConcept")
    if isinstance(concept, dict):
        return "codeableConcept", [_coding(c) for c in concept.get("coding", [])]
    coding = params.value("coding")
    if coding is not None:
        return "coding", [_coding(coding)]
    code = params.text("code")
    if code is None:
        raise TerminologyError.single(
            "invalid",
            "invalid-data",
            "give the code to validate as code, coding or codeableConcept",
            status=400,
        )
    if code_system:
        system = params.text("url") or params.text("system")
        version = params.text("version")
    else:
        system = params.text("system")
        version = params.text("systemVersion")
    return "code", [Coding(system, code, version, params.text("display"))]


def _validate_options(params: _Parameters, context: RequestContext) -> ValidateOptions:
    return ValidateOptions(
        abstract_ok=params.flag("abstract", True),
        active_only=params.flag("activeOnly"),
        membership_only=params.flag("valueset-membership-only"),
        lenient_display=params.flag("lenient-display-validation"),
        infer_system=params.flag("inferSystem"),
        language=_language(params, context),
        versions=_version_rules(params),
        supplements=params.texts("useSupplement"),
    )


def validate_code(
    session: Session, request: JsonObject, context: RequestContext
) -> tuple[int, JsonObject]:
    """Answer ``ValueSet/$validate-code``: Parameters with ``result``, or an OperationOutcome.

    See :func:`expand` for the arguments.
    """

    def run() -> tuple[int, JsonObject]:
        params = _Parameters(request)
        resources, inline = _with_request(params, "valueSet")
        mode, codings = _coded_value(params, code_system=False)
        with _request_resources(session, resources):
            if inline is not None:
                url, version = str(inline["url"]), inline.get("version")
            else:
                url, version = _value_set_reference(params)
            options = _validate_options(params, context)
            try:
                answer = query.validate_concept(
                    session,
                    url,
                    codings,
                    version=version,
                    options=options,
                    mode=mode,
                    cache=context.cache,
                )
            except ValueSetNotExpandable as error:
                if error.issue.tx_type != "not-found":
                    raise
                # An import that is not loaded: the code cannot be checked (HL7 tx:
                # validation-simple-code-bad-import answers with the issue, not an error).
                answer = Validation(
                    result=False,
                    system=codings[0].system
                    if codings and mode != "codeableConcept"
                    else None,
                    code=codings[0].code
                    if codings and mode != "codeableConcept"
                    else None,
                    message=error.issue.text,
                    issues=(error.issue,),
                )
        return 200, validation_resource(
            answer, mode=mode, codeable_concept=params.value("codeableConcept")
        )

    return _answering(run)


def cs_validate_code(
    session: Session, request: JsonObject, context: RequestContext
) -> tuple[int, JsonObject]:
    """Answer ``CodeSystem/$validate-code``. See :func:`expand` for the arguments."""

    def run() -> tuple[int, JsonObject]:
        params = _Parameters(request)
        resources, _ = _with_request(params, "codeSystem")
        mode, codings = _coded_value(params, code_system=True)
        with _request_resources(session, resources):
            answer = query.validate_in_code_system(
                session,
                codings,
                url=params.text("url") if mode != "code" else None,
                version=params.text("version") if mode != "code" else None,
                options=_validate_options(params, context),
                mode=mode,
            )
        return 200, validation_resource(
            answer, mode=mode, codeable_concept=params.value("codeableConcept")
        )

    return _answering(run)


def validation_resource(
    answer: Validation, *, mode: str = "code", codeable_concept: Any = None
) -> JsonObject:
    """The FHIR Parameters of a ``$validate-code`` answer.

    :param mode: how the code was given: ``code``, ``coding`` or ``codeableConcept``.
    :param codeable_concept: the CodeableConcept validated, echoed in that mode.
    """
    out: list[JsonObject] = []
    if answer.code is not None:
        out.append({"name": "code", "valueCode": answer.code})
    if mode == "codeableConcept":
        out.append(
            {
                "name": "codeableConcept",
                "valueCodeableConcept": codeable_concept,
            }
        )
    if answer.display is not None:
        out.append({"name": "display", "valueString": answer.display})
    if answer.inactive:
        out.append({"name": "inactive", "valueBoolean": True})
    if answer.issues:
        out.append({"name": "issues", "resource": outcome(list(answer.issues))})
    if answer.message:
        out.append({"name": "message", "valueString": answer.message})
    if answer.normalized_code is not None:
        out.append({"name": "normalized-code", "valueCode": answer.normalized_code})
    out.append({"name": "result", "valueBoolean": answer.result})
    if answer.status is not None:
        out.append({"name": "status", "valueCode": answer.status})
    if answer.system is not None:
        out.append({"name": "system", "valueUri": answer.system})
    if answer.version is not None:
        out.append({"name": "version", "valueString": answer.version})
    out += [
        {"name": "x-caused-by-unknown-system", "valueCanonical": s}
        for s in answer.caused_by_unknown_systems
    ]
    out += [
        {"name": "x-unknown-system", "valueCanonical": s}
        for s in answer.unknown_systems
    ]
    return {"resourceType": "Parameters", "parameter": out}


# --- $lookup ---------------------------------------------------------------------------


def lookup(
    session: Session, request: JsonObject, context: RequestContext
) -> tuple[int, JsonObject]:
    """Answer ``CodeSystem/$lookup``. See :func:`expand` for the arguments."""

    def run() -> tuple[int, JsonObject]:
        params = _Parameters(request)
        resources, _ = _with_request(params, "codeSystem")
        coding = params.value("coding")
        if isinstance(coding, dict):
            system, code = coding.get("system"), coding.get("code")
            version = coding.get("version")
        else:
            system, code, version = (
                params.text("system"),
                params.text("code"),
                params.text("version"),
            )
        if not system or not code:
            raise TerminologyError.single(
                "invalid", "invalid-data", "give system and code, or coding", status=400
            )
        with _request_resources(session, resources):
            found = query.lookup(
                session,
                system=system,
                code=code,
                version=version,
                supplements=params.texts("useSupplement"),
            )
        return 200, lookup_resource(found)

    return _answering(run)


def lookup_resource(found: Lookup) -> JsonObject:
    """The FHIR Parameters of a ``$lookup`` answer."""
    out: list[JsonObject] = []
    out.append({"name": "abstract", "valueBoolean": found.abstract})
    out.append({"name": "code", "valueCode": found.code})
    if found.definition is not None:
        out.append({"name": "definition", "valueString": found.definition})
    for i, designation in enumerate(found.designation_values):
        part: list[JsonObject] = []
        if designation.language:
            part.append({"name": "language", "valueCode": designation.language})
        if designation.use_code:
            use: JsonObject = {"code": designation.use_code}
            if designation.use_system:
                use = {"system": designation.use_system, **use}
            part.append({"name": "use", "valueCoding": use})
        if i in found.sources:
            part.append({"name": "source", "valueCanonical": found.sources[i]})
        part.append({"name": "value", "valueString": designation.value})
        out.append({"name": "designation", "part": part})
    if found.display is not None:
        out.append({"name": "display", "valueString": found.display})
    if found.name is not None:
        out.append({"name": "name", "valueString": found.name})
    for prop in found.property_values:
        element, value = _typed_value(prop)
        part = [
            {"name": "code", "valueCode": prop.code},
            {"name": "value", element: value},
        ]
        description = found.descriptions.get(prop.value or "")
        if prop.code in ("parent", "child") and description is not None:
            part.insert(1, {"name": "description", "valueString": description})
        out.append({"name": "property", "part": part})
    out.append({"name": "system", "valueUri": found.system})
    out += [
        {"name": "used-supplement", "valueCanonical": s} for s in found.used_supplements
    ]
    if found.version is not None:
        out.append({"name": "version", "valueString": found.version})
    return {"resourceType": "Parameters", "parameter": out}
