"""Backups to the USB backup disk, and the cleanup that may delete only what is safe elsewhere.

Why it matters: a clinic's disk fills up, and old studies must make room; but a study removed
here must exist at HQ (confirmed, and still there when asked again) and in a backup that holds
exactly the stored bytes. Every other case keeps the study. Real Orthanc, real HQ receiver on
PostgreSQL, real borg through borgmatic, the backup disk a real (tmpfs) file system.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from gotg_pacs import audit
from gotg_pacs.audit import AuditLog
from gotg_pacs.sync.sender import Sender
from gotg_pacs.sync.transport import HQClient
from gotg_pacs.web.tls import SiteTLS
from gotg_pacs.web.users import Users
from tests.conftest import run_pacs
from tests.support import corpus
from tests.support.disk import tmpfs
from tests.support.site import free_port, owe

pytestmark = pytest.mark.timeout(600)

# One file per study, five different studies.
SENT_AND_BACKED_UP = "693_UNCR.dcm"
SENT_AFTER_THE_BACKUP = "OBXXXX1A_rle.dcm"
NEVER_SENT = "emri_small_jpeg_ls_lossless.dcm"
LOST_AT_HQ = "SC_rgb.dcm"
CORRUPT_WHEN_BACKED_UP = "JPGLosslessP14SV1_1s_1f_8b.dcm"


@pytest.fixture
def backup_disk(tmp_path):
    with tmpfs(tmp_path / "usb-backup", "2g") as disk:
        yield disk


def _study_uid(name: str) -> str:
    return str(pydicom.dcmread(corpus.DATA_DIR / name, stop_before_pixels=True).StudyInstanceUID)


def _send(clinic, hq, names: list[str | Path]) -> None:
    box = owe(clinic, [corpus.DATA_DIR / name for name in names])
    sender = Sender(clinic.settings, box, clinic.orthanc, HQClient(hq.url, hq.token))
    try:
        assert len(sender.send().confirmed) == len(names)
    finally:
        sender.close()
        box.close()


def _stored_file(appliance, name: str):
    sop = str(pydicom.dcmread(corpus.DATA_DIR / name, stop_before_pixels=True).SOPInstanceUID)
    [instance] = appliance.orthanc.find_instance(sop)
    uuid = appliance.orthanc.get(f"/instances/{instance}/attachments/dicom/info")["Uuid"]
    return appliance.settings.orthanc_storage_dir / uuid[:2] / uuid[2:4] / uuid


def _studies(appliance) -> set[str]:
    return {appliance.orthanc.get(f"/studies/{study}")["MainDicomTags"]["StudyInstanceUID"]
            for study in appliance.orthanc.get("/studies")}


def test_cleanup_removes_only_studies_hq_holds_and_the_backup_holds_as_stored(
        make_clinic, hq, backup_disk, tmp_path):
    clinic = make_clinic(hq.url, BACKUP_PATH=str(backup_disk))
    # A study whose second instance arrives after the backup.
    early, late = corpus.renumbered_study([corpus.DATA_DIR / SENT_AND_BACKED_UP,
                                           corpus.DATA_DIR / NEVER_SENT], tmp_path / "partly",
                                          PatientID="PARTLY-1", PatientName="Partly^Test")
    partly = str(pydicom.dcmread(early, stop_before_pixels=True).StudyInstanceUID)
    _send(clinic, hq, [SENT_AND_BACKED_UP, LOST_AT_HQ, CORRUPT_WHEN_BACKED_UP, early])
    # Bit rot on the clinic's disk before the backup: the backup holds bytes Orthanc never had.
    rotten = _stored_file(clinic, CORRUPT_WHEN_BACKED_UP)
    data = bytearray(rotten.read_bytes())
    data[-10] ^= 0xFF
    rotten.write_bytes(bytes(data))

    declared = run_pacs("modality", "add", "xray-tent", "XRAY_TENT", "10.0.0.9", "104",
                        env_file=clinic.env_file)
    assert declared.returncode == 0, declared.stderr
    # The box's own state beyond the archive: accounts, the audit trail, the site CA.
    users = Users.from_settings(clinic.settings)
    users.bootstrap_admin("kept in the backup")
    users.close()
    AuditLog(clinic.settings.audit_file).record("login", "admin", "10.0.0.9")
    SiteTLS(clinic.settings.tls_dir, "test-site").ensure(["localhost"])
    backed_up = run_pacs("backup", "now", "--json", env_file=clinic.env_file)
    assert backed_up.returncode == 0, backed_up.stderr
    [archive] = json.loads(backed_up.stdout)["archives"]
    assert archive["repository"] == "local" and archive["files"] >= 3
    listed = json.loads(run_pacs("backup", "list", "--json", env_file=clinic.env_file).stdout)
    assert [entry["name"] for entry in listed] == [archive["archive"]]
    assert (backup_disk / "gotg-pacs.borg" / "config").exists()
    shown = json.loads(run_pacs("status", "--json", env_file=clinic.env_file).stdout)["backup"]
    assert shown["archives"] == [archive["archive"]] and not shown["failing"]
    assert shown["age_s"] < 300
    # Read back from the archive: the modality declared in Orthanc's index, which is not in it.
    snapshot = clinic.settings.state_path / "backup" / "snapshot"
    out = tmp_path / "extracted"
    out.mkdir()
    extracted = subprocess.run(
        [str(Path(sys.executable).parent / "borgmatic"), "--config",
         str(clinic.settings.state_path / "backup" / "borgmatic.yaml"), "extract",
         "--archive", "latest", "--path", str(snapshot).lstrip("/"),
         "--destination", str(out)], capture_output=True, text=True)
    assert extracted.returncode == 0, extracted.stderr
    held = out / str(snapshot).lstrip("/")
    modalities = json.loads((held / "modalities.json").read_text())
    assert modalities["xray-tent"]["AET"] == "XRAY_TENT"
    assert (held / "tls" / "ca.key").read_bytes() == (clinic.settings.tls_dir
                                                      / "ca.key").read_bytes()
    assert [e["action"] for e in audit.read(held / "audit.jsonl")[0]] == [audit.TRAIL_START,
                                                                          "login"]
    kept = Users(held / "users.sqlite", 3600, 43200)
    assert kept.login("admin", "kept in the backup", "x")[1].must_change
    kept.close()

    _send(clinic, hq, [SENT_AFTER_THE_BACKUP, late])
    assert clinic.modality.store([corpus.DATA_DIR / NEVER_SENT]).ok
    # HQ loses a study after confirming it (a restore gone wrong, a disk at HQ).
    [at_hq] = hq.orthanc.find_instance(str(pydicom.dcmread(
        corpus.DATA_DIR / LOST_AT_HQ, stop_before_pixels=True).SOPInstanceUID))
    hq.orthanc.delete(f"/instances/{at_hq}")
    before = _studies(clinic)
    assert len(before) == 6

    dry = run_pacs("cleanup", "--older-than", "0", "--dry-run", "--json",
                   env_file=clinic.env_file)
    assert dry.returncode == 0, dry.stderr
    verdicts = {v["study_uid"]: v for v in json.loads(dry.stdout)}
    assert set(verdicts) == before
    assert verdicts[_study_uid(SENT_AND_BACKED_UP)]["removable"]
    assert "not confirmed" in verdicts[_study_uid(NEVER_SENT)]["reason"]
    assert "backup does not hold" in verdicts[_study_uid(SENT_AFTER_THE_BACKUP)]["reason"]
    assert "backup does not hold" in verdicts[_study_uid(CORRUPT_WHEN_BACKED_UP)]["reason"]
    assert "HQ no longer holds" in verdicts[_study_uid(LOST_AT_HQ)]["reason"]
    assert "backup does not hold 1 instance(s)" in verdicts[partly]["reason"]
    assert verdicts[partly]["instances"] == 2
    assert sum(v["removable"] for v in verdicts.values()) == 1
    assert _studies(clinic) == before, "a dry run removes nothing"

    done = run_pacs("cleanup", "--older-than", "0", env_file=clinic.env_file)
    assert done.returncode == 0, done.stderr
    assert "1 removed" in done.stdout and "5 kept" in done.stdout, done.stdout
    assert _studies(clinic) == before - {_study_uid(SENT_AND_BACKED_UP)}
    [still_at_hq] = hq.orthanc.find_instance(str(pydicom.dcmread(
        corpus.DATA_DIR / SENT_AND_BACKED_UP, stop_before_pixels=True).SOPInstanceUID))
    assert still_at_hq

    # The archive that held the removed study is kept out of pruning: four more backups today,
    # pruning drops the oldest regular archives of the day, and the kept one, older still, stays.
    for _ in range(4):
        again = run_pacs("backup", "now", env_file=clinic.env_file)
        assert again.returncode == 0, again.stderr
    names = [entry["name"] for entry in json.loads(
        run_pacs("backup", "list", "--json", env_file=clinic.env_file).stdout)]
    assert f"kept.{archive['archive']}" in names and archive["archive"] not in names, names
    regular = [name for name in names if not name.startswith("kept.")]
    assert len(regular) < 4 and min(regular) > archive["archive"], names


def test_no_cleanup_without_a_backup_and_no_backup_on_the_images_own_disk(make_clinic, hq,
                                                                          tmp_path):
    # The folder is there but on the same file system as the images: the USB disk is not in.
    same_disk = tmp_path / "mnt-backup"
    same_disk.mkdir()
    clinic = make_clinic(hq.url, BACKUP_PATH=str(same_disk))
    refused = run_pacs("backup", "now", env_file=clinic.env_file)
    assert refused.returncode == 1
    assert "nothing is mounted at BACKUP_PATH" in refused.stderr, refused.stderr
    assert not (same_disk / "gotg-pacs.borg").exists()
    shown = json.loads(run_pacs("status", "--json", env_file=clinic.env_file).stdout)["backup"]
    assert shown["failing"] and "nothing is mounted" in shown["last_error"]
    assert shown["archives"] == []
    assert "FAILING" in run_pacs("status", env_file=clinic.env_file).stdout

    env = clinic.env_file.read_text()
    clinic.env_file.write_text(env.replace(f"BACKUP_PATH={same_disk}",
                                           f"BACKUP_PATH={tmp_path / 'unplugged'}"))
    missing = run_pacs("backup", "now", env_file=clinic.env_file)
    assert missing.returncode == 1 and "backup disk missing" in missing.stderr, missing.stderr

    _send(clinic, hq, [SENT_AND_BACKED_UP])
    kept = run_pacs("cleanup", "--older-than", "0", "--json", env_file=clinic.env_file)
    assert kept.returncode == 0, kept.stderr
    [verdict] = json.loads(kept.stdout)
    assert not verdict["removable"] and "backup" in verdict["reason"]
    assert _study_uid(SENT_AND_BACKED_UP) in _studies(clinic)


def test_auto_cleanup_after_a_backup_keeps_everything_younger_than_retention_days(
        make_clinic, hq, backup_disk):
    clinic = make_clinic(hq.url, BACKUP_PATH=str(backup_disk), AUTO_CLEANUP="true",
                         RETENTION_DAYS="1")
    _send(clinic, hq, [SENT_AND_BACKED_UP])
    first = run_pacs("backup", "now", env_file=clinic.env_file)
    assert first.returncode == 0, first.stderr
    assert "cleanup: 0 old studies" in first.stdout, first.stdout
    # Old enough by the command line's own limit, and in the backup now; but HQ cannot be
    # asked again (the link is down): kept.
    env = clinic.env_file.read_text()
    dead = f"http://127.0.0.1:{free_port()}"
    clinic.env_file.write_text(env.replace(f"HQ_URL={hq.url}", f"HQ_URL={dead}"))
    offline = run_pacs("cleanup", "--older-than", "0", "--json", env_file=clinic.env_file)
    assert offline.returncode == 0, offline.stderr
    [verdict] = json.loads(offline.stdout)
    assert not verdict["removable"] and "HQ could not be asked" in verdict["reason"]
    assert _studies(clinic) == {_study_uid(SENT_AND_BACKED_UP)}
    clinic.env_file.write_text(env)
    assert "1 removed" in run_pacs("cleanup", "--older-than", "0",
                                   env_file=clinic.env_file).stdout
    assert _studies(clinic) == set()

    # The box loses its passphrase (its state disk replaced): no new one is made beside the
    # old repository, which it would not open; the reason is said in words.
    passphrase = clinic.settings.state_path / "backup" / "passphrase"
    shown = run_pacs("backup", "passphrase", env_file=clinic.env_file)
    assert shown.returncode == 0 and shown.stdout.strip() == passphrase.read_text().strip()
    passphrase.unlink()
    lost = run_pacs("backup", "now", env_file=clinic.env_file)
    assert lost.returncode == 1 and "lost its passphrase" in lost.stderr, lost.stderr
    assert not passphrase.exists()
