"""A lossy preview stored in the real Orthanc: beside the original, never in its place.

Why it matters: HQ triages from what its Orthanc shows. The preview must land in the same study,
in a series of its own, keep saying it is lossy, and leave the original exactly as it was; and
Orthanc (with the GDCM plugin the appliance loads) must be able to render it.
"""

from __future__ import annotations

import hashlib

from gotg_pacs.sync import preview
from tests.support import corpus


def test_orthanc_files_the_preview_beside_the_original(appliance):
    client = appliance.orthanc
    original = (corpus.DATA_DIR / "MR2_UNCR.dcm").read_bytes()
    made = preview.make_preview(original)
    assert made is not None

    stored = client.post("/instances", data=original)
    derived = client.post("/instances", data=made.payload)
    assert derived["Status"] == "Success"
    assert derived["ID"] != stored["ID"]
    assert derived["ParentStudy"] == stored["ParentStudy"]
    assert derived["ParentSeries"] != stored["ParentSeries"]
    assert sorted(client.get(f"/studies/{stored['ParentStudy']}")["Series"]) == sorted(
        [stored["ParentSeries"], derived["ParentSeries"]])

    tags = client.get(f"/instances/{derived['ID']}/simplified-tags")
    assert tags["SOPInstanceUID"] == made.sop_uid
    assert tags["SeriesInstanceUID"] == made.series_uid
    assert tags["LossyImageCompression"] == "01"
    assert float(tags["LossyImageCompressionRatio"]) <= 7.0
    assert tags["LossyImageCompressionMethod"] == "ISO_15444_1"
    assert tags["ImageType"].startswith("DERIVED\\")
    assert tags["SeriesDescription"].startswith("PREVIEW (lossy, not for diagnosis)")
    [source] = tags["SourceImageSequence"]
    assert source["ReferencedSOPInstanceUID"] == made.source_sop_uid
    series = client.get(f"/series/{derived['ParentSeries']}")
    assert series["MainDicomTags"]["SeriesDescription"].startswith("PREVIEW")

    # Stored byte for byte, and the original untouched beside it.
    for answer, data in ((derived, made.payload), (stored, original)):
        served = client.request("GET", f"/instances/{answer['ID']}/file").content
        assert hashlib.md5(served).hexdigest() == hashlib.md5(data).hexdigest()
    assert client.get(f"/instances/{stored['ID']}/simplified-tags").get(
        "LossyImageCompression") is None

    # Orthanc can decode the lossy JPEG 2000 (what HQ's viewer will ask of it).
    rendered = client.request("GET", f"/instances/{derived['ID']}/preview",
                              headers={"Accept": "image/png"})
    assert rendered.content.startswith(b"\x89PNG")
