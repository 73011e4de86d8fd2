"""Tests for thodb.imaging: coded items read out of real DICOM files.

The files are built here with pydicom (a small CT series) and highdicom (a Segmentation, a
Key Object Selection document and a Comprehensive SR over that series), written to a
temporary folder next to a text file and an empty file, and scanned. The expected items
are the codes this module put into the objects, plus the few that highdicom writes itself,
read from the place highdicom writes them; never from the scanner's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from dicom_objects import (
    code_item,
    ct_series,
    referenced_instances,
)
from thodb.errors import LoadError
from thodb.imaging.scan import CodedItem, ScanResult, iter_coded_items, scan
from thodb.imaging.schemes import SCHEMES, scheme_for, system_for

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"
SRT = "http://snomed.info/srt"

# Codes put into the objects. Category and type of the liver segment are from CID 7150
# and CID 7151 (2026b: SCT 91723000 is the "Anatomical Structure" of CID 7150); the type
# of the second segment is a made-up code that no CID holds.
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
LIVER = Code("10200004", "SCT", "Liver")
ENTIRE = Code("255503000", "SCT", "Entire")
TEST_STRUCTURE = hd.sr.CodedConcept(
    "T0001", "99TEST", "Test structure", scheme_version="1.0"
)
ABDOMEN = Code("818981001", "SCT", "Abdomen")
LEFT = Code("7771000", "SCT", "Left")
ABDOMEN_SRT = Code("T-D4000", "SRT", "Abdomen")
LOCALIZER = Code("121311", "DCM", "Localizer")
OF_INTEREST = Code("113000", "DCM", "Of Interest")
REPORT_TITLE = Code("126000", "DCM", "Imaging Measurement Report")
FINDING = Code("121071", "DCM", "Finding")
SOURCE_OF_MEASUREMENT = Code("121112", "DCM", "Source of Measurement")
FINDING_SITE = Code("363698007", "SCT", "Finding Site")
FINDINGS = Code("121070", "DCM", "Findings")
# Longer than the 16 characters of Code Value, so highdicom writes Long Code Value.
LONG_CODE = hd.sr.CodedConcept("ABCDEFGHIJKLMNOPQRST", "99TEST", "Long test code")
# Purposes of reference: 121191 is in CID 7250 (Multi-Frame Subset Type), 113076 is not.
REFERENCED_SEGMENT = Code("121191", "DCM", "Referenced Segment")
SEGMENTATION = Code("113076", "DCM", "Segmentation")
PRIVATE_CODE = Code("P0001", "99TEST", "Private test code")
URN_VALUE = "urn:oid:2.25.123456789012345678901234567890"


@dataclass(frozen=True)
class Built:
    """The objects written to the scanned folder, and where."""

    root: Path
    cts: list[Dataset]
    seg: Dataset
    kos: Dataset
    sr: Dataset


Key = tuple[str, str, str | None, str, str | None]
"""(SOP Instance UID, attribute path, designator, code value, system) of one item."""


def _ct_series() -> list[Dataset]:
    """A small axial CT series with one anatomic region per slice."""
    slices = ct_series(3, 8, LOCALIZER)
    for ct in slices:
        # A legacy SRT code, in a sequence whose keyword does not end in CodeSequence.
        ct.AnatomicRegionSequence = Sequence([code_item(ABDOMEN_SRT)])
    return slices


def _segmentation(cts: list[Dataset]) -> Dataset:
    """Build a binary Segmentation of ``cts`` with a liver and a test segment."""
    mask = np.zeros((len(cts), int(cts[0].Rows), int(cts[0].Columns)), dtype=np.uint8)
    mask[0:2, 2:5, 2:5] = 1
    mask[2, 1:3, 1:3] = 2
    liver = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="liver",
        segmented_property_category=ANATOMICAL_STRUCTURE,
        segmented_property_type=LIVER,
        algorithm_type="MANUAL",
    )
    other = hd.seg.SegmentDescription(
        segment_number=2,
        segment_label="test structure",
        segmented_property_category=ANATOMICAL_STRUCTURE,
        segmented_property_type=TEST_STRUCTURE,
        algorithm_type="MANUAL",
        anatomic_regions=[ABDOMEN],
    )
    seg = hd.seg.Segmentation(
        source_images=cts,
        pixel_array=mask,
        segmentation_type="BINARY",
        segment_descriptions=[liver, other],
        series_instance_uid=generate_uid(),
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="thodb tests",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="1",
    )
    # highdicom takes no modifiers; add them where PS3.3 C.8.20.4 puts them.
    seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[
        0
    ].SegmentedPropertyTypeModifierCodeSequence = Sequence([code_item(ENTIRE)])
    seg.SegmentSequence[1].AnatomicRegionSequence[
        0
    ].AnatomicRegionModifierSequence = Sequence([code_item(LEFT)])
    return seg


def _key_object_selection(cts: list[Dataset]) -> Dataset:
    """Build a Key Object Selection document flagging the first two slices."""
    return hd.ko.KeyObjectSelectionDocument(
        evidence=cts,
        content=hd.ko.KeyObjectSelection(
            document_title=OF_INTEREST, referenced_objects=cts[:2]
        ),
        series_instance_uid=generate_uid(),
        series_number=3,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )


def _structured_report(seg: Dataset) -> Dataset:
    """Build a Comprehensive SR about the liver segment, referencing the Segmentation."""
    nested = hd.sr.ContainerContentItem(name=FINDINGS, relationship_type="CONTAINS")
    nested.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                name=FINDING_SITE, value=ABDOMEN, relationship_type="CONTAINS"
            ),
            hd.sr.CodeContentItem(
                name=FINDING, value=LONG_CODE, relationship_type="CONTAINS"
            ),
        ]
    )
    root = hd.sr.ContainerContentItem(name=REPORT_TITLE)
    root.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                name=FINDING, value=LIVER, relationship_type="CONTAINS"
            ),
            hd.sr.ImageContentItem(
                name=SOURCE_OF_MEASUREMENT,
                referenced_sop_class_uid=seg.SOPClassUID,
                referenced_sop_instance_uid=seg.SOPInstanceUID,
                referenced_segment_numbers=[1],
                relationship_type="CONTAINS",
            ),
            nested,
            # Its value is replaced by a URN code below.
            hd.sr.CodeContentItem(
                name=FINDING, value=LIVER, relationship_type="CONTAINS"
            ),
        ]
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[seg],
        content=root,
        series_instance_uid=generate_uid(),
        series_number=4,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )

    # Referenced Instance Sequence (SR Document General Module), one purpose in CID 7250
    # and one outside it.
    sr.ReferencedInstanceSequence = referenced_instances(
        seg, [REFERENCED_SEGMENT, SEGMENTATION]
    )

    # A URN Code Value may go without a Coding Scheme Designator (PS3.3 Table 8.8-1).
    urn_item = Dataset()
    urn_item.URNCodeValue = URN_VALUE
    urn_item.CodeMeaning = "URN test code"
    sr.ContentSequence[3].ConceptCodeSequence = Sequence([urn_item])

    # A private sequence holding a code item: the path names it by its tag.
    block = sr.private_block(0x0009, "THODB TEST", create=True)
    block.add_new(0x10, "SQ", Sequence([code_item(PRIVATE_CODE)]))
    return sr


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """A folder holding a CT series, SEG, KOS and SR, a text file and an empty file."""
    root = tmp_path_factory.mktemp("study")
    cts = _ct_series()
    seg = _segmentation(cts)
    kos = _key_object_selection(cts)
    sr = _structured_report(seg)

    (root / "ct").mkdir()
    for index, ct in enumerate(cts, start=1):
        ct.save_as(root / "ct" / f"ct-{index}.dcm", enforce_file_format=True)
    (root / "derived").mkdir()
    seg.save_as(root / "derived" / "seg.dcm", enforce_file_format=True)
    kos.save_as(root / "derived" / "kos.dcm", enforce_file_format=True)
    sr.save_as(root / "derived" / "sr.dcm", enforce_file_format=True)
    (root / "notes.txt").write_text("not a DICOM file\n", encoding="utf-8")
    (root / "empty.dcm").write_bytes(b"")
    return Built(root=root, cts=cts, seg=seg, kos=kos, sr=sr)


def _system(designator: str) -> str | None:
    """The system the test expects for a designator."""
    return {"DCM": DCM, "SCT": SCT, "SRT": SRT}.get(designator)


def _key(sop: str, path: str, code: Code | hd.sr.CodedConcept) -> Key:
    """The expected key of ``code`` at ``path`` in instance ``sop``."""
    designator = code.scheme_designator
    return (sop, path, designator, code.value, _system(designator))


def _written_by_highdicom(dataset: Dataset, path: str) -> Key:
    """The key of a code item highdicom wrote at ``path`` (keyword[index] steps)."""
    item = dataset
    for step in path.split("."):
        keyword, _, index = step.rstrip("]").partition("[")
        item = getattr(item, keyword)[int(index)]
    designator = str(item.CodingSchemeDesignator)
    return (
        str(dataset.SOPInstanceUID),
        path,
        designator,
        str(item.CodeValue),
        _system(designator),
    )


def _contributing_equipment(dataset: Dataset) -> set[Key]:
    """The purposes of the Contributing Equipment items highdicom adds to every object."""
    return {
        _written_by_highdicom(
            dataset,
            f"ContributingEquipmentSequence[{i}].PurposeOfReferenceCodeSequence[0]",
        )
        for i in range(len(dataset.ContributingEquipmentSequence))
    }


def _expected_ct(cts: list[Dataset]) -> set[Key]:
    """The coded items put into the CT slices."""
    expected: set[Key] = set()
    for ct in cts:
        expected.add(_key(ct.SOPInstanceUID, "AnatomicRegionSequence[0]", ABDOMEN_SRT))
    expected.add(
        _key(
            cts[-1].SOPInstanceUID,
            "ReferencedImageSequence[0].PurposeOfReferenceCodeSequence[0]",
            LOCALIZER,
        )
    )
    return expected


def _expected_seg(built: Built) -> set[Key]:
    """The coded items of the Segmentation: its segments, and what highdicom adds."""
    seg = built.seg.SOPInstanceUID
    expected = {
        _key(
            seg,
            "SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0]",
            ANATOMICAL_STRUCTURE,
        ),
        _key(seg, "SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]", LIVER),
        _key(
            seg,
            "SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]"
            ".SegmentedPropertyTypeModifierCodeSequence[0]",
            ENTIRE,
        ),
        _key(
            seg,
            "SegmentSequence[1].SegmentedPropertyCategoryCodeSequence[0]",
            ANATOMICAL_STRUCTURE,
        ),
        _key(
            seg,
            "SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0]",
            TEST_STRUCTURE,
        ),
        _key(seg, "SegmentSequence[1].AnatomicRegionSequence[0]", ABDOMEN),
        _key(
            seg,
            "SegmentSequence[1].AnatomicRegionSequence[0]"
            ".AnatomicRegionModifierSequence[0]",
            LEFT,
        ),
    }
    expected |= _contributing_equipment(built.seg)
    # Each frame says which slice it was derived from, and how (PS3.3 C.7.6.16.2.6).
    for frame in range(int(built.seg.NumberOfFrames)):
        derivation = (
            f"PerFrameFunctionalGroupsSequence[{frame}].DerivationImageSequence[0]"
        )
        expected.add(
            _written_by_highdicom(built.seg, f"{derivation}.DerivationCodeSequence[0]")
        )
        expected.add(
            _written_by_highdicom(
                built.seg,
                f"{derivation}.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0]",
            )
        )
    return expected


def _expected_kos(built: Built) -> set[Key]:
    """The coded items of the Key Object Selection document."""
    kos = built.kos.SOPInstanceUID
    expected = {_key(kos, "ConceptNameCodeSequence[0]", OF_INTEREST)}
    expected |= _contributing_equipment(built.kos)
    # highdicom names each image of a Key Object Selection (TID 2010).
    for index in range(len(built.kos.ContentSequence)):
        expected.add(
            _written_by_highdicom(
                built.kos, f"ContentSequence[{index}].ConceptNameCodeSequence[0]"
            )
        )
    return expected


def _expected_sr(built: Built) -> set[Key]:
    """The coded items of the Comprehensive SR."""
    sr = built.sr.SOPInstanceUID
    expected = {
        _key(sr, "ConceptNameCodeSequence[0]", REPORT_TITLE),
        _key(sr, "ContentSequence[0].ConceptNameCodeSequence[0]", FINDING),
        _key(sr, "ContentSequence[0].ConceptCodeSequence[0]", LIVER),
        _key(sr, "ContentSequence[3].ConceptNameCodeSequence[0]", FINDING),
        (sr, "ContentSequence[3].ConceptCodeSequence[0]", None, URN_VALUE, None),
        _key(
            sr, "ContentSequence[1].ConceptNameCodeSequence[0]", SOURCE_OF_MEASUREMENT
        ),
        _key(sr, "ContentSequence[2].ConceptNameCodeSequence[0]", FINDINGS),
        _key(
            sr,
            "ContentSequence[2].ContentSequence[0].ConceptNameCodeSequence[0]",
            FINDING_SITE,
        ),
        _key(
            sr, "ContentSequence[2].ContentSequence[0].ConceptCodeSequence[0]", ABDOMEN
        ),
        _key(
            sr,
            "ContentSequence[2].ContentSequence[1].ConceptNameCodeSequence[0]",
            FINDING,
        ),
        _key(
            sr,
            "ContentSequence[2].ContentSequence[1].ConceptCodeSequence[0]",
            LONG_CODE,
        ),
        _key(
            sr,
            "ReferencedInstanceSequence[0].PurposeOfReferenceCodeSequence[0]",
            REFERENCED_SEGMENT,
        ),
        _key(
            sr,
            "ReferencedInstanceSequence[1].PurposeOfReferenceCodeSequence[0]",
            SEGMENTATION,
        ),
        _key(sr, "(0009,1010)[0]", PRIVATE_CODE),
    }
    expected |= _contributing_equipment(built.sr)
    return expected


def _expected(built: Built) -> set[Key]:
    """Every coded item the scan should find, from the objects built above."""
    return (
        _expected_ct(built.cts)
        | _expected_seg(built)
        | _expected_kos(built)
        | _expected_sr(built)
    )


def _keys(result: ScanResult) -> list[Key]:
    """The keys of the items found, in scan order."""
    return [
        (
            str(item.sop_instance_uid),
            item.attribute_path,
            item.coding_scheme_designator,
            item.code_value,
            item.system,
        )
        for item in result.items
    ]


def _item(result: ScanResult, sop: str, path: str) -> CodedItem:
    """The one item found at ``path`` in instance ``sop``."""
    (found,) = [
        item
        for item in result.items
        if item.sop_instance_uid == sop and item.attribute_path == path
    ]
    return found


def test_scan_finds_exactly_the_codes_put_into_the_objects(built: Built) -> None:
    result = scan([built.root])

    keys = _keys(result)
    assert len(keys) == len(set(keys)), "an item was reported twice"
    assert set(keys) == _expected(built)
    assert result.coded_items == len(_expected(built))


def test_scan_counts_files_and_skips_the_ones_that_are_not_dicom(built: Built) -> None:
    result = scan([built.root])

    assert result.files_read == 8
    assert result.dicom_files == 6
    assert result.non_dicom_skipped == 2


def test_scan_keeps_the_instance_uids_meaning_and_version(built: Built) -> None:
    result = scan([built.root])
    seg = built.seg

    liver = _item(
        result,
        seg.SOPInstanceUID,
        "SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]",
    )
    assert liver.study_instance_uid == built.cts[0].StudyInstanceUID
    assert liver.series_instance_uid == seg.SeriesInstanceUID
    assert liver.sop_class_uid == seg.SOPClassUID
    assert liver.code_meaning == LIVER.meaning
    assert liver.coding_scheme_version is None

    test_type = _item(
        result,
        seg.SOPInstanceUID,
        "SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0]",
    )
    assert test_type.coding_scheme_version == "1.0"
    assert test_type.system is None


def test_long_code_value_is_reported_as_the_code_value(built: Built) -> None:
    path = "ContentSequence[2].ContentSequence[1].ConceptCodeSequence[0]"
    long_item = built.sr.ContentSequence[2].ContentSequence[1].ConceptCodeSequence[0]
    assert "LongCodeValue" in long_item and "CodeValue" not in long_item

    found = _item(scan([built.root]), built.sr.SOPInstanceUID, path)

    assert found.code_value == LONG_CODE.value


def test_rescan_gives_identical_items_in_the_same_order(built: Built) -> None:
    first = scan([built.root])
    second = scan([built.root])

    assert first == second


def test_a_file_named_twice_is_read_once(built: Built) -> None:
    once = scan([built.root])
    twice = scan([built.root, built.root / "derived" / "sr.dcm"])

    assert twice == once


def test_progress_is_called_once_per_file_in_sorted_order(built: Built) -> None:
    calls: list[tuple[int, Path]] = []

    scan([built.root], progress=lambda done, path: calls.append((done, path)))

    relative = [path.relative_to(built.root).as_posix() for _, path in calls]
    assert [done for done, _ in calls] == list(range(1, 9))
    assert relative == [
        "empty.dcm",
        "notes.txt",
        "ct/ct-1.dcm",
        "ct/ct-2.dcm",
        "ct/ct-3.dcm",
        "derived/kos.dcm",
        "derived/seg.dcm",
        "derived/sr.dcm",
    ]


def test_scan_of_a_missing_path_raises_load_error(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="no such file"):
        scan([tmp_path / "missing"])


def test_iter_coded_items_skips_a_code_value_without_designator() -> None:
    dataset = Dataset()
    item = Dataset()
    item.CodeValue = "123"
    item.CodeMeaning = "no scheme"
    dataset.ConceptNameCodeSequence = Sequence([item])

    assert list(iter_coded_items(dataset)) == []


def test_system_for_maps_the_designators_of_the_dicom_data() -> None:
    assert system_for("DCM") == DCM
    assert system_for("SCT") == SCT
    assert system_for("SRT") == SRT
    assert system_for("LN") == "http://loinc.org"
    assert system_for("UCUM", "1.9") == "http://unitsofmeasure.org"
    assert system_for("NCIt") == "http://ncicb.nci.nih.gov/xml/owl/EVS/Thesaurus.owl"
    assert system_for("BI") == "urn:dicom:coding-scheme:BI"
    assert system_for("PUBCHEM_CID") == "http://pubchem.ncbi.nlm.nih.gov"
    assert system_for("NCIT") is None
    assert system_for("99TEST") is None


def test_schemes_have_unique_designators_and_systems() -> None:
    designators = [scheme.designator for scheme in SCHEMES]
    systems = [scheme.system for scheme in SCHEMES]

    assert len(designators) == len(set(designators))
    assert len(systems) == len(set(systems))
    dcm = scheme_for("DCM")
    assert dcm is not None and dcm.uid == "1.2.840.10008.2.16.4"
