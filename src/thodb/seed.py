"""The content shipped with thodb: THO's Image Reference Type and all of DICOM's CIDs.

See ``seeds/README.md`` for sources and versions.
"""

from __future__ import annotations

from pathlib import Path

#: The model case: the THO value set that imports DICOM context groups.
IMAGE_REFERENCE_TYPE = "http://terminology.hl7.org/ValueSet/image-reference-type"


def seeds_path() -> Path:
    """The folder of the shipped seed content.

    An installed thodb carries it as the package ``thodb.seeds``; a source checkout has
    it in the top-level ``seeds/`` folder.
    """
    installed = Path(__file__).parent / "seeds"
    if (installed / "README.md").exists():
        return installed
    return Path(__file__).resolve().parents[2] / "seeds"
