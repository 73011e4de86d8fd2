"""Reading FHIR terminology resources."""
