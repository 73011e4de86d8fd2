"""DICOM Coding Scheme Designators and the FHIR code system each one stands for.

A DICOM coded item names its code system with a Coding Scheme Designator (0008,0102) such
as ``DCM`` or ``SCT``; FHIR names it with a system URL. This module is the one place that
maps the first to the second.

Where the data comes from:

- designators, Coding Scheme UIDs and names: DICOM PS3.16 release 2026b, Section 8
  "Coding Schemes", Table 8-1;
- system URLs of the external terminologies (SNOMED CT, LOINC, UCUM, ...): the URL FHIR
  registers for them (FHIR "Using Codes in Resources", Named Systems list);
- system URLs of the small schemes hosted by DICOM (BARI, BI, IBSI, NEU, PUBCHEM_CID,
  UNS) and of RADLEX, UMLS and SRT: the URLs written in this project's DICOM terminology
  data (``data/dicom/README.md``, section "System URLs", and its ``CodeSystem-*.json``),
  which was converted from bvdh/dicom-terminology-in-fhir for the same 2026b release. A
  code found in a file must carry the system its code system and value sets were loaded
  under, or it would never match them.

To update for a new DICOM release, compare :data:`SCHEMES` with Table 8-1 of that
release and with the README of the data set loaded for it, and change
:data:`DICOM_RELEASE`.
"""

from __future__ import annotations

from dataclasses import dataclass

DICOM_RELEASE = "2026b"
"""The DICOM release the table below was checked against."""


@dataclass(frozen=True)
class CodingScheme:
    """One row of PS3.16 Table 8-1 with the FHIR system URL for its codes.

    :param designator: the Coding Scheme Designator (0008,0102), case-sensitive
        (``NCIt``, not ``NCIT``).
    :param system: the FHIR ``Coding.system`` URL for codes of this scheme.
    :param uid: the Coding Scheme UID from Table 8-1, or ``None`` when the table gives
        none.
    :param name: the coding scheme's name.
    """

    designator: str
    system: str
    uid: str | None
    name: str


SCHEMES: tuple[CodingScheme, ...] = (
    CodingScheme(
        "DCM",
        "http://dicom.nema.org/resources/ontology/DCM",
        "1.2.840.10008.2.16.4",
        "DICOM Controlled Terminology",
    ),
    CodingScheme(
        "SCT", "http://snomed.info/sct", "2.16.840.1.113883.6.96", "SNOMED CT"
    ),
    # SRT code values are the legacy SNOMED RT identifiers (e.g. T-62000 for the liver),
    # not SNOMED CT concept ids, so they must never be looked up in http://snomed.info/sct.
    # Table 8-1 gives SRT the SNOMED CT UID; http://snomed.info/srt is not a registered
    # FHIR system but the URL the DICOM data source writes for these ids, which keeps them
    # apart from SCT codes.
    CodingScheme(
        "SRT",
        "http://snomed.info/srt",
        "2.16.840.1.113883.6.96",
        "SNOMED CT using SNOMED RT style code values (legacy)",
    ),
    CodingScheme("LN", "http://loinc.org", "2.16.840.1.113883.6.1", "LOINC"),
    CodingScheme(
        "UCUM",
        "http://unitsofmeasure.org",
        "2.16.840.1.113883.6.8",
        "Unified Code for Units of Measure",
    ),
    # Code values are in the 32-bit decimal form (partition * 65536 + term), as in the
    # DICOM data; see its README, "Known gaps".
    CodingScheme(
        "MDC",
        "urn:iso:std:iso:11073:10101",
        "2.16.840.1.113883.6.24",
        "ISO/IEEE 11073 Medical Device Nomenclature",
    ),
    CodingScheme(
        "NCIt",
        "http://ncicb.nci.nih.gov/xml/owl/EVS/Thesaurus.owl",
        "2.16.840.1.113883.3.26.1.1",
        "NCI Thesaurus",
    ),
    CodingScheme(
        "FMA",
        "http://sig.biostr.washington.edu/projects/fm/AboutFM.html",
        "2.16.840.1.113883.6.119",
        "Foundational Model of Anatomy",
    ),
    # FHIR's Named Systems list and the DICOM data both write the www. form.
    CodingScheme(
        "RADLEX", "http://www.radlex.org", "2.16.840.1.113883.6.256", "RadLex"
    ),
    # The URL HL7 Terminology (THO) registers for UMLS CUIs and the one the DICOM data
    # writes beside SNOMED CT codes.
    CodingScheme(
        "UMLS",
        "http://terminology.hl7.org/CodeSystem/umls",
        "2.16.840.1.113883.6.86",
        "Unified Medical Language System",
    ),
    CodingScheme(
        "NEU",
        "http://braininfo.rprc.washington.edu/aboutBrainInfo.aspx#NeuroNames",
        "2.16.840.1.113883.6.210",
        "NeuroNames",
    ),
    CodingScheme(
        "BARI",
        "doi:10.1016/S0735-1097(99)00126-6",
        None,
        "Bypass Angioplasty Revascularization Investigation",
    ),
    CodingScheme(
        "IBSI",
        "http://arxiv.org/abs/1612.07003",
        "1.2.840.10008.2.16.13",
        "Image Biomarker Standardisation Initiative",
    ),
    # No URL is known for UNS and BI; these urn:dicom:coding-scheme: placeholders are the
    # ones the DICOM data uses for their code systems.
    CodingScheme(
        "UNS",
        "urn:dicom:coding-scheme:UNS",
        "1.2.840.10008.2.16.17",
        "Unified numbering system (UNS) for metals and alloys",
    ),
    CodingScheme(
        "BI",
        "urn:dicom:coding-scheme:BI",
        None,
        "ACR Breast Imaging Reporting and Data System (BI-RADS)",
    ),
    CodingScheme(
        "PUBCHEM_CID",
        "http://pubchem.ncbi.nlm.nih.gov",
        "1.2.840.10008.2.16.9",
        "PubChem Compound CID",
    ),
    CodingScheme(
        "I10",
        "http://hl7.org/fhir/sid/icd-10",
        "2.16.840.1.113883.6.3",
        "ICD-10",
    ),
    CodingScheme(
        "RXNORM",
        "http://www.nlm.nih.gov/research/umls/rxnorm",
        "2.16.840.1.113883.6.88",
        "RxNorm",
    ),
    CodingScheme(
        "NDC",
        "http://hl7.org/fhir/sid/ndc",
        "2.16.840.1.113883.6.69",
        "National Drug Code Directory",
    ),
)
"""The coding schemes whose FHIR system is known.

MSH, ITIS_TSN and NCDR are left out on purpose: the URLs the DICOM data writes for them
are not the registered ones (see its README, "Known gaps"), and a guessed URL would file
codes under a system nothing else uses.
"""

_BY_DESIGNATOR: dict[str, CodingScheme] = {
    scheme.designator: scheme for scheme in SCHEMES
}


def scheme_for(designator: str) -> CodingScheme | None:
    """Return the coding scheme a Coding Scheme Designator stands for.

    :param designator: the Coding Scheme Designator (0008,0102), compared exactly
        (designators are case-sensitive in DICOM).
    :return: the scheme, or ``None`` when the designator is not in :data:`SCHEMES`
        (a private ``99...`` scheme, or one this table does not map).
    """
    return _BY_DESIGNATOR.get(designator)


def system_for(designator: str, version: str | None = None) -> str | None:
    """Return the FHIR system URL for codes of a DICOM coding scheme.

    :param designator: the Coding Scheme Designator (0008,0102), compared exactly.
    :param version: the Coding Scheme Version (0008,0103), if the item has one. No scheme
        in this table changes system with its version (FHIR carries the version in
        ``Coding.version``, not in the URL), so it does not change the result; it is
        taken so that callers pass what the item holds and a scheme that does depend on
        it can be added here without changing them.
    :return: the system URL, or ``None`` when the designator is unknown.
    """
    scheme = _BY_DESIGNATOR.get(designator)
    return scheme.system if scheme is not None else None
