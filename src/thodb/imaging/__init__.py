"""Imaging data: the coded items found in DICOM files, and their FHIR code systems."""
