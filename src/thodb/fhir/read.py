"""Finding and parsing FHIR resources in files, folders, Bundles and NPM packages.

Every input ends up as FHIR JSON dicts: JSON is parsed directly, XML through
:mod:`thodb.fhir.xml`. A Bundle yields its entries; an NPM package (``.tgz`` with a
``package/`` folder) yields the CodeSystem and ValueSet resources it carries.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from thodb.errors import LoadError
from thodb.fhir import stream
from thodb.fhir.xml import parse_xml

log = logging.getLogger(__name__)

#: The resource types thodb loads; a Bundle is opened, other types are refused.
TERMINOLOGY_TYPES = frozenset({"CodeSystem", "ValueSet"})

_PACKAGE_SUFFIXES = (".tgz", ".tar.gz")

#: Largest single file or package member read (bytes): larger input is refused.
MAX_FILE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Resource:
    """A resource as read, with where it came from.

    :param source: the file, or ``package.tgz!package/member.json``.
    :param path_prefix: element path of the resource inside its file
        (``entry[3].resource.`` inside a Bundle), for error messages.
    :param concepts: a large CodeSystem's ``concept`` items, read from its file as
        they are needed; ``data`` then holds its other elements.
    """

    source: str
    data: dict[str, Any]
    path_prefix: str = ""
    concepts: stream.ConceptStream | None = None


@dataclass
class ReadCounts:
    """What reading found besides resources: files passed over, by reason."""

    files: int = 0
    skipped_not_fhir: int = 0
    skipped_other_types: int = 0

    def add(self, other: ReadCounts) -> None:
        """Count what ``other`` counted too."""
        self.files += other.files
        self.skipped_not_fhir += other.skipped_not_fhir
        self.skipped_other_types += other.skipped_other_types


def read_paths(
    paths: Sequence[str | Path], counts: ReadCounts | None = None
) -> Iterator[Resource]:
    """Yield every CodeSystem and ValueSet under ``paths``, in a stable order.

    Folders are walked recursively (sorted; ``.json``, ``.xml`` and package files).
    In a folder, a JSON file that is not a FHIR resource (no ``resourceType``, such
    as a ``manifest.json``) is passed over and counted; named on its own it is an
    error. Other resource types are errors, except inside NPM packages, which carry
    many kinds of resources.

    :raises LoadError: for a file that cannot be read or parsed, or a refused type.
    """
    counts = counts if counts is not None else ReadCounts()
    for path, in_folder in files_of(paths):
        yield from read_file(path, counts, in_folder=in_folder)


def files_of(paths: Sequence[str | Path]) -> Iterator[tuple[Path, bool]]:
    """The files :func:`read_paths` reads, in its order, each with whether it was found
    in a folder (rather than named).

    :raises LoadError: for a path that does not exist.
    """
    for given in paths:
        path = Path(given)
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if _wanted(p)):
                yield child, True
        elif path.exists():
            yield path, False
        else:
            raise LoadError(str(path), "", "no such file or folder")


def read_whole(path: Path) -> bool:
    """Whether ``path`` is read in one piece: not a package, not a JSON file large
    enough to be streamed (see :mod:`thodb.fhir.stream`)."""
    name = path.name.lower()
    if name.endswith(_PACKAGE_SUFFIXES):
        return False
    if name.endswith(".xml"):
        return True
    try:
        return path.stat().st_size < stream.STREAM_BYTES
    except OSError:
        return True  # read_file names the error


def _wanted(path: Path) -> bool:
    if any(part.startswith(".") for part in path.parts[-1:]):
        return False
    name = path.name.lower()
    return path.is_file() and (
        name.endswith((".json", ".xml")) or name.endswith(_PACKAGE_SUFFIXES)
    )


def read_file(path: Path, counts: ReadCounts, *, in_folder: bool) -> Iterator[Resource]:
    """The resources of one file (see :func:`read_paths`); ``in_folder``: it was
    found in a folder, so JSON that is not a FHIR resource is passed over."""
    counts.files += 1
    name = path.name.lower()
    source = str(path)
    if name.endswith(_PACKAGE_SUFFIXES):
        yield from _read_package(path, counts)
        return
    xml = name.endswith(".xml")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise LoadError(source, "", f"cannot read: {exc.strerror}") from None
    if size > MAX_FILE_BYTES:
        raise LoadError(source, "", f"file is larger than {MAX_FILE_BYTES} bytes")
    streamed = _streamed(source, size, xml, lambda: path.open("rb"))
    if streamed is not None:
        yield streamed
        return
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LoadError(source, "", f"cannot read: {exc.strerror}") from None
    resource = parse_bytes(data, source, xml=xml)
    if resource is None:
        if not in_folder:
            raise LoadError(
                source, "resourceType", "not a FHIR resource (no resourceType)"
            )
        counts.skipped_not_fhir += 1
        log.info("%s: not a FHIR resource, passed over", source)
        return
    yield from expand_bundle(Resource(source, resource), counts, strict=True)


def _streamed(
    source: str, size: int, xml: bool, opener: stream.Opener
) -> Resource | None:
    """A large JSON CodeSystem whose concepts are read from ``opener`` as they are
    needed (:mod:`thodb.fhir.stream`), or ``None`` when the input is read whole."""
    if xml or size < stream.STREAM_BYTES:
        return None
    found = stream.open_code_system(source, opener)
    return None if found is None else Resource(source, found[0], concepts=found[1])


def parse_bytes(data: bytes, source: str, *, xml: bool) -> dict[str, Any] | None:
    """Parse one file's bytes as FHIR JSON or XML.

    :returns: the resource, or ``None`` for JSON that is not a FHIR resource.
    :raises LoadError: when the content cannot be parsed.
    """
    if xml:
        return parse_xml(data, source)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LoadError(
            source, "", f"not UTF-8 text: {exc.reason} at byte {exc.start}"
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LoadError(
            source,
            "",
            f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
        ) from None
    except RecursionError:
        raise LoadError(source, "", "JSON is nested too deeply") from None
    if not isinstance(value, dict) or "resourceType" not in value:
        return None
    if not isinstance(value["resourceType"], str):
        raise LoadError(source, "resourceType", "must be a string")
    return value


def expand_bundle(
    resource: Resource, counts: ReadCounts, *, strict: bool = True
) -> Iterator[Resource]:
    """Yield the resource, or each resource of a Bundle (recursively).

    :param strict: refuse resource types other than CodeSystem, ValueSet and Bundle;
        otherwise count and pass over them.
    :raises LoadError: for a refused type or a malformed Bundle.
    """
    kind = resource.data.get("resourceType")
    if kind in TERMINOLOGY_TYPES:
        yield resource
        return
    if kind == "Bundle":
        entries = resource.data.get("entry") or []
        if not isinstance(entries, list):
            raise LoadError(
                resource.source, resource.path_prefix + "entry", "must be an array"
            )
        for i, entry in enumerate(entries):
            prefix = f"{resource.path_prefix}entry[{i}].resource."
            inner = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(inner, dict) or not isinstance(
                inner.get("resourceType"), str
            ):
                raise LoadError(
                    resource.source, prefix.rstrip("."), "is not a resource"
                )
            yield from expand_bundle(
                Resource(resource.source, inner, prefix), counts, strict=strict
            )
        return
    if strict:
        raise LoadError(
            resource.source,
            resource.path_prefix + "resourceType",
            f"expected CodeSystem, ValueSet or Bundle, found {kind!r}",
        )
    counts.skipped_other_types += 1


def _read_package(path: Path, counts: ReadCounts) -> Iterator[Resource]:
    # An NPM package: only members under package/ are read, and a member whose name
    # would land outside package/ (absolute, or with ..) is refused outright.
    try:
        archive = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError) as exc:
        raise LoadError(
            str(path),
            "",
            "not a readable package archive: " + " ".join(str(exc).split()),
        ) from None
    with archive:
        members = []
        for member in archive.getmembers():
            name = PurePosixPath(member.name)
            if (
                name.is_absolute()
                or ".." in name.parts
                or (name.parts and name.parts[0] != "package")
            ):
                raise LoadError(
                    f"{path}!{member.name}", "", "member path is outside package/"
                )
            if member.issym() or member.islnk():
                raise LoadError(
                    f"{path}!{member.name}", "", "links are not accepted in a package"
                )
            if member.isfile() and _package_resource(name):
                members.append(member)
        for member in sorted(members, key=lambda m: m.name):
            source = f"{path}!{member.name}"
            if member.size > MAX_FILE_BYTES:
                raise LoadError(
                    source, "", f"member is larger than {MAX_FILE_BYTES} bytes"
                )
            xml = member.name.endswith(".xml")
            counts.files += 1
            opener = functools.partial(_package_member, path, member.name)
            streamed = _streamed(source, member.size, xml, opener)
            if streamed is not None:
                yield streamed
                continue
            handle = archive.extractfile(member)
            if handle is None:
                continue
            resource = parse_bytes(handle.read(), source, xml=xml)
            if resource is None:
                counts.skipped_not_fhir += 1
                continue
            yield from expand_bundle(Resource(source, resource), counts, strict=False)


@contextmanager
def _package_member(path: Path, name: str) -> Iterator[IO[bytes]]:
    # A member of its own archive: the stream of a large CodeSystem reads it again
    # after the reading of the package has moved on.
    with tarfile.open(path, "r:*") as archive:
        handle = archive.extractfile(name)
        if handle is None:
            raise OSError(errno.ENOENT, "no longer in the package")
        with handle:
            yield handle


def _package_resource(name: PurePosixPath) -> bool:
    # package/package.json and package/.index.json describe the package; resources are
    # the other JSON files (examples under package/example/ are left out).
    if name.suffix.lower() != ".json" or name.name in ("package.json", ".index.json"):
        return False
    return len(name.parts) == 2 or (len(name.parts) > 2 and name.parts[1] != "example")
