"""The ``thodb operation`` command: one FHIR terminology operation, Parameters in and out.

The request is a FHIR ``Parameters`` resource as a terminology server receives it
(every parameter of the operation's OperationDefinition that thodb implements, with
``tx-resource`` and inline ``valueSet`` resources for this request only); the response
is the resource a server returns, printed as JSON on stdout. The work is done by
:mod:`thodb.fhir.operations`; request resources are loaded in a transaction that is
rolled back, so the database is never changed.
"""

from __future__ import annotations

import json
import sys
from typing import IO, TYPE_CHECKING, Any

import click
from sqlalchemy.orm import Session

from thodb.db import WRITE_OPTION

if TYPE_CHECKING:
    from thodb.cli import _State

#: The operations the command runs: the names of their functions in
#: thodb.fhir.operations, which it imports when it runs (the other commands start
#: without it).
_OPERATIONS = {
    "expand": "expand",
    "validate-code": "validate_code",
    "cs-validate-code": "cs_validate_code",
    "lookup": "lookup",
}

# Parameters that carry resources: the request loads them, so it needs a write lock.
_RESOURCE_PARAMETERS = frozenset({"tx-resource", "valueSet", "codeSystem"})


# cli.py imports this module at its end to register the command, so its helpers are
# imported when the command runs: that works whichever module is imported first.
def _state() -> _State:
    from thodb.cli import _state as state

    return state()


def _fail(message: str) -> None:
    from thodb.cli import _fail as fail

    fail(message)


@click.command("operation")
@click.argument("name", type=click.Choice(sorted(_OPERATIONS)))
@click.argument("parameters", type=click.File("rb"), default="-")
@click.option(
    "--accept-language",
    metavar="LANGUAGES",
    help="The Accept-Language header of the request (e.g. 'de, en;q=0.5'): the "
    "display language when the parameters give no displayLanguage.",
)
def operation(name: str, parameters: IO[bytes], accept_language: str | None) -> None:
    """Run operation NAME on a FHIR Parameters resource (a file, or - for stdin).

    NAME is ValueSet/$expand (expand), ValueSet/$validate-code (validate-code),
    CodeSystem/$validate-code (cs-validate-code) or CodeSystem/$lookup (lookup). The
    response (a ValueSet, Parameters or OperationOutcome) is printed on stdout.
    Exit status: 0 success, 1 a validate-code result of false, 2 an error outcome.

    \b
    Example:
      echo '{"resourceType": "Parameters", "parameter": [
        {"name": "url", "valueUri":
         "http://dicom.nema.org/medical/dicom/current/output/chtml/part16/sect_CID_7151.html"},
        {"name": "filter", "valueString": "liver"},
        {"name": "includeDesignations", "valueBoolean": true}]}' |
      thodb operation expand -
    """
    from thodb.fhir import operations as fhir_operations

    request = _read(parameters)
    writes = any(
        isinstance(p, dict) and p.get("name") in _RESOURCE_PARAMETERS
        for p in request.get("parameter") or []
    )
    engine = _state().engine()
    bind = engine.execution_options(**{WRITE_OPTION: True}) if writes else engine
    context = fhir_operations.RequestContext(accept_language=accept_language)
    run = getattr(fhir_operations, _OPERATIONS[name])
    with Session(bind, autobegin=True) as session:
        try:
            status, response = run(session, request, context)
        finally:
            session.rollback()
    click.echo(json.dumps(response, indent=2, ensure_ascii=False))
    if status >= 300:
        sys.exit(2)
    if _result(response) is False:
        sys.exit(1)


def _read(stream: IO[bytes]) -> dict[str, Any]:
    source = getattr(stream, "name", "-")
    source = "stdin" if source in ("-", "<stdin>") else source
    try:
        request = json.loads(stream.read().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        _fail(f"{source}: not a JSON document: {exc}")
        raise AssertionError from exc  # _fail exits
    if not isinstance(request, dict) or request.get("resourceType") != "Parameters":
        _fail(f"{source}: resourceType: expected a FHIR Parameters resource")
    if not isinstance(request.get("parameter", []), list):
        _fail(f"{source}: parameter: must be an array")
    found: dict[str, Any] = request
    return found


def _result(response: dict[str, Any]) -> bool | None:
    for parameter in response.get("parameter") or []:
        if parameter.get("name") == "result":
            value = parameter.get("valueBoolean")
            return value if isinstance(value, bool) else None
    return None
