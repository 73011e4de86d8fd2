"""Run HL7's FHIR terminology ecosystem test suite and compare the responses."""
