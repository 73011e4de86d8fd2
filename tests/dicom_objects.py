"""Small DICOM objects built with pydicom for the imaging tests."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.coding import Code
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def code_item(code: Code | hd.sr.CodedConcept) -> Dataset:
    """A code sequence item holding ``code``."""
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def referenced_instances(target: Dataset, purposes: list[Code]) -> Sequence:
    """A Referenced Instance Sequence (SR Document General Module) naming ``target``
    once for each purpose of reference."""
    references = []
    for purpose in purposes:
        reference = Dataset()
        reference.ReferencedSOPClassUID = target.SOPClassUID
        reference.ReferencedSOPInstanceUID = target.SOPInstanceUID
        reference.PurposeOfReferenceCodeSequence = Sequence([code_item(purpose)])
        references.append(reference)
    return Sequence(references)


def name_localizer(slices: list[Dataset], purpose: Code) -> None:
    """Make the last slice name the first in its Referenced Image Sequence."""
    reference = Dataset()
    reference.ReferencedSOPClassUID = slices[0].SOPClassUID
    reference.ReferencedSOPInstanceUID = slices[0].SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = Sequence([code_item(purpose)])
    slices[-1].ReferencedImageSequence = Sequence([reference])


def ct_slice(
    *, study: str, series: str, frame_of_reference: str, uid: str, index: int, size: int
) -> Dataset:
    """One axial CT slice of ``size`` × ``size`` pixels, slice ``index`` of a series."""
    ct = Dataset()
    ct.file_meta = FileMetaDataset()
    ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ct.file_meta.MediaStorageSOPInstanceUID = uid
    ct.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ct.SOPClassUID = CTImageStorage
    ct.SOPInstanceUID = uid
    ct.StudyInstanceUID = study
    ct.SeriesInstanceUID = series
    ct.FrameOfReferenceUID = frame_of_reference
    ct.PatientName = "Test^Patient"
    ct.PatientID = "P1"
    ct.PatientBirthDate = ""
    ct.PatientSex = "O"
    ct.StudyDate = "20260101"
    ct.StudyTime = "120000"
    ct.AccessionNumber = "A1"
    ct.ReferringPhysicianName = ""
    ct.StudyID = "1"
    ct.Modality = "CT"
    ct.SeriesNumber = 1
    ct.InstanceNumber = index + 1
    ct.Manufacturer = "thodb tests"
    ct.PositionReferenceIndicator = ""
    ct.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ct.ImagePositionPatient = [0.0, 0.0, float(index)]
    ct.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ct.PixelSpacing = [1.0, 1.0]
    ct.SliceThickness = 1.0
    ct.KVP = 120
    ct.AcquisitionNumber = 1
    ct.SamplesPerPixel = 1
    ct.PhotometricInterpretation = "MONOCHROME2"
    ct.Rows = size
    ct.Columns = size
    ct.BitsAllocated = 16
    ct.BitsStored = 16
    ct.HighBit = 15
    ct.PixelRepresentation = 1
    ct.RescaleIntercept = 0
    ct.RescaleSlope = 1
    ct.PixelData = np.zeros((size, size), dtype=np.int16).tobytes()
    return ct


def ct_series(count: int, size: int, localizer: Code) -> list[Dataset]:
    """``count`` slices of one new axial CT series; the last names the first as its
    localizer (purpose of reference ``localizer``)."""
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    slices = [
        ct_slice(
            study=study,
            series=series,
            frame_of_reference=frame_of_reference,
            uid=generate_uid(),
            index=index,
            size=size,
        )
        for index in range(count)
    ]
    name_localizer(slices, localizer)
    return slices
