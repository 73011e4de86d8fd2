"""Reading a large CodeSystem file without holding all of its JSON in memory.

``json.loads`` of a 60 MB CodeSystem makes about ten times its size in Python objects,
all alive until the last concept is read. A file of :data:`STREAM_BYTES` or more is
read in two passes instead, with the incremental parser ijson:

1. every top-level element except ``concept``, whose array is only walked through;
2. the ``concept`` array, one top-level concept (with the concepts nested in it) at a
   time, while the resource's records are made (:func:`thodb.fhir.resources.parse_resource`).

The second pass starts when the first has read the whole file, so the elements that
decide how concepts are read (``property``, which may come after ``concept``) are
known. Input the incremental parser would read differently from ``json.loads`` is
read whole, as a small file is, so both ways give the same records and the same
content hash: a file that is not one CodeSystem object with one ``concept`` array,
invalid JSON (``json.loads`` then names the line and column), numbers beyond 64 bits,
``NaN``, UTF-16 surrogate escapes (ijson turns a lone one into ``?``) and nesting
deeper than :data:`MAX_STREAMED_DEPTH`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import IO, Any

import ijson

from thodb.errors import LoadError

#: Files of this size or more are read in two passes (see the module's text).
STREAM_BYTES = 16 * 1024 * 1024

#: Deepest nesting of JSON arrays and objects inside ``concept`` that is streamed;
#: ijson's item paths grow with the depth, deeper input is read whole.
MAX_STREAMED_DEPTH = 200

_BOM = b"\xef\xbb\xbf"
_STARTS = frozenset({"start_map", "start_array"})
_ENDS = frozenset({"end_map", "end_array"})
# \uD800-\uDBFF begins a UTF-16 surrogate pair (or is a lone surrogate).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB]")

#: Opens a file (or a package member) for binary reading at its start, as a context.
Opener = Callable[[], AbstractContextManager[IO[bytes]]]


@dataclass(frozen=True)
class ConceptStream:
    """The items of a file's top-level ``concept`` array, read again on each iteration."""

    source: str
    opener: Opener

    def __iter__(self) -> Iterator[Any]:
        try:
            with self.opener() as handle:
                _skip_bom(handle)
                yield from ijson.items(handle, "concept.item", use_float=True)
        except ijson.JSONError as exc:
            # The first pass read the same bytes without an error.
            raise LoadError(
                self.source, "concept", f"the file changed while it was read ({exc})"
            ) from None
        except OSError as exc:
            raise LoadError(self.source, "", f"cannot read: {exc.strerror}") from None


def open_code_system(
    source: str, opener: Opener
) -> tuple[dict[str, Any], ConceptStream] | None:
    """Read a CodeSystem's elements other than ``concept``, and its concepts' stream.

    :param source: the file, or ``package.tgz!package/member.json``, for errors.
    :returns: ``None`` when the file must be read whole (see the module's text).
    :raises LoadError: when the file cannot be read.
    """
    try:
        with opener() as handle:
            _skip_bom(handle)
            scanned = _SurrogateScan(handle)
            top = _top_level(ijson.basic_parse(scanned, use_float=True))
    except ijson.JSONError:
        return None
    except OSError as exc:
        raise LoadError(source, "", f"cannot read: {exc.strerror}") from None
    if top is None or scanned.found or top.get("resourceType") != "CodeSystem":
        return None
    return top, ConceptStream(source, opener)


def _top_level(events: Iterator[tuple[str, Any]]) -> dict[str, Any] | None:
    # The top-level object's members with concept left out, or None when the file is
    # anything but an object holding one concept array within the streamed depth.
    event, _ = next(events)
    if event != "start_map":
        return None
    members: dict[str, Any] = {}
    concept_arrays = 0
    for event, key in events:
        if event == "end_map":
            break
        event, value = next(events)
        if key == "concept" and event == "start_array":
            concept_arrays += 1
            if _skip(events) > MAX_STREAMED_DEPTH:
                return None
        else:
            members[key] = _build(event, value, events)
    for _ in events:  # the parser's own check that nothing follows the object
        pass
    return members if concept_arrays == 1 and "concept" not in members else None


def _skip(events: Iterator[tuple[str, Any]]) -> int:
    """Read past a value whose start was just read; return its deepest nesting."""
    depth = deepest = 1
    for event, _ in events:
        if event in _STARTS:
            depth += 1
            deepest = max(deepest, depth)
        elif event in _ENDS:
            depth -= 1
            if not depth:
                break
    return deepest


def _build(event: str, value: Any, events: Iterator[tuple[str, Any]]) -> Any:
    builder = ijson.ObjectBuilder()
    builder.event(event, value)
    depth = 1 if event in _STARTS else 0
    while depth:
        event, value = next(events)
        builder.event(event, value)
        if event in _STARTS:
            depth += 1
        elif event in _ENDS:
            depth -= 1
    return builder.value


def _skip_bom(handle: IO[bytes]) -> None:
    if handle.read(len(_BOM)) != _BOM:
        handle.seek(0)


class _SurrogateScan:
    """A file's ``read``, noting whether the bytes read hold a surrogate escape."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self._tail = b""
        self.found = False

    def read(self, size: int = -1) -> bytes:
        chunk = self._handle.read(size)
        if not self.found and _SURROGATE_ESCAPE.search(self._tail + chunk):
            self.found = True
        self._tail = chunk[-5:]  # an escape cut at the chunk's end: \uD8 is 4 bytes
        return chunk
