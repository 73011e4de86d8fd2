"""Storing DICOM coded items and FHIR ImagingSelection codings, on both engines.

The DICOM files are built here with pydicom (a small CT series) and highdicom (a
Segmentation of it and a Comprehensive SR about the Segmentation), written to a
temporary folder beside a text file, scanned and stored. The functions that build them
are used by tests/test_reporting.py and tests/test_docs_examples.py as well.

Expected rows come from what the tests put into the objects and files; the store is
compared with the scanner's items (the scanner has its own tests) and with the file
each object was written to.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from sqlalchemy.engine import Engine

import thodb.imaging
from conftest import table_checksums
from dicom_objects import (
    ct_slice,
    name_localizer,
    referenced_instances,
)
from thodb import migrate
from thodb.cli import main
from thodb.db import schema_prefix
from thodb.errors import LoadError
from thodb.imaging import store
from thodb.imaging.scan import CodedItem, scan

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


def _ct_series(count: int = 2, size: int = 8) -> list[Dataset]:
    """A small axial CT series; the last slice names the first as its localizer."""
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    slices = []
    for index in range(count):
        ct = ct_slice(
            study=study,
            series=series,
            frame_of_reference=frame_of_reference,
            uid=generate_uid(),
            index=index,
            size=size,
        )
        slices.append(ct)
    name_localizer(slices, LOCALIZER)
    return slices


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
    cts = _ct_series()
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


# --- tests ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """The DICOM files of this module, built once."""
    return build_study(tmp_path_factory.mktemp("study"))


@pytest.fixture
def engine(fresh_engine: Engine) -> Engine:
    """An empty database at the newest schema revision."""
    migrate.upgrade(fresh_engine)
    return fresh_engine


def _rows(engine: Engine) -> list[tuple[Any, ...]]:
    p = schema_prefix(engine)
    with engine.connect() as connection:
        return [
            tuple(row)
            for row in connection.exec_driver_sql(
                "SELECT study_instance_uid, series_instance_uid, sop_instance_uid, "
                "sop_class_uid, attribute_path, coding_scheme_designator, "
                "coding_scheme_version, code_value, code_meaning, system, source "
                f"FROM {p}imaging_coded_item"
            )
        ]


def _item_key(item: CodedItem, source: str | None) -> tuple[Any, ...]:
    return (
        item.study_instance_uid,
        item.series_instance_uid,
        item.sop_instance_uid,
        item.sop_class_uid,
        item.attribute_path,
        item.coding_scheme_designator,
        item.coding_scheme_version,
        item.code_value,
        item.code_meaning,
        item.system,
        source,
    )


def test_scan_and_store_keeps_every_item_with_its_file(
    engine: Engine, study: Study
) -> None:
    summary = store.scan_and_store(engine, [study.root])

    items = scan([study.root]).items
    expected = sorted(
        _item_key(item, str(study.files[str(item.sop_instance_uid)])) for item in items
    )
    assert sorted(_rows(engine)) == expected
    assert (summary.files_read, summary.dicom_files, summary.non_dicom_skipped) == (
        5,
        4,
        1,
    )
    assert summary.coded_items == len(items)
    assert summary.store.added == len(items)

    # What the objects hold, counted by pydicom's own walk, is what was stored.
    stored = sorted((row[5], row[7]) for row in _rows(engine))
    assert stored == sorted(c for ds in study.datasets for c in code_items(ds))
    assert (SEGMENTATION.scheme_designator, SEGMENTATION.value) in stored


def test_rescanning_the_same_files_changes_nothing(
    engine: Engine, study: Study
) -> None:
    first = store.scan_and_store(engine, [study.root])
    before = table_checksums(engine)

    again = store.scan_and_store(
        engine, [study.root, study.files[study.sr.SOPInstanceUID]]
    )

    assert table_checksums(engine) == before
    assert again.store.added == 0
    assert again.store.unchanged == first.store.added


def test_stored_scan_results_are_not_stored_twice(engine: Engine, study: Study) -> None:
    result = scan([study.root])
    first = store.store_coded_items(engine, result.items)
    again = store.scan_and_store(engine, [study.root])

    assert first.added == result.coded_items
    assert again.store.added == 0
    # The rows stay as first stored, without a file.
    assert {row[-1] for row in _rows(engine)} == {None}


def test_an_item_without_sop_instance_uid_is_skipped_and_counted(
    engine: Engine,
) -> None:
    item = CodedItem(
        study_instance_uid=None,
        series_instance_uid=None,
        sop_instance_uid=None,
        sop_class_uid=None,
        attribute_path="ConceptNameCodeSequence[0]",
        coding_scheme_designator="DCM",
        coding_scheme_version=None,
        code_value="121071",
        code_meaning="Finding",
        system=DCM,
    )
    summary = store.store_coded_items(engine, [item], source="x.dcm")

    assert (summary.added, summary.skipped_no_sop_instance_uid) == (0, 1)
    assert _rows(engine) == []


def test_scanning_without_pydicom_names_the_extra_to_install(
    engine: Engine, study: Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes `import pydicom` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "pydicom", None)
    monkeypatch.delitem(sys.modules, "thodb.imaging.scan")
    monkeypatch.delattr(thodb.imaging, "scan")

    with pytest.raises(store.ImagingDependencyError, match=r"thodb\[imaging\]"):
        store.scan_and_store(engine, [study.root])

    result = CliRunner().invoke(
        main, ["--database-url", _url(engine), "imaging", "scan", str(study.root)]
    )
    assert result.exit_code == 2
    assert "pip install 'thodb[imaging]'" in result.stderr
    assert result.stdout == ""


def _url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def test_the_scan_command_reports_counts_on_stderr(
    engine: Engine, study: Study
) -> None:
    args = ["--database-url", _url(engine), "imaging", "scan", str(study.root)]
    result = CliRunner().invoke(main, args)

    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    count = len(scan([study.root]).items)
    assert "(4 DICOM, 1 not DICOM, skipped)" in result.stderr
    assert (
        f"coded items: {count} found, {count} added, 0 already stored" in result.stderr
    )

    again = CliRunner().invoke(main, args)
    assert f"{count} found, 0 added, {count} already stored" in again.stderr


def _selection_rows(engine: Engine) -> set[tuple[Any, ...]]:
    p = schema_prefix(engine)
    with engine.connect() as connection:
        return {
            tuple(row)
            for row in connection.exec_driver_sql(
                "SELECT id, element, status, study_uid, series_uid, system, code, "
                f"display FROM {p}imaging_selection"
            )
        }


def _expected_selection_rows(
    resources: dict[str, dict[str, Any]],
) -> set[tuple[Any, ...]]:
    """The rows the resources built here should give: one per Coding with a code."""
    rows = set()
    for rid, resource in resources.items():
        concepts = [("code", resource["code"])]
        concepts += [
            (f"category[{j}]", c) for j, c in enumerate(resource.get("category", []))
        ]
        for element, concept in concepts:
            for i, coding in enumerate(concept["coding"]):
                rows.add(
                    (rid, f"{element}.coding[{i}]", "available", "2.25.1", "2.25.2")
                    + (coding["system"], coding["code"], coding.get("display"))
                )
    return rows


def test_imaging_selections_load_from_bundles_and_files(
    engine: Engine, tmp_path: Path
) -> None:
    resources = write_selections(tmp_path / "selections")

    summary = store.load_selections(engine, [tmp_path / "selections"])

    assert _selection_rows(engine) == _expected_selection_rows(resources)
    assert (summary.files, summary.skipped_not_fhir, summary.skipped_other_types) == (
        3,
        1,
        1,
    )
    assert (summary.selections, summary.added, summary.codings) == (3, 3, 4)


def test_reloading_selections_changes_only_what_differs(
    engine: Engine, tmp_path: Path
) -> None:
    resources = write_selections(tmp_path)
    store.load_selections(engine, [tmp_path])
    before = table_checksums(engine)

    again = store.load_selections(engine, [tmp_path])
    assert table_checksums(engine) == before
    assert (again.unchanged, again.added, again.replaced) == (3, 0, 0)

    changed = dict(resources["sel-localizer"], status="entered-in-error")
    (tmp_path / "localizer.json").write_text(json.dumps(changed), encoding="utf-8")
    third = store.load_selections(engine, [tmp_path])
    assert (third.unchanged, third.replaced) == (2, 1)
    statuses = {row[0]: row[2] for row in _selection_rows(engine)}
    assert statuses["sel-localizer"] == "entered-in-error"


@pytest.mark.parametrize(
    ("change", "path", "message"),
    [
        (lambda r: r.pop("id"), "id", "needs an id"),
        (lambda r: r["code"].update(coding={"code": "x"}), "code.coding", "an array"),
        (
            lambda r: r.update(category=[{"coding": ["x"]}]),
            "category[0].coding[0]",
            "a Coding",
        ),
    ],
)
def test_a_bad_selection_names_the_element_and_writes_nothing(
    engine: Engine,
    tmp_path: Path,
    change: Any,
    path: str,
    message: str,
) -> None:
    resource = selection_resources()["sel-seg"]
    change(resource)
    (tmp_path / "bad.json").write_text(json.dumps(resource), encoding="utf-8")
    before = table_checksums(engine)

    with pytest.raises(LoadError, match=message) as caught:
        store.load_selections(engine, [tmp_path / "bad.json"])

    assert caught.value.path == path
    assert table_checksums(engine) == before


def test_two_different_selections_with_one_id_are_refused(
    engine: Engine, tmp_path: Path
) -> None:
    resources = selection_resources()
    other = dict(resources["sel-localizer"], id="sel-seg")
    (tmp_path / "a.json").write_text(json.dumps(resources["sel-seg"]), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps(other), encoding="utf-8")

    with pytest.raises(LoadError, match="also in"):
        store.load_selections(engine, [tmp_path])


def test_the_load_selections_command(engine: Engine, tmp_path: Path) -> None:
    write_selections(tmp_path)
    result = CliRunner().invoke(
        main,
        ["--database-url", _url(engine), "imaging", "load-selections", str(tmp_path)],
    )

    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "3 read, 3 added, 0 replaced, 0 unchanged" in result.stderr
    with engine.connect() as connection:
        count = connection.scalar(
            sa.text(f"SELECT COUNT(*) FROM {schema_prefix(engine)}imaging_selection")
        )
    assert count == 4
