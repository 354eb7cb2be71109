"""The sync outbox fed by real Orthanc: every stored instance owed to HQ, once, whatever happens.

Why it matters: an instance the outbox never learns of is never sent to HQ and, with cleanup,
could one day be deleted unseen. The feed must survive kill -9 at any instant and an Orthanc
index that went back in time, without rescanning the archive.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pydicom

from gotg_pacs.process import wait_until
from gotg_pacs.sync.feed import Feed
from gotg_pacs.sync.outbox import Outbox
from tests.conftest import run_pacs
from tests.support import corpus
from tests.support.dcmtk import storescu_profile


def _outbox_ids(settings) -> dict[str, int]:
    box = Outbox(settings.sync_outbox_file)
    try:
        return dict(box.db.execute("SELECT orthanc_id, size FROM instances").fetchall())
    finally:
        box.close()


def _orthanc_ids(appliance) -> dict[str, int]:
    return {i: appliance.orthanc.get(f"/instances/{i}")["FileSize"]
            for i in appliance.orthanc.get("/instances")}


def _catch_up(appliance) -> Outbox:
    box = Outbox(appliance.settings.sync_outbox_file)
    feed = Feed(appliance.orthanc, box)
    while not feed.step():
        pass
    return box


def test_feed_records_every_instance_with_its_study_and_size(appliance, tmp_path):
    files = corpus.renumbered_copies(corpus.representative()[:5], 2, tmp_path / "studies")
    assert appliance.modality.store(files).ok
    box = _catch_up(appliance)
    assert _outbox_ids(appliance.settings) == _orthanc_ids(appliance)
    assert box.cursor == appliance.orthanc.get("/changes", params={"last": ""})["Last"]
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
    assert {row["study_uid"] for row in box.queue()} == uids
    assert all(row["priority"] == "high" for row in box.queue())
    for row in box.ready():  # nothing goes before Orthanc holds its study complete (stable)
        assert appliance.orthanc.get(f"/studies/{row['study_id']}")["IsStable"]
    # Orthanc declares the studies stable after STABLE_AGE (10 s here): then they are ready.
    feed = Feed(appliance.orthanc, box)
    assert wait_until(lambda: feed.step() and len(box.ready()) == len(files), 40, interval=1)


def test_kill_9_of_the_sync_service_misses_and_repeats_nothing(appliance, tmp_path):
    files = corpus.renumbered_copies(corpus.representative()[:7], 4, tmp_path / "studies")
    rounds = [files[i::4] for i in range(4)]
    profile = storescu_profile(files, tmp_path / "storescu.cfg")
    argv = [sys.executable, "-m", "gotg_pacs", "--env-file", str(appliance.env_file),
            "sync", "run"]
    random.seed(7)
    for batch in rounds:
        service = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        storing = subprocess.Popen(
            ["storescu", "-xf", str(profile), "Corpus", "-aec", appliance.settings.pacs_aet,
             "127.0.0.1", str(appliance.settings.dicom_port), *map(str, batch)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(random.uniform(0.3, 1.5))  # kill it mid-batch, wherever it is
        service.send_signal(signal.SIGKILL)
        service.wait(10)
        assert storing.wait(120) == 0
    service = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    try:
        last = appliance.orthanc.get("/changes", params={"last": ""})["Last"]
        assert wait_until(lambda: Outbox(appliance.settings.sync_outbox_file).cursor >= last,
                          60, interval=0.5)
    finally:
        service.terminate()
        assert service.wait(30) == 0, "SIGTERM stops the service cleanly"
    assert appliance.instance_count() == len(files)
    assert _outbox_ids(appliance.settings) == _orthanc_ids(appliance)


def test_an_index_that_went_back_in_time_is_read_again_from_the_start(appliance):
    files = corpus.representative()[:3]
    assert appliance.modality.store(files).ok
    box = Outbox(appliance.settings.sync_outbox_file)
    # Our cursor is ahead of Orthanc: as after a power cut that rolled its index back.
    box.record([], [], cursor=10_000)
    feed = Feed(appliance.orthanc, box)
    assert feed.step() is False
    assert box.cursor == 0
    while not feed.step():
        pass
    assert _outbox_ids(appliance.settings) == _orthanc_ids(appliance)


def test_prioritize_queue_status_and_mode_from_the_command_line(appliance, tmp_path):
    files = corpus.renumbered_copies(corpus.representative()[:2], 3, tmp_path / "studies")
    assert appliance.modality.store(files).ok
    _catch_up(appliance)
    urgent = str(pydicom.dcmread(files[-1], stop_before_pixels=True).StudyInstanceUID)
    env = appliance.env_file

    result = run_pacs("sync", "prioritize", urgent, "--json", env_file=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["priority"] == "critical"
    queue = json.loads(run_pacs("sync", "queue", "--json", env_file=env).stdout)
    assert queue[0]["study_uid"] == urgent and queue[0]["priority"] == "critical"
    assert [row["priority"] for row in queue[1:]] == ["high", "high"]

    missing = run_pacs("sync", "prioritize", "1.2.3.4.5", env_file=env)
    assert missing.returncode == 1 and "no study '1.2.3.4.5'" in missing.stderr

    assert run_pacs("sync", "mode", "offline", env_file=env).returncode == 0
    status = json.loads(run_pacs("sync", "status", "--json", env_file=env).stdout)
    assert status["mode"] == "offline" and status["configured_mode"] == "offline"
    assert status["pending_by_priority"]["critical"]["studies"] == 1
    assert status["pending_by_priority"]["high"]["instances"] == 4
    assert status["feed_lag_changes"] == 0
    text = run_pacs("sync", "status", env_file=env).stdout
    assert "critical" in text and "HQ not configured (HQ_URL)" in text


def test_a_study_whose_stable_change_an_orthanc_restart_swallowed_still_goes(appliance_factory):
    site = appliance_factory("site")
    files = corpus.representative()[:2]
    assert site.modality.store(files).ok
    site.child.process.kill()  # before STABLE_AGE: Orthanc never writes StableStudy for it
    site.child.process.wait()
    site = appliance_factory("site")
    box = Outbox(site.settings.sync_outbox_file)
    feed = Feed(site.orthanc, box)
    while not feed.step():
        pass
    time.sleep(2)
    assert box.ready() == [] and len(box.arriving_studies()) >= 1
    assert feed.check_stability() == len(box.queue())
    assert len(box.ready()) == len(files)


def test_a_rollback_hidden_by_new_images_is_still_noticed(appliance, tmp_path):
    """After a power cut rolled Orthanc's index back, new images (or re-adopted orphans) can
    push its changes past our cursor before the sync looks: the change under the cursor's
    number is then another one, and the feed reads everything again."""
    files = corpus.renumbered_copies(corpus.representative()[:4], 1, tmp_path / "studies")
    assert appliance.modality.store(files[:1]).ok
    box = _catch_up(appliance)
    cursor = box.cursor
    # What the outbox recorded under that number is not what Orthanc now shows there.
    box.record([], [], cursor=cursor, cursor_change="NewInstance not-the-same-instance")
    assert appliance.modality.store(files[1:]).ok
    feed = Feed(appliance.orthanc, box)
    assert feed.step() is False and box.cursor == 0
    while not feed.step():
        pass
    assert _outbox_ids(appliance.settings) == _orthanc_ids(appliance)


def test_a_deleted_instance_under_the_cursor_is_no_rollback(appliance, tmp_path):
    files = corpus.renumbered_copies(corpus.representative()[:2], 1, tmp_path / "studies")
    assert appliance.modality.store(files[:1]).ok
    box = _catch_up(appliance)
    cursor = box.cursor
    [only] = appliance.orthanc.get("/instances")
    appliance.orthanc.delete(f"/instances/{only}")  # Orthanc drops its changes too
    assert appliance.modality.store(files[1:]).ok
    feed = Feed(appliance.orthanc, box)
    assert feed.step() is True  # one batch on from the cursor: no restart from change 0
    assert box.cursor > cursor
    assert box.db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 2
