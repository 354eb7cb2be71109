"""Clinics that disagree, for real: two clinic Orthancs, DCMTK, the HQ receiver, HQ's Orthanc on
PostgreSQL.

Why it matters: two clinics' patient "12345" are two people and must never become one record at
HQ; a corrected image must never overwrite (or be lost behind) the one HQ already holds; and a
person, not the archive, decides whether two records are one patient.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from gotg_pacs.sync.sender import Sender
from gotg_pacs.sync.transport import HQClient, HQRefused
from tests.conftest import run_pacs
from tests.support import corpus
from tests.support.site import owe, same_at_hq, write_env


def _patient(source: Path, target: Path, patient_id: str, name: str, study: str | None = None,
             birth: str = "19800101", sex: str = "F") -> Path:
    """A copy of `source` for this patient, in a study of its own (or `study`)."""
    dataset = pydicom.dcmread(source)
    dataset.PatientID, dataset.PatientName = patient_id, name
    dataset.PatientBirthDate, dataset.PatientSex = birth, sex
    dataset.StudyInstanceUID = study or generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    target.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(target, enforce_file_format=True)
    return target


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _send(clinic, token: str, url: str, files: list[Path]):
    box = owe(clinic, files)
    sender = Sender(clinic.settings, box, clinic.orthanc, HQClient(url, token))
    try:
        return sender.send(), box
    finally:
        sender.close()


def _token(hq, *args: str) -> str:
    added = run_pacs("hq", *args, "--json", env_file=hq.env_file)
    assert added.returncode == 0, added.stderr
    answer = json.loads(added.stdout)
    return answer.get("hq_token") or answer["token"]


@pytest.fixture
def site_b(appliance_factory, tmp_path, hq):
    """A second clinic with its own site code and credential."""
    token = _token(hq, "site", "add", "site-b")
    home = tmp_path / "clinic-b"
    home.mkdir()
    write_env(home / "pacs.env", SITE_CODE="site-b", HQ_URL=hq.url, HQ_TOKEN=token,
              OFFLINE_MODE="auto", COMPRESSION_LEVEL="6")
    clinic = appliance_factory("clinic-b")
    clinic.token = token
    return clinic


@pytest.fixture
def operator(hq) -> dict[str, str]:
    return {"Authorization": f"Bearer {_token(hq, 'operator', 'add', 'nadia')}"}


def _hq_patients(hq) -> dict[str, str]:
    """HQ's patients: PatientID -> PatientName."""
    return {p["MainDicomTags"]["PatientID"]: p["MainDicomTags"].get("PatientName", "")
            for p in hq.orthanc.get("/patients?expand")}


def test_two_sites_same_patient_id_stay_two_patients_and_both_are_confirmed_and_verified(
        clinic, site_b, hq, operator, tmp_path):
    mr, ct = corpus.DATA_DIR / "MR2_UNCR.dcm", corpus.DATA_DIR / "693_UNCR.dcm"
    a_files = [_patient(mr, tmp_path / "a" / "1.dcm", "12345", "Amina^Haddad"),
               _patient(ct, tmp_path / "a" / "2.dcm", "555", "Layla^Saad")]
    b_files = [_patient(mr, tmp_path / "b" / "1.dcm", "12345", "Omar^Khalil", sex="M")]
    # A referral: site-b also holds site-a's CT of another patient, the same file, same UIDs.
    b_files.append(a_files[1])

    sent_a, box_a = _send(clinic, hq.token, hq.url, a_files)
    sent_b, box_b = _send(site_b, site_b.token, hq.url, b_files)
    assert len(sent_a.confirmed) == 2 and len(sent_b.confirmed) == 2
    assert not sent_a.refused and not sent_b.refused

    assert _hq_patients(hq) == {"test-site:12345": "Amina^Haddad", "site-b:12345": "Omar^Khalil",
                                "test-site:555": "Layla^Saad", "site-b:555": "Layla^Saad"}
    for path in a_files:
        assert same_at_hq(clinic.orthanc, hq.orthanc, _uid(path), site="test-site"), path.name
    for path in b_files:
        assert same_at_hq(site_b.orthanc, hq.orthanc, _uid(path), site="site-b"), path.name
    # The referred CT: one copy per site, each under its own site's patient.
    shared = _uid(a_files[1])
    copies = hq.orthanc.find_instance(shared)
    assert len(copies) == 2
    owners = {hq.orthanc.get(f"/instances/{i}/patient")["MainDicomTags"]["PatientID"]
              for i in copies}
    assert owners == {"test-site:555", "site-b:555"}
    [stored] = [i for i in copies if hq.orthanc.get(f"/instances/{i}/patient")
                ["MainDicomTags"]["PatientID"] == "test-site:555"]
    header = pydicom.dcmread(io.BytesIO(
        hq.orthanc.request("GET", f"/instances/{stored}/file").content))
    assert header.IssuerOfPatientID == "test-site"
    assert header.OtherPatientIDsSequence[-1].PatientID == "555"

    # Each site asks about its own copies and hears of its own only.
    [row_a] = box_a.db.execute("SELECT original_md5, hq_id FROM instances WHERE sop_uid = ?",
                               (shared,)).fetchall()
    assert HQClient(hq.url, hq.token).holdings(
        [{"sop_uid": shared, "original_md5": row_a[0]}]) == [row_a[1]]
    assert HQClient(hq.url, site_b.token).holdings(
        [{"sop_uid": shared, "original_md5": row_a[0]}]) != [row_a[1]]
    box_a.close()
    box_b.close()

    # The same PatientID at two sites, and one study at two sites with the same demographics,
    # are no disagreement: nothing for a person to reconcile.
    assert requests.get(f"{hq.url}/api/v1/reconciliation", headers=operator,
                        timeout=10).json()["entries"] == []
    audit = [json.loads(line) for line in
             (hq.settings.hq_dir / "audit.jsonl").read_text().splitlines()]
    assert [(a["event"], a["site"], a["also_from"]) for a in audit if a["event"] == "shared"] \
        == [("shared", "site-b", ["test-site"])]


def _upload(client: HQClient, payload: bytes, sop_uid: str) -> str | None:
    md5 = hashlib.md5(payload).hexdigest()
    url = client.create(len(payload), {"sop_uid": sop_uid, "codec": "identity",
                                       "payload_md5": md5, "original_md5": md5})
    return client.append(url, 0, payload)[1]


def test_a_revision_is_kept_audited_and_confirmed_and_the_original_untouched(clinic, hq,
                                                                            operator, tmp_path):
    source = _patient(corpus.DATA_DIR / "MR2_UNCR.dcm", tmp_path / "first.dcm", "P-7",
                      "Sara^Nasser")
    uid = _uid(source)
    sent, box = _send(clinic, hq.token, hq.url, [source])
    assert len(sent.confirmed) == 1
    [(first_md5,)] = box.db.execute("SELECT original_md5 FROM instances").fetchall()
    box.close()
    [original_id] = hq.orthanc.find_instance(uid)
    before = hq.orthanc.request("GET", f"/instances/{original_id}/file").content

    # The site corrects the name and sends the same SOP Instance UID again.
    revised = pydicom.dcmread(source)
    revised.PatientName = "Sarah^Nasser"
    revised.save_as(tmp_path / "revised.dcm", enforce_file_format=True)
    payload = (tmp_path / "revised.dcm").read_bytes()
    client = HQClient(hq.url, hq.token)
    revision = _upload(client, payload, uid)
    assert revision and revision.startswith("rev-")
    assert _upload(client, payload, uid) == revision, "sent again: the same answer"
    md5 = hashlib.md5(payload).hexdigest()
    assert client.holdings([{"sop_uid": uid, "original_md5": md5}]) == [revision]

    # HQ's Orthanc still serves the first version, untouched; the revision is kept aside.
    assert hq.orthanc.find_instance(uid) == [original_id]
    assert hq.orthanc.request("GET", f"/instances/{original_id}/file").content == before
    kept = requests.get(f"{hq.url}/api/v1/revisions/{revision}/file", headers=operator,
                        timeout=10)
    assert kept.status_code == 200 and kept.content == payload
    info = requests.get(f"{hq.url}/api/v1/revisions/{revision}", headers=operator,
                        timeout=10).json()
    assert info["site"] == "test-site" and info["differing"] == ["PatientName"]
    [audit] = [json.loads(line) for line in
               (hq.settings.hq_dir / "audit.jsonl").read_text().splitlines()
               if json.loads(line)["event"] == "revision"]
    assert audit["old_md5"] == first_md5
    assert audit["new_md5"] == md5 and audit["differing"] == ["PatientName"]
    assert audit["old_hq_id"] == original_id and audit["time"]
    entries = requests.get(f"{hq.url}/api/v1/reconciliation", headers=operator,
                           timeout=10).json()["entries"]
    assert [e["kind"] for e in entries] == ["revision"]
    # A site never reads revisions, its own or another's.
    assert requests.get(f"{hq.url}/api/v1/revisions/{revision}/file", timeout=10,
                        headers={"Authorization": f"Bearer {hq.token}"}).status_code == 403


HOSTILE_ID = "../../<b>x</b>"
HOSTILE_NAME = "<img src=x onerror=alert(1)>^../../etc"


# An ESC in a name is also a DICOM character-set escape: pydicom warns, and keeps it as data.
@pytest.mark.filterwarnings("ignore:Found unknown escape sequence")
def test_the_reconciliation_list_over_http_and_cli_for_operators_only_with_hostile_values(
        clinic, hq, operator, tmp_path):
    mr = corpus.DATA_DIR / "MR2_UNCR.dcm"
    files = [_patient(mr, tmp_path / "1.dcm", HOSTILE_ID, HOSTILE_NAME),
             _patient(mr, tmp_path / "2.dcm", HOSTILE_ID, "Other^Name\x1b[2J", sex="M")]
    sent, box = _send(clinic, hq.token, hq.url, files)
    assert len(sent.confirmed) == 2
    box.close()
    # Stored as data: one qualified patient, each instance as sent (nothing merged or edited).
    assert list(_hq_patients(hq)) == [f"test-site:{HOSTILE_ID}"]
    for path in files:
        assert same_at_hq(clinic.orthanc, hq.orthanc, _uid(path))
    for path in hq.settings.hq_dir.rglob("*"):
        assert "<" not in path.name and path.resolve().is_relative_to(hq.settings.hq_dir)

    url = f"{hq.url}/api/v1/reconciliation"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers={"Authorization": f"Bearer {hq.token}"},
                        timeout=10).status_code == 403, "a site never reads other patients"
    assert requests.post(f"{url}/1/resolve", json={"decision": "same-patient"}, timeout=10,
                         headers={"Authorization": f"Bearer {hq.token}"}).status_code == 403
    with pytest.raises(HQRefused) as upload:  # an operator's token uploads nothing
        HQClient(hq.url, operator["Authorization"][7:]).holdings([])
    assert upload.value.status == 401

    answer = requests.get(url, headers=operator, timeout=10)
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    [entry] = answer.json()["entries"]
    assert entry["kind"] == "patient-demographics"
    assert entry["subject"] == f"test-site:{HOSTILE_ID}"
    assert sorted((v["PatientName"], v["PatientSex"]) for v in entry["variants"]) == [
        (HOSTILE_NAME, "F"), ("Other^Name\x1b[2J", "M")]

    listed = run_pacs("hq", "reconcile", "list", env_file=hq.env_file)
    assert listed.returncode == 0 and f"#{entry['id']} open" in listed.stdout
    shown = run_pacs("hq", "reconcile", "show", str(entry["id"]), env_file=hq.env_file)
    assert shown.returncode == 0 and HOSTILE_NAME in shown.stdout
    assert "\x1b" not in shown.stdout and "\\x1b[2J" in shown.stdout, "no terminal escapes"

    bad = requests.post(f"{url}/{entry['id']}/resolve", json={"decision": "merge"},
                        headers=operator, timeout=10)
    assert bad.status_code == 400
    resolved = requests.post(f"{url}/{entry['id']}/resolve", headers=operator, timeout=10,
                             json={"decision": "different-patients", "note": "twins"}).json()
    assert resolved["state"] == "resolved" and resolved["resolutions"][0]["by"] == "nadia"
    assert requests.get(url, headers=operator, timeout=10).json()["entries"] == []
    everything = json.loads(run_pacs("hq", "reconcile", "list", "--state", "all", "--json",
                                     env_file=hq.env_file).stdout)
    assert [e["resolutions"][0]["decision"] for e in everything] == ["different-patients"]
    again = run_pacs("hq", "reconcile", "resolve", str(entry["id"]), "--decision",
                     "same-patient", "--note", "checked the register", "--by", "omar",
                     "--json", env_file=hq.env_file)
    assert again.returncode == 0, again.stderr
    assert [r["by"] for r in json.loads(again.stdout)["resolutions"]] == ["nadia", "omar"]
    assert run_pacs("hq", "reconcile", "show", "999", env_file=hq.env_file).returncode != 0
    # Deciding changes no image: HQ still holds both instances exactly as sent.
    assert list(_hq_patients(hq)) == [f"test-site:{HOSTILE_ID}"]
    for path in files:
        assert same_at_hq(clinic.orthanc, hq.orthanc, _uid(path))
