"""Clinic to HQ for real: two Orthancs, the HQ receiver, tus uploads, confirmations.

Why it matters: an instance counts as at HQ only when HQ's Orthanc holds exactly it; a study HQ
already has must cost only a question; a transfer cut anywhere must resume, not restart.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from gotg_pacs import audit, config
from gotg_pacs.audit import AuditLog
from gotg_pacs.data_disk import luks
from gotg_pacs.hq.receiver import sweep
from gotg_pacs.process import wait_until
from gotg_pacs.sync.outbox import Outbox
from gotg_pacs.sync.sender import LocalTrouble, Sender, SenderBusy
from gotg_pacs.sync.transport import HQClient, HQRefused
from tests.conftest import run_pacs
from tests.support import corpus
from tests.support.site import free_port, hq_answers, owe, same_at_hq


def test_every_instance_reaches_hq_verified_and_a_resend_costs_only_the_question(clinic, hq):
    files = corpus.representative()[:6]
    box = owe(clinic, files)
    sender = Sender(clinic.settings, box, clinic.orthanc, HQClient(hq.url, hq.token))
    sent = sender.send()
    assert len(sent.confirmed) == len(files) and not sent.refused
    assert box.summary()["instances"] == {"confirmed": {"instances": len(files),
                                                         "bytes": box.summary()["instances"]
                                                         ["confirmed"]["bytes"]}}
    for source in files:
        uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        assert same_at_hq(clinic.orthanc, hq.orthanc, uid), source.name
        [there] = hq.orthanc.find_instance(uid)
        assert hq.orthanc.request("GET", f"/instances/{there}/metadata/GotgSite").text \
            == "test-site"
    journal = [json.loads(line) for line in
               (hq.settings.hq_dir / "transfers.jsonl").read_text().splitlines()]
    assert sum(entry["length"] for entry in journal) < sum(f.stat().st_size for f in files)
    assert "jxl" in {entry["codec"] for entry in journal}, "native CT, MR, US: JPEG XL"

    # The clinic forgets everything (a fresh outbox): HQ's answer confirms it all, no upload.
    sender.close()
    box.close()
    clinic.settings.sync_outbox_file.unlink()
    fresh = owe(clinic, [])
    again = Sender(clinic.settings, fresh, clinic.orthanc, HQClient(hq.url, hq.token))
    result = again.send()
    assert len(result.already_held) == len(files) and not result.confirmed
    assert again.hq.bytes_sent == 0


def test_a_transfer_killed_mid_upload_resumes_losing_at_most_one_chunk(clinic, hq, tmp_path):
    big = corpus.DATA_DIR / "RG3_UNCR.dcm"  # 6 MB; sent as is to make the upload long
    env = clinic.env_file
    # A 4 Mbit/s cap: chunks of about 2 MB (four seconds of the link), three of them.
    env.write_text(env.read_text().replace("COMPRESSION_LEVEL=6", "COMPRESSION_LEVEL=0")
                   + "MAX_BANDWIDTH_MBPS=4\n")
    box = owe(clinic, [big])
    box.close()
    argv = [sys.executable, "-m", "gotg_pacs", "--env-file", str(env), "sync", "run"]
    uploads = hq.settings.hq_dir / "uploads"
    service = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    # Kill -9 once HQ holds part of the file, wherever the sender is.
    assert wait_until(lambda: any(p.stat().st_size > 1_000_000 for p in uploads.glob("*.part")),
                      60, interval=0.02)
    service.send_signal(signal.SIGKILL)
    service.wait(10)
    [part] = uploads.glob("*.part")
    assert 0 < part.stat().st_size < big.stat().st_size
    service = subprocess.Popen(argv, stderr=open(tmp_path / "sync.log", "w"))  # noqa: SIM115
    try:
        assert wait_until(lambda: Outbox(clinic.settings.sync_outbox_file).summary()["instances"]
                          .get("confirmed", {}).get("instances") == 1, 60, interval=0.5)
    finally:
        service.terminate()
        service.wait(30)
    [entry] = [json.loads(line) for line in
               (hq.settings.hq_dir / "transfers.jsonl").read_text().splitlines()]
    assert entry["codec"] == "identity"
    assert entry["max_chunk"] <= 2 * 2**20, "chunks follow the capped rate"
    assert entry["received"] - entry["length"] <= entry["max_chunk"], "more than a chunk re-sent"
    assert list(uploads.glob("*.part")) == [], "resumed the same upload, none left behind"
    uid = str(pydicom.dcmread(big, stop_before_pixels=True).SOPInstanceUID)
    assert same_at_hq(clinic.orthanc, hq.orthanc, uid)


def test_hq_refuses_strangers_revoked_sites_and_damaged_payloads(clinic, hq):
    with pytest.raises(HQRefused) as stranger:
        HQClient(hq.url, "not-a-token").holdings([])
    assert stranger.value.status == 401
    client = HQClient(hq.url, hq.token)
    url = client.create(4, {"sop_uid": "1.2.3", "codec": "identity", "payload_md5": "0" * 32,
                            "original_md5": "0" * 32})
    with pytest.raises(HQRefused) as damaged:
        client.append(url, 0, b"DICM")
    assert damaged.value.status == 422
    assert hq.instance_count() == 0
    assert run_pacs("hq", "site", "revoke", "test-site", env_file=hq.env_file).returncode == 0
    with pytest.raises(HQRefused) as revoked:  # on its very next request
        client.holdings([])
    assert revoked.value.status == 401


def test_sync_now_and_test_connection_from_the_command_line(clinic, hq):
    env = clinic.env_file
    ok = run_pacs("sync", "test-connection", "--json", env_file=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    files = corpus.representative()[:3]
    owe(clinic, files).close()
    now = run_pacs("sync", "now", "--json", env_file=env)
    assert now.returncode == 0, now.stderr
    assert json.loads(now.stdout)["confirmed"] == len(files)
    assert hq.instance_count() == len(files)

    assert run_pacs("sync", "mode", "offline", env_file=env).returncode == 0
    refused = run_pacs("sync", "now", env_file=env)
    assert refused.returncode == 1 and "offline" in refused.stderr

    assert run_pacs("hq", "site", "revoke", "test-site", env_file=hq.env_file).returncode == 0
    bad = run_pacs("sync", "test-connection", env_file=env)
    assert bad.returncode == 1 and "refused this site's credential" in bad.stdout


def test_holdings_answer_the_exact_pair_and_only_to_the_site_that_sent_it(clinic, hq):
    files = corpus.representative()[:1]
    box = owe(clinic, files)
    sender = Sender(clinic.settings, box, clinic.orthanc, HQClient(hq.url, hq.token))
    assert len(sender.send().confirmed) == 1
    [row] = box.db.execute("SELECT sop_uid, original_md5, hq_id FROM instances").fetchall()
    client = HQClient(hq.url, hq.token)
    # The same UID asked again with other content (a corrected version): not held.
    assert client.holdings([{"sop_uid": row[0], "original_md5": row[1]},
                            {"sop_uid": row[0], "original_md5": "f" * 32}]) == [row[2], None]
    other = json.loads(run_pacs("hq", "site", "add", "other-site", "--json",
                                env_file=hq.env_file).stdout)["hq_token"]
    assert HQClient(hq.url, other).holdings(
        [{"sop_uid": row[0], "original_md5": row[1]}]) == [None]


def test_an_instance_deleted_here_before_hq_had_it_is_never_counted_and_blocks_nothing(clinic,
                                                                                       hq):
    files = corpus.representative()[:3]
    box = owe(clinic, files)
    victim = str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
    [victim_id] = clinic.orthanc.find_instance(victim)
    clinic.orthanc.delete(f"/instances/{victim_id}")
    sent = Sender(clinic.settings, box, clinic.orthanc, HQClient(hq.url, hq.token)).send()
    assert len(sent.confirmed) == 2
    states = dict(box.db.execute("SELECT orthanc_id, state FROM instances").fetchall())
    assert states[victim_id] == "gone"
    assert sorted(states.values()) == ["confirmed", "confirmed", "gone"]
    assert hq.orthanc.find_instance(victim) == []


def _upload_whole(client: HQClient, payload: bytes, sop_uid: str) -> str:
    """An upload at HQ with every byte but the last in place."""
    url = client.create(len(payload), {"sop_uid": sop_uid, "codec": "identity",
                                       "payload_md5": hashlib.md5(payload).hexdigest(),
                                       "original_md5": hashlib.md5(payload).hexdigest()})
    assert client.append(url, 0, payload[:-1]) == (len(payload) - 1, None)
    return url


def _announce_wrongly(box: Outbox, sop_uid) -> str:
    """Make the clinic announce another SOP Instance UID than its file holds (a damaged outbox
    row): HQ refuses such an upload for good. Returns the UID announced."""
    wrong = f"{sop_uid}.999"
    box.db.execute("UPDATE instances SET sop_uid = ? WHERE sop_uid = ?", (wrong, str(sop_uid)))
    return wrong


def test_a_last_chunk_sent_twice_at_once_stores_once_and_answers_both(hq):
    """The clinic's timeout can fire while HQ still stores a large instance: the retried last
    chunk must wait for the first and get the same confirmation, never a second store."""
    source = corpus.DATA_DIR / "MR2_UNCR.dcm"
    payload = source.read_bytes()
    uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    url = _upload_whole(HQClient(hq.url, hq.token), payload, uid)
    answers = []

    def last_chunk() -> None:
        answers.append(HQClient(hq.url, hq.token, timeout=60).append(url, len(payload) - 1,
                                                                     payload[-1:]))

    threads = [threading.Thread(target=last_chunk) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [hq_id] = hq.orthanc.find_instance(uid)
    assert answers == [(len(payload), hq_id)] * 4
    journal = (hq.settings.hq_dir / "transfers.jsonl").read_text().splitlines()
    assert len(journal) == 1, "finalized once"
    # Asked again later (the answer was lost): HEAD and PATCH both still confirm it.
    assert HQClient(hq.url, hq.token).offset(url) == (len(payload), hq_id)
    assert HQClient(hq.url, hq.token).append(url, len(payload), b"") == (len(payload), hq_id)
    assert list((hq.settings.hq_dir / "uploads").glob("*.part")) == []


def test_a_chunk_cut_off_by_an_outage_does_not_hold_the_upload_when_the_clinic_returns(hq):
    """A link that drops mid-chunk sends HQ no FIN: the request reading that chunk would hold
    the upload for the receiver's socket timeout (a minute) while the clinic, its link back,
    waits. The clinic's next HEAD must cut the stale request off, count the bytes it had, and
    the resumed PATCH go through at once."""
    source = corpus.DATA_DIR / "MR2_UNCR.dcm"
    payload = source.read_bytes()
    uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    client = HQClient(hq.url, hq.token, timeout=30)
    url = client.create(len(payload), {"sop_uid": uid, "codec": "identity",
                                       "payload_md5": hashlib.md5(payload).hexdigest(),
                                       "original_md5": hashlib.md5(payload).hexdigest()})
    path = url.removeprefix(hq.url)
    arrived = 300_000  # of a chunk announced as the whole payload
    stale = socket.create_connection(("127.0.0.1", int(hq.url.rsplit(":", 1)[1])))
    try:
        stale.sendall(
            f"PATCH {path} HTTP/1.1\r\nHost: hq\r\nAuthorization: Bearer {hq.token}\r\n"
            f"Tus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n"
            f"Content-Type: application/offset+octet-stream\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload[:arrived])
        time.sleep(1)  # the receiver reads what arrived; the rest never comes, nor a FIN
        started = time.monotonic()
        offset, confirmed = client.offset(url)
        assert (offset, confirmed) == (arrived, None), "the bytes that arrived are kept"
        assert client.append(url, offset, payload[offset:], total=len(payload))[1]
        assert time.monotonic() - started < 10, "the resume did not wait for the stale request"
    finally:
        stale.close()
    [hq_id] = hq.orthanc.find_instance(uid)
    # HQ verified the reassembled payload against the original's MD5 before storing it.
    assert hq.orthanc.request("GET", f"/instances/{hq_id}/metadata/GotgOriginalMd5"
                              ).text.strip() == hashlib.md5(payload).hexdigest()


def test_a_refusal_is_answered_again_the_same_and_another_site_sees_nothing(hq):
    client = HQClient(hq.url, hq.token)
    url = _upload_whole(client, b"not dicom at all", "1.2.3")
    with pytest.raises(HQRefused) as first:
        client.append(url, 15, b"l")
    with pytest.raises(HQRefused) as again:
        client.append(url, 16, b"")
    assert first.value.status == again.value.status == 422
    assert client.offset(url) is None, "a refused upload is gone: the clinic starts over"
    other = json.loads(run_pacs("hq", "site", "add", "other-site", "--json",
                                env_file=hq.env_file).stdout)["hq_token"]
    with pytest.raises(HQRefused) as stranger:
        HQClient(hq.url, other).append(url, 16, b"")
    assert stranger.value.status == 404


def test_uploads_idle_for_a_week_are_forgotten(tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    now = time.time()
    for name, age_days in (("a" * 32, 8), ("b" * 32, 1)):
        for suffix in (".part", ".json"):
            (uploads / f"{name}{suffix}").write_bytes(b"x")
        os.utime(uploads / f"{name}.json", (now - age_days * 86400,) * 2)
    (uploads / f"{'c' * 32}.done").write_text("{}")
    os.utime(uploads / f"{'c' * 32}.done", (now - 9 * 86400,) * 2)
    assert sweep(uploads, now) == 2
    assert sorted(p.name for p in uploads.iterdir()) == [f"{'b' * 32}.json", f"{'b' * 32}.part"]


def test_an_instance_hq_refuses_waits_before_it_is_tried_again_and_staff_see_why(clinic, hq):
    """HQ refuses an instance (here: its content is not the instance the clinic announced):
    not re-packed and re-sent on every turn of a paid link. (Other content under a UID HQ
    already holds is no refusal: HQ keeps it as a revision, see test_hq_conflicts.)"""
    [source] = corpus.representative()[:1]
    box = owe(clinic, [source])
    _announce_wrongly(box, pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    sender = Sender(clinic.settings, box, clinic.orthanc, HQClient(hq.url, hq.token))
    first = sender.send()
    assert len(first.refused) == 1 and not first.confirmed
    sent_before = sender.hq.bytes_sent
    assert sender.send().refused == [], "paused: not tried again at once"
    assert sender.hq.bytes_sent == sent_before
    [refusal] = box.refusals()
    assert refusal["refusals"] == 1 and "differs from the announced" in refusal["last_error"]
    assert refusal["retry_at"] > time.time() + 200
    sender.close()
    box.close()
    status = run_pacs("sync", "status", "--json", env_file=clinic.env_file)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["refused_instances"] == 1
    assert "differs from the announced" in report["refusals"][0]["last_error"]
    text = run_pacs("sync", "status", env_file=clinic.env_file).stdout
    assert "1 instances refused" in text and "differs from the announced" in text


def test_kill_9_of_the_hq_receiver_mid_upload_loses_and_duplicates_nothing(clinic, hq, tmp_path):
    """HQ's receiver dies hard while a chunk streams in, and again later: a new receiver
    continues from what reached the disk; every instance is stored once and verified."""
    files = [corpus.DATA_DIR / "RG3_UNCR.dcm", *corpus.representative()[:3]]
    env = clinic.env_file
    env.write_text(env.read_text().replace("COMPRESSION_LEVEL=6", "COMPRESSION_LEVEL=0")
                   + "MAX_BANDWIDTH_MBPS=8\n")  # chunks of about 4 MB
    owe(clinic, files).close()
    uploads = hq.settings.hq_dir / "uploads"
    service = subprocess.Popen([sys.executable, "-m", "gotg_pacs", "--env-file", str(env),
                                "sync", "run"], stderr=open(tmp_path / "sync.log", "w"))  # noqa: SIM115
    try:
        for _ in range(2):
            assert wait_until(lambda: any(p.stat().st_size > 0 for p in uploads.glob("*.part")),
                              60, interval=0.01)
            hq.receiver.send_signal(signal.SIGKILL)
            hq.receiver.wait(10)
            time.sleep(2)  # the clinic meets a dead receiver, then a new one
            hq.start_receiver()
        box = Outbox(clinic.settings.sync_outbox_file, readonly=True)
        assert wait_until(lambda: box.summary()["instances"].get("confirmed", {})
                          .get("instances") == len(files), 120, interval=0.5)
        box.close()
    finally:
        service.terminate()
        service.wait(30)
    for source in files:
        uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        assert len(hq.orthanc.find_instance(uid)) == 1
        assert same_at_hq(clinic.orthanc, hq.orthanc, uid), source.name
    assert hq.instance_count() == len(files)
    journal = [json.loads(line) for line in
               (hq.settings.hq_dir / "transfers.jsonl").read_text().splitlines()]
    assert sorted(entry["sop_uid"] for entry in journal if entry["sop_uid"]) == sorted(
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)


def test_small_instances_travel_in_batches_and_one_refusal_spares_the_rest(clinic, hq, tmp_path):
    """Thirty small CT slices: a few uploads instead of thirty round trips each; HQ refusing
    one of them refuses that one only."""
    ct_small = Path(get_testdata_file("CT_small.dcm"))  # 39 KB, as a small CT slice travels
    files = corpus.renumbered_copies([ct_small], 30, tmp_path / "ct")
    box = owe(clinic, files)
    victim = _announce_wrongly(box, pydicom.dcmread(files[7]).SOPInstanceUID)
    sender = Sender(clinic.settings, box, clinic.orthanc, HQClient(hq.url, hq.token))
    try:
        sent = sender.send()
    finally:
        sender.close()
    assert len(sent.confirmed) == 29 and len(sent.refused) == 1
    [refusal] = box.refusals()
    assert refusal["sop_uid"] == victim
    assert "differs from the announced" in refusal["last_error"]
    journal = [json.loads(line) for line in
               (hq.settings.hq_dir / "transfers.jsonl").read_text().splitlines()]
    batches = [entry for entry in journal if entry["codec"] == "batch"]
    assert batches and sum(entry["members"] for entry in batches) == 30
    assert len(batches) <= 3, "a few uploads, not thirty"
    for source in files:
        uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        if f"{uid}.999" != victim:
            assert same_at_hq(clinic.orthanc, hq.orthanc, uid)
    box.close()


def test_a_payload_cut_short_on_disk_is_packed_again_and_one_sender_works_at_a_time(clinic, hq):
    """After a power cut a payload file may be shorter than its sidecar says: it is never
    sent as is (HQ would refuse it and the instance would pause for minutes); and two senders
    at one site (the service and `pacs sync now`) would overwrite each other's payloads."""
    box = owe(clinic, corpus.representative()[1:2])
    sender = Sender(clinic.settings, box, clinic.orthanc, HQClient(hq.url, hq.token))
    try:
        with pytest.raises(SenderBusy):
            Sender(clinic.settings, box, clinic.orthanc, HQClient(hq.url, hq.token))
        [row] = box.ready()
        md5 = sender._original_md5(row["orthanc_id"])
        payload = sender.packer.pack(row["orthanc_id"], md5, 6)
        with open(payload.path, "r+b") as handle:
            handle.truncate(payload.size // 2)
        assert sender.packer.existing(row["orthanc_id"], md5) is None
        sent = sender.send()
        assert len(sent.confirmed) == 1 and not sent.refused
    finally:
        sender.close()
    assert same_at_hq(clinic.orthanc, hq.orthanc, row["sop_uid"])
    busy = subprocess.run([sys.executable, "-m", "gotg_pacs", "--env-file",
                           str(clinic.env_file), "sync", "now"], capture_output=True, text=True)
    assert busy.returncode == 0, "the lock is released when a sender closes"
    box.close()


def test_on_a_poor_link_lossy_previews_go_first_where_they_save_and_never_count(clinic, hq):
    """Under 1 Mbit/s HQ gets a lossy preview ahead of a lossless original only where it saves
    much: the CR whose lossless payload is 5.7x its preview gets one; the small CT (1.5x) and
    the ultrasound (no lossy policy) get none; only originals are ever confirmed."""
    files = [corpus.DATA_DIR / name for name in ("RG1_UNCR.dcm", "693_UNCR.dcm", "US1_UNCR.dcm")]
    originals = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    box = owe(clinic, files)
    sender = Sender(clinic.settings, box, clinic.orthanc, HQClient(hq.url, hq.token))
    try:
        for _ in range(10):  # as measured on a 0.5 Mbit/s link (the sending itself is local)
            sender.hq.link.sent(250_000, 4.0)
        assert sender.hq.link.tier == "poor"
        sent = sender.send()
        assert len(sent.confirmed) == 3 and not sent.refused
        again = sender.send()
        assert not again.confirmed and not again.already_held
    finally:
        sender.close()
    journal = [json.loads(line) for line in
               (hq.settings.hq_dir / "transfers.jsonl").read_text().splitlines()]
    order = [entry["sop_uid"] for entry in journal if entry["sop_uid"]]
    previews = [uid for uid in order if uid not in originals]
    assert len(previews) == 1, "the CR only"
    assert order.index(previews[0]) < min(order.index(uid) for uid in originals)
    assert len(order) == 4, "the preview sent once"
    [there] = hq.orthanc.find_instance(previews[0])
    tags = hq.orthanc.get(f"/instances/{there}/simplified-tags")
    assert tags["LossyImageCompression"] == "01" and tags["ImageType"].startswith("DERIVED")
    assert tags["Modality"] in ("CR", "DX")
    for uid in originals:
        assert same_at_hq(clinic.orthanc, hq.orthanc, uid)
    confirmed = {row["sop_uid"] for row in box.db.execute(
        "SELECT sop_uid FROM instances WHERE state = 'confirmed'")}
    assert confirmed == originals
    box.close()


def test_a_full_disk_here_pauses_sending_without_blaming_the_instance(clinic, hq):
    """Packing needs room for the payload; a full state disk must not count as a refusal
    (which would pause the instance for up to a day once the disk is freed)."""
    box = owe(clinic, corpus.representative()[1:2])  # MR 2 MB: its payload needs ~600 KB
    payloads = clinic.settings.state_path / "sync" / "payloads"
    payloads.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(payloads)],
                   check=True)
    try:
        sender = Sender(clinic.settings, box, clinic.orthanc, HQClient(hq.url, hq.token))
        try:
            with pytest.raises(LocalTrouble):
                sender.send()
        finally:
            sender.close()
    finally:
        subprocess.run(["umount", str(payloads)], check=True)
    assert box.refusals() == [] and len(box.ready()) == 1
    sender = Sender(clinic.settings, box, clinic.orthanc, HQClient(hq.url, hq.token))
    try:
        assert len(sender.send().confirmed) == 1
    finally:
        sender.close()
    box.close()


def test_two_receivers_share_one_hq_and_an_upload_moves_between_them(hq, tmp_path):
    """Stateless but for the shared upload folder: behind a proxy, each chunk of one upload
    may reach another receiver process, and both answer alike."""
    port = free_port()
    second_env = hq.env_file.with_name("second.env")
    second_env.write_text(hq.env_file.read_text().replace(
        f"HQ_RECEIVER_PORT={hq.settings.hq_receiver_port}", f"HQ_RECEIVER_PORT={port}"))
    second = subprocess.Popen([sys.executable, "-m", "gotg_pacs", "--env-file", str(second_env),
                               "hq", "run"], stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "second.log", "w"))  # noqa: SIM115
    try:
        other = HQClient(f"http://127.0.0.1:{port}", hq.token, timeout=30)
        assert wait_until(lambda: hq_answers(other), 30)
        source = corpus.DATA_DIR / "MR2_UNCR.dcm"
        payload = source.read_bytes()
        uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        first = HQClient(hq.url, hq.token, timeout=30)
        md5 = hashlib.md5(payload).hexdigest()
        url = first.create(len(payload), {"sop_uid": uid, "codec": "identity",
                                          "payload_md5": md5, "original_md5": md5})
        there = url.replace(hq.url, other.url)
        half = len(payload) // 2
        assert first.append(url, 0, payload[:half]) == (half, None)
        assert other.offset(there) == (half, None)
        assert other.append(there, 0, payload[:10])[0] == half, "a stale offset: 409, told where"
        offset, hq_id = other.append(there, half, payload[half:])
        assert offset == len(payload) and hq_id == hq.orthanc.find_instance(uid)[0]
        assert first.offset(url) == (len(payload), hq_id), "the other receiver knows the outcome"
    finally:
        second.terminate()
        second.wait(30)
    # HQ holds exactly this original (qualified by site, as every instance a site sends).
    [there] = hq.orthanc.find_instance(uid)
    assert hq.orthanc.request("GET", f"/instances/{there}/metadata/GotgOriginalMd5").text == md5
    sent = pydicom.dcmread(io.BytesIO(payload))
    assert hq.orthanc.get(f"/instances/{there}/simplified-tags")["PatientID"] \
        == f"test-site:{sent.PatientID}"


def test_on_an_excellent_link_several_uploads_are_in_flight(clinic, hq, tmp_path):
    """On a LAN the link is not the limit (packing and HQ's stores are): large instances go
    up to three at a time, each confirmed on its own."""
    env = clinic.env_file
    env.write_text(env.read_text().replace("COMPRESSION_LEVEL=6", "COMPRESSION_LEVEL=0"))
    clinic.settings = config.load(env)
    files = corpus.renumbered_copies([corpus.DATA_DIR / "RG3_UNCR.dcm"], 8, tmp_path / "cr")
    box = owe(clinic, files)
    uploads = hq.settings.hq_dir / "uploads"
    most, watching = [0], threading.Event()

    def watch() -> None:
        while not watching.is_set():
            most[0] = max(most[0], len(list(uploads.glob("*.part"))))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    sender = Sender(clinic.settings, box, clinic.orthanc, HQClient(hq.url, hq.token))
    try:
        sender.hq.link.sent(8 * 2**20, 0.05)  # as measured on this loopback: excellent
        assert sender.hq.link.tier == "excellent"
        sent = sender.send()
    finally:
        watching.set()
        watcher.join()
        sender.close()
    assert len(sent.confirmed) == len(files) and not sent.refused
    assert most[0] >= 2, "uploads overlapped"
    for source in files:
        uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        assert same_at_hq(clinic.orthanc, hq.orthanc, uid)
    assert box.summary()["instances"]["confirmed"]["instances"] == len(files)
    box.close()


def test_a_link_faster_than_the_slow_codecs_gets_only_the_fast_ones(clinic, hq, tmp_path):
    """JPEG XL packs at a few Mbit/s of payload: on a faster link the CPU would hold the link
    back, so there ultrasound goes as zstd; on a slow link, as JPEG XL."""
    files = corpus.renumbered_copies([corpus.DATA_DIR / "US1_UNCR.dcm"], 2, tmp_path / "us")
    box = owe(clinic, files[:1])
    sender = Sender(clinic.settings, box, clinic.orthanc, HQClient(hq.url, hq.token))
    try:
        assert sender.level == 6, "nothing measured yet: the level as configured"
        sender.hq.link.sent(2**20, 1.0)  # 8.4 Mbit/s
        assert sender.level == 3
        assert len(sender.send().confirmed) == 1
        owe(clinic, files[1:]).close()
        sender.hq.link.bps = 0.5e6
        assert sender.level == 6
        assert len(sender.send().confirmed) == 1
    finally:
        sender.close()
        box.close()
    journal = [json.loads(line) for line in
               (hq.settings.hq_dir / "transfers.jsonl").read_text().splitlines()]
    assert [entry["codec"] for entry in journal] == ["zstd", "jxl"]


# A receiver from before JPEG XL: the same program with that codec unknown to it.
OLDER_RECEIVER = """
import sys
from gotg_pacs.sync import codecs
codecs.EXACT = ("identity", "zstd")
from gotg_pacs.cli import main
sys.argv = ["pacs", "--env-file", sys.argv[1], "hq", "run"]
main()
"""


def test_a_clinic_updated_before_hq_sends_what_hq_knows_at_once(clinic, hq, tmp_path):
    """Sites updated before HQ: the older receiver refuses a JPEG XL payload as an unknown
    codec. The clinic packs as every receiver knows from then on and sends the instance again
    straight away, not after a refusal's pause, and nothing is counted as refused."""
    hq.receiver.terminate()
    hq.receiver.wait(30)
    older = subprocess.Popen([sys.executable, "-c", OLDER_RECEIVER, str(hq.env_file)],
                             stdout=subprocess.DEVNULL, stderr=open(tmp_path / "older.log", "w"))
    try:
        client = HQClient(hq.url, hq.token)
        assert wait_until(lambda: hq_answers(client), 30)
        files = corpus.renumbered_copies([corpus.DATA_DIR / "US1_UNCR.dcm"], 1, tmp_path / "us")
        box = owe(clinic, files)
        sender = Sender(clinic.settings, box, clinic.orthanc, client)
        try:
            first = sender.send()
            assert not first.confirmed and not first.refused and sender.older_hq
            assert sender.level == 3 and box.refusals() == []
            assert len(sender.send().confirmed) == 1
        finally:
            sender.close()
            box.close()
        assert "unknown codec 'jxl'" in (tmp_path / "older.log").read_text()
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
        assert same_at_hq(clinic.orthanc, hq.orthanc, uid)
    finally:
        older.terminate()
        older.wait(30)
        hq.start_receiver()


def test_the_audit_trail_reaches_hq_in_order_once_and_only_for_its_own_site(clinic, hq):
    trail = AuditLog(clinic.settings.audit_file)
    for number in range(3):
        trail.record("export", "amina", "10.0.0.5", kind="studies", resource=f"s{number}")
    client = HQClient.from_settings(clinic.settings)
    assert audit.ship(clinic.settings.audit_file, client) == 4  # the trail's start, 3 exports
    assert audit.ship(clinic.settings.audit_file, client) == 0
    trail.record("delete", "admin", "10.0.0.1", kind="studies", resource="s0")
    assert audit.ship(clinic.settings.audit_file, client) == 1
    name = audit.trail_of(clinic.settings.audit_file)
    kept = hq.settings.hq_dir / "audit" / "test-site" / f"{name}.jsonl"
    events, _ = audit.read(kept)
    assert [e.get("resource") for e in events] == [None, "s0", "s1", "s2", "s0"]
    assert audit.verify(events) == []
    # A batch that does not start where HQ's copy ends is answered with HQ's offset.
    held, took = client.ship_audit(name, 0, 10, [{"action": "forged"}])
    assert not took and held == clinic.settings.audit_file.stat().st_size
    with pytest.raises(HQRefused) as malformed:
        client.ship_audit(name, 5, 1, [])
    assert malformed.value.status == 400
    with pytest.raises(HQRefused) as unnamed:
        client.ship_audit("../../escrow", 0, 0, [])
    assert unnamed.value.status == 400
    with pytest.raises(HQRefused):
        HQClient(hq.url, "not-a-token").ship_audit(name, 0, 0, [])
    shown = run_pacs("hq", "site", "audit", "test-site", "--json", env_file=hq.env_file)
    assert shown.returncode == 0, shown.stderr
    [held_trail] = json.loads(shown.stdout)
    assert (held_trail["trail"], held_trail["events"], held_trail["chain_problems"]) == \
        (name, 5, [])
    assert audit.read(kept)[0] == events


def test_a_data_disks_recovery_passphrase_goes_to_hq_and_never_back_to_a_site(clinic, hq):
    """HQ IT must be able to open a clinic's data disk whose key stick is lost; a thief holding
    the box (and so its token) must not be able to ask HQ for that passphrase."""
    client = HQClient.from_settings(clinic.settings)
    uuid, passphrase = "9ffd33eb-18e6-4ea2-b362-376e0090e0ba", luks.new_recovery_passphrase()
    client.hand_over_disk_passphrase(uuid, passphrase)
    client.hand_over_disk_passphrase(uuid, passphrase)  # again: kept once
    for bad_uuid, bad_passphrase in ((uuid, passphrase.lower()), ("../../escrow", passphrase),
                                     (uuid, "short")):
        with pytest.raises(HQRefused) as refused:
            client.hand_over_disk_passphrase(bad_uuid, bad_passphrase)
        assert refused.value.status == 400
    with pytest.raises(HQRefused):
        HQClient(hq.url, "not-a-token").hand_over_disk_passphrase(uuid, passphrase)
    asked = client.session.get(f"{hq.url}/api/v1/escrow/disk", verify=client.session.verify,
                               timeout=30)  # the site's own token, asking
    assert asked.status_code in (404, 405) and passphrase not in asked.text
    shown = run_pacs("hq", "site", "disk-passphrase", "test-site", "--json",
                     env_file=hq.env_file)
    assert shown.returncode == 0, shown.stderr
    assert [(e["luks_uuid"], e["passphrase"]) for e in json.loads(shown.stdout)] == \
        [(uuid, passphrase)]
