"""The ``url|version`` canonical reference, in one place for keys and messages alike."""

from __future__ import annotations

#: The base of canonical urls given to resources that carry none (THO's own base).
DEFAULT_CANONICAL_BASE = "http://terminology.hl7.org"


def split_canonical(reference: str) -> tuple[str, str | None]:
    """Split a FHIR canonical reference into its url and optional version.

    ``http://x/ValueSet/a|1.0`` gives ``("http://x/ValueSet/a", "1.0")``; a reference
    without ``|`` gives a version of ``None``.
    """
    url, bar, version = reference.partition("|")
    return url, (version if bar and version else None)


def canonical(url: str, version: str | None) -> str:
    """Join a url and an optional version into the ``url|version`` form."""
    return f"{url}|{version}" if version else url
