"""Bad input from the network: refused with a DICOM failure status, nothing else harmed.

Why it matters: a broken modality, a half-written file or a hostile sender must never crash the
archive or touch what it already holds, and header values must never become paths or markup.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage

from tests.support import corpus


def _snapshot(appliance) -> dict[str, str]:
    """Every stored file's MD5, read back through Orthanc."""
    result = {}
    for instance_id in appliance.orthanc.get("/instances"):
        data = appliance.orthanc.request("GET", f"/instances/{instance_id}/file").content
        result[instance_id] = hashlib.md5(data).hexdigest()
    return result


def _send_raw(appliance, path: Path) -> int | None:
    """C-STORE a file's bytes as they are, the way a broken modality would.

    Returns the C-STORE status, or None when the archive gave no response at all (DCMTK inside
    Orthanc drops a dataset it cannot even decode, without a response: the modality sees no
    success and keeps the image).
    """
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes without parsing them
    ae = AE(ae_title="BROKEN_MOD")
    ae.dimse_timeout = 5
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", appliance.settings.dicom_port,
                         ae_title=appliance.settings.pacs_aet)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)  # a path is sent without decoding it
    finally:
        assoc.release()
        _config.STORE_SEND_CHUNKED_DATASET = False
    return status.get("Status")


def _file_meta_then(payload: bytes, path: Path) -> Path:
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.save_as(path, enforce_file_format=True)
    with open(path, "ab") as handle:
        handle.write(payload)
    return path


def _not_acknowledged(status: int | None) -> bool:
    return status is None or status >= 0xA000


def test_undecodable_dataset_is_never_acknowledged_and_harms_nothing(appliance, tmp_path):
    assert appliance.modality.store(corpus.representative()[:3]).ok
    before = _snapshot(appliance)

    garbage = _file_meta_then(b"\x08\x00\x18\x00UI\xff\x7f" + b"\xde\xad" * 500,
                              tmp_path / "garbage.dcm")
    status = _send_raw(appliance, garbage)
    assert _not_acknowledged(status), f"garbage was acknowledged with status 0x{status:04X}"

    truncated = corpus.DATA_DIR / "693_UNCR.dcm"
    cut = _file_meta_then(truncated.read_bytes()[400:5000], tmp_path / "cut.dcm")
    status = _send_raw(appliance, cut)
    assert _not_acknowledged(status), f"a cut stream was acknowledged with status 0x{status:04X}"

    assert appliance.modality.echo().ok, "the archive must still answer after bad input"
    assert _snapshot(appliance) == before
    for instance_id in before:
        assert appliance.orthanc.verify_md5(instance_id)


def test_instance_without_its_identifiers_is_refused(appliance, tmp_path):
    dataset = pydicom.dcmread(corpus.DATA_DIR / "693_UNCR.dcm")
    del dataset.StudyInstanceUID
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    path = tmp_path / "no-study.dcm"
    dataset.save_as(path, enforce_file_format=True)

    status = _send_raw(appliance, path)
    assert status is not None and status >= 0xA000, status  # an explicit DICOM failure status

    # The same file from storescu: the modality is told, in DICOM terms, that it was refused.
    result = appliance.modality.store_raw([path], ["-v"])
    assert not result.ok
    assert "Received Store Response (Refused" in result.output
    assert appliance.instance_count() == 0
    assert appliance.modality.echo().ok


def test_storescu_refuses_a_non_dicom_file_and_the_archive_is_untouched(appliance, tmp_path):
    assert appliance.modality.store(corpus.representative()[:1]).ok
    before = _snapshot(appliance)
    not_dicom = tmp_path / "report.dcm"
    not_dicom.write_bytes(b"%PDF-1.4 this is not DICOM\n" * 200)
    result = appliance.modality.store_raw([not_dicom])
    assert not result.ok
    assert _snapshot(appliance) == before
    assert appliance.modality.echo().ok


def test_hostile_header_values_are_stored_verbatim_and_never_become_paths(appliance, tmp_path):
    dataset = pydicom.dcmread(corpus.DATA_DIR / "693_UNCR.dcm")
    dataset.PatientName = "<script>alert(1)</script>^<img src=x onerror=alert(2)>"
    dataset.PatientID = "../../../../etc/passwd"
    dataset.StudyDescription = "'; DROP TABLE studies; --"
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    path = tmp_path / "hostile.dcm"
    dataset.save_as(path, enforce_file_format=True)

    assert appliance.modality.store([path]).ok
    [instance_id] = appliance.orthanc.find_instance(dataset.SOPInstanceUID)
    tags = appliance.orthanc.get(f"/instances/{instance_id}/simplified-tags")
    assert tags["PatientID"] == "../../../../etc/passwd"
    assert tags["PatientName"].startswith("<script>")
    # Stored under Orthanc's own content-addressed names, never under a header value.
    storage = appliance.settings.orthanc_storage_dir
    names = [p.relative_to(storage).as_posix() for p in storage.rglob("*") if p.is_file()]
    assert names and all(".." not in n and "passwd" not in n and "<" not in n for n in names)
    assert appliance.instance_count() == 1
