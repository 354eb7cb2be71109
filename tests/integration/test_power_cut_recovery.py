"""Images whose index entry a power cut rolled back are taken back in at the next start.

Why it matters: Orthanc fsyncs each image before it answers "stored", but its SQLite index may
lose its last transactions in a power cut (WAL, SYNCHRONOUS=NORMAL). Without recovery those images
sit on disk forever, invisible to the viewer, the backup and the sync to HQ: lost in all but name.
The cut is reproduced exactly: the index is put back to its state before the last stores while
their files stay on disk.
"""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import time
from contextlib import closing

import pydicom
import pytest
from pydicom.uid import generate_uid

from gotg_pacs import orphans
from gotg_pacs.process import StartError, start_orthanc
from tests.conftest import free_port
from tests.support import corpus


def _unindexed_files(appliance) -> list:
    with closing(sqlite3.connect(appliance.settings.orthanc_index_dir / "index")) as db:
        known = {row[0] for row in db.execute("SELECT uuid FROM AttachedFiles")}
    return [p for p in appliance.settings.orthanc_storage_dir.glob("??/??/*")
            if p.name not in known]


def _crash(site) -> None:
    """Power gone: Orthanc dies on the spot, no clean-stop marker, its WAL left as it is."""
    site.child.process.kill()
    site.child.process.wait()


def _cut_power_after(appliance_factory, tmp_path, before, after):
    """Store `before`, snapshot the live index (main file and WAL), store `after`, crash, and
    put the snapshot back: exactly what a power cut that rolled back the index leaves."""
    site = appliance_factory("site")
    assert site.modality.store(before).ok
    time.sleep(1)  # idle: the WAL on disk holds every committed transaction
    snapshot = tmp_path / "index-before"
    shutil.copytree(site.settings.orthanc_index_dir, snapshot)
    assert (snapshot / "index-wal").exists(), "the live WAL is part of what is read back"
    assert site.modality.store(after).ok
    _crash(site)
    shutil.rmtree(site.settings.orthanc_index_dir)
    shutil.copytree(snapshot, site.settings.orthanc_index_dir)
    return site


def test_images_the_index_lost_are_stored_again_and_verified(appliance_factory, tmp_path):
    files = corpus.representative()
    before, after = files[:2], files[2:6]
    lost = _cut_power_after(appliance_factory, tmp_path, before, after)
    assert len(_unindexed_files(lost)) == len(after), "the cut left files the index forgot"
    site = appliance_factory("site")
    assert site.instance_count() == len(before) + len(after)
    for source in after:
        uid = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
        [instance_id] = site.orthanc.find_instance(uid)
        assert site.orthanc.verify_md5(instance_id)
    assert not list(orphans.inbox(site.settings).iterdir())
    assert not orphans.unresolved_dir(site.settings).exists()
    # Re-stored images are announced on the changes feed, so sync will send them to HQ.
    changes = site.orthanc.get("/changes", params={"since": 0, "limit": 10000})["Changes"]
    announced = {c["ID"] for c in changes if c["ChangeType"] == "NewInstance"}
    assert set(site.orthanc.get("/instances")) <= announced
    site.stop()
    assert _unindexed_files(site) == [], "every file on disk is known to the index again"


def test_what_cannot_be_taken_back_is_kept_aside_never_deleted(appliance_factory, tmp_path):
    site = appliance_factory("site")
    original = corpus.DATA_DIR / "693_UNCR.dcm"
    assert site.modality.store([original]).ok
    _crash(site)
    storage = site.settings.orthanc_storage_dir
    # Not DICOM at all, and a different version of an instance Orthanc already holds.
    junk = storage / "ab" / "cd" / "abcd0000-0000-4000-8000-000000000001"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"{\"not\": \"dicom\"}")
    other = pydicom.dcmread(original)
    other.PatientName = "Someone^Else"
    version = storage / "ab" / "cd" / "abcd0000-0000-4000-8000-000000000002"
    other.save_as(version, enforce_file_format=True)
    version_bytes = version.read_bytes()

    site = appliance_factory("site")
    assert site.instance_count() == 1
    kept = sorted(p.name for p in orphans.unresolved_dir(site.settings).iterdir())
    assert kept == [junk.name, version.name]
    assert (orphans.unresolved_dir(site.settings) / version.name).read_bytes() == version_bytes
    [instance_id] = site.orthanc.get("/instances")
    tags = site.orthanc.get(f"/instances/{instance_id}/simplified-tags")
    assert tags["PatientName"] != "Someone^Else", "the stored original was not replaced"


def test_a_second_orthanc_on_the_same_storage_is_refused(appliance_factory):
    site = appliance_factory("site")
    twin = dataclasses.replace(site.settings, dicom_port=free_port(), http_port=free_port())
    with pytest.raises(StartError, match="in use: is another Orthanc running on this storage"):
        start_orthanc(twin)
    assert site.modality.echo().ok


def test_an_identical_copy_is_recognised_and_the_spare_removed(appliance_factory, tmp_path):
    dataset = pydicom.dcmread(corpus.DATA_DIR / "693_UNCR.dcm")
    dataset.SOPInstanceUID = generate_uid()
    path = tmp_path / "one.dcm"
    dataset.save_as(path, enforce_file_format=True)
    site = appliance_factory("site")
    assert site.modality.store([path]).ok
    _crash(site)
    [stored] = [p for p in site.settings.orthanc_storage_dir.glob("??/??/*")]
    spare = stored.parent / "0f0f0000-0000-4000-8000-00000000000f"
    shutil.copy2(stored, spare)
    site = appliance_factory("site")
    assert site.instance_count() == 1
    assert not spare.exists() and not list(orphans.inbox(site.settings).iterdir())


def test_a_copy_is_never_deleted_on_the_word_of_a_damaged_held_file(appliance_factory):
    """Orthanc's index says it holds the instance, but its file is gone: the spare is the only
    copy left and must be kept."""
    site = appliance_factory("site")
    assert site.modality.store([corpus.DATA_DIR / "MR2_UNCR.dcm"]).ok
    _crash(site)
    [held] = site.settings.orthanc_storage_dir.glob("??/??/*")
    spare = held.parent / "0e0e0000-0000-4000-8000-00000000000e"
    shutil.copy2(held, spare)
    image = held.read_bytes()
    held.unlink()
    site = appliance_factory("site")
    [kept] = orphans.unresolved_dir(site.settings).iterdir()
    assert kept.read_bytes() == image


def test_a_partial_attachment_is_never_stored_as_an_instance(appliance_factory, tmp_path):
    site = appliance_factory("site")
    assert site.modality.store([corpus.DATA_DIR / "MR2_UNCR.dcm"]).ok
    _crash(site)
    fragment = pydicom.dcmread(corpus.DATA_DIR / "693_UNCR.dcm")
    del fragment.PixelData  # what Orthanc keeps as "dicom-until-pixel-data"
    path = site.settings.orthanc_storage_dir / "0d" / "0d" / "0d0d0000-0000-4000-8000-00000000000d"
    path.parent.mkdir(parents=True)
    fragment.save_as(path, enforce_file_format=True)
    site = appliance_factory("site")
    assert site.instance_count() == 1
    assert [p.name for p in orphans.unresolved_dir(site.settings).iterdir()] == [path.name]
