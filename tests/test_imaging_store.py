"""Storing DICOM coded items and FHIR ImagingSelection codings, on both engines.

The DICOM files are built here with pydicom (a small CT series) and highdicom (a
Segmentation of it and a Comprehensive SR about the Segmentation), written to a
temporary folder beside a text file (tests/imaging_study.py), scanned and stored.

Expected rows come from what the tests put into the objects and files; the store is
compared with the scanner's items (the scanner has its own tests) and with the file
each object was written to.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import Engine

import thodb.imaging
from conftest import table_checksums
from imaging_study import (
    DCM,
    SEGMENTATION,
    Study,
    build_study,
    code_items,
    selection_resources,
    write_selections,
)
from thodb import migrate
from thodb.cli import main
from thodb.db import schema_prefix
from thodb.errors import LoadError
from thodb.imaging import store
from thodb.imaging.scan import CodedItem, scan


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
