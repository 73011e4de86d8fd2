"""The exceptions thodb raises for problems a user can cause.

Everything a user can get wrong (a bad file, an unknown value set, a database that is not
there) raises a subclass of :class:`ThodbError`. The command line catches that base class
only and prints its message; any other exception is a bug.
"""

from __future__ import annotations


class ThodbError(Exception):
    """Base class of every error a user can cause."""


class LoadError(ThodbError):
    """A resource could not be read or is not valid FHIR terminology content.

    :param source: the file (or ``archive.tgz!member``) the resource came from.
    :param path: the FHIRPath-like element path inside the resource, e.g.
        ``compose.include[2].concept[5].code``; empty when the problem is the whole file.
    :param message: what is wrong, and how to fix it when there is a hint.
    """

    def __init__(self, source: str, path: str, message: str) -> None:
        self.source = source
        self.path = path
        self.message = message
        where = f"{source}: {path}" if path else source
        super().__init__(f"{where}: {message}")

    def __reduce__(self) -> tuple[type[LoadError], tuple[str, str, str]]:
        # As the arguments it was made with: a file read on another core reports
        # its error through pickle.
        return (type(self), (self.source, self.path, self.message))


class NotFoundError(ThodbError):
    """A value set, code system or concept that was asked for is not loaded."""


class NotExpandableError(ThodbError):
    """A value set is loaded but has no expansion (no compose, a cycle, a missing import).

    :param canonical: ``url|version`` of the value set.
    :param reason: why it cannot be expanded, as stored in ``value_set.expansion_error``.
    """

    def __init__(self, canonical: str, reason: str) -> None:
        self.canonical = canonical
        self.reason = reason
        super().__init__(f"{canonical} cannot be expanded: {reason}")


class DatabaseError(ThodbError):
    """The database cannot be reached, or its schema is not at the expected revision."""
