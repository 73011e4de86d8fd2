"""thodb: a terminology database for HL7 Terminology (THO) and DICOM."""
