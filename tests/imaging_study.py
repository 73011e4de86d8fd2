"""A small imaging study for the tests: a CT series, its Segmentation, an SR about it.

The CT slices are built with pydicom, the Segmentation and the Comprehensive SR with
highdicom, and written to a folder beside a text file; FHIR ImagingSelection resources
go beside them. The tests of the imaging store, of the reporting views and of the
documentation's examples all read these objects, and take what they expect from them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from sqlalchemy.engine import Engine

from dicom_objects import (
    ct_series,
    referenced_instances,
)
from thodb.db import schema_prefix

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"
CID = "http://dicom.nema.org/medical/dicom/current/output/chtml/part16/sect_CID_{}.html"
CID_7150 = CID.format(7150)
CID_7151 = CID.format(7151)

# Segment codes. The categories are in CID 7150 (Segmentation Property Categories) and
# Liver in CID 7151 (Segmentation Property Types), 2026b; DCM 129301 Coil Marker is a
# DCM concept that CID 7151 does not hold.
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
PHYSICAL_OBJECT = Code("260787004", "SCT", "Physical object")
LIVER = Code("10200004", "SCT", "Liver")
COIL_MARKER = Code("129301", "DCM", "Coil Marker")
# SR codes, and purposes of reference: 121191 is in image-reference-type, 113076 not.
REPORT_TITLE = Code("126000", "DCM", "Imaging Measurement Report")
FINDING = Code("121071", "DCM", "Finding")
REFERENCED_SEGMENT = Code("121191", "DCM", "Referenced Segment")
SEGMENTATION = Code("113076", "DCM", "Segmentation")
LOCALIZER = Code("121311", "DCM", "Localizer")

#: The FHIR system of each designator the objects use (FHIR's registered URLs).
SYSTEMS = {"DCM": DCM, "SCT": SCT}


@dataclass(frozen=True)
class Study:
    """The objects written to a folder, and the file of each SOP instance."""

    root: Path
    cts: list[Dataset]
    seg: Dataset
    sr: Dataset
    files: dict[str, Path]

    @property
    def datasets(self) -> list[Dataset]:
        """Every DICOM object written."""
        return [*self.cts, self.seg, self.sr]


def _segmentation(cts: list[Dataset]) -> Dataset:
    """A binary Segmentation: segment 1 the liver, segment 2 a coil marker."""
    mask = np.zeros((len(cts), int(cts[0].Rows), int(cts[0].Columns)), dtype=np.uint8)
    mask[0, 2:5, 2:5] = 1
    mask[1, 1:3, 1:3] = 2
    segments = [
        hd.seg.SegmentDescription(
            segment_number=1,
            segment_label="liver",
            segmented_property_category=ANATOMICAL_STRUCTURE,
            segmented_property_type=LIVER,
            algorithm_type="MANUAL",
        ),
        hd.seg.SegmentDescription(
            segment_number=2,
            segment_label="marker",
            segmented_property_category=PHYSICAL_OBJECT,
            segmented_property_type=COIL_MARKER,
            algorithm_type="MANUAL",
        ),
    ]
    return hd.seg.Segmentation(
        source_images=cts,
        pixel_array=mask,
        segmentation_type="BINARY",
        segment_descriptions=segments,
        series_instance_uid=generate_uid(),
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="thodb tests",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="1",
    )


def _structured_report(seg: Dataset) -> Dataset:
    """A Comprehensive SR about the liver, referencing the Segmentation twice."""
    root = hd.sr.ContainerContentItem(name=REPORT_TITLE)
    root.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.CodeContentItem(name=FINDING, value=LIVER, relationship_type="CONTAINS")]
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[seg],
        content=root,
        series_instance_uid=generate_uid(),
        series_number=3,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    # Referenced Instance Sequence (SR Document General Module): one purpose in
    # image-reference-type, one outside it.
    sr.ReferencedInstanceSequence = referenced_instances(
        seg, [REFERENCED_SEGMENT, SEGMENTATION]
    )
    return sr


def build_study(root: Path) -> Study:
    """Write a CT series, its Segmentation, an SR and a text file under ``root``."""
    cts = ct_series(2, 8, LOCALIZER)
    seg = _segmentation(cts)
    sr = _structured_report(seg)
    files: dict[str, Path] = {}
    (root / "ct").mkdir(parents=True)
    for index, ct in enumerate(cts, start=1):
        files[ct.SOPInstanceUID] = root / "ct" / f"ct-{index}.dcm"
    files[seg.SOPInstanceUID] = root / "seg.dcm"
    files[sr.SOPInstanceUID] = root / "sr.dcm"
    for dataset in [*cts, seg, sr]:
        dataset.save_as(files[dataset.SOPInstanceUID], enforce_file_format=True)
    (root / "notes.txt").write_text("not a DICOM file\n", encoding="utf-8")
    return Study(root=root, cts=cts, seg=seg, sr=sr, files=files)


def code_items(dataset: Dataset) -> list[tuple[str, str]]:
    """(designator, code value) of every code item in ``dataset``, found by pydicom."""
    found = []
    for element in dataset.iterall():
        if element.VR != "SQ":
            continue
        for item in element.value:
            if "CodeValue" in item and "CodingSchemeDesignator" in item:
                found.append((str(item.CodingSchemeDesignator), str(item.CodeValue)))
    return found


def purposes_of_reference(dataset: Dataset) -> list[tuple[str, str, str]]:
    """(designator, code value, meaning) of every Purpose of Reference in ``dataset``."""
    return [
        (str(item.CodingSchemeDesignator), str(item.CodeValue), str(item.CodeMeaning))
        for element in dataset.iterall()
        if element.keyword == "PurposeOfReferenceCodeSequence"
        for item in element.value
    ]


def selection_resources() -> dict[str, dict[str, Any]]:
    """ImagingSelection resources (R5): two with purposes in and out of image-ref-type."""

    def selection(rid: str, code: Code, category: Code | None) -> dict[str, Any]:
        resource: dict[str, Any] = {
            "resourceType": "ImagingSelection",
            "id": rid,
            "status": "available",
            "studyUid": "2.25.1",
            "seriesUid": "2.25.2",
            "code": {
                "coding": [
                    {
                        "system": SYSTEMS[code.scheme_designator],
                        "code": code.value,
                        "display": code.meaning,
                    }
                ],
                "text": code.meaning,
            },
        }
        if category is not None:
            resource["category"] = [
                {"coding": [{"system": DCM, "code": category.value}]}
            ]
        return resource

    return {
        "sel-segment": selection("sel-segment", REFERENCED_SEGMENT, REPORT_TITLE),
        "sel-seg": selection("sel-seg", SEGMENTATION, None),
        "sel-localizer": selection("sel-localizer", LOCALIZER, None),
    }


def write_selections(root: Path) -> dict[str, dict[str, Any]]:
    """A Bundle of two selections and a Patient, one selection alone, a manifest."""
    resources = selection_resources()
    root.mkdir(parents=True, exist_ok=True)
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:1", "resource": resources["sel-segment"]},
            {"resource": {"resourceType": "Patient", "id": "p1"}},
            {"resource": resources["sel-seg"]},
        ],
    }
    (root / "bundle.json").write_text(json.dumps(bundle), encoding="utf-8")
    (root / "localizer.json").write_text(
        json.dumps(resources["sel-localizer"]), encoding="utf-8"
    )
    (root / "manifest.json").write_text('{"files": []}', encoding="utf-8")
    return resources


def clear_imaging(engine: Engine) -> None:
    """Remove every imaging row, leaving the database as the seeds made it."""
    p = schema_prefix(engine)
    with engine.begin() as connection:
        connection.exec_driver_sql(f"DELETE FROM {p}imaging_coded_item")
        connection.exec_driver_sql(f"DELETE FROM {p}imaging_selection")
