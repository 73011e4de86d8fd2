"""Code system and value set versions: ordering, wildcards and the version rules of a request.

FHIR leaves version strings free-form; most terminologies use dotted numbers
(``1.2.0``, semver). Versions are compared part by part, numbers as numbers and other
parts as text, so that ``1.10.0`` is newer than ``1.9.0``. A version *pattern* may put
``x``, ``X`` or ``*`` in place of a part (``1.x.x``, ``1.0.x``; semver.org wildcards);
``*`` alone matches every version. A plain version such as ``1`` is not a pattern: it
names the version ``1``, which a code system at ``1.0.0`` does not have.

:class:`VersionRules` holds the ``system-version``, ``check-system-version`` and
``force-system-version`` parameters of ``$expand`` and ``$validate-code``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

_WILDCARDS = frozenset({"x", "X", "*"})
_PART = re.compile(r"(\d+)|(\D+)")


def _key(version: str) -> tuple[tuple[int, int | str], ...]:
    parts: list[tuple[int, int | str]] = []
    for piece in re.split(r"[.\-+]", version):
        for number, other in _PART.findall(piece):
            parts.append((1, int(number)) if number else (0, other))
    return tuple(parts)


def newest(versions: Iterable[str | None]) -> str | None:
    """The newest of ``versions``; a missing version (``None``) loses to any other."""
    found = [v for v in versions if v is not None]
    if len(found) < 2:
        return found[0] if found else None  # most code systems: one version loaded
    return max(found, key=_key)


def sort_key(version: str | None) -> tuple[int, tuple[tuple[int, int | str], ...]]:
    """A key that orders versions oldest first, a missing version before all others."""
    return (0, ()) if version is None else (1, _key(version))


def is_pattern(version: str) -> bool:
    """True when ``version`` has a wildcard part (``1.x``, ``1.0.*``) or is ``*``."""
    return any(part in _WILDCARDS for part in version.split("."))


def matches(pattern: str, version: str | None) -> bool:
    """Does ``version`` fall under ``pattern``?

    A pattern without wildcards matches only the same version; ``1.x`` matches
    ``1.0`` and ``1.2.3`` (trailing parts of the version beyond the pattern are free);
    ``*`` matches any version, even a missing one.
    """
    if pattern == "*":
        return True
    if version is None:
        return False
    if not is_pattern(pattern):
        return pattern == version
    wanted = pattern.split(".")
    given = version.split(".")
    if len(given) < len(wanted) and not all(
        p in _WILDCARDS for p in wanted[len(given) :]
    ):
        return False
    return all(p in _WILDCARDS or p == g for p, g in zip(wanted, given, strict=False))


def resolve(
    pattern: str | None, available: Iterable[str | None]
) -> tuple[bool, str | None]:
    """Pick the loaded version that ``pattern`` selects: the newest match.

    :param pattern: a version or pattern; ``None`` selects the newest version.
    :param available: the versions loaded (``None`` for an unversioned resource).
    :return: ``(found, version)``; ``found`` is false when nothing matches.
    """
    candidates = list(available)
    hits = (
        candidates
        if pattern is None
        else [v for v in candidates if matches(pattern, v)]
    )
    return (bool(hits), newest(hits))


def _by_system(canonicals: Iterable[str]) -> dict[str, str]:
    rules: dict[str, str] = {}
    for value in canonicals:
        system, bar, version = value.partition("|")
        if bar and version:
            rules[system] = version
    return rules


@dataclass(frozen=True)
class VersionRules:
    """Which code system versions a request asks for (``$expand`` parameters).

    Each mapping goes from a code system url to a version or version pattern.

    :param default: ``system-version``: the version to use where the value set names
        none.
    :param check: ``check-system-version``: the version the value set must resolve to;
        anything else is an error.
    :param force: ``force-system-version``: the version to use whatever the value set
        says.
    """

    default: Mapping[str, str] = field(default_factory=dict)
    check: Mapping[str, str] = field(default_factory=dict)
    force: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_canonicals(
        cls,
        default: Iterable[str] = (),
        check: Iterable[str] = (),
        force: Iterable[str] = (),
    ) -> VersionRules:
        """Build the rules from ``url|version`` values, as the parameters carry them."""
        return cls(_by_system(default), _by_system(check), _by_system(force))

    def __bool__(self) -> bool:
        return bool(self.default or self.check or self.force)

    def __hash__(self) -> int:
        # By value, as equality is: the options of a request are part of the key of
        # the answers kept for it.
        return hash(
            tuple(
                tuple(sorted(m.items())) for m in (self.default, self.check, self.force)
            )
        )

    def effective(self, system: str, version: str | None) -> str | None:
        """The version pattern to resolve for an include of ``system|version``.

        ``force`` wins over the include's version; where the include names none,
        ``default`` applies, else ``check`` (a value set that does not pin the
        version is expected to take the one the check allows).
        """
        if system in self.force:
            return self.force[system]
        if version is None:
            return self.default.get(system, self.check.get(system))
        return version

    def changes(self, system: str, version: str | None) -> bool:
        """True when these rules resolve ``system|version`` differently than none would."""
        return self.effective(system, version) != version

    def forcing(self, system: str, version: str) -> VersionRules:
        """These rules with ``system`` forced to ``version``."""
        return VersionRules(self.default, self.check, {**self.force, system: version})
