"""HQ to clinic for real: HQ's Orthanc, the receiver, the clinic's Orthanc and its sync service.

Why it matters: a radiologist's report read at HQ, or the prior study a clinician needs to compare
with, is worth something only once it is in the clinic's own archive, byte for byte, on whatever
link the clinic has. It must survive the link dropping mid-download and the service being killed,
costing at most the bytes in flight; no site may see another's; and what came from HQ must never
travel back up the same thin link.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from gotg_pacs.process import wait_until
from gotg_pacs.sync.inbound import Inbound, Inbox
from gotg_pacs.sync.outbox import Outbox
from gotg_pacs.sync.sender import Sender
from gotg_pacs.sync.transport import HQClient, HQRefused
from tests.conftest import run_pacs
from tests.support import corpus
from tests.support.netns import Link
from tests.support.site import owe

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def report(path: Path, patient_id: str = "GOTG-0001") -> Path:
    """A radiologist's report as a small Basic Text SR, its own study."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr = Dataset()
    sr.file_meta = meta
    sr.SOPClassUID, sr.SOPInstanceUID = BASIC_TEXT_SR, meta.MediaStorageSOPInstanceUID
    sr.StudyInstanceUID, sr.SeriesInstanceUID = generate_uid(), generate_uid()
    sr.PatientID, sr.PatientName, sr.Modality = patient_id, "Test^Report", "SR"
    sr.StudyDate = sr.ContentDate = datetime.date.today().strftime("%Y%m%d")
    sr.ContentTime = "120000"
    sr.SeriesNumber = sr.InstanceNumber = 1
    sr.ValueType, sr.CompletionFlag, sr.VerificationFlag = "CONTAINER", "COMPLETE", "VERIFIED"
    sr.ContinuityOfContent = "SEPARATE"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator = "18748-4", "LN"
    title.CodeMeaning = "Diagnostic imaging report"
    sr.ConceptNameCodeSequence = Sequence([title])
    finding = Dataset()
    finding.RelationshipType, finding.ValueType = "CONTAINS", "TEXT"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
    finding.ConceptNameCodeSequence = Sequence([name])
    finding.TextValue = "No acute fracture. Mild soft tissue swelling."
    sr.ContentSequence = Sequence([finding])
    sr.save_as(path, enforce_file_format=True)
    return path


def store_at_hq(hq, files: list[Path]) -> list[str]:
    """HQ's instance IDs (stored straight into HQ's Orthanc, as HQ's own work is)."""
    return [hq.orthanc.post("/instances", data=file.read_bytes(),
                            headers={"Content-Type": "application/dicom"})["ID"]
            for file in files]


def send(hq, *refs: str, site: str = "test-site", again: bool = False) -> dict:
    done = run_pacs("hq", "send", "--site", site, *(["--again"] if again else []), "--json",
                    *refs, env_file=hq.env_file)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def outbound(hq) -> list[dict]:
    done = run_pacs("hq", "outbound", "--json", env_file=hq.env_file)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def fetch_all(clinic, hq) -> Inbound:
    inbound = Inbound(clinic.settings, clinic.orthanc, HQClient(hq.url, hq.token))
    for _ in range(100):
        if not inbound.step():
            return inbound
    raise AssertionError("HQ's items never all arrived")


def same_bytes(clinic, hq, sop_uid: str) -> bool:
    [here] = clinic.orthanc.find_instance(sop_uid)
    [there] = hq.orthanc.find_instance(sop_uid)
    return (clinic.orthanc.request("GET", f"/instances/{here}/file").content
            == hq.orthanc.request("GET", f"/instances/{there}/file").content)


def journal_uids(hq) -> set[str]:
    path = hq.settings.hq_dir / "transfers.jsonl"
    if not path.exists():
        return set()
    return {json.loads(line)["sop_uid"] for line in path.read_text().splitlines()}


def confirmed(clinic) -> int:
    box = Outbox(clinic.settings.sync_outbox_file)
    try:
        return box.summary()["instances"].get("confirmed", {}).get("instances", 0)
    finally:
        box.close()


def test_a_report_and_a_prior_study_arrive_identical_acknowledged_and_never_go_back(
        clinic, hq, tmp_path):
    sr = report(tmp_path / "report.dcm")
    prior = corpus.renumbered_copies([corpus.DATA_DIR / name for name in
                                      ("MR2_UNCR.dcm", "693_UNCR.dcm", "US1_UNCR.dcm")],
                                     1, tmp_path / "prior")
    store_at_hq(hq, [sr, *prior])
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in [sr, *prior]]
    uids = [str(h.SOPInstanceUID) for h in headers]
    queued_sr = send(hq, uids[0])
    queued_prior = send(hq, str(headers[1].StudyInstanceUID))
    assert (queued_sr["queued"], queued_prior["queued"]) == (1, 3)
    assert send(hq, uids[0])["waiting"] == 1, "queued twice, sent once"

    # Another site's credential sees nothing of this one's queue.
    other = run_pacs("hq", "site", "add", "other-site", "--json", env_file=hq.env_file)
    stranger = HQClient(hq.url, json.loads(other.stdout)["hq_token"], timeout=5)
    assert stranger.waiting() == ([], False)
    seqs = [row["seq"] for row in outbound(hq)]
    for seq in seqs:
        with pytest.raises(HQRefused) as refused:
            stranger.download(seq, 0, 99)
        assert refused.value.status == 404
        with pytest.raises(HQRefused) as refused:
            stranger.acknowledge(seq, "0" * 32, "x")
        assert refused.value.status == 404
    with pytest.raises(HQRefused) as refused:
        HQClient(hq.url, "not-a-token", timeout=5).waiting()
    assert refused.value.status == 401

    fetch_all(clinic, hq).close()
    for uid, source in zip(uids, [sr, *prior], strict=True):
        assert same_bytes(clinic, hq, uid), source.name
    rows = outbound(hq)
    assert all(row["delivered_at"] for row in rows) and len(rows) == 4
    assert sum(row["served"] for row in rows) == sum(row["size"] for row in rows), \
        "every byte crossed once"
    status = run_pacs("sync", "inbound", "--json", env_file=clinic.env_file)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["instances"]["delivered"]["instances"] == 4
    assert shown["instances"]["waiting"]["instances"] == 0
    assert not list((clinic.settings.state_path / "sync" / "inbound").glob("*.part"))

    # The clinic's outbox owes them to HQ like anything stored here: one holdings question
    # settles it, nothing is uploaded, and HQ's journal of transfers never hears of them.
    box = owe(clinic, [])
    sender = Sender(clinic.settings, box, clinic.orthanc, HQClient(hq.url, hq.token))
    try:
        result = sender.send()
    finally:
        sender.close()
    assert len(result.already_held) == 4 and not result.confirmed and not result.refused
    assert sender.hq.bytes_sent == 0
    assert not journal_uids(hq) & set(uids)
    for uid in uids:  # HQ's provenance stays HQ's: the site is not recorded as the sender
        [there] = hq.orthanc.find_instance(uid)
        with pytest.raises(Exception):  # noqa: B017 - Orthanc answers 404: no such metadata
            hq.orthanc.request("GET", f"/instances/{there}/metadata/GotgSite")
    box.close()

    # Sent again on purpose (the site restored an old backup): acknowledged from what the
    # clinic holds, not a byte downloaded.
    assert send(hq, uids[0], again=True)["requeued"] == 1
    fetch_all(clinic, hq).close()
    [row] = [row for row in outbound(hq) if row["sop_uid"] == uids[0]]
    assert row["delivered_at"] and row["served"] == row["size"]


def test_a_service_killed_mid_download_resumes_where_its_file_ends(make_clinic, hq):
    big = corpus.DATA_DIR / "RG3_UNCR.dcm"  # 6 MB
    # A 4 Mbit/s cap: about 12 s of downloading, in ranges of about 2 MB (four seconds).
    clinic = make_clinic(hq.url, MAX_BANDWIDTH_MBPS="4", SYNC_INTERVAL="5s")
    store_at_hq(hq, [big])
    send(hq, str(pydicom.dcmread(big, stop_before_pixels=True).SOPInstanceUID))
    size = big.stat().st_size
    inbound_dir = clinic.settings.state_path / "sync" / "inbound"
    argv = [sys.executable, "-m", "gotg_pacs", "--env-file", str(clinic.env_file), "sync", "run"]
    service = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: any(p.stat().st_size > 2_500_000
                                      for p in inbound_dir.glob("*.part")), 60, interval=0.02)
        service.send_signal(signal.SIGKILL)
        service.wait(10)
        [part] = inbound_dir.glob("*.part")
        kept = part.stat().st_size
        service = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        assert wait_until(lambda: all(row["delivered_at"] for row in outbound(hq)), 120,
                          interval=1)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(60)
    assert same_bytes(clinic, hq, str(pydicom.dcmread(big, stop_before_pixels=True)
                                      .SOPInstanceUID))
    [row] = outbound(hq)
    lost = row["served"] - size
    print(f"kill -9 at {kept} of {size} bytes: {row['served']} served in {row['fetches']} "
          f"ranges, {lost} lost")
    assert 0 <= lost <= 2_100_000, f"{lost} bytes fetched twice: at most the range in flight"
    with Inbox(inbound_dir / "inbound.sqlite", readonly=True) as inbox:
        assert inbox.summary()["instances"]["delivered"]["instances"] == 1


@pytest.fixture
def link():
    made = Link(subnet=212)
    yield made
    made.close()


def test_a_download_cut_by_an_outage_resumes_losing_at_most_what_was_in_flight(
        hq, make_clinic, link):
    link.shape("1mbit")
    clinic = make_clinic(link.expose(hq.settings.hq_receiver_port), SYNC_INTERVAL="5s")
    prior = corpus.DATA_DIR / "RG1_J2KR.dcm"  # 4.3 MB: some 35 s at 1 Mbit/s
    store_at_hq(hq, [prior])
    uid = str(pydicom.dcmread(prior, stop_before_pixels=True).SOPInstanceUID)
    send(hq, uid)
    size = prior.stat().st_size
    inbound_dir = clinic.settings.state_path / "sync" / "inbound"
    service = subprocess.Popen([sys.executable, "-m", "gotg_pacs", "--env-file",
                                str(clinic.env_file), "sync", "run"], stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: any(p.stat().st_size > 1_500_000
                                      for p in inbound_dir.glob("*.part")), 120, interval=0.05)
        link.down()
        time.sleep(15)  # longer than a TCP hiccup, and than the clinic's read timeout
        cut_at = next(inbound_dir.glob("*.part")).stat().st_size
        link.up()
        assert wait_until(lambda: all(row["delivered_at"] for row in outbound(hq)), 180,
                          interval=1)
        # The service's outbox then owes it to HQ (once its study is stable): its own
        # holdings question settles that, and no upload of it ever begins.
        assert wait_until(lambda: confirmed(clinic) == 1, 90, interval=1)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(60)
    assert same_bytes(clinic, hq, uid)
    [row] = outbound(hq)
    with Inbox(inbound_dir / "inbound.sqlite", readonly=True) as inbox:
        [item] = inbox.items()
    lost = row["served"] - size
    print(f"outage at {cut_at} of {size} bytes: HQ served {row['served']} in {row['fetches']} "
          f"ranges, the clinic received {item['received']}, {lost} lost in flight")
    assert item["received"] == size, "nothing that reached the clinic's disk came twice"
    assert 0 <= lost <= 600_000, f"{lost} bytes lost: at most one range (4 s of 1 Mbit/s)"
    assert hashlib.md5(prior.read_bytes()).hexdigest() == row["md5"]
    assert uid not in journal_uids(hq)
    assert not list((hq.settings.hq_dir / "uploads").glob("*.json"))
