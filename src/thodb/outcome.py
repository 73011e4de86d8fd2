"""Issues found while answering a terminology request, and the error that carries them.

An :class:`Issue` is one FHIR ``OperationOutcome.issue``: a severity, an issue type
(``code``: ``not-found``, ``code-invalid``, ``business-rule``...), the kind of
terminology problem from HL7's tx-issue-type code system (``not-in-vs``,
``invalid-code``, ``invalid-display``...), a message and the element it is about
(``Coding.code``). ``$validate-code`` returns its issues inside a successful answer;
an operation that cannot answer at all raises :class:`TerminologyError` with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from thodb.errors import ThodbError

#: The code system of :attr:`Issue.tx_type` (FHIR tooling IG, ``tx-issue-type``).
TX_ISSUE_TYPE = "http://hl7.org/fhir/tools/CodeSystem/tx-issue-type"

#: Severities, most severe first (FHIR ``issue-severity``).
SEVERITIES = ("fatal", "error", "warning", "information")


@dataclass(frozen=True)
class Issue:
    """One issue of an OperationOutcome.

    :param severity: ``error``, ``warning`` or ``information``.
    :param code: the FHIR issue type (``OperationOutcome.issue.code``).
    :param tx_type: the tx-issue-type code, or ``None``.
    :param text: the message (``issue.details.text``).
    :param expression: the element the issue is about, e.g. ``Coding.code``.
    :param message_id: a stable name of the message, e.g. ``Unknown_Code_in_Version``
        (the names HL7's reference server uses). It is not rendered: the
        ``operationoutcome-message-id`` extension carries server-specific names, which
        clients must not depend on.
    """

    severity: str
    code: str
    tx_type: str | None
    text: str
    expression: str | None = None
    message_id: str | None = None

    @property
    def is_error(self) -> bool:
        """True for ``error`` and ``fatal`` issues."""
        return self.severity in ("error", "fatal")

    def to_fhir(self) -> dict[str, Any]:
        """The issue as FHIR JSON (``OperationOutcome.issue``)."""
        issue: dict[str, Any] = {"severity": self.severity}
        issue["code"] = self.code
        details: dict[str, Any] = {}
        if self.tx_type:
            details["coding"] = [{"system": TX_ISSUE_TYPE, "code": self.tx_type}]
        details["text"] = self.text
        issue["details"] = details
        if self.expression:
            issue["location"] = [self.expression]
            issue["expression"] = [self.expression]
        return issue


def outcome(issues: list[Issue]) -> dict[str, Any]:
    """An OperationOutcome resource holding ``issues`` (errors first)."""
    ordered = sorted(issues, key=lambda issue: SEVERITIES.index(issue.severity))
    return {
        "resourceType": "OperationOutcome",
        "issue": [issue.to_fhir() for issue in ordered],
    }


def path(base: str, name: str) -> str:
    """Join an element path and a child name: ``path("Coding", "code")`` is ``Coding.code``."""
    return f"{base}.{name}" if base else name


class TerminologyError(ThodbError):
    """A request that cannot be answered; :attr:`issues` say why.

    :param issues: at least one issue, the first of which is the main reason.
    :param status: the HTTP status a server would answer with (404, 422, 400...).
    """

    def __init__(self, issues: list[Issue], status: int = 422) -> None:
        self.issues = issues
        self.status = status
        super().__init__(issues[0].text)

    @classmethod
    def single(
        cls,
        code: str,
        tx_type: str | None,
        text: str,
        *,
        status: int = 422,
        expression: str | None = None,
        message_id: str | None = None,
    ) -> TerminologyError:
        """An error with one issue of severity ``error``."""
        issue = Issue("error", code, tx_type, text, expression, message_id)
        return cls([issue], status)
