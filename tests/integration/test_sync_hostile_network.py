"""Sync over a real bad link: rate-limited, offline at first, cut in the middle of a transfer.

Why it matters: this is the field. The link is a veth pair into a network namespace with a tbf
rate limit, taken down with `ip link` (design brief section 5); the clinic, its sync service and
HQ are the real processes. Every instance must arrive verified, and an outage must cost at most
the chunk in flight.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pydicom
import pytest

from gotg_pacs.process import wait_until
from gotg_pacs.sync.outbox import Outbox
from tests.conftest import run_pacs
from tests.support import corpus
from tests.support.netns import Link
from tests.support.site import owe, same_at_hq


@pytest.fixture
def link():
    made = Link()
    yield made
    made.close()


def _confirmed(settings) -> int:
    box = Outbox(settings.sync_outbox_file)
    try:
        return box.summary()["instances"].get("confirmed", {}).get("instances", 0)
    finally:
        box.close()


def test_offline_then_shaped_with_an_outage_everything_arrives_verified(hq, make_clinic, link):
    link.shape("2mbit")
    clinic = make_clinic(link.expose(hq.settings.hq_receiver_port), COMPRESSION_LEVEL="0")
    files = corpus.representative()[:8]  # about 12 MB sent as is: some 50 s at 2 Mbit/s
    owe(clinic, files).close()

    link.down()  # the clinic starts with no network at all
    service = subprocess.Popen([sys.executable, "-m", "gotg_pacs", "--env-file",
                                str(clinic.env_file), "sync", "run"], stderr=subprocess.DEVNULL)
    try:
        time.sleep(8)
        assert _confirmed(clinic.settings) == 0
        link.up()
        # Cut the link once HQ holds part of an upload, for longer than a TCP hiccup.
        uploads = hq.settings.hq_dir / "uploads"
        assert wait_until(lambda: any(p.stat().st_size > 1_500_000
                                      for p in uploads.glob("*.part")), 120, interval=0.05)
        link.down()
        time.sleep(12)
        link.up()
        assert wait_until(lambda: _confirmed(clinic.settings) == len(files), 300, interval=1)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(60)

    for source in files:
        uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        assert len(hq.orthanc.find_instance(uid)) == 1, source.name
        # The original as sent, the patient's identity qualified by the site and nothing else.
        assert same_at_hq(clinic.orthanc, hq.orthanc, uid), source.name
    journal = [json.loads(line) for line in
               (hq.settings.hq_dir / "transfers.jsonl").read_text().splitlines()]
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    stored = [entry["sop_uid"] for entry in journal if entry["sop_uid"] in uids]
    assert sorted(stored) == sorted(uids), "each instance stored once"
    resent = sum(entry["received"] - entry["length"] for entry in journal)
    chunk = max(entry["max_chunk"] for entry in journal)
    assert not [e for e in journal if e["sop_uid"] and e["sop_uid"] not in uids], \
        "a 2 Mbit/s link cut for 12 s is no poor link: no previews"
    assert chunk <= 1_100_000, "chunks of about four seconds of a 2 Mbit/s link"
    assert resent <= chunk, f"{resent} bytes re-sent for one outage"


def test_work_piled_up_offline_goes_urgent_first_soon_after_the_link_returns(hq, make_clinic,
                                                                            link, tmp_path):
    """Offline while studies arrive and staff mark one urgent: when the link returns it is
    used within seconds, and the urgent study reaches HQ before the earlier routine one."""
    link.shape("1mbit")
    clinic = make_clinic(link.expose(hq.settings.hq_receiver_port))
    routine = corpus.renumbered_copies(corpus.representative()[1:2], 3, tmp_path / "r")
    urgent = corpus.renumbered_copies(corpus.representative()[:1], 1, tmp_path / "u")
    link.down()
    service = subprocess.Popen([sys.executable, "-m", "gotg_pacs", "--env-file",
                                str(clinic.env_file), "sync", "run"],
                               stderr=open(tmp_path / "sync.log", "w"))  # noqa: SIM115
    try:
        assert clinic.modality.store(routine).ok
        assert clinic.modality.store(urgent).ok
        study = str(pydicom.dcmread(urgent[0], stop_before_pixels=True).StudyInstanceUID)
        assert run_pacs("sync", "prioritize", study, env_file=clinic.env_file).returncode == 0
        # Routine studies are ready once Orthanc calls them stable; all of it waits offline.
        box = Outbox(clinic.settings.sync_outbox_file, readonly=True)
        assert wait_until(lambda: len(box.ready()) == len(routine) + len(urgent), 60)
        time.sleep(5)
        assert _confirmed(clinic.settings) == 0
        link.up()
        back = time.monotonic()
        assert wait_until(lambda: _confirmed(clinic.settings) >= 1, 60, interval=0.2)
        assert time.monotonic() - back < 15, "a returning link is used within seconds"
        assert wait_until(lambda: _confirmed(clinic.settings) == len(routine) + len(urgent),
                          300, interval=1)
        box.close()
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(60)
    journal = [json.loads(line) for line in
               (hq.settings.hq_dir / "transfers.jsonl").read_text().splitlines()]
    order = [entry["sop_uid"] for entry in journal if entry["sop_uid"]]
    urgent_uid = str(pydicom.dcmread(urgent[0], stop_before_pixels=True).SOPInstanceUID)
    assert order[0] == urgent_uid, "the urgent study first"
