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
    return [p for p in appliance.settings.orthanc_storage_dir.rglob("*")
            if p.is_file() and p.name not in known]


def _cut_power_after(appliance_factory, tmp_path, before, after):
    """Store `before`, snapshot the index, store `after`, stop, roll the index back."""
    site = appliance_factory("site")
    assert site.modality.store(before).ok
    site.stop()
    snapshot = tmp_path / "index-before"
    shutil.copytree(site.settings.orthanc_index_dir, snapshot)
    site = appliance_factory("site")
    assert site.modality.store(after).ok
    site.stop()
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
    site.stop()
    assert _unindexed_files(site) == [], "every file on disk is known to the index again"
    # The re-stored images are announced on the changes feed, so sync will send them to HQ.


def test_what_cannot_be_taken_back_is_kept_aside_never_deleted(appliance_factory, tmp_path):
    site = appliance_factory("site")
    original = corpus.DATA_DIR / "693_UNCR.dcm"
    assert site.modality.store([original]).ok
    site.stop()
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
    site.stop()
    [stored] = [p for p in site.settings.orthanc_storage_dir.rglob("*") if p.is_file()]
    spare = stored.parent / "0f0f0000-0000-4000-8000-00000000000f"
    shutil.copy2(stored, spare)
    site = appliance_factory("site")
    assert site.instance_count() == 1
    assert not spare.exists() and not list(orphans.inbox(site.settings).iterdir())
