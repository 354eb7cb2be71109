"""The sync outbox's promises: atomic progress, deadlines by priority, nothing starves."""

from __future__ import annotations

import sqlite3

import pytest

from gotg_pacs.sync.outbox import PRIORITIES, NewInstance, Outbox, OutboxError

NOW = 1_800_000_000.0


@pytest.fixture
def outbox(tmp_path):
    box = Outbox(tmp_path / "sync" / "outbox.sqlite")
    yield box
    box.close()


def _instance(n: int, study: str = "study-a", changed_at: float = NOW, size: int = 1000):
    return NewInstance(orthanc_id=f"inst-{n}", study_id=study, study_uid=f"1.2.{study}",
                       sop_uid=f"1.2.3.{n}", size=size, change_seq=n, changed_at=changed_at)


def test_a_batch_and_its_cursor_are_one_durable_step(outbox, tmp_path):
    outbox.record([_instance(1), _instance(2)], [], cursor=7, now=NOW)
    reopened = Outbox(tmp_path / "sync" / "outbox.sqlite")
    assert reopened.cursor == 7
    assert reopened.summary(NOW)["instances"]["pending"]["instances"] == 2
    assert reopened.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert reopened.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_failed_batch_leaves_neither_rows_nor_cursor(outbox):
    outbox.record([_instance(1)], [], cursor=3, now=NOW)
    bad = _instance(2)
    object.__setattr__(bad, "size", None)  # violates NOT NULL halfway through the batch
    with pytest.raises(sqlite3.IntegrityError):
        outbox.record([_instance(3), bad], [], cursor=9, now=NOW)
    assert outbox.cursor == 3
    assert outbox.summary(NOW)["instances"]["pending"]["instances"] == 1


def test_reading_a_batch_twice_counts_it_once(outbox):
    outbox.record([_instance(1), _instance(2)], [], cursor=2, now=NOW)
    outbox.record([_instance(1), _instance(2)], [], cursor=2, now=NOW + 5)
    assert outbox.summary(NOW)["instances"]["pending"]["instances"] == 2


def test_new_studies_are_high_and_old_changes_are_backfill(outbox):
    outbox.record([_instance(1, "fresh"), _instance(2, "old", changed_at=NOW - 3 * 86400)], [],
                  cursor=2, now=NOW)
    by_study = {row["study_uid"]: row for row in outbox.queue()}
    assert by_study["1.2.fresh"]["priority"] == "high"
    assert by_study["1.2.fresh"]["due_at"] == NOW + PRIORITIES["high"]
    assert by_study["1.2.old"]["priority"] == "low"


def test_only_stable_studies_are_ready_unless_critical(outbox):
    outbox.record([_instance(1, "a"), _instance(2, "b")], [], cursor=2, now=NOW)
    assert outbox.ready() == []
    outbox.record([], ["a"], cursor=3, now=NOW)
    assert [row["orthanc_id"] for row in outbox.ready()] == ["inst-1"]
    outbox.prioritize("b", "1.2.b", now=NOW + 10)
    assert [row["orthanc_id"] for row in outbox.ready()] == ["inst-2", "inst-1"]


def test_earliest_deadline_first_so_low_priority_never_starves(outbox):
    # A back-fill study waiting for more than a week goes before a high one that just arrived.
    outbox.record([_instance(1, "backfill", changed_at=NOW - 30 * 86400)], ["backfill"],
                  cursor=1, now=NOW - 8 * 86400)
    outbox.record([_instance(2, "fresh")], ["fresh"], cursor=2, now=NOW)
    assert [row["study_uid"] for row in outbox.queue()] == ["1.2.backfill", "1.2.fresh"]
    outbox.prioritize("fresh", "1.2.fresh", now=NOW)
    assert outbox.queue()[0]["study_uid"] == "1.2.fresh"


def test_prioritize_before_the_feed_saw_the_study_is_kept(outbox):
    outbox.prioritize("late", "1.2.late", now=NOW)
    outbox.record([_instance(1, "late")], [], cursor=1, now=NOW + 60)
    [row] = outbox.queue()
    assert row["priority"] == "critical" and row["due_at"] == NOW


def test_mode_is_set_here_or_follows_the_configuration(outbox):
    assert outbox.mode("auto") == "auto"
    outbox.set_mode("offline")
    assert outbox.mode("auto") == "offline"
    with pytest.raises(OutboxError):
        outbox.set_mode("sometimes")


def test_summary_counts_per_priority_and_oldest_wait(outbox):
    outbox.record([_instance(1, "a", size=10), _instance(2, "a", size=20)], [], cursor=2,
                  now=NOW - 100)
    summary = outbox.summary(NOW)
    assert summary["pending_by_priority"]["high"] == {"studies": 1, "instances": 2, "bytes": 30}
    assert summary["pending_by_priority"]["critical"]["instances"] == 0
    assert summary["oldest_pending_age_s"] == 100
    assert summary["overdue_studies"] == 0
    assert outbox.summary(NOW + 3600)["overdue_studies"] == 1


def test_heartbeat(outbox):
    assert outbox.heartbeat_age(NOW) is None
    outbox.beat(NOW)
    assert outbox.heartbeat_age(NOW + 12) == 12



def test_a_refused_instance_pauses_longer_each_time_and_keeps_its_reason(outbox):
    outbox.record([_instance(1), _instance(2)], ["study-a"], cursor=2, now=NOW)
    assert outbox.refused("inst-1", "HQ refused (422): damaged", now=NOW) == 300
    assert [r["orthanc_id"] for r in outbox.ready(now=NOW + 1)] == ["inst-2"]
    assert [r["orthanc_id"] for r in outbox.ready(now=NOW + 301)] == ["inst-1", "inst-2"]
    assert outbox.refused("inst-1", "again", now=NOW + 301) == 1200
    assert outbox.refused("inst-1", "again", now=NOW + 2000) == 4800
    for _ in range(5):
        pause = outbox.refused("inst-1", "again", now=NOW + 2000)
    assert pause == 86400, "at most a day"
    [refusal] = outbox.refusals()
    assert refusal["refusals"] == 8 and refusal["last_error"] == "again"
    assert outbox.summary(now=NOW)["refused_instances"] == 1


def test_backfill_can_be_held_back(outbox):
    outbox.record([_instance(1, "old", changed_at=NOW - 10 * 86400), _instance(2, "new")],
                  ["old", "new"], cursor=2, now=NOW)
    assert [r["orthanc_id"] for r in outbox.ready(now=NOW, include_low=False)] == ["inst-2"]
    assert len(outbox.ready(now=NOW)) == 2


def test_an_outbox_from_before_refusals_gains_the_new_columns(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE instances (orthanc_id TEXT PRIMARY KEY, study_id TEXT, "
                     "sop_uid TEXT, size INTEGER, change_seq INTEGER, state TEXT DEFAULT "
                     "'pending', enqueued_at REAL, upload_url TEXT, codec TEXT, payload_md5 "
                     "TEXT, original_md5 TEXT, hq_id TEXT, confirmed_at REAL);"
                     "INSERT INTO instances (orthanc_id, study_id, sop_uid, size, change_seq, "
                     "enqueued_at) VALUES ('kept', 's', '1.2', 5, 1, 0);")
    db.commit()
    db.close()
    box = Outbox(path)
    rows = box.db.execute("SELECT orthanc_id, refusals, retry_at FROM instances")
    assert [tuple(row) for row in rows] == [("kept", 0, 0)]
    box.close()


def test_a_read_only_outbox_never_creates_or_writes(tmp_path, outbox):
    with pytest.raises(OutboxError, match="has not run"):
        Outbox(tmp_path / "missing.sqlite", readonly=True)
    assert not (tmp_path / "missing.sqlite").exists()
    outbox.record([_instance(1)], [], cursor=1, now=NOW)
    with Outbox(outbox.path, readonly=True) as reader:
        assert reader.cursor == 1
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.set_mode("offline")
