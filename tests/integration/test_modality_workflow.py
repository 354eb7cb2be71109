"""A modality's whole day against the real archive: echo, store, find, retrieve, worklist.

Why it matters: this is the radiographer's path. If one transfer syntax is refused, one query
misses a study, or a retrieve returns altered pixels, images are lost or misread.
"""

from __future__ import annotations

import pydicom
import pytest

from tests.conftest import free_port, run_pacs
from tests.support import corpus
from tests.support.dcmtk import QueryRefused


def test_echo_answers_on_the_configured_aet(appliance):
    result = appliance.modality.echo()
    assert result.ok, result.output


def test_every_kind_of_image_is_stored_unaltered(appliance):
    files = corpus.representative()
    result = appliance.modality.store(files)
    assert result.ok, result.output
    assert appliance.instance_count() == len(files)
    for source in files:
        original = pydicom.dcmread(source)
        [instance_id] = appliance.orthanc.find_instance(original.SOPInstanceUID)
        # Orthanc re-reads the file and checks the MD5 taken when it was stored.
        assert appliance.orthanc.verify_md5(instance_id), source.name
        stored_bytes = appliance.orthanc.request("GET", f"/instances/{instance_id}/file").content
        stored = pydicom.dcmread(pydicom.filebase.DicomBytesIO(stored_bytes))
        # The original transfer syntax and every data element survive untouched (invariant 3).
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert corpus.content(stored) == corpus.content(original), \
            f"{source.name} changed on its way into the archive"


def test_find_get_and_move_return_what_was_stored(appliance, tmp_path):
    files = corpus.representative()[:4]
    assert appliance.modality.store(files).ok
    headers = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in files}
    study_uids = {str(h.StudyInstanceUID) for h in headers.values()}

    answers = appliance.modality.find({"StudyInstanceUID": "", "PatientID": "",
                                       "NumberOfStudyRelatedInstances": ""}, tmp_path / "find")
    assert {str(a.StudyInstanceUID) for a in answers} == study_uids

    study = headers[files[0]]
    expected = {str(h.SOPInstanceUID) for h in headers.values()
                if h.StudyInstanceUID == study.StudyInstanceUID}

    got = appliance.modality.get(study.StudyInstanceUID, tmp_path / "get")
    assert got.ok, got.output
    retrieved = {str(pydicom.dcmread(p).SOPInstanceUID) for p in (tmp_path / "get").iterdir()}
    assert retrieved == expected

    # C-MOVE needs the destination declared; `pacs modality add` stores it in Orthanc's database.
    receive_port = free_port()
    add = run_pacs("modality", "add", "workstation", "MOVE_DEST", "127.0.0.1", str(receive_port),
                   env_file=appliance.env_file)
    assert add.returncode == 0, add.stderr
    moved = appliance.modality.move(study.StudyInstanceUID, tmp_path / "move", receive_port,
                                    "MOVE_DEST")
    assert moved.ok, moved.output
    moved_uids = {str(pydicom.dcmread(p).SOPInstanceUID) for p in (tmp_path / "move").iterdir()}
    assert moved_uids == expected
    by_uid = {h.SOPInstanceUID: f for f, h in headers.items()}
    for path in (tmp_path / "move").iterdir():
        received = pydicom.dcmread(path)
        assert received.PixelData == pydicom.dcmread(by_uid[received.SOPInstanceUID]).PixelData


def test_move_to_an_undeclared_destination_is_refused(appliance, tmp_path):
    files = corpus.representative()[:1]
    assert appliance.modality.store(files).ok
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    moved = appliance.modality.move(study_uid, tmp_path / "move", free_port(), "NOBODY")
    assert not list((tmp_path / "move").iterdir())
    assert "Failed" in moved.output or not moved.ok


def test_query_and_retrieve_need_a_declared_modality_in_standard_access(appliance_factory,
                                                                        tmp_path):
    appliance = appliance_factory(DICOM_ACCESS="standard")
    files = corpus.representative()[:1]
    assert appliance.modality.store(files).ok, "an undeclared modality must still be able to store"
    with pytest.raises(QueryRefused):
        appliance.modality.find({"StudyInstanceUID": ""}, tmp_path / "denied")
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    assert not appliance.modality.get(study_uid, tmp_path / "get-denied").ok
    assert not list((tmp_path / "get-denied").iterdir())
    with pytest.raises(QueryRefused):  # the worklist holds patient names: declared devices only
        appliance.modality.find_worklist({"PatientName": ""}, tmp_path / "wl-denied")
    appliance.orthanc.put_modality("radiography", appliance.modality.calling_aet, "127.0.0.1",
                                   free_port())
    answers = appliance.modality.find({"StudyInstanceUID": ""}, tmp_path / "allowed")
    assert len(answers) == 1
    assert appliance.modality.find_worklist({"PatientName": ""}, tmp_path / "wl") == []


def test_standard_access_checks_the_called_aet(appliance_factory):
    appliance = appliance_factory(DICOM_ACCESS="standard")
    appliance.modality.called_aet = "SOMEONE_ELSE"
    assert not appliance.modality.echo().ok


def test_worklist_plugin_answers_from_the_worklist_folder(appliance, tmp_path):
    item = pydicom.Dataset()
    item.PatientName = "Worklist^Test"
    item.PatientID = "WL-001"
    item.AccessionNumber = "ACC-WL-1"
    step = pydicom.Dataset()
    step.Modality = "CR"
    step.ScheduledStationAETitle = "DCMTK_MODALITY"
    step.ScheduledProcedureStepStartDate = "20261125"
    item.ScheduledProcedureStepSequence = [step]
    item.file_meta = pydicom.dataset.FileMetaDataset()
    item.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    item.save_as(appliance.settings.worklists_dir / "acc-wl-1.wl", enforce_file_format=False)

    answers = appliance.modality.find_worklist(
        {"PatientName": "", "PatientID": "", "AccessionNumber": "",
         "ScheduledProcedureStepSequence[0].Modality": "CR"}, tmp_path / "wl")
    assert [str(a.AccessionNumber) for a in answers] == ["ACC-WL-1"]


def test_dicomweb_and_gdcm_plugins_serve_stored_studies(appliance):
    files = [corpus.DATA_DIR / "RG3_J2KR.dcm"]
    assert appliance.modality.store(files).ok
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    studies = appliance.orthanc.get("/dicom-web/studies")
    assert [s["0020000D"]["Value"][0] for s in studies] == [uid]
    [instance_id] = appliance.orthanc.find_instance(
        pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
    # Orthanc alone cannot decode JPEG 2000: a PNG preview proves the GDCM plugin is loaded.
    preview = appliance.orthanc.request("GET", f"/instances/{instance_id}/preview")
    assert preview.headers["Content-Type"] == "image/png"
    assert preview.content.startswith(b"\x89PNG")
