"""Display languages: reading a language preference and picking displays by it.

A preference comes from the ``displayLanguage`` parameter of ``$expand`` and
``$validate-code`` or from the HTTP ``Accept-Language`` header; both use the header's
syntax (RFC 9110 12.5.4): ``de``, ``en, en-AU; q=0.4``, ``de,*; q=0``. Tags are BCP 47;
a requested ``de`` accepts designations in ``de-CH`` too (the requested tag is a
prefix, RFC 4647 basic filtering). ``*`` stands for any language; ``*; q=0`` says that
no other language is acceptable, so a concept without a display in the requested
language then has none.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: The designation use that marks a display as the preferred one for its language
#: (THO ``hl7TermMaintInfra``).
PREFERRED_FOR_LANGUAGE = (
    "http://terminology.hl7.org/CodeSystem/hl7TermMaintInfra",
    "preferredForLanguage",
)

#: The code system of language tags in the ``designation`` parameter of ``$expand``.
BCP47 = "urn:ietf:bcp:47"


@dataclass(frozen=True)
class LanguagePreference:
    """Requested languages, best first.

    :param tags: language tags with a quality above zero, in order of preference.
    :param others_ok: whether a language not listed is acceptable as a fallback
        (false only when ``*; q=0`` is given).
    :param text: the preference as given, for echoing in the answer.
    """

    tags: tuple[str, ...]
    others_ok: bool = True
    text: str = ""

    @classmethod
    def parse(cls, value: str) -> LanguagePreference:
        """Read an ``Accept-Language``-style value.

        :raises ValueError: when a tag is not a language tag (e.g. ``-``).
        """
        ranked: list[tuple[float, int, str]] = []
        others_ok = True
        for position, item in enumerate(part.strip() for part in value.split(",")):
            if not item:
                continue
            tag, _, params = item.partition(";")
            tag = tag.strip()
            quality = 1.0
            for param in params.split(";"):
                name, _, number = param.strip().partition("=")
                if name.strip() == "q" and number:
                    try:
                        quality = float(number)
                    except ValueError:
                        raise ValueError(
                            f"bad quality {number!r} in {value!r}"
                        ) from None
            if tag == "*":
                others_ok = quality > 0
                continue
            if not _is_tag(tag):
                raise ValueError(f"{tag!r} is not a language tag")
            if quality > 0:
                ranked.append((-quality, position, tag))
        return cls(tuple(tag for _, _, tag in sorted(ranked)), others_ok, value)

    def __bool__(self) -> bool:
        return bool(self.tags) or not self.others_ok

    def accepts(self, language: str | None) -> bool:
        """True when a text in ``language`` is one of the requested languages."""
        return language is not None and any(matches(tag, language) for tag in self.tags)

    def rank(self, language: str | None) -> int | None:
        """Position of the first requested tag ``language`` satisfies (0 is best)."""
        if language is None:
            return None
        for i, tag in enumerate(self.tags):
            if matches(tag, language):
                return i
        return None


def _is_tag(tag: str) -> bool:
    parts = tag.split("-")
    return (
        all(part.isalnum() and 1 <= len(part) <= 8 for part in parts)
        and parts[0].isalpha()
    )


def matches(requested: str, language: str) -> bool:
    """Does a text in ``language`` satisfy the requested tag (``de`` takes ``de-CH``)?"""
    requested, language = requested.lower(), language.lower()
    return language == requested or language.startswith(requested + "-")


@dataclass(frozen=True)
class Designation:
    """A designation of a concept (``CodeSystem.concept.designation``).

    :param value: the text.
    :param language: its BCP 47 language, when known.
    :param use_system: system of the designation's ``use`` coding.
    :param use_code: code of the ``use`` coding.
    :param status: its standards status (``deprecated``, ``withdrawn``), when stated.
    """

    value: str
    language: str | None = None
    use_system: str | None = None
    use_code: str | None = None
    status: str | None = None


def pick_display(
    display: str | None,
    display_language: str | None,
    designations: Sequence[Designation],
    preference: LanguagePreference | None,
) -> str | None:
    """The display to show for a concept under a language preference.

    Without a preference the code system's display is the answer. Otherwise the best
    ranked of the display (in the code system's language) and the designations wins;
    when none is in a requested language, the display is the fallback unless the
    preference excludes other languages (``*; q=0``), in which case there is none.

    :param display: ``concept.display``.
    :param display_language: the language of ``concept.display`` (the code system's
        ``language``), when known.
    """
    if not preference:
        return display
    best: tuple[int, int, str] | None = None
    candidates: list[tuple[str | None, str, int]] = []
    if display is not None:
        candidates.append((display_language, display, 0))
    candidates += [(d.language, d.value, 1) for d in designations]
    for language, value, order in candidates:
        rank = preference.rank(language)
        if rank is not None and (best is None or (rank, order) < best[:2]):
            best = (rank, order, value)
    if best is not None:
        return best[2]
    return display if preference.others_ok else None


def select_designations(
    designations: Iterable[Designation], wanted: Sequence[str]
) -> list[Designation]:
    """The designations that the ``designation`` parameters of ``$expand`` ask for.

    Each wanted value is ``urn:ietf:bcp:47|<language>`` or ``<use system>|<use code>``
    (a bare value is taken as a language); with none, all designations are kept. A
    language here names exactly that language: ``de`` does not take ``de-CH`` (HL7 tx:
    language-echo-en-designations).
    """
    if not wanted:
        return list(designations)
    languages: list[str] = []
    uses: list[tuple[str, str]] = []
    for value in wanted:
        system, bar, code = value.partition("|")
        if not bar:
            languages.append(value)
        elif system == BCP47:
            languages.append(code)
        else:
            uses.append((system, code))
    return [
        d
        for d in designations
        if (
            d.language is not None
            and d.language.lower() in {t.lower() for t in languages}
        )
        or (d.use_system, d.use_code) in uses
    ]
