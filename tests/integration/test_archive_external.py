"""`pacs archive --external PATH`: studies on a USB disk as a DICOM File-set, verified.

Why it matters: the disk is what a clinic hands to a referral hospital or carries to HQ when no
network exists. A viewer must open it from its DICOMDIR, every file must be exactly what the
modality sent (the MD5 Orthanc took at ingest), and a full disk, a Ctrl-C, a hostile header or a
disk that already holds something must never leave a DICOMDIR that looks complete but is not.
Everything here runs the real Orthanc, DCMTK's storescu and the real `pacs` command line.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.fileset import FileSet, is_conformant_file_id

from gotg_pacs import archive
from tests.conftest import run_pacs
from tests.support import corpus
from tests.support.disk import tmpfs

CT, MR, CR = "693_UNCR.dcm", "MR2_UNCR.dcm", "RG3_J2KR.dcm"
BIG_CR = "RG1_UNCR.dcm"  # 7.2 MB


def _files(*names: str) -> list[Path]:
    return [corpus.DATA_DIR / name for name in names]


def _pacs_archive(appliance, target: Path, *args: str, as_json: bool = True):
    argv = ["archive", "--external", str(target), *args] + (["--json"] if as_json else [])
    return run_pacs(*argv, env_file=appliance.env_file, timeout=300)


def _orthanc_instances(appliance) -> dict[str, dict]:
    """SOP Instance UID -> Orthanc ID and the MD5 Orthanc recorded at ingest."""
    found = {}
    for instance_id in appliance.orthanc.get("/instances"):
        tags = appliance.orthanc.get(f"/instances/{instance_id}")["MainDicomTags"]
        md5 = appliance.orthanc.request(
            "GET", f"/instances/{instance_id}/attachments/dicom/md5").text.strip()
        found[tags["SOPInstanceUID"]] = {"id": instance_id, "md5": md5}
    return found


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    """Every file under root (relative path -> MD5)."""
    return {p.relative_to(root).as_posix(): _md5(p) for p in sorted(root.rglob("*"))
            if p.is_file()}


def _dicomdir(root: Path) -> dict[str, str]:
    """SOP Instance UID -> File ID, read by pydicom's FileSet (orphan records are an error)."""
    file_set = FileSet()
    file_set.load(root / "DICOMDIR", include_orphans=False, raise_orphans=True)
    return {str(i.SOPInstanceUID): Path(i.path).relative_to(root).as_posix() for i in file_set}


def _manifest_instances(root: Path) -> dict[str, dict]:
    manifest = json.loads((root / "GOTG_MANIFEST.json").read_text(encoding="utf-8"))
    return {instance["sop_instance_uid"]: instance for study in manifest["studies"]
            for series in study["series"] for instance in series["instances"]}


# --- the normal case -----------------------------------------------------------------------------


def test_export_is_a_dicomdir_file_set_byte_identical_to_orthanc(appliance, tmp_path):
    assert appliance.modality.store(corpus.representative()).ok
    held = _orthanc_instances(appliance)
    usb = tmp_path / "usb"
    usb.mkdir()

    result = _pacs_archive(appliance, usb)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["export"] == "EX000001"
    assert report["instances_written"] == report["instances_verified"] == len(held)
    assert report["instances_already_there"] == 0
    assert report["studies"] == len(appliance.orthanc.get("/studies"))

    # A standard File-set: pydicom's reader follows the record offsets to every instance.
    referenced = _dicomdir(usb)
    assert set(referenced) == set(held)
    for file_id in referenced.values():
        assert is_conformant_file_id(Path(file_id)), file_id
    # DCMTK reads it too (a second, independent DICOM parser).
    dump = subprocess.run(["dcmdump", "-q", str(usb / "DICOMDIR")], capture_output=True,
                          text=True)
    assert dump.returncode == 0 and dump.stdout.count("ReferencedSOPInstanceUIDInFile") == len(
        held)

    # Each file is exactly the original Orthanc holds, and the manifest says so.
    listed = _manifest_instances(usb)
    assert set(listed) == set(held)
    for sop_uid, file_id in referenced.items():
        on_disk = _md5(usb / file_id)
        original = hashlib.md5(appliance.orthanc.request(
            "GET", f"/instances/{held[sop_uid]['id']}/file").content).hexdigest()
        assert on_disk == original == held[sop_uid]["md5"] == listed[sop_uid]["md5"]
        assert listed[sop_uid]["path"] == file_id
        assert listed[sop_uid]["size"] == (usb / file_id).stat().st_size
        dataset = pydicom.dcmread(usb / file_id, stop_before_pixels=True)
        assert listed[sop_uid]["transfer_syntax_uid"] == dataset.file_meta.TransferSyntaxUID

    manifest = json.loads((usb / "GOTG_MANIFEST.json").read_text())
    assert manifest["site"] == {"code": "test-site", "name": "Test clinic", "aet": "GOTG_PACS"}
    [made] = manifest["exports"]
    assert made["id"] == "EX000001" and made["instances"] == len(held)
    assert made["site_code"] == "test-site" and made["finished"].endswith("Z")
    # Nothing else on the disk: no temporary names left behind.
    assert sorted(p.name for p in usb.iterdir()) == ["DICOMDIR", "EX000001",
                                                     "GOTG_MANIFEST.json"]
    # Nothing was taken out of the archive.
    assert set(_orthanc_instances(appliance)) == set(held)


def test_second_export_adds_only_what_is_new_and_never_touches_the_first(appliance, tmp_path):
    usb = tmp_path / "usb"
    usb.mkdir()
    assert appliance.modality.store(_files(CT, MR)).ok
    first = _pacs_archive(appliance, usb, as_json=False)
    assert first.returncode == 0, first.stderr
    assert "copying 2/2 instances" in first.stderr and "verifying 2/2" in first.stderr
    assert "copied 2 instances" in first.stdout
    before = _tree(usb / "EX000001")
    inodes = {p: p.stat().st_ino for p in (usb / "EX000001").rglob("*") if p.is_file()}

    assert appliance.modality.store(corpus.renumbered_study(_files(CR, CT), tmp_path / "new")).ok
    second = json.loads(_pacs_archive(appliance, usb).stdout)
    assert second["ok"] and second["export"] == "EX000002"
    assert second["instances_written"] == 2 and second["instances_already_there"] == 2

    assert _tree(usb / "EX000001") == before  # same bytes, same files (not rewritten)
    assert {p: p.stat().st_ino for p in inodes} == inodes
    referenced = _dicomdir(usb)
    assert set(referenced) == set(_orthanc_instances(appliance)) == set(_manifest_instances(usb))
    assert sorted({path.split("/")[0] for path in referenced.values()}) == ["EX000001",
                                                                            "EX000002"]
    manifest = json.loads((usb / "GOTG_MANIFEST.json").read_text())
    assert [item["id"] for item in manifest["exports"]] == ["EX000001", "EX000002"]

    dicomdir = _md5(usb / "DICOMDIR")
    third = _pacs_archive(appliance, usb, as_json=False)
    assert third.returncode == 0 and "nothing to copy: all 4 instances" in third.stdout
    assert _md5(usb / "DICOMDIR") == dicomdir

    checked = json.loads(_pacs_archive(appliance, usb, "--verify").stdout)
    assert checked["ok"] and checked["instances"] == 4 and checked["problems"] == []


def test_study_selection_and_a_study_not_in_the_archive(appliance, tmp_path):
    assert appliance.modality.store(_files(CT, MR, CR)).ok
    wanted = pydicom.dcmread(corpus.DATA_DIR / MR, stop_before_pixels=True)
    usb = tmp_path / "usb"
    usb.mkdir()

    missing = _pacs_archive(appliance, usb, "--study", wanted.StudyInstanceUID,
                            "--study", "1.2.3.4.5.6.7.8.9")
    assert missing.returncode == 1
    assert json.loads(missing.stdout)["ok"] is False
    assert "not in this archive: 1.2.3.4.5.6.7.8.9" in missing.stderr
    assert list(usb.iterdir()) == []

    one = json.loads(_pacs_archive(appliance, usb, "--study", wanted.StudyInstanceUID).stdout)
    assert one["ok"] and one["studies"] == 1
    assert set(_dicomdir(usb)) == {wanted.SOPInstanceUID}

    later = _pacs_archive(appliance, usb, "--since", "2999-01-01")
    assert later.returncode == 1 and "no studies to export received since" in later.stderr
    today = json.loads(_pacs_archive(appliance, usb, "--since", "2000-01-01").stdout)
    assert today["ok"] and len(_dicomdir(usb)) == 3


# --- hostile input -------------------------------------------------------------------------------


def test_hostile_and_missing_header_values_stay_data(appliance, tmp_path):
    hostile = corpus.renumbered_study(_files(CT, MR), tmp_path / "hostile",
                          PatientID="../../../../../tmp/evil<script>",
                          PatientName="<img src=x onerror=alert(1)>^../..",
                          StudyDescription="\x1b[2J\x1b[31mred/../../x",
                          StudyID="..")
    nameless = [*corpus.renumbered_study(_files(CT), tmp_path / "noid-a", PatientID="",
                                         PatientName=""),
                *corpus.renumbered_study(_files(CT), tmp_path / "noid-b", PatientID="",
                                         PatientName="")]
    assert appliance.modality.store(hostile + nameless).ok
    usb = tmp_path / "box" / "usb"
    usb.mkdir(parents=True)
    outside = sorted(p for p in tmp_path.rglob("*") if usb not in p.parents and p != usb)

    result = _pacs_archive(appliance, usb, as_json=False)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout + result.stderr

    # Every path on the disk is ours: 8-character components, inside the target.
    for path in usb.rglob("*"):
        relative = path.relative_to(usb)
        assert path.resolve().is_relative_to(usb.resolve())
        if relative.parts[0] not in ("DICOMDIR", "GOTG_MANIFEST.json"):
            assert is_conformant_file_id(relative), relative
    after = sorted(p for p in tmp_path.rglob("*") if usb not in p.parents and p != usb
                   and "site" not in p.relative_to(tmp_path).parts[:1])
    assert [p for p in after if p not in outside] == []
    assert not Path("/tmp/evil<script>").exists()

    # The values travel as data, unchanged, in the DICOMDIR and the manifest.
    manifest = json.loads((usb / "GOTG_MANIFEST.json").read_text(encoding="utf-8"))
    ids = sorted(study["patient_id"] for study in manifest["studies"])
    assert "../../../../../tmp/evil<script>" in ids
    directory = pydicom.dcmread(usb / "DICOMDIR")
    patients = [r for r in directory.DirectoryRecordSequence
                if r.DirectoryRecordType == "PATIENT"]
    recorded = sorted(str(r.PatientID) for r in patients)
    assert "../../../../../tmp/evil<script>" in recorded
    # Two unidentified patients get two distinct stand-in IDs: never filed as one patient.
    stand_ins = [pid for pid in recorded if pid.startswith("NOID-")]
    assert len(stand_ins) == 2 and len(set(stand_ins)) == 2
    assert set(_dicomdir(usb)) == set(_orthanc_instances(appliance))


# --- disks that are full, wrong or already used --------------------------------------------------


def test_bad_targets_are_refused_with_a_clear_message(appliance, tmp_path):
    assert appliance.modality.store(_files(CT)).ok
    missing = _pacs_archive(appliance, tmp_path / "not-mounted")
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    assert not (tmp_path / "not-mounted").exists()
    inside = _pacs_archive(appliance, appliance.settings.storage_path)
    assert inside.returncode == 1 and "the archive's own storage" in inside.stderr
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert "is not a folder" in _pacs_archive(appliance, a_file).stderr
    with tmpfs(tmp_path / "ro", "1m", "ro") as read_only:
        refused = _pacs_archive(appliance, read_only)
        assert refused.returncode == 1 and "not writable" in refused.stderr

    # A DICOMDIR some other system wrote is never rewritten.
    foreign = tmp_path / "foreign"
    (foreign / "IMAGES").mkdir(parents=True)
    (foreign / "IMAGES" / "IM1").write_bytes((corpus.DATA_DIR / CT).read_bytes())
    made = subprocess.run(["dcmmkdir", "-q", "+I", "+id", str(foreign), "+D",
                           str(foreign / "DICOMDIR"), "IMAGES/IM1"], capture_output=True)
    assert made.returncode == 0, made.stderr
    before = _tree(foreign)
    refused = _pacs_archive(appliance, foreign)
    assert refused.returncode == 1 and "did not make" in refused.stderr
    assert json.loads(refused.stdout)["ok"] is False
    assert _tree(foreign) == before


def test_not_enough_space_is_found_before_writing_anything(appliance, tmp_path):
    assert appliance.modality.store(_files(MR, BIG_CR)).ok  # 9.3 MB
    with tmpfs(tmp_path / "usb", "4m") as usb:
        result = _pacs_archive(appliance, usb)
        assert result.returncode == 1
        assert "not enough space" in result.stderr and "nothing was written" in result.stderr
        report = json.loads(result.stdout)
        assert report["ok"] is False and "MB free" in report["error"]
        assert list(usb.iterdir()) == []


def test_disk_filling_up_mid_copy_leaves_the_previous_file_set_whole(appliance, tmp_path,
                                                                    monkeypatch):
    """The free-space check is made to pass so the copy really runs into a full tmpfs."""
    assert appliance.modality.store(_files(CT)).ok
    with tmpfs(tmp_path / "usb", "6m") as usb:
        first = archive.export(appliance.settings, usb)
        assert first["ok"]
        before = _tree(usb)

        assert appliance.modality.store(_files(MR, BIG_CR)).ok  # 9.3 MB: cannot fit
        monkeypatch.setattr(archive, "free_bytes", lambda root: (1 << 40, 4096))
        with pytest.raises(archive.ArchiveError, match="the disk filled up"):
            archive.export(appliance.settings, usb)

        assert _tree(usb) == before  # no partial folder, no temporary DICOMDIR or manifest
        assert archive.verify_only(usb)["ok"]
        used = os.statvfs(usb)
        assert (used.f_blocks - used.f_bfree) * used.f_frsize < 2 << 20  # the space came back


def test_interruptions_before_the_commit_leave_the_previous_file_set_whole(appliance,
                                                                           tmp_path,
                                                                           monkeypatch):
    assert appliance.modality.store(_files(CT)).ok
    usb = tmp_path / "usb"
    usb.mkdir()
    assert archive.export(appliance.settings, usb)["ok"]
    before = _tree(usb)
    assert appliance.modality.store(_files(MR)).ok

    # Ctrl-C once every file is copied, while the DICOMDIR is being made.
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(archive, "encode_dicomdir", interrupted)
        with pytest.raises(KeyboardInterrupt):
            archive.export(appliance.settings, usb)
    assert _tree(usb) == before

    # A crash between putting the manifest in place and the DICOMDIR (the commit).
    real_replace = os.replace

    def crash_at_commit(source, destination):
        if Path(destination).name == "DICOMDIR":
            raise OSError(5, "Input/output error")
        real_replace(source, destination)

    with monkeypatch.context() as patch:
        patch.setattr(archive.os, "replace", crash_at_commit)
        with pytest.raises(archive.ArchiveError, match="nothing was put in place"):
            archive.export(appliance.settings, usb)
    assert _md5(usb / "DICOMDIR") == before["DICOMDIR"]
    checked = archive.verify_only(usb)  # the old DICOMDIR still verifies; the manifest's
    assert checked["ok"] and checked["instances"] == 1  # extra entries are recognised
    assert any("never finished" in note for note in checked["notes"])

    # A run killed outright leaves a folder the DICOMDIR does not reference: reported, kept.
    (usb / "EX000007.partial" / "ST000001").mkdir(parents=True)
    report = archive.export(appliance.settings, usb)
    assert report["ok"] and report["instances_written"] == 1
    assert report["leftovers"] == ["EX000007.partial"]
    assert report["export"] == "EX000008"
    assert set(_dicomdir(usb)) == set(_orthanc_instances(appliance))
    assert archive.verify_only(usb)["ok"]


def test_a_damaged_original_in_orthanc_is_never_copied_as_good(appliance_factory, tmp_path):
    appliance = appliance_factory()
    assert appliance.modality.store(_files(CT, MR)).ok
    [instance_id] = appliance.orthanc.find_instance(
        pydicom.dcmread(corpus.DATA_DIR / MR, stop_before_pixels=True).SOPInstanceUID)
    uuid_ = appliance.orthanc.get(f"/instances/{instance_id}")["FileUuid"]
    appliance.stop()  # Orthanc keeps recent files in memory: damage the file while it is down
    stored = appliance.settings.orthanc_storage_dir / uuid_[:2] / uuid_[2:4] / uuid_
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # bit rot on the archive's own disk
    stored.write_bytes(bytes(data))
    appliance = appliance_factory()
    usb = tmp_path / "usb"
    usb.mkdir()

    result = _pacs_archive(appliance, usb)
    assert result.returncode == 1
    assert "pacs integrity check" in result.stderr and instance_id in result.stderr
    assert list(usb.iterdir()) == []
    assert appliance.instance_count() == 2  # nothing deleted from the archive


def test_the_archive_stopping_mid_copy_puts_nothing_in_place(appliance, tmp_path, monkeypatch):
    assert appliance.modality.store(_files(CT, MR)).ok
    usb = tmp_path / "usb"
    usb.mkdir()
    copy_instance, copied = archive._copy_instance, []

    def then_orthanc_stops(client, item, path):
        result = copy_instance(client, item, path)
        if not copied:
            appliance.stop()  # the real Orthanc goes away after the first file
        copied.append(item)
        return result

    monkeypatch.setattr(archive, "_copy_instance", then_orthanc_stops)
    with pytest.raises(archive.ArchiveError, match="stopped answering.*nothing was put in place"):
        archive.export(appliance.settings, usb)
    assert len(copied) == 1 and list(usb.iterdir()) == []
