"""Restores and the integrity check: every path proven by restoring, with real borg and Orthanc.

Why it matters: a dead SD card or a flooded clinic must cost minutes, not studies. A restore into
an empty appliance must give back the same instances (same UIDs, same MD5s); damaged files must
be found and put back from the backup; what cannot be repaired must be said; and a backup killed
halfway (a power cut) must not spoil the next one or the restore.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pydicom
import pytest

from gotg_pacs import audit, config
from gotg_pacs.audit import AuditLog
from gotg_pacs.hq.escrow import Escrow
from gotg_pacs.process import wait_until
from gotg_pacs.ris import worklist
from gotg_pacs.ris.mllp import Listener
from gotg_pacs.ris.orders import Orders
from gotg_pacs.sync import codecs
from gotg_pacs.sync.sender import Sender
from gotg_pacs.sync.transport import HQClient
from gotg_pacs.web.tls import SiteTLS
from gotg_pacs.web.users import ADMIN_CHANGED_MARKER, Users
from tests.conftest import run_pacs, write_env
from tests.support import corpus
from tests.support.disk import tmpfs
from tests.support.site import owe
from tests.support.sshd import BackupServer, borg_as_clinic

pytestmark = pytest.mark.timeout(900)

NOBODY = 65534  # stands for Orthanc's user
ORDER = "\r".join([
    "MSH|^~\\&|RIS|GOTG|PACS|SITE|20261127101500||ORM^O01|OLD-1|P|2.5.1",
    "PID|1||PAT-OLD^^^SITE^MR||Doe^Jane||19800102|F",
    "ORC|NW|PL1|FL1||SC||^^^20261128090000",
    "OBR|1|PL1|FL1|CXR^Chest X-ray^LOCAL||||||||||||||ACC-OLD-1|RP1|SPS1||||CR"]).encode()
MIX = ["693_UNCR.dcm", "MR2_UNCR.dcm", "US1_UNCR.dcm", "SC_rgb.dcm",
       "emri_small_jpeg_ls_lossless.dcm"]


@pytest.fixture
def backup_disk(tmp_path):
    with tmpfs(tmp_path / "usb-backup", "2g") as disk:
        yield disk


@pytest.fixture
def small_disk(tmp_path):
    """A 100 MB disk for images (set up before the appliances, so unmounted after them)."""
    with tmpfs(tmp_path / "small-disk", "100m") as disk:
        yield disk


def _held(appliance) -> dict[str, str]:
    """SOP Instance UID -> Orthanc's MD5 of the stored file, for every instance."""
    held = {}
    for instance in appliance.orthanc.get("/instances", params={"expand": ""}):
        md5 = appliance.orthanc.request(
            "GET", f"/instances/{instance['ID']}/attachments/dicom/md5").text.strip()
        held[instance["MainDicomTags"]["SOPInstanceUID"]] = md5
    return held


def _stored_file(appliance, path):
    sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    [instance] = appliance.orthanc.find_instance(sop)
    uuid = appliance.orthanc.get(f"/instances/{instance}/attachments/dicom/info")["Uuid"]
    return sop, instance, appliance.settings.orthanc_storage_dir / uuid[:2] / uuid[2:4] / uuid


def _backup(appliance) -> str:
    done = run_pacs("backup", "now", "--json", env_file=appliance.env_file, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["archives"][0]["archive"]


def _move_passphrase(old, new) -> None:
    """What HQ's escrow does for a replaced box: the old box's passphrase onto the new one."""
    shown = run_pacs("backup", "passphrase", env_file=old.env_file)
    assert shown.returncode == 0, shown.stderr
    put = run_pacs("backup", "passphrase", "--set", input=shown.stdout, env_file=new.env_file)
    assert put.returncode == 0, put.stderr


def _restore(appliance, *args: str) -> dict:
    done = run_pacs("restore", *args, "--json", env_file=appliance.env_file, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


ADMIN_PASSWORD_OF_OLD = "chosen at the clinic, 2026"


def _in_use(settings) -> None:
    """A box people use: the admin chose a password, a clinician has an account, events in
    the audit trail, the site CA the tablets trust."""
    users = Users.from_settings(settings)
    users.bootstrap_admin(settings.admin_password)
    token, _ = users.login("admin", settings.admin_password, "10.0.0.9")
    users.change_password("admin", settings.admin_password, ADMIN_PASSWORD_OF_OLD, token)
    users.add("amina", "clinician")
    users.close()
    AuditLog(settings.audit_file).record("export", "amina", "10.0.0.5", kind="studies",
                                         resource="s1")
    SiteTLS(settings.tls_dir, settings.site_code).ensure(["localhost"])
    with Orders(settings.ris_orders_file) as orders:  # a patient scheduled for tomorrow
        ack = Listener(orders, settings.worklists_dir, settings.site_code).handle(ORDER)
    assert b"MSA|AA|" in ack, ack


def _as_flashed(settings) -> None:
    """A new box at its first start: its own CA, `admin` on the password it was given."""
    users = Users.from_settings(settings)
    users.bootstrap_admin(settings.admin_password)
    users.close()
    AuditLog(settings.audit_file).record("login-refused", "admin", "10.0.0.9")
    SiteTLS(settings.tls_dir, settings.site_code).ensure(["localhost"])


def _state_came_back(old, new, said: dict) -> None:
    """The accounts (passwords as they were, no session), the site CA (the server certificate
    issued again from it) and the old box's audit trail, kept beside the new box's."""
    users = Users.from_settings(new)
    assert {user["name"] for user in users.list()} == {"admin", "amina"}, said
    _, session = users.login("admin", ADMIN_PASSWORD_OF_OLD, "10.0.0.9")
    assert not session.must_change
    users.close()
    assert (new.state_path / ADMIN_CHANGED_MARKER).exists(), "the flashed password's copy goes"
    assert said["accounts"].startswith("2 put back"), said
    assert (new.tls_dir / "ca.key").read_bytes() == (old.tls_dir / "ca.key").read_bytes()
    assert "put back" in said["site_ca"] and list(new.tls_dir.glob("replaced-*/ca.key"))
    tls = SiteTLS(new.tls_dir, new.site_code)
    assert tls.ensure(["localhost"]).server_issued == "none yet"
    assert tls.server_cert().issuer == SiteTLS(old.tls_dir, old.site_code).ca_cert().subject
    assert said["ris_orders"].startswith("1 put back"), said
    with Orders(new.ris_orders_file, readonly=True) as orders:
        assert [order.accession for order in orders.scheduled()] == ["ACC-OLD-1"]
    assert [path.name for path in new.worklists_dir.glob("*.wl")] == \
        [worklist.file_name("ACC-OLD-1")], "on the new box's worklist"
    old_trail = audit.trail_of(old.audit_file)
    assert old_trail in said["audit_trail"]
    kept = audit.earlier_folder(new.audit_file) / f"{old_trail}.jsonl"
    assert kept.read_bytes() == old.audit_file.read_bytes()
    events = audit.read(new.audit_file)[0]
    assert [e["action"] for e in events] == [audit.TRAIL_START, "login-refused", "restore"]
    assert events[-1]["earlier_trails"] == old_trail and audit.verify(events) == []


def test_a_backup_restores_into_an_empty_appliance_identical_and_again_changes_nothing(
        small_disk, appliance_factory, backup_disk, tmp_path):
    old = appliance_factory("old", BACKUP_PATH=str(backup_disk))
    assert old.modality.store([corpus.DATA_DIR / name for name in MIX]).ok
    declared = run_pacs("modality", "add", "xray-tent", "XRAY_TENT", "10.0.0.9", "104",
                        env_file=old.env_file)
    assert declared.returncode == 0, declared.stderr
    _in_use(old.settings)
    # A modality goes on storing while the backup runs: Orthanc pauses only while its index
    # is copied, and nothing is refused.
    during = corpus.renumbered_copies([corpus.DATA_DIR / "MR2_UNCR.dcm"], 30, tmp_path)
    backing_up = subprocess.Popen(
        [sys.executable, "-m", "gotg_pacs", "--env-file", str(old.env_file), "backup", "now",
         "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stored_during = [old.modality.store([path]).ok for path in during]
    out, err = backing_up.communicate(timeout=600)
    assert backing_up.returncode == 0, err
    assert all(stored_during)
    made = json.loads(out)
    assert 0 <= made["index_pause_ms"] < 1000, made
    archive = made["archives"][0]["archive"]
    expected = _held(old)
    assert len(expected) == len(MIX) + len(during)
    drill = run_pacs("backup", "drill", "--json", env_file=old.env_file, timeout=300)
    assert drill.returncode == 0, drill.stderr
    rehearsed = json.loads(drill.stdout)
    assert rehearsed["files"] >= len(MIX) and rehearsed["failures"] == []
    assert rehearsed["held_here"] == rehearsed["files"]
    assert len(MIX) <= rehearsed["index_instances"] <= len(expected)
    assert not list(old.settings.storage_path.glob("*-staging"))
    old.stop()  # the SD card died; the backup disk moves to a freshly flashed box

    new = appliance_factory("new", BACKUP_PATH=str(backup_disk))
    assert _held(new) == {}
    _as_flashed(new.settings)
    new.stop()  # a whole restore: Orthanc stopped, its index empty
    refused = run_pacs("restore", "--latest", env_file=new.env_file)
    assert refused.returncode == 1
    assert "lost its passphrase" in refused.stderr, refused.stderr
    _move_passphrase(old, new)
    # A box whose images' disk cannot take the archive is told so before anything is written.
    small = appliance_factory("small", BACKUP_PATH=str(backup_disk),
                              STORAGE_PATH=str(small_disk))
    _move_passphrase(old, small)
    cramped = run_pacs("restore", "--latest", env_file=small.env_file)
    assert cramped.returncode == 1 and "not enough room" in cramped.stderr, cramped.stderr
    assert _held(small) == {}
    # A replaced disk: STORAGE_PATH alone, owned by Orthanc's user (here nobody), and root
    # restoring into it.
    for folder in (new.settings.orthanc_storage_dir, new.settings.orthanc_index_dir):
        shutil.rmtree(folder)
    os.chown(new.settings.storage_path, NOBODY, NOBODY)
    report = _restore(new, "--latest")
    made = [new.settings.orthanc_index_dir, new.settings.orthanc_index_dir / "index",
            new.settings.orthanc_storage_dir, new.settings.orthanc_storage_dir / ".pacs-lock",
            *new.settings.orthanc_storage_dir.glob("??"),
            *new.settings.orthanc_storage_dir.glob("??/??")]
    assert len(made) > 4 and all((path.stat().st_uid, path.stat().st_gid) == (NOBODY, NOBODY)
                                 for path in made), "Orthanc's, not root's"
    assert (report["archive"], report["mode"]) == (archive, "whole")
    assert (report["failed"], report["missing"]) == ([], [])
    assert report["restored"] >= len(MIX)
    new = appliance_factory("new")  # Orthanc starts on the restored index
    held = _held(new)
    assert held.items() <= expected.items(), "the same instances, byte for byte"
    assert {uid for uid in expected if uid not in held} <= {
        str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in during}
    # Stored while the backup ran, not yet in the index copy: stored again at Orthanc's start.
    assert len(held) == report["restored"] + report["waiting"]
    for instance in new.orthanc.get("/instances"):
        assert new.orthanc.verify_md5(instance)
    assert new.orthanc.modalities()["xray-tent"]["AET"] == "XRAY_TENT"
    _state_came_back(old.settings, new.settings, report["state"])
    # Healthy: it stores what a modality sends next.
    assert new.modality.store([corpus.DATA_DIR / "OBXXXX1A.dcm"]).ok
    assert len(_held(new)) == len(held) + 1

    again = _restore(new, "--archive", archive)  # Orthanc runs with studies: merged
    assert (again["mode"], again["restored"], again["modalities"]) == ("merge", 0, [])
    assert again["state"]["accounts"].startswith("this box's own kept"), again["state"]
    assert again["present"] == len(held)
    missing = run_pacs("restore", "--archive", "no-such-archive", env_file=new.env_file)
    assert missing.returncode == 1 and "no archive named" in missing.stderr
    new.stop()  # stopped with studies of its own: a whole restore would replace them
    replacing = run_pacs("restore", "--latest", env_file=new.env_file)
    assert replacing.returncode == 1 and "already holds" in replacing.stderr, replacing.stderr


def test_a_damaged_file_no_backup_holds_comes_back_from_hq_byte_for_byte(clinic, hq):
    """No backup disk at all: HQ confirmed the files, so HQ rebuilds each exact original from
    its site-qualified copy. A part fetched by an earlier run is resumed; an instance HQ holds
    no way back to is reported, never put back in other bytes."""
    files = [corpus.DATA_DIR / name for name in MIX[:4]]
    box = owe(clinic, files)
    sender = Sender(clinic.settings, box, clinic.orthanc, HQClient(hq.url, hq.token))
    assert len(sender.send().confirmed) == len(files)
    sender.close()
    box.close()
    stored = [_stored_file(clinic, path) for path in files]
    kept = {uid: path.read_bytes() for uid, _, path in stored}
    (rotten_uid, rotten_id, rotten), (gone_uid, gone_id, gone), \
        (resumed_uid, resumed_id, resumed), (lost_uid, _, lost) = stored
    for uid, _, _ in stored:
        [there] = hq.orthanc.find_instance(uid)
        codec = hq.orthanc.request("GET", f"/instances/{there}/metadata/GotgCodec").text
        assert codec in codecs.EXACT, f"{uid} went as {codec}: HQ holds other bytes"
    [lost_at_hq] = hq.orthanc.find_instance(lost_uid)
    hq.orthanc.request("DELETE", f"/instances/{lost_at_hq}/metadata/GotgOriginalPatch")

    data = bytearray(kept[rotten_uid])
    data[len(data) // 2] ^= 0x01
    rotten.write_bytes(bytes(data))
    gone.unlink()
    resumed.write_bytes(kept[resumed_uid][:100])
    lost.write_bytes(kept[lost_uid][:-10])
    # What an earlier run fetched before the link dropped: its first half, named by its MD5.
    md5 = clinic.orthanc.request(
        "GET", f"/instances/{resumed_id}/attachments/dicom/md5").text.strip()
    part = clinic.settings.storage_path / "fetch-back" / f"{md5}.part"
    part.parent.mkdir()
    part.write_bytes(kept[resumed_uid][:len(kept[resumed_uid]) // 2])

    repaired = run_pacs("integrity", "check", "--repair", "--json", env_file=clinic.env_file,
                        timeout=600)
    assert repaired.returncode == 1, "one file could not be repaired"
    findings = {f["sop_uid"]: f for f in json.loads(repaired.stdout)["findings"]}
    assert {uid: f["repaired_from"] for uid, f in findings.items()} == {
        rotten_uid: "HQ", gone_uid: "HQ", resumed_uid: "HQ", lost_uid: None}
    assert all(f["at_hq"] for f in findings.values())
    assert "no way back to the exact bytes" in findings[lost_uid]["detail"]
    for uid, _, path in stored[:3]:
        assert path.read_bytes() == kept[uid], uid
    assert all(clinic.orthanc.verify_md5(i) for i in (rotten_id, gone_id, resumed_id))
    assert lost.read_bytes() == kept[lost_uid][:-10], "left as it was, not replaced"
    assert not part.parent.exists(), "nothing left half-fetched"
    said = run_pacs("integrity", "check", env_file=clinic.env_file)
    assert said.returncode == 1 and "1 damaged" in said.stdout and lost_uid in said.stdout
    assert "HQ confirmed a copy" in said.stdout


def test_damaged_files_are_found_put_back_from_the_backup_and_the_rest_reported(
        appliance_factory, backup_disk):
    box = appliance_factory("site", BACKUP_PATH=str(backup_disk))
    files = [corpus.DATA_DIR / name for name in MIX]
    assert box.modality.store(files[:4]).ok
    archive = _backup(box)
    assert box.modality.store(files[4:]).ok  # after the backup: no copy of it anywhere

    clean = run_pacs("integrity", "check", "--json", env_file=box.env_file)
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout) == {"checked": len(MIX), "findings": []}

    rotten_uid, rotten_id, rotten = _stored_file(box, files[0])
    good_bytes = rotten.read_bytes()
    data = bytearray(good_bytes)
    data[len(data) // 2] ^= 0x01  # one bit flipped: the file still parses
    rotten.write_bytes(bytes(data))
    gone_uid, gone_id, gone = _stored_file(box, files[1])
    gone_bytes = gone.read_bytes()
    gone.unlink()
    for folder in (gone.parent, gone.parent.parent):  # fsck on a failing card drops folders too
        if not any(folder.iterdir()):
            folder.rmdir()
    lost_uid, _, lost = _stored_file(box, files[4])
    lost.write_bytes(lost.read_bytes()[:-100])

    found = run_pacs("integrity", "check", "--json", env_file=box.env_file)
    assert found.returncode == 1
    problems = {f["sop_uid"]: f["problem"] for f in json.loads(found.stdout)["findings"]}
    assert problems == {rotten_uid: "corrupt", gone_uid: "missing", lost_uid: "corrupt"}
    assert rotten.read_bytes() == bytes(data), "a check alone changes nothing"

    repaired = run_pacs("integrity", "check", "--repair", "--json", env_file=box.env_file,
                        timeout=600)
    assert repaired.returncode == 1, "one file could not be repaired"
    outcome = {f["sop_uid"]: f["repaired_from"] for f in json.loads(repaired.stdout)["findings"]}
    assert outcome == {rotten_uid: archive, gone_uid: archive, lost_uid: None}
    assert rotten.read_bytes() == good_bytes and gone.read_bytes() == gone_bytes
    storage = box.settings.orthanc_storage_dir.stat()
    for folder in (gone.parent, gone.parent.parent):
        made = folder.stat()
        assert (made.st_uid, made.st_gid, made.st_mode) == \
            (storage.st_uid, storage.st_gid, storage.st_mode), "Orthanc can write there"
    assert box.orthanc.verify_md5(rotten_id) and box.orthanc.verify_md5(gone_id)
    said = run_pacs("integrity", "check", env_file=box.env_file)
    assert said.returncode == 1
    assert "1 damaged" in said.stdout and lost_uid in said.stdout and "no copy known" in said.stdout
    assert not list(box.settings.storage_path.glob("*-staging")), "no scratch left behind"

    # Bit rot on the backup disk itself: the weekly check (segment checksums) and the monthly
    # one (every chunk decrypted and verified) both find it, and status says so.
    checked = run_pacs("backup", "check", "--verify-data", env_file=box.env_file, timeout=600)
    assert checked.returncode == 0, checked.stderr
    segment = max((backup_disk / "gotg-pacs.borg").glob("data/*/*"),
                  key=lambda path: path.stat().st_size)
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    weekly = run_pacs("backup", "check", env_file=box.env_file, timeout=600)
    assert weekly.returncode == 1 and "checksum mismatch" in weekly.stderr, weekly.stderr
    monthly = run_pacs("backup", "check", "--verify-data", env_file=box.env_file, timeout=600)
    assert monthly.returncode == 1
    shown = json.loads(run_pacs("status", "--json", env_file=box.env_file).stdout)["backup"]
    assert shown["checks"]["verify_data"]["ok"] is False
    assert shown["checks"]["check"]["ok"] is False
    assert shown["checks"]["integrity"]["ok"] is False  # the file no backup held
    text = run_pacs("status", env_file=box.env_file).stdout
    assert "data verified 0.0 d ago FAILED" in text, text


def _noisy(source, count: int, where) -> list:
    """Copies of an instance with random pixels, that borg can neither deduplicate nor
    compress, so a backup of them takes long enough to be killed halfway."""
    copies = corpus.renumbered_copies([source], count, where)
    for path in copies:
        dataset = pydicom.dcmread(path)
        dataset.PixelData = os.urandom(len(dataset.PixelData))
        dataset.save_as(path)
    return copies


def test_a_backup_killed_midway_leaves_the_next_backup_and_the_restore_whole(
        appliance_factory, backup_disk, tmp_path):
    box = appliance_factory("old", BACKUP_PATH=str(backup_disk))
    _backup(box)  # the repository and a first archive exist
    assert box.modality.store(_noisy(corpus.DATA_DIR / "MR2_UNCR.dcm", 120, tmp_path)).ok
    # Everything dies at once, as in a power cut: the command, borgmatic, borg.
    killed = subprocess.Popen([sys.executable, "-m", "gotg_pacs", "--env-file",
                               str(box.env_file), "backup", "now"], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def borg_creating() -> bool:  # borg itself at work on the 240 MB, not borgmatic before it
        for child in psutil.Process(killed.pid).children(recursive=True):
            try:
                argv = child.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "create" in argv and any(Path(arg).name == "borg" for arg in argv[:2]):
                return True
        return False

    assert wait_until(borg_creating, 60, interval=0.02)
    time.sleep(0.3)
    os.killpg(killed.pid, signal.SIGKILL)
    assert killed.wait(30) == -signal.SIGKILL, "killed while borg was writing"
    listed = run_pacs("backup", "list", "--json", env_file=box.env_file)
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 1, "the killed backup made no archive"

    archive = _backup(box)
    checked = run_pacs("backup", "check", env_file=box.env_file, timeout=600)
    assert checked.returncode == 0, checked.stderr
    expected = _held(box)
    new = appliance_factory("new", BACKUP_PATH=str(backup_disk))
    new.stop()
    _move_passphrase(box, new)
    report = _restore(new, "--archive", archive)
    assert (report["mode"], report["failed"], report["missing"], report["waiting"]) == \
        ("whole", [], [], 0)
    new = appliance_factory("new")
    assert _held(new) == expected


def _transactions(repository) -> list[int]:
    """The transaction log borg keeps in an append-only repository, oldest first."""
    return [int(line.split(",")[0].split()[1])
            for line in (repository / "transactions").read_text().splitlines() if line]


def _roll_back(repository, transaction: int) -> None:
    """What HQ IT does after a clinic's key was misused (borg's documented append-only
    recovery): drop every segment written after `transaction` and the caches built on them."""
    for segment in repository.glob("data/*/*"):
        if segment.name.isdigit() and int(segment.name) > transaction:
            segment.unlink()
    for cache in [*repository.glob("index.*"), *repository.glob("hints.*"),
                  *repository.glob("integrity.*")]:
        cache.unlink()


def _backed_up_to(appliance) -> dict[str, str]:
    """`pacs backup now`: the archive made in each repository, by its label."""
    done = run_pacs("backup", "now", "--json", env_file=appliance.env_file, timeout=600)
    assert done.returncode == 0, done.stderr
    return {made["repository"]: made["archive"] for made in json.loads(done.stdout)["archives"]}


def test_backups_go_to_hq_over_ssh_append_only_and_a_new_box_restores_from_there(
        appliance_factory, backup_disk, tmp_path):
    server = BackupServer(tmp_path / "hq-backups").start()
    try:
        old = appliance_factory("old", BACKUP_PATH=str(backup_disk),
                                REMOTE_BACKUP_URL=server.url)
        assert old.modality.store([corpus.DATA_DIR / name for name in MIX[:3]]).ok
        # HQ has not allowed this box's key yet: the backup disk takes the backup all the same.
        local_only = run_pacs("backup", "now", "--json", env_file=old.env_file, timeout=300)
        assert local_only.returncode == 0, local_only.stderr
        made = json.loads(local_only.stdout)
        assert [archive["repository"] for archive in made["archives"]] == ["local"]
        assert made["remote_error"]
        shown = json.loads(run_pacs("status", "--json", env_file=old.env_file).stdout)["backup"]
        assert not shown["failing"] and shown["remote"]["failing"]
        assert "at HQ: none yet (failing" in run_pacs("status", env_file=old.env_file).stdout

        access = json.loads(run_pacs("backup", "key", "--json", env_file=old.env_file).stdout)
        line = access["authorized_keys"]
        assert "borg serve --append-only" in line and line.startswith("restrict,")
        assert f"--restrict-to-repository {server.repository('test-site')}" in line
        server.authorize(line)
        first = _backed_up_to(old)["hq"]
        # The USB disk unplugged: HQ's copy is made all the same, and the failure is said.
        env = old.env_file.read_text()
        old.env_file.write_text(env.replace(f"BACKUP_PATH={backup_disk}",
                                            f"BACKUP_PATH={tmp_path / 'unplugged'}"))
        unplugged = run_pacs("backup", "now", env_file=old.env_file, timeout=300)
        old.env_file.write_text(env)
        assert unplugged.returncode == 1
        assert "backup disk missing" in unplugged.stderr and "HQ's copy was made" in \
            unplugged.stderr, unplugged.stderr
        second = _backed_up_to(old)["hq"]
        expected = _held(old)
        shown = json.loads(run_pacs("status", "--json", env_file=old.env_file).stdout)["backup"]
        assert shown["remote"]["archives"] == [second] and not shown["remote"]["failing"]
        # With HQ's copy configured too, a repair reads the disk's archives.
        _, rotten_id, rotten = _stored_file(old, corpus.DATA_DIR / MIX[0])
        good = rotten.read_bytes()
        rotten.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        repaired = run_pacs("integrity", "check", "--repair", "--json", env_file=old.env_file,
                            timeout=300)
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        assert rotten.read_bytes() == good and old.orthanc.verify_md5(rotten_id)

        # The clinic's key (or a thief holding the box) tries to erase HQ's history.
        state = old.settings.state_path / "backup"
        repo = server.repository("test-site")
        kept = _transactions(repo)[-1]
        size = sum(p.stat().st_size for p in repo.glob("data/*/*"))
        url = f"{server.url}/test-site.borg"
        clinic = (state / "ssh" / "id_ed25519", state / "ssh" / "known_hosts")
        secret = (state / "passphrase").read_text().strip()
        listed = borg_as_clinic(*clinic, "list", "--short", url, passphrase=secret)
        assert len(listed.stdout.split()) == 3 and {first, second} <= set(listed.stdout.split())
        for archive in listed.stdout.split():
            borg_as_clinic(*clinic, "delete", f"{url}::{archive}", passphrase=secret)
        borg_as_clinic(*clinic, "compact", url, passphrase=secret)
        listed = borg_as_clinic(*clinic, "list", "--short", url, passphrase=secret)
        assert listed.returncode == 0 and listed.stdout.split() == []
        assert sum(p.stat().st_size for p in repo.glob("data/*/*")) >= size, \
            "nothing was erased at HQ: only deletions appended"
        _roll_back(repo, kept)  # HQ undoes it
        old.stop()

        new = appliance_factory("new", BACKUP_PATH="", REMOTE_BACKUP_URL=server.url)  # disk lost
        server.authorize(json.loads(run_pacs("backup", "key", "--json",
                                             env_file=new.env_file).stdout)["authorized_keys"])
        wrong = run_pacs("backup", "passphrase", "--set", input="not-the-site-passphrase",
                         env_file=new.env_file, timeout=120)
        assert wrong.returncode == 1 and "opens the hq repository" in wrong.stderr, wrong.stderr
        _move_passphrase(old, new)
        escaping = run_pacs("restore", "--remote", "--site", "../other", env_file=new.env_file)
        assert escaping.returncode == 2 and "a SITE_CODE" in escaping.stderr
        new.stop()  # the freshly flashed box's empty Orthanc, stopped: a whole restore
        report = _restore(new, "--remote", "--site", "test-site")
        assert (report["archive"], report["mode"]) == (second, "whole")
        assert (report["restored"], report["failed"], report["missing"]) == (3, [], [])
        new = appliance_factory("new", BACKUP_PATH="", REMOTE_BACKUP_URL=server.url)
        assert _held(new) == expected
        again = _restore(new, "--remote", "--site", "test-site")  # Orthanc runs: merged
        assert (again["mode"], again["restored"], again["present"]) == ("merge", 0, 3)
    finally:
        server.stop()


def test_the_passphrase_is_kept_at_hq_and_a_new_box_for_the_site_takes_it_back(
        appliance_factory, hq, backup_disk):
    at_hq = {"HQ_URL": hq.url, "HQ_TOKEN": hq.token, "BACKUP_PATH": str(backup_disk)}
    old = appliance_factory("old", **at_hq)
    assert old.modality.store([corpus.DATA_DIR / MIX[0]]).ok
    first = run_pacs("backup", "now", env_file=old.env_file, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "passphrase handed to HQ" in first.stdout, first.stdout
    assert "repository key handed to HQ" in first.stdout, first.stdout
    second = run_pacs("backup", "now", env_file=old.env_file, timeout=300)
    assert second.returncode == 0 and "passphrase" not in second.stdout, "handed over once"
    assert "repository key" not in second.stdout
    secret = (old.settings.state_path / "backup" / "passphrase").read_text().strip()
    kept = run_pacs("hq", "site", "passphrase", "test-site", "--json", env_file=hq.env_file)
    assert kept.returncode == 0, kept.stderr
    assert [entry["passphrase"] for entry in json.loads(kept.stdout)] == [secret]
    repository = backup_disk / "gotg-pacs.borg"
    keys = run_pacs("hq", "site", "keys", "test-site", "--json", env_file=hq.env_file)
    assert keys.returncode == 0, keys.stderr
    [key] = json.loads(keys.stdout)
    assert key["repository"] in (repository / "config").read_text()
    assert key["key"].startswith(f"BORG_KEY {key['repository']}")
    # Another site's credential reads nothing of this one's.
    other = json.loads(run_pacs("hq", "site", "add", "other-site", "--json",
                                env_file=hq.env_file).stdout)["hq_token"]
    stranger = appliance_factory("stranger", HQ_URL=hq.url, HQ_TOKEN=other, BACKUP_PATH="")
    refused = run_pacs("backup", "passphrase", "--from-hq", env_file=stranger.env_file)
    assert refused.returncode == 1 and "404" in refused.stderr, refused.stderr
    old.stop()

    new = appliance_factory("new", **at_hq)
    # Its backup timer fires before anyone put the passphrase back: no new one is made.
    early = run_pacs("backup", "now", env_file=new.env_file, timeout=300)
    assert early.returncode == 1 and "--from-hq" in early.stderr, early.stderr
    assert not (new.settings.state_path / "backup" / "passphrase").exists()
    taken = run_pacs("backup", "passphrase", "--from-hq", env_file=new.env_file)
    assert taken.returncode == 0, taken.stderr
    # The backup disk's copy of its key is damaged (its config rewritten without it): nothing
    # reads the repository until the key HQ keeps is put back.
    config = (repository / "config").read_text()
    (repository / "config").write_text(re.sub(r"\nkey = .*?(?=\n\S|\Z)", "\n", config,
                                              flags=re.S))
    unreadable = run_pacs("restore", "--latest", env_file=new.env_file, timeout=600)
    assert unreadable.returncode == 1, unreadable.stdout
    put_back = run_pacs("backup", "repository-key", "--from-hq", env_file=new.env_file)
    assert put_back.returncode == 0, put_back.stderr
    assert key["repository"] in put_back.stdout
    restored = run_pacs("restore", "--latest", "--json", env_file=new.env_file, timeout=600)
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["restored"] == 1


def test_hq_prunes_a_sites_copies_only_after_an_audit_and_never_after_the_sites_key_deleted(
        appliance_factory, tmp_path, monkeypatch):
    server = BackupServer(tmp_path / "hq-backups").start()
    try:
        clinic = appliance_factory("clinic", BACKUP_PATH="", REMOTE_BACKUP_URL=server.url)
        server.authorize(json.loads(run_pacs("backup", "key", "--json",
                                             env_file=clinic.env_file).stdout)["authorized_keys"])
        assert clinic.modality.store([corpus.DATA_DIR / MIX[0]]).ok
        made = [_backed_up_to(clinic)["hq"] for _ in range(3)]  # three the same day
        state = clinic.settings.state_path / "backup"
        secret = (state / "passphrase").read_text().strip()
        (tmp_path / "hq").mkdir()
        hq_env = write_env(tmp_path / "hq" / "pacs.env", HQ_BACKUP_PATH=str(server.repos),
                           SITE_CODE="hq")
        escrow = Escrow(config.load(hq_env).hq_dir / "escrow")
        escrow.keep("test-site", secret)
        escrow.keep("test-site", "an-older-box-passphrase")  # the newest is tried first

        def prune() -> subprocess.CompletedProcess:
            return run_pacs("hq", "backups", "prune", "--json", env_file=hq_env, timeout=300)

        first = prune()
        assert first.returncode == 0, first.stdout + first.stderr
        [outcome] = json.loads(first.stdout)
        # The sites' retention: per day the newest and (borg's daily rule) the oldest stay.
        assert (outcome["site"], outcome["first_audit"]) == ("test-site", True)
        assert outcome["pruned"] == [made[1]] and outcome["kept"] == [made[0], made[2]]
        url = f"{server.url}/test-site.borg"
        clinic_key = (state / "ssh" / "id_ed25519", state / "ssh" / "known_hosts")
        assert borg_as_clinic(*clinic_key, "list", "--short", url,
                              passphrase=secret).stdout.split() == [made[0], made[2]]

        newest = _backed_up_to(clinic)["hq"]
        repo = server.repository("test-site")
        before_deletion = _transactions(repo)[-1]
        # The site's key (a thief holding the box) deletes the newest copy at HQ.
        deleted = borg_as_clinic(*clinic_key, "delete", f"{url}::{made[2]}", passphrase=secret)
        assert deleted.returncode == 0, deleted.stderr
        refused = prune()
        assert refused.returncode == 1
        [outcome] = json.loads(refused.stdout)
        assert "vanished since HQ's last audit" in outcome["error"] and made[2] in \
            outcome["error"], outcome
        # Nothing compacted: HQ IT rolls the deletion back, and the audit passes again.
        _roll_back(repo, before_deletion)
        again = prune()
        assert again.returncode == 0, again.stdout + again.stderr
        [outcome] = json.loads(again.stdout)
        # Back after the rollback, then pruned by HQ's own rules: the day's newest is newer.
        assert outcome["first_audit"] is False and outcome["pruned"] == [made[2]]
        assert outcome["kept"] == [made[0], newest]
        # The key replaces the newest archive by one of the same name, or adds one dated in
        # the past (which pruning would keep instead of a genuine one): refused both times.
        for n, forged in enumerate(([f"{url}::{newest}", "/etc/hostname"],
                                    ["--timestamp", "2020-01-01T00:00:00",
                                     f"{url}::test-site-2020-01-01", "/etc/hostname"])):
            # A thief's own borg state each time (its last would see the rollback as a replay).
            monkeypatch.setenv("BORG_BASE_DIR", str(tmp_path / f"thief-{n}"))
            # HQ's own prune and compaction are not in the append-only log: the last segment
            # written is where the repository stood before the key was used.
            kept_transaction = max(int(segment.name) for segment in repo.glob("data/*/*")
                                   if segment.name.isdigit())
            if forged[0].endswith(newest):
                assert borg_as_clinic(*clinic_key, "delete", forged[0],
                                      passphrase=secret).returncode == 0
            made_forged = borg_as_clinic(*clinic_key, "create", *forged, passphrase=secret)
            assert made_forged.returncode == 0, made_forged.stderr
            refused = prune()
            assert refused.returncode == 1
            said = json.loads(refused.stdout)[0]["error"]
            assert ("replaced by another archive" in said) if forged[0].endswith(newest) \
                else ("dated outside" in said), said
            _roll_back(repo, kept_transaction)
        assert prune().returncode == 0, "after the rollbacks, the audit passes again"

        # Without a backup disk the clinic checks HQ's copy over the link, but reading every
        # chunk's data is HQ's to do, on its own disks.
        checked = run_pacs("backup", "check", "--json", env_file=clinic.env_file, timeout=300)
        assert checked.returncode == 0, checked.stderr
        verify = run_pacs("backup", "check", "--verify-data", env_file=clinic.env_file)
        assert verify.returncode == 1 and "HQ verifies its copy" in verify.stderr, verify.stderr

        def check(*args: str) -> subprocess.CompletedProcess:
            return run_pacs("hq", "backups", "check", "--site", "test-site", "--json", *args,
                            env_file=hq_env, timeout=300)

        for args in ((), ("--verify-data",)):
            done = check(*args)
            assert done.returncode == 0, done.stdout + done.stderr
            assert json.loads(done.stdout)[0]["ok"] is True
        # A flipped byte in a chunk at HQ: only reading the data finds it.
        segment = max((p for p in repo.glob("data/*/*") if p.name.isdigit()),
                      key=lambda p: p.stat().st_size)
        damaged = bytearray(segment.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        segment.write_bytes(bytes(damaged))
        found = check("--verify-data")
        assert found.returncode == 1
        [outcome] = json.loads(found.stdout)
        assert outcome["ok"] is False and "check" in outcome["error"], outcome
        kept = json.loads((config.load(hq_env).hq_dir / "backup-audit"
                           / "test-site.checks.json").read_text())
        assert kept["check"]["ok"] is True and kept["verify_data"]["ok"] is False
        assert not list((server.repos / ".audit").glob("*.passphrase")), "not left behind"
    finally:
        server.stop()
