"""Read the coded items out of DICOM files, wherever in the dataset they sit.

A coded item is a sequence item holding the Basic Code Sequence Macro (PS3.3 Table 8.8-1):
a Code Value (0008,0100), Long Code Value (0008,0119) or URN Code Value (0008,0120), the
Coding Scheme Designator (0008,0102) and Coding Scheme Version (0008,0103), and the Code
Meaning (0008,0104). Such items sit in many places: the segment descriptions of a
Segmentation, the content tree of a Structured Report or Key Object Selection document,
the Purpose of Reference Code Sequence of a reference to another instance, the Anatomic
Region Sequence of an image. :func:`iter_coded_items` finds them all by walking every
sequence, and :func:`scan` does that for every DICOM file under a set of paths.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from thodb.errors import LoadError
from thodb.imaging.schemes import system_for

logger = logging.getLogger(__name__)

# In the order they are looked for; PS3.3 Section 8.1 allows only one of them in an item.
_CODE_VALUE_KEYWORDS = ("CodeValue", "LongCodeValue", "URNCodeValue")

Progress = Callable[[int, Path], None]
"""A callback taking the number of files done so far and the file just done."""


@dataclass(frozen=True)
class CodedItem:
    """One code sequence item found in a DICOM file, with the instance it came from.

    :param study_instance_uid: Study Instance UID (0020,000D) of the instance, or
        ``None`` when it has none.
    :param series_instance_uid: Series Instance UID (0020,000E), or ``None``.
    :param sop_instance_uid: SOP Instance UID (0008,0018), taken from the file meta
        information when the dataset lacks it; ``None`` if neither has it.
    :param sop_class_uid: SOP Class UID (0008,0016), with the same fallback.
    :param attribute_path: where the item sits, as DICOM keywords with 0-based item
        indices, e.g. ``SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]``; an
        attribute without a keyword (a private one) is written as its tag, ``(0009,1010)``.
    :param coding_scheme_designator: Coding Scheme Designator (0008,0102); ``None`` only
        for an item with a URN Code Value, which the standard lets go without one.
    :param coding_scheme_version: Coding Scheme Version (0008,0103), or ``None``.
    :param code_value: the Code Value, or the Long Code Value or URN Code Value when the
        item uses one of those instead.
    :param code_meaning: Code Meaning (0008,0104); empty if a non-conformant item lacks it.
    :param system: the FHIR system URL of the coding scheme (see
        :func:`thodb.imaging.schemes.system_for`), or ``None`` when it is not known.
    """

    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str | None
    sop_class_uid: str | None
    attribute_path: str
    coding_scheme_designator: str | None
    coding_scheme_version: str | None
    code_value: str
    code_meaning: str
    system: str | None


@dataclass(frozen=True)
class ScanResult:
    """What :func:`scan` found, with a count per outcome.

    :param items: the coded items of every DICOM file, file by file in scan order and,
        within a file, in dataset order.
    :param files_read: files opened, DICOM or not.
    :param dicom_files: files read as DICOM.
    :param non_dicom_skipped: files skipped because they are not DICOM (no preamble and
        ``DICM`` prefix, too short, empty).
    """

    items: tuple[CodedItem, ...]
    files_read: int
    dicom_files: int
    non_dicom_skipped: int

    @property
    def coded_items(self) -> int:
        """The number of coded items found."""
        return len(self.items)


@dataclass(frozen=True)
class _Instance:
    """The identifiers every coded item of one dataset shares."""

    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str | None
    sop_class_uid: str | None


def iter_coded_items(dataset: Dataset) -> Iterator[CodedItem]:
    """Yield every coded item of a dataset, walking all its sequences recursively.

    An item counts as coded when it holds a Code Value, Long Code Value or URN Code Value
    together with a Coding Scheme Designator (which a URN Code Value may go without), in
    whatever sequence it sits. The keyword of the sequence is not relied on: Anatomic
    Region Sequence (0008,2218) and its modifiers hold coded items but their keywords do
    not end in ``CodeSequence``. Items nested in a coded item (e.g. the
    ``SegmentedPropertyTypeModifierCodeSequence`` inside a
    ``SegmentedPropertyTypeCodeSequence`` item) are found too. Each item is yielded once,
    in dataset order, depth first.

    :param dataset: a dataset as read by :func:`pydicom.dcmread` or built in memory.
    :return: an iterator of :class:`CodedItem`.
    """
    instance = _Instance(
        study_instance_uid=_text(dataset, "StudyInstanceUID"),
        series_instance_uid=_text(dataset, "SeriesInstanceUID"),
        sop_instance_uid=_uid_with_meta_fallback(
            dataset, "SOPInstanceUID", "MediaStorageSOPInstanceUID"
        ),
        sop_class_uid=_uid_with_meta_fallback(
            dataset, "SOPClassUID", "MediaStorageSOPClassUID"
        ),
    )
    yield from _walk(dataset, "", instance)


def scan(
    paths: Iterable[str | os.PathLike[str]], *, progress: Progress | None = None
) -> ScanResult:
    """Read every file under ``paths`` and collect the coded items of the DICOM ones.

    Directories are walked recursively in sorted order, so two scans of the same tree
    give the same items in the same order; a file reached twice (named and inside a named
    directory) is read once. Pixel data is not read. A file that pydicom does not accept
    as DICOM (:class:`pydicom.errors.InvalidDicomError`: empty, too short, no preamble and
    ``DICM`` prefix) is skipped and counted.

    :param paths: files and directories to scan.
    :param progress: called after each file with the number of files done so far and the
        file's path, so that a command can show progress.
    :return: the coded items and the counts.
    :raises LoadError: if a path does not exist.
    """
    items: list[CodedItem] = []
    files_read = 0
    dicom_files = 0
    non_dicom_skipped = 0

    for path in _iter_files(paths):
        files_read += 1
        dataset = _read(path)
        if dataset is None:
            non_dicom_skipped += 1
        else:
            dicom_files += 1
            items.extend(iter_coded_items(dataset))
        if progress is not None:
            progress(files_read, path)

    logger.info(
        "scanned %d files: %d DICOM, %d not DICOM (skipped), %d coded items",
        files_read,
        dicom_files,
        non_dicom_skipped,
        len(items),
    )
    return ScanResult(
        items=tuple(items),
        files_read=files_read,
        dicom_files=dicom_files,
        non_dicom_skipped=non_dicom_skipped,
    )


def _walk(dataset: Dataset, prefix: str, instance: _Instance) -> Iterator[CodedItem]:
    """Yield the coded items of the sequences of ``dataset``, then of their items."""
    for element in dataset:
        if element.VR != "SQ":
            continue
        name = element.keyword or _tag_text(element.tag)
        for index, item in enumerate(element.value):
            path = f"{prefix}{name}[{index}]"
            coded = _coded_item(item, path, instance)
            if coded is not None:
                yield coded
            yield from _walk(item, f"{path}.", instance)


def _coded_item(item: Dataset, path: str, instance: _Instance) -> CodedItem | None:
    """Return the coded item ``item`` holds, or ``None`` if it holds none."""
    found = _code_value(item)
    if found is None:
        return None
    keyword, code_value = found

    designator = _text(item, "CodingSchemeDesignator")
    if designator is None and keyword != "URNCodeValue":
        logger.debug(
            "%s: %s without a Coding Scheme Designator, skipped", path, keyword
        )
        return None
    version = _text(item, "CodingSchemeVersion")

    return CodedItem(
        study_instance_uid=instance.study_instance_uid,
        series_instance_uid=instance.series_instance_uid,
        sop_instance_uid=instance.sop_instance_uid,
        sop_class_uid=instance.sop_class_uid,
        attribute_path=path,
        coding_scheme_designator=designator,
        coding_scheme_version=version,
        code_value=code_value,
        code_meaning=_text(item, "CodeMeaning") or "",
        system=system_for(designator, version) if designator is not None else None,
    )


def _code_value(item: Dataset) -> tuple[str, str] | None:
    """Return the keyword and value of the first non-empty code value attribute."""
    for keyword in _CODE_VALUE_KEYWORDS:
        value = _text(item, keyword)
        if value is not None:
            return keyword, value
    return None


def _text(dataset: Dataset, keyword: str) -> str | None:
    """Return a string attribute as ``str``, or ``None`` when absent or empty.

    A value holding a backslash is split by pydicom into several values; they are joined
    back, since the attributes read here all have a value multiplicity of 1.
    """
    value = dataset.get(keyword)
    if value is None:
        return None
    parts = value if isinstance(value, MultiValue) else [value]
    return "\\".join(str(part) for part in parts) or None


def _uid_with_meta_fallback(
    dataset: Dataset, keyword: str, meta_keyword: str
) -> str | None:
    """Return a UID of the dataset, or its file meta information counterpart."""
    value = _text(dataset, keyword)
    file_meta = getattr(dataset, "file_meta", None)
    if value is None and file_meta is not None:
        value = _text(file_meta, meta_keyword)
    return value


def _tag_text(tag: BaseTag) -> str:
    """Write a tag the way PS3 does, e.g. ``(0009,1010)``."""
    return f"({tag.group:04X},{tag.element:04X})"


def _iter_files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Yield the regular files named by or under ``paths``, each once, sorted per folder."""
    seen: set[Path] = set()
    for given in paths:
        top = Path(given)
        if not top.exists():
            raise LoadError(str(top), "", "no such file or directory; check the path")
        if top.is_dir():
            candidates: Iterator[Path] = _walk_directory(top)
        else:
            candidates = iter((top,))
        for path in candidates:
            key = path.resolve()
            if key in seen:
                continue
            seen.add(key)
            if not path.is_file():
                # Broken symbolic links, sockets and the like: nothing to read.
                logger.debug("%s: not a regular file, ignored", path)
                continue
            yield path


def _walk_directory(top: Path) -> Iterator[Path]:
    """Yield the files under ``top`` depth first, each folder's names in sorted order."""
    for root, dirnames, filenames in os.walk(top):
        # Sorting dirnames in place makes os.walk descend in sorted order as well.
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(root, name)


def _read(path: Path) -> Dataset | None:
    """Read a DICOM file without its pixel data, or return ``None`` if it is not DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=False)
    except InvalidDicomError as error:
        logger.debug("%s: not a DICOM file (%s), skipped", path, error)
        return None
