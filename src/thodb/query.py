"""``$validate-code`` and ``$lookup`` over the loaded content.

Validation follows the R5 ValueSet-validate-code and CodeSystem-validate-code
OperationDefinitions and answers the way HL7's terminology test suite expects: a code
is checked against the code system version the value set selects for it (or the one
the coding names, or a request's version rules), and every problem found on the way is
an :class:`~thodb.outcome.Issue` with its tx-issue-type: ``not-in-vs``,
``invalid-code``, ``invalid-display``, ``not-found`` (unknown system or version),
``vs-invalid`` (a version that does not match), ``code-rule`` (abstract or inactive
when not allowed), ``code-comment`` (inactive or deprecated), ``cannot-infer``. The
answer is valid only when the code is a member and no error was found.

Membership comes from ``value_set_member`` (computed by :func:`thodb.refresh.refresh`);
when a coding names another version of a code system than the value set resolved to,
membership is recomputed for that version inside a savepoint that is rolled back.
Both operations only read otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import sqlalchemy as sa
from sqlalchemy.orm import Session

from thodb import concepts, versions
from thodb.canonical import canonical
from thodb.concepts import CodeSystemInfo, ConceptDetails, Property
from thodb.errors import NotFoundError
from thodb.expand import annotated, require_supplement
from thodb.languages import (
    PREFERRED_FOR_LANGUAGE,
    Designation,
    LanguagePreference,
    pick_display,
)
from thodb.models import ValueSet
from thodb.outcome import Issue, TerminologyError, path
from thodb.refresh import version_scope
from thodb.scope import (
    FLAGGED_STANDARDS_STATUS,
    Reads,
    Rule,
    Scope,
    ValueSetFacts,
    kept_answer,
)
from thodb.versions import VersionRules


@dataclass(frozen=True)
class Coding:
    """A coded value to validate (FHIR ``Coding``; ``code`` + ``system`` in code form)."""

    system: str | None
    code: str | None
    version: str | None = None
    display: str | None = None


@dataclass(frozen=True)
class ValidateOptions:
    """The ``$validate-code`` parameters besides the coded value.

    :param abstract_ok: ``abstract``: an abstract (not selectable) code is valid.
    :param active_only: ``activeOnly``: an inactive code is not valid.
    :param membership_only: ``valueset-membership-only``: only say whether the code is
        in the value set; do not look codes up in their code systems.
    :param lenient_display: ``lenient-display-validation``: a wrong display is a
        warning, not an error.
    :param infer_system: ``inferSystem``: find the system of a code given without one
        from the value set.
    :param language: ``displayLanguage`` (or ``Accept-Language``).
    :param versions: ``system-version``, ``check-system-version``,
        ``force-system-version``.
    :param supplements: ``useSupplement``: supplements whose designations count.
    """

    abstract_ok: bool = True
    active_only: bool = False
    membership_only: bool = False
    lenient_display: bool = False
    infer_system: bool = False
    language: LanguagePreference | None = None
    versions: VersionRules = field(default_factory=VersionRules)
    supplements: tuple[str, ...] = ()


_NO_OPTIONS = ValidateOptions()


@dataclass(frozen=True)
class Validation:
    """The answer of ``$validate-code`` (FHIR Parameters ``result``, ``issues``...).

    :param result: the code is valid: in the value set and without errors.
    :param message: the error and warning messages, joined.
    :param unknown_systems: ``x-unknown-system``: code systems (``url|version``) that
        are not loaded and made the code invalid.
    :param caused_by_unknown_systems: ``x-caused-by-unknown-system``: code systems that
        are not loaded and prevented validation.
    """

    result: bool
    system: str | None
    code: str | None
    display: str | None = None
    inactive: bool = False
    message: str | None = None
    version: str | None = None
    status: str | None = None
    normalized_code: str | None = None
    issues: tuple[Issue, ...] = ()
    unknown_systems: tuple[str, ...] = ()
    caused_by_unknown_systems: tuple[str, ...] = ()


# --- checking one coding --------------------------------------------------------------


@dataclass
class _Check:
    """What checking one coding found."""

    outcome: bool | None = False
    system: str | None = None
    code: str | None = None
    version: str | None = None
    display: str | None = None
    inactive: bool = False
    status: str | None = None
    normalized: str | None = None
    located: bool = False


# Designation statuses that make a designation no longer a correct display.
_NO_LONGER_VALID = frozenset({"deprecated", "withdrawn", "retired"})


class _Validator:
    def __init__(self, reads: Reads, scope: Scope, options: ValidateOptions) -> None:
        session = self.session = reads.session
        self.reads = reads
        self.scope = scope
        self.options = options
        self.issues: list[Issue] = []
        self.unknown: list[str] = []
        self.supplements = [
            found
            for found in (
                concepts.find_supplement(session, s) for s in options.supplements
            )
            if found is not None
        ]

    def add(
        self,
        severity: str,
        code: str,
        tx_type: str | None,
        text: str,
        expression: str | None,
        message_id: str | None = None,
    ) -> None:
        issue = Issue(severity, code, tx_type, text, expression or None, message_id)
        if issue not in self.issues:
            self.issues.append(issue)

    def unknown_system(self, system: str, version: str | None, where: str) -> None:
        name = canonical(system, version)
        if name in self.unknown:
            return
        self.unknown.append(name)
        if version is None:
            text = f"the code system {system} is not known to this server"
            message_id = "UNKNOWN_CODESYSTEM"
        else:
            loaded = [cs.version for cs in self.reads.code_system_versions(system)]
            known = ", ".join(v for v in loaded if v) or "none"
            text = (
                f"version {version} of the code system {system} is not known to this "
                f"server (versions known: {known})"
            )
            message_id = "UNKNOWN_CODESYSTEM_VERSION"
        self.add(
            "error", "not-found", "not-found", text, path(where, "system"), message_id
        )

    def check(self, coding: Coding, where: str, mode: str) -> _Check:
        """Check one coding; ``where`` is its element path (``Coding``, ``""``...)."""
        found = _Check(system=coding.system, code=coding.code, version=coding.version)
        code = coding.code
        if not code:
            self.add(
                "warning",
                "invalid",
                "invalid-data",
                "the coding has no code, so it cannot be validated",
                where or "code",
            )
            return found
        if not concepts.storable(coding.system, code, coding.version):
            self.add(
                "error",
                "invalid",
                "invalid-data",
                "the coding holds a character that no code or system can contain "
                "(NUL, or a lone surrogate)",
                where or "code",
            )
            return found
        system = coding.system
        if not system and self.options.infer_system and mode == "code":
            system = self._infer(code, found)
        if not system:
            if not self.options.infer_system:
                self.add(
                    "warning",
                    "invalid",
                    "invalid-data",
                    "the coding has no system, so it cannot be validated",
                    where or "code",
                    "Coding_has_no_system__cannot_validate",
                )
            return found
        coding = Coding(system, code, coding.version, coding.display)
        rule = self.scope.rule_for(system, code)
        if rule is not None and self._listed_only(system, code, where, found):
            return found
        if rule is not None:
            cs = self._version(coding, rule, where)
            if cs is None:
                found.outcome = None
            else:
                self._in_code_system(coding, cs, where, found, member_check=True)
                if found.outcome is True:
                    self._presence(coding, found, where)
        if (
            found.outcome is not True
            and not self.options.membership_only
            and not found.located
        ):
            self._look_up(coding, rule, where, mode, found)
        return found

    def _listed_only(self, system: str, code: str, where: str, found: _Check) -> bool:
        """Accept a code the value set lists from a code system that is not loaded.

        SNOMED CT in DICOM's context groups is the case: the code is a member, but
        neither it nor its display can be checked.
        """
        listed = self.scope.listed(system, code)
        if listed is None or self.reads.code_system_versions(system):
            return False
        found.outcome, found.version, found.display = True, listed[0], listed[1]
        self.add(
            "warning",
            "not-found",
            "not-found",
            f"the code system {system} is not loaded: {code!r} is in the value set "
            f"{self.scope.name}, but neither it nor its display could be checked",
            path(where, "system"),
            "UNKNOWN_CODESYSTEM",
        )
        return True

    def _infer(self, code: str, found: _Check) -> str | None:
        systems = self.scope.systems_with(code)
        if len(systems) == 1:
            found.system = systems[0]
            return systems[0]
        text = (
            f"the code {code!r} is in the value set {self.scope.name} for several systems "
            f"({', '.join(systems)}), so the system cannot be inferred"
            if systems
            else f"the system of the code {code!r} cannot be inferred from the value set "
            f"{self.scope.name}"
        )
        self.add(
            "error",
            "not-found",
            "cannot-infer",
            text,
            "code",
            "UNABLE_TO_INFER_CODESYSTEM",
        )
        return None

    def _version(self, coding: Coding, rule: Rule, where: str) -> CodeSystemInfo | None:
        """The code system version to check ``coding`` in, with issues on mismatches."""
        system, wanted = str(coding.system), coding.version
        rules = self.options.versions
        pattern = rules.effective(system, rule.version)
        if wanted is not None:
            if pattern is None:
                loaded = [cs.version for cs in self.reads.code_system_versions(system)]
                chosen: str | None = (
                    wanted if any(versions.matches(wanted, v) for v in loaded) else None
                )
            elif versions.is_pattern(pattern) and versions.matches(pattern, wanted):
                chosen = wanted
            else:
                chosen = pattern
            cs = self.reads.find_code_system(system, chosen)
            if cs is not None and not versions.matches(wanted, cs.version):
                severity = "warning" if chosen is None else "error"
                self.add(
                    severity,
                    "invalid",
                    "vs-invalid",
                    f"the value set {self.scope.name} uses version {cs.version} of {system}, "
                    f"not the version {wanted} the coding names",
                    path(where, "version"),
                    "VALUESET_VALUE_MISMATCH",
                )
                if self.reads.find_code_system(system, wanted) is None:
                    self.unknown_system(system, wanted, where)
            elif cs is None and chosen != wanted:
                self.add(
                    "error",
                    "invalid",
                    "vs-invalid",
                    f"the value set {self.scope.name} asks for version {chosen} of {system}, "
                    f"not the version {wanted} the coding names",
                    path(where, "version"),
                    "VALUESET_VALUE_MISMATCH",
                )
        else:
            chosen = pattern
            cs = self.reads.find_code_system(system, chosen)
        if cs is None:
            self._not_a_code_system(system, chosen, where)
            return None
        check = rules.check.get(system)
        if check is not None and not versions.matches(check, cs.version):
            self.add(
                "error",
                "exception",
                "version-error",
                f"the value set {self.scope.name} resolves {system} to version {cs.version}, "
                f"but check-system-version asks for {check}",
                path(where, "version"),
                "VALUESET_VERSION_CHECK",
            )
        self._status(cs)
        return cs

    def value_set_status(self) -> None:
        """Report the value sets of the scope that are deprecated or withdrawn."""
        for name, status in self.scope.flagged:
            self.add(
                "information",
                "business-rule",
                "status-check",
                f"the value set {name} is {status}",
                None,
                FLAGGED_STANDARDS_STATUS[status],
            )

    def _presence(self, coding: Coding, found: _Check, where: str) -> None:
        code = found.normalized or str(coding.code)
        status = self.scope.presence_status(str(coding.system), code)
        if status is None:
            return
        self.add(
            "warning",
            "business-rule",
            "code-comment",
            f"the code {code!r} of {coding.system} is {status} in the value set "
            f"{self.scope.name}, and its use should be reviewed",
            where or "code",
            "CONCEPT_DEPRECATED_IN_VALUESET",
        )

    def _status(self, cs: CodeSystemInfo) -> None:
        vs = self.scope.value_set
        if cs.standards_status in FLAGGED_STANDARDS_STATUS:
            self.add(
                "information",
                "business-rule",
                "status-check",
                f"the code system {cs.canonical} is {cs.standards_status}",
                None,
                FLAGGED_STANDARDS_STATUS[cs.standards_status],
            )
        if cs.experimental and not (vs is not None and vs.experimental):
            self.add(
                "information",
                "business-rule",
                "status-check",
                f"the code system {cs.canonical} is experimental",
                None,
                "MSG_EXPERIMENTAL",
            )
        if cs.status == "retired":
            self.add(
                "information",
                "business-rule",
                "status-check",
                f"the code system {cs.canonical} is retired",
                None,
                "MSG_RETIRED",
            )
        elif cs.status == "draft" and vs is not None and vs.status != "draft":
            self.add(
                "information",
                "business-rule",
                "status-check",
                f"the {vs.status or ''} value set {self.scope.name} refers to the draft "
                f"code system {cs.canonical}",
                None,
                "MSG_DRAFT_SRC_STATUS",
            )

    def _in_code_system(
        self,
        coding: Coding,
        cs: CodeSystemInfo,
        where: str,
        found: _Check,
        *,
        member_check: bool,
    ) -> None:
        code = str(coding.code)
        found.version = cs.version
        # Designations matter for a display to check or a language to show it in.
        located = self.reads.locate(
            cs,
            code,
            designations=coding.display is not None or bool(self.options.language),
        )
        if located is None:
            found.located = True
            if self.options.membership_only:
                found.outcome = False
            elif cs.content != "complete":
                self.add(
                    "warning",
                    "code-invalid",
                    "invalid-code",
                    f"the code {code!r} is not in the {cs.content or 'incomplete'} code "
                    f"system {cs.canonical}, which may not hold all its codes",
                    path(where, "code"),
                    "UNKNOWN_CODE_IN_FRAGMENT",
                )
                found.outcome = True if member_check else found.outcome
            else:
                self.add(
                    "error",
                    "code-invalid",
                    "invalid-code",
                    f"the code {code!r} is not a code of {cs.canonical}",
                    path(where, "code"),
                    "Unknown_Code_in_Version",
                )
                found.outcome = False
            return
        actual, details = located
        found.located = True
        if actual != code:
            found.normalized = actual
            self.add(
                "information",
                "business-rule",
                "code-rule",
                f"the code {code!r} is written {actual!r} in {cs.canonical}, which ignores case",
                path(where, "code"),
                "CODE_CASE_DIFFERENCE",
            )
        details = self._with_supplements(cs, details)
        annotation = self.scope.annotations.get((cs.url, actual))
        if annotation is not None:
            details = annotated(details, annotation)
        if member_check and self.scope.is_member(self.options.versions, cs, actual):
            if details.abstract and not self.options.abstract_ok:
                self.add(
                    "error",
                    "business-rule",
                    "code-rule",
                    f"the code {code!r} of {cs.url} is abstract and may not be used here",
                    path(where, "code"),
                    "ABSTRACT_CODE_NOT_ALLOWED",
                )
                found.outcome = False
            elif self.options.active_only and details.inactive:
                self.add(
                    "error",
                    "business-rule",
                    "code-rule",
                    f"the code {code!r} is not active, and only active codes are valid here",
                    path(where, "code"),
                    "STATUS_CODE_WARNING_CODE",
                )
                found.outcome = False
            else:
                found.outcome = True
        else:
            found.outcome = False
            vs = self.scope.value_set
            if (
                member_check
                and details.inactive
                and vs
                and vs.compose_inactive is False
            ):
                # The compose would take the code but leaves inactive codes out.
                self.add(
                    "error",
                    "business-rule",
                    "code-rule",
                    f"the code {code!r} is valid but not active, and the value set "
                    f"{self.scope.name} holds active codes only",
                    path(where, "code"),
                    "STATUS_CODE_WARNING_CODE",
                )
        found.inactive = details.inactive
        found.status = details.status
        found.display = (
            pick_display(
                details.display,
                cs.language,
                details.designations,
                self.options.language,
            )
            or details.display
        )
        if coding.display is not None:
            self._display(coding, details, where, cs.language)

    def _with_supplements(
        self, cs: CodeSystemInfo, details: ConceptDetails
    ) -> ConceptDetails:
        ids = concepts.supplements_of(self.session, self.supplements, cs)
        if not ids:
            return details
        return concepts.details(self.session, cs.id, [details.code], supplements=ids)[
            details.code
        ]

    def _display(
        self,
        coding: Coding,
        details: ConceptDetails,
        where: str,
        language: str | None,
    ) -> None:
        """Check the coding's display; ``language`` is that of ``details.display``."""
        given = str(coding.display)
        preference = self.options.language
        severity = "warning" if self.options.lenient_display else "error"
        current = [d for d in details.designations if d.status not in _NO_LONGER_VALID]
        everything = _texts(details.display, current)
        if not preference:
            if _contains(everything, given):
                return
            if self._no_longer_valid(coding, details, where):
                return
            self._wrong_display(coding, details, where, severity, language)
            return
        # A display of a code system that states no language is taken to be in any.
        requested = [d.value for d in current if preference.accepts(d.language)]
        if details.display is not None and (
            language is None or preference.accepts(language)
        ):
            requested.insert(0, details.display)
        if _contains(requested, given):
            return
        if not requested and _contains(everything, given):
            self.add(
                "information",
                "invalid",
                "invalid-display",
                f"there is no display for {coding.system}#{coding.code} in the requested "
                f"language ({preference.text}); {given!r} is valid in another language",
                path(where, "display"),
                "NO_VALID_DISPLAY_FOUND_NONE_FOR_LANG_OK",
            )
            return
        if self._no_longer_valid(coding, details, where):
            return
        self._wrong_display(coding, details, where, severity, language)

    def _no_longer_valid(
        self, coding: Coding, details: ConceptDetails, where: str
    ) -> bool:
        """Warn when the display is a designation marked deprecated or withdrawn."""
        given = str(coding.display)
        old = [
            d
            for d in details.designations
            if d.status in _NO_LONGER_VALID and _contains([d.value], given)
        ]
        if not old:
            return False
        self.add(
            "warning",
            "invalid",
            "display-comment",
            f"{given!r} is no longer a correct display for {coding.system}#"
            f"{coding.code} (it is {old[0].status}); the display is "
            f"{details.display!r}",
            path(where, "display"),
            "INACTIVE_DISPLAY_FOUND",
        )
        return True

    def _wrong_display(
        self,
        coding: Coding,
        details: ConceptDetails,
        where: str,
        severity: str,
        language: str | None,
    ) -> None:
        expected = (
            pick_display(
                details.display, language, details.designations, self.options.language
            )
            or details.display
        )
        self.add(
            severity,
            "invalid",
            "invalid-display",
            f"wrong display {coding.display!r} for {coding.system}#{coding.code}: "
            f"should be {expected!r}",
            path(where, "display"),
            "Display_Name_for__should_be_one_of__instead_of",
        )

    def _look_up(
        self, coding: Coding, rule: Rule | None, where: str, mode: str, found: _Check
    ) -> None:
        """Report on a code that is not in the value set, as its code system sees it."""
        system = str(coding.system)
        if ":" not in system:
            self.add(
                "error",
                "invalid",
                "invalid-data",
                f"the system {system!r} is not an absolute URI: code systems are named "
                "by canonical URLs",
                path(where, "system"),
                "Terminology_TX_System_Relative",
            )
        wanted = coding.version
        if wanted is None and rule is not None:
            wanted = self.options.versions.effective(system, rule.version)
        cs = self.reads.find_code_system(system, wanted)
        if cs is None:
            self._not_a_code_system(system, wanted, where)
            return
        # What the code system says does not change an outcome that is unknown.
        outcome = found.outcome
        self._status(cs)
        self._in_code_system(coding, cs, where, found, member_check=False)
        if outcome is None:
            found.outcome = None
        if mode == "codeableConcept":
            found.version = coding.version

    def _not_a_code_system(self, system: str, version: str | None, where: str) -> None:
        is_value_set = self.session.scalar(
            sa.select(sa.func.count())
            .select_from(ValueSet)
            .where(ValueSet.url == system)
        )
        if is_value_set:
            self.add(
                "error",
                "invalid",
                "invalid-data",
                f"{system} is a value set, not a code system",
                path(where, "system"),
                "Terminology_TX_System_ValueSet2",
            )
            return
        supplement = concepts.find_supplement(self.session, system)
        if supplement is not None:
            self.add(
                "error",
                "invalid",
                "invalid-data",
                f"{supplement.canonical} is a supplement: codes belong to the code system "
                f"it supplements ({supplement.supplements})",
                path(where, "system"),
                "CODESYSTEM_CS_NO_SUPPLEMENT",
            )
            self.unknown.append(system)
            return
        if version is not None and not self.reads.code_system_versions(system):
            version = None
        self.unknown_system(system, version, where)


def _texts(display: str | None, designations: Sequence[Designation]) -> list[str]:
    return ([display] if display is not None else []) + [d.value for d in designations]


def _contains(texts: Sequence[str], given: str) -> bool:
    # Displays are compared ignoring case, not ignoring spaces (HL7 tx:
    # validation-simple-code-bad-display-ws).
    folded = given.casefold()
    return any(text.casefold() == folded for text in texts)


# --- assembling the answer -------------------------------------------------------------


def _answer(
    validator: _Validator, checks: list[tuple[Coding, str, _Check]], mode: str
) -> Validation:
    scope = validator.scope
    ok: bool | None = False
    for _, _, check in checks:
        if ok is not True and check.outcome is not False:
            ok = check.outcome
    if mode == "codeableConcept" and not scope.internal:
        for coding, where, check in checks:
            if check.outcome is False:
                validator.add(
                    "information",
                    "code-invalid",
                    "this-code-not-in-vs",
                    f"the code {coding.system}#{coding.code} is not in the value set "
                    f"{scope.name}",
                    path(where, "code"),
                    "None_of_the_provided_codes_are_in_the_value_set_one",
                )
    if mode == "codeableConcept" and ok is True:
        _downgrade_unchecked(validator, checks)
    has_errors = any(issue.is_error for issue in validator.issues)
    if ok is False and not (scope.internal and has_errors) and checks:
        summary_at = {"code": "code", "coding": "Coding.code"}.get(mode)
        codes = ", ".join(f"{c.system}#{c.code}" for c, _, _ in checks)
        validator.add(
            "error",
            "code-invalid",
            "not-in-vs",
            f"none of the codes ({codes}) are in the value set {scope.name}",
            summary_at,
            "None_of_the_provided_codes_are_in_the_value_set_one",
        )
    valid = ok is True and not any(issue.is_error for issue in validator.issues)

    matched = next((c for c in checks if c[2].outcome is True), None)
    shown = matched or (checks[0] if checks and mode != "codeableConcept" else None)
    inactive = next((c for c in checks if c[2].inactive), None)
    if inactive is not None:
        coding, where, check = inactive
        validator.add(
            "warning",
            "business-rule",
            "code-comment",
            f"the concept {coding.code!r} is {check.status or 'inactive'}",
            where or "code",
            "INACTIVE_CONCEPT_FOUND",
        )
    else:
        deprecated = next((c for c in checks if c[2].status == "deprecated"), None)
        if deprecated is not None:
            validator.add(
                "warning",
                "business-rule",
                "code-comment",
                f"the concept {deprecated[0].code!r} is deprecated",
                deprecated[1] or "code",
                "DEPRECATED_CONCEPT_FOUND",
            )
    show_inactive = inactive is not None and (
        mode != "codeableConcept" or (matched is not None and inactive[1] == matched[1])
    )
    status = None
    if show_inactive and inactive is not None and inactive[2].status != "inactive":
        status = inactive[2].status
    elif inactive is None and any(c[2].status == "deprecated" for c in checks):
        status = "deprecated"
    texts = sorted(
        {i.text for i in validator.issues if i.severity in ("error", "warning")}
    )
    return Validation(
        result=valid,
        system=shown[2].system if shown else None,
        code=shown[2].code if shown else None,
        display=shown[2].display if shown else None,
        inactive=show_inactive,
        message="; ".join(texts) or None,
        version=shown[2].version if shown else None,
        status=status,
        normalized_code=shown[2].normalized if shown else None,
        issues=tuple(validator.issues),
        unknown_systems=tuple(validator.unknown) if ok is False else (),
        caused_by_unknown_systems=tuple(validator.unknown)
        if ok is not False and not valid
        else (),
    )


def _downgrade_unchecked(
    validator: _Validator, checks: list[tuple[Coding, str, _Check]]
) -> None:
    # One valid coding satisfies a CodeableConcept: a coding of an unknown code system
    # next to it is reported, but as a warning.
    unchecked = {
        path(where, "system") for _, where, check in checks if check.outcome is not True
    }
    validator.issues = [
        Issue("warning", i.code, i.tx_type, i.text, i.expression, i.message_id)
        if i.is_error and i.tx_type == "not-found" and i.expression in unchecked
        else i
        for i in validator.issues
    ]


def _run(
    reads: Reads,
    scope: Scope,
    codings: Sequence[Coding],
    mode: str,
    options: ValidateOptions,
) -> Validation:
    validator = _Validator(reads, scope, options)
    checks = []
    for i, coding in enumerate(codings):
        where = {"code": "", "coding": "Coding"}.get(
            mode, f"CodeableConcept.coding[{i}]"
        )
        checks.append((coding, where, validator.check(coding, where, mode)))
    validator.value_set_status()
    return _answer(validator, checks, mode)


def _supplements(session: Session, references: Sequence[str]) -> None:
    for reference in references:
        require_supplement(session, reference)


def _defaults(
    session: Session, options: ValidateOptions, value_set: ValueSetFacts
) -> ValidateOptions:
    """``options`` with what the value set states for what the request leaves open.

    :raises TerminologyError: when a supplement it names is not loaded.
    """
    if options.language is None and value_set.language is not None:
        options = replace(options, language=value_set.language)
    if value_set.supplements:
        # The request's own supplements were checked before the value set was read.
        _supplements(session, value_set.supplements)
        options = replace(
            options,
            supplements=tuple(
                dict.fromkeys((*options.supplements, *value_set.supplements))
            ),
        )
    return options


def validate_code(
    session: Session,
    url: str,
    *,
    system: str | None,
    code: str,
    display: str | None = None,
    version: str | None = None,
    system_version: str | None = None,
    options: ValidateOptions | None = None,
    cache: bool = True,
) -> Validation:
    """Is ``system|code`` valid in value set ``url|version``? (``ValueSet/$validate-code``)

    The answer is kept in this process and given again to the same call until a load
    changes the membership (as :func:`thodb.expand.expand` keeps expansions).

    :param system: the code's system (``None`` with ``options.infer_system``).
    :param display: a display to check.
    :param version: the value set's version (the newest when ``None``).
    :param system_version: the code system version the code is from.
    :param cache: answer from (and add to) the answers kept for the same arguments;
        the facts kept of value sets and code systems are used either way.
    :raises ValueSetNotFound: when the value set is not loaded.
    :raises ValueSetNotExpandable: when it cannot be evaluated (an import cycle, a bad
        filter, an import that is not loaded).
    :raises TerminologyError: when a requested supplement is not loaded.
    """
    coding = Coding(system, code, system_version, display)
    return validate_coding(
        session, url, coding, version=version, options=options, mode="code", cache=cache
    )


def validate_coding(
    session: Session,
    url: str,
    coding: Coding,
    *,
    version: str | None = None,
    options: ValidateOptions | None = None,
    mode: str = "coding",
    cache: bool = True,
) -> Validation:
    """Validate a ``Coding`` against value set ``url|version``.

    :param mode: ``coding`` (issues name ``Coding.code``...) or ``code`` (issues name
        ``code``, ``system``...).
    :param cache: see :func:`validate_code`.
    :raises ValueSetNotFound: see :func:`validate_code`.
    """
    return validate_concept(
        session, url, [coding], version=version, options=options, mode=mode, cache=cache
    )


def validate_concept(
    session: Session,
    url: str,
    codings: Sequence[Coding],
    *,
    version: str | None = None,
    options: ValidateOptions | None = None,
    mode: str = "codeableConcept",
    cache: bool = True,
) -> Validation:
    """Validate a ``CodeableConcept`` (valid when one of its codings is).

    :param cache: see :func:`validate_code`.
    :raises ValueSetNotFound: see :func:`validate_code`.
    """
    options = options or _NO_OPTIONS
    # The default options by identity: hashing them is most of the time of a lookup.
    key = (
        url,
        version,
        mode,
        tuple(codings),
        None if options is _NO_OPTIONS else options,
    )
    if cache and not options.versions:
        # Kept only in a state where the supplements it asks for were loaded.
        kept = kept_answer(session, key)
        if isinstance(kept, Validation):
            return kept
    _supplements(session, options.supplements)
    # The membership row of a single coding is read with the refresh token.
    first = codings[0] if len(codings) == 1 else Coding(None, None)
    probe = None
    if first.system and first.code and concepts.storable(first.system, first.code):
        probe = (first.system, first.code)
    with version_scope(session, options.versions):
        for _ in range(_READ_ATTEMPTS):
            # Facts kept from earlier calls hold only for the stored membership.
            reads = Reads(session, keep=not options.versions)
            kept = reads.begin(url, version, probe, answer=key if cache else None)
            if isinstance(kept, Validation):
                return kept
            value_set = reads.value_set(url, version)
            scope = reads.scope(value_set)
            answer = _run(
                reads, scope, codings, mode, _defaults(session, options, value_set)
            )
            # Under PostgreSQL's READ COMMITTED each statement sees the latest commit:
            # the answer is of one state when the refresh token did not change.
            if reads.settle(scope):
                if cache:
                    reads.keep_answer(key, answer)
                break
        return answer


# How often to validate again when a load committed meanwhile.
_READ_ATTEMPTS = 5


def validate_in_code_system(
    session: Session,
    codings: Sequence[Coding],
    *,
    url: str | None = None,
    version: str | None = None,
    options: ValidateOptions | None = None,
    mode: str = "code",
) -> Validation:
    """Is the code a code of the code system? (``CodeSystem/$validate-code``)

    :param url: the code system (else the first coding's system).
    :param version: its version (else the first coding's version).
    :raises TerminologyError: when no code system is given.
    """
    options = options or _NO_OPTIONS
    _supplements(session, options.supplements)
    first = codings[0] if codings else Coding(None, None)
    system = url or first.system
    if system is None:
        raise TerminologyError.single(
            "invalid",
            "invalid-data",
            "no code system: give url or a coding with a system",
            status=400,
        )
    wanted = version or first.version
    cs = concepts.find_code_system(session, system, wanted)
    rules = {system: [Rule(None, system, cs.version if cs else wanted)]}
    name = cs.canonical if cs else canonical(system, wanted)
    scope = Scope(session, name, rules, None, cs)
    return _run(Reads(session, keep=False), scope, codings, mode, options)


# --- $lookup ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Lookup:
    """The answer of ``CodeSystem/$lookup``.

    :param properties: (code, value) of each concept property, ``parent`` and
        ``child`` included.
    :param designations: (language, use code, value) of each designation.
    :param property_values: each property with its type, the ``inactive`` property
        always there, then those of the supplements in use.
    :param designation_values: each designation, the code system's own ones first and
        then those of the supplements in use.
    """

    name: str | None
    system: str
    version: str | None
    code: str
    display: str | None
    definition: str | None
    inactive: bool
    abstract: bool
    properties: list[tuple[str, str | None]] = field(default_factory=list)
    designations: list[tuple[str | None, str | None, str]] = field(default_factory=list)
    property_values: list[Property] = field(default_factory=list)
    designation_values: list[Designation] = field(default_factory=list)
    used_supplements: list[str] = field(default_factory=list)
    #: The displays of the parent and child codes named in ``properties``.
    descriptions: dict[str, str] = field(default_factory=dict)
    #: For each designation from a supplement, that supplement's ``url|version``.
    sources: dict[int, str] = field(default_factory=dict)


def lookup(
    session: Session,
    *,
    system: str,
    code: str,
    version: str | None = None,
    supplements: Sequence[str] = (),
) -> Lookup:
    """Look up ``system|code`` in a loaded code system (``CodeSystem/$lookup``).

    :param supplements: ``useSupplement``: supplements whose designations and
        properties are added.
    :raises NotFoundError: when the code system is not loaded or has no such code.
    :raises TerminologyError: when a supplement is not loaded.
    """
    cs = concepts.find_code_system(session, system, version)
    if cs is None:
        raise NotFoundError(f"code system {canonical(system, version)} is not loaded")
    used = [require_supplement(session, reference) for reference in supplements]
    located = concepts.locate(session, cs, code)
    if located is None:
        raise NotFoundError(f"code {code!r} is not in code system {cs.canonical}")
    actual, details = located
    properties = [
        Property("inactive", "boolean", "true" if details.inactive else "false")
    ]
    properties += [p for p in details.properties if p.code != "inactive"]
    listed = {(p.code, p.value) for p in properties}
    properties += [
        Property("parent", "code", parent)
        for parent in details.parents
        if ("parent", parent) not in listed and ("subsumedBy", parent) not in listed
    ]
    properties += [
        Property("child", "code", child)
        for child in details.children
        if ("child", child) not in listed
    ]
    related = sorted({*details.parents, *details.children})
    descriptions = {
        c: d.display
        for c, d in concepts.details(
            session,
            cs.id,
            related,
            designations=False,
            properties=False,
            hierarchy=False,
        ).items()
        if d.display is not None
    }
    designations = list(details.designations)
    if cs.language and details.display is not None:
        # The display is the concept's designation in the code system's language.
        designations.insert(
            0, Designation(details.display, cs.language, *PREFERRED_FOR_LANGUAGE)
        )
    sources: dict[int, str] = {}
    for supplement in used:
        extra = concepts.details(session, supplement.id, [actual], hierarchy=False).get(
            actual
        )
        if extra is None:
            continue
        for designation in extra.designations:
            sources[len(designations)] = supplement.canonical
            designations.append(designation)
        properties += extra.properties
    return Lookup(
        name=cs.name or cs.title,
        system=cs.url,
        version=cs.version,
        code=actual,
        display=details.display,
        definition=details.definition,
        inactive=details.inactive,
        abstract=details.abstract,
        properties=[(p.code, p.value) for p in properties if p.code != "inactive"],
        designations=[(d.language, d.use_code, d.value) for d in details.designations],
        property_values=properties,
        designation_values=designations,
        used_supplements=[s.canonical for s in used],
        descriptions=descriptions,
        sources=sources,
    )
