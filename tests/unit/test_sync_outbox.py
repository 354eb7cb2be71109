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

