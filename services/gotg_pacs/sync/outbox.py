"""The sync outbox: every instance that must reach HQ, durable in SQLite, scheduled by deadline.

One SQLite database (WAL, `synchronous=FULL`: a commit is on disk when it returns) holds the
studies and instances still owed to HQ, and the cursor into Orthanc's `/changes` feed. A batch of
changes and the cursor that follows it are written in one transaction, so after a kill -9 or a
power cut at any instant the feed resumes exactly where the last durable batch ended: no change is
skipped and none is counted twice.

Scheduling: critical studies first, then earliest deadline first. Each other priority is a promise
of time (high: within an hour, medium: six hours, low: a week), so a low study waiting long enough
comes before a fresh high one: nothing starves.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..orthanc import Orthanc, OrthancError
from ..sqlite_tx import immediate, open_store

# Priority -> seconds within which it should be sent (the deadline added to the enqueue time).
PRIORITIES = {"critical": 0, "high": 3600, "medium": 6 * 3600, "low": 7 * 86400}
RANK = {name: rank for rank, name in enumerate(PRIORITIES)}
MODES = ("auto", "offline")
# Columns added after the first release, with their definitions: an older outbox gains them.
ADDED_COLUMNS = {
    "instances": {
        "refusals": "INTEGER NOT NULL DEFAULT 0",
        "retry_at": "REAL NOT NULL DEFAULT 0",
        "last_error": "TEXT",
    },
    "studies": {"previewed": "INTEGER NOT NULL DEFAULT 0"},
}
REFUSAL_PAUSE = 300.0  # first pause after a refusal; x4 each time, at most a day

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    orthanc_id  TEXT PRIMARY KEY,
    study_uid   TEXT NOT NULL,
    priority    TEXT NOT NULL,
    stable      INTEGER NOT NULL DEFAULT 0,
    enqueued_at REAL NOT NULL,
    due_at      REAL NOT NULL,
    previewed   INTEGER NOT NULL DEFAULT 0  -- lossy previews sent ahead (poor links)
);
CREATE INDEX IF NOT EXISTS studies_due ON studies (due_at, enqueued_at);
CREATE TABLE IF NOT EXISTS instances (
    orthanc_id   TEXT PRIMARY KEY,
    study_id     TEXT NOT NULL REFERENCES studies (orthanc_id),
    sop_uid      TEXT NOT NULL,
    size         INTEGER NOT NULL,
    change_seq   INTEGER NOT NULL,
    state        TEXT NOT NULL DEFAULT 'pending',  -- pending, confirmed, gone
    enqueued_at  REAL NOT NULL,
    -- an upload in progress (tus): where, and what exactly is being sent
    upload_url   TEXT,
    codec        TEXT,
    payload_md5  TEXT,
    original_md5 TEXT,
    -- HQ's word that it stored and verified the instance
    hq_id        TEXT,
    confirmed_at REAL,
    -- refused by HQ or failing here: retried with a growing pause, the reason kept for staff
    refusals     INTEGER NOT NULL DEFAULT 0,
    retry_at     REAL NOT NULL DEFAULT 0,
    last_error   TEXT
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_id, state);
"""


class OutboxError(Exception):
    """A request the outbox cannot honour, worded for the person who asked."""


@dataclass(frozen=True)
class NewInstance:
    """What the feed learnt about one stored instance."""

    orthanc_id: str
    study_id: str
    study_uid: str
    sop_uid: str
    size: int
    change_seq: int
    changed_at: float


class Outbox:
    def __init__(self, path: Path, readonly: bool = False) -> None:
        """The outbox at `path`; `readonly` for those who only look (status, queue): they never
        create it or take a write lock. A missing read-only outbox raises OutboxError."""
        self.path = path
        db = open_store(path, SCHEMA, readonly, added=ADDED_COLUMNS)
        if db is None:
            raise OutboxError(f"no sync outbox yet at {path} (pacs-sync has not run)")
        self.db = db

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with immediate(self.db) as db:
            yield db

    # --- small persistent facts -------------------------------------------------------------

    def _get(self, key: str, default: str) -> str:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def _set(self, db: sqlite3.Connection, key: str, value: str) -> None:
        db.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                   "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    @property
    def cursor(self) -> int:
        """The last Orthanc change already in the outbox."""
        return int(self._get("changes_cursor", "0"))

    @property
    def cursor_change(self) -> str:
        """What the cursor's change was ("ChangeType ID"): if Orthanc later shows another
        change under that number, its index went back in time."""
        return self._get("changes_cursor_change", "")

    def mode(self, configured: str) -> str:
        """`offline` if staff switched sync off here, else what OFFLINE_MODE says."""
        return self._get("mode", configured)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise OutboxError(f"mode must be one of {', '.join(MODES)}")
        with self._transaction() as db:
            self._set(db, "mode", mode)

    # --- fed by Orthanc's changes --------------------------------------------------------------

    def record(self, instances: Iterable[NewInstance], stable_studies: Iterable[str],
               cursor: int, cursor_change: str = "", now: float | None = None,
               backfill_age: float = 86400) -> None:
        """One batch of changes and the cursor after it, atomically.

        An instance whose change is older than `backfill_age` was in the archive before sync
        saw it (first start on an existing archive, a rescan): it is back-fill, priority low.
        """
        now = time.time() if now is None else now
        with self._transaction() as db:
            for item in instances:
                priority = "low" if now - item.changed_at > backfill_age else "high"
                db.execute(
                    "INSERT INTO studies (orthanc_id, study_uid, priority, enqueued_at, due_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (orthanc_id) DO NOTHING",
                    (item.study_id, item.study_uid, priority, now, now + PRIORITIES[priority]))
                # Seen again under another change: stored anew after it was deleted here (or
                # after HQ confirmed and cleanup removed it), maybe with other content. It is
                # owed again; if HQ already holds exactly it, the holdings question says so.
                db.execute(
                    "INSERT INTO instances (orthanc_id, study_id, sop_uid, size, change_seq, "
                    "enqueued_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (orthanc_id) DO UPDATE "
                    "SET state = 'pending', size = excluded.size, change_seq = "
                    "excluded.change_seq, enqueued_at = excluded.enqueued_at, upload_url = NULL, "
                    "refusals = 0, retry_at = 0, last_error = NULL "
                    "WHERE instances.state != 'pending' "
                    "AND instances.change_seq != excluded.change_seq",
                    (item.orthanc_id, item.study_id, item.sop_uid, item.size, item.change_seq,
                     now))
            for study_id in stable_studies:
                db.execute("UPDATE studies SET stable = 1 WHERE orthanc_id = ?", (study_id,))
            self._set(db, "changes_cursor", str(cursor))
            self._set(db, "changes_cursor_change", cursor_change)

    def beat(self, now: float | None = None, link: str | None = None) -> None:
        """The service is alive, and what it knows of the link to HQ (JSON), for status
        (written every 30 s at most: SD cards wear with every fsync)."""
        with self._transaction() as db:
            self._set(db, "heartbeat", str(time.time() if now is None else now))
            if link is not None:
                self._set(db, "link", link)

    def link(self) -> dict:
        """The link to HQ as the service last saw it (empty before it first looked)."""
        return json.loads(self._get("link", "{}"))

    def heartbeat_age(self, now: float | None = None) -> float | None:
        value = self._get("heartbeat", "")
        return None if not value else (time.time() if now is None else now) - float(value)

    def arriving_studies(self) -> list[str]:
        """Studies still waiting for Orthanc's word that they are complete."""
        return [row[0] for row in self.db.execute(
            "SELECT DISTINCT s.orthanc_id FROM studies s JOIN instances i "
            "ON i.study_id = s.orthanc_id WHERE s.stable = 0 AND i.state = 'pending'")]

    def mark_stable(self, study_ids: list[str]) -> None:
        with self._transaction() as db:
            db.executemany("UPDATE studies SET stable = 1 WHERE orthanc_id = ?",
                           [(study_id,) for study_id in study_ids])

    def restart_feed(self) -> None:
        """Read Orthanc's changes from the start again (its index went back in time)."""
        with self._transaction() as db:
            self._set(db, "changes_cursor", "0")
            self._set(db, "changes_cursor_change", "")

    # --- the transfer to HQ ----------------------------------------------------------------------

    def upload(self, instance_id: str) -> sqlite3.Row | None:
        return self.db.execute(
            "SELECT upload_url, codec, payload_md5, original_md5 FROM instances "
            "WHERE orthanc_id = ? AND upload_url IS NOT NULL", (instance_id,)).fetchone()

    def start_upload(self, instance_id: str, url: str, codec: str, payload_md5: str,
                     original_md5: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE instances SET upload_url = ?, codec = ?, payload_md5 = ?, "
                       "original_md5 = ? WHERE orthanc_id = ?",
                       (url, codec, payload_md5, original_md5, instance_id))

    def forget_upload(self, instance_id: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE instances SET upload_url = NULL WHERE orthanc_id = ?",
                       (instance_id,))

    def gone(self, instance_id: str) -> None:
        """Deleted at the clinic before HQ had it: never counted as at HQ, shown in status."""
        with self._transaction() as db:
            db.execute("UPDATE instances SET state = 'gone', upload_url = NULL "
                       "WHERE orthanc_id = ? AND state = 'pending'", (instance_id,))

    def refused(self, instance_id: str, reason: str, now: float | None = None) -> float:
        """HQ said no, or it could not be packed here: try again after a growing pause (5 min,
        20 min, 80 min, ... at most a day) so a paid link is not spent on the same refusal every
        turn, and keep the reason for `pacs sync status`. Returns the pause."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            count = db.execute("SELECT refusals FROM instances WHERE orthanc_id = ?",
                               (instance_id,)).fetchone()[0] + 1
            pause = min(86400.0, REFUSAL_PAUSE * 4 ** (count - 1))
            db.execute("UPDATE instances SET refusals = ?, retry_at = ?, last_error = ?, "
                       "upload_url = NULL WHERE orthanc_id = ?",
                       (count, now + pause, reason[:500], instance_id))
        return pause

    def refusals(self, limit: int = 20) -> list[dict]:
        """Instances HQ refused or that failed here, still owed, most recent reason first."""
        return [dict(row) for row in self.db.execute(
            "SELECT orthanc_id, sop_uid, refusals, retry_at, last_error FROM instances "
            "WHERE state = 'pending' AND refusals > 0 ORDER BY retry_at DESC LIMIT ?",
            (limit,))]

    def confirm(self, instance_id: str, hq_id: str, original_md5: str,
                now: float | None = None) -> None:
        """HQ stored and verified exactly this content (the MD5 Orthanc took here at ingest):
        the only way an instance ever counts as at HQ."""
        with self._transaction() as db:
            db.execute("UPDATE instances SET state = 'confirmed', hq_id = ?, confirmed_at = ?, "
                       "original_md5 = ?, upload_url = NULL WHERE orthanc_id = ?",
                       (hq_id, time.time() if now is None else now, original_md5, instance_id))

    def confirmations(self, instance_ids: Iterable[str]) -> dict[str, str]:
        """For those of these instances HQ confirmed: the MD5 of the content it confirmed."""
        ids = list(instance_ids)
        found: dict[str, str] = {}
        for first in range(0, len(ids), 500):  # SQLite's limit on bound parameters
            batch = ids[first:first + 500]
            found.update(self.db.execute(
                "SELECT orthanc_id, original_md5 FROM instances WHERE state = 'confirmed' "
                f"AND original_md5 IS NOT NULL AND orthanc_id IN ({','.join('?' * len(batch))})",
                batch).fetchall())
        return found

    # --- staff and scheduling ------------------------------------------------------------------

    def prioritize(self, study_id: str, study_uid: str, now: float | None = None) -> None:
        """Mark a study critical: due now, sent even before it is stable."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute(
                "INSERT INTO studies (orthanc_id, study_uid, priority, enqueued_at, due_at) "
                "VALUES (?, ?, 'critical', ?, ?) ON CONFLICT (orthanc_id) DO UPDATE SET "
                "priority = 'critical', due_at = MIN(due_at, excluded.due_at)",
                (study_id, study_uid, now, now))

    def queue(self, limit: int = 50) -> list[dict]:
        """Studies with instances still owed to HQ, in the order they will be sent."""
        rows = self.db.execute(
            """SELECT s.orthanc_id, s.study_uid, s.priority, s.stable, s.enqueued_at, s.due_at,
                      COUNT(i.orthanc_id) AS instances, COALESCE(SUM(i.size), 0) AS bytes
               FROM studies s JOIN instances i ON i.study_id = s.orthanc_id
               WHERE i.state = 'pending'
               GROUP BY s.orthanc_id
               ORDER BY s.priority != 'critical', s.due_at, s.enqueued_at
               LIMIT ?""", (limit,)).fetchall()
        return [dict(row) for row in rows]

    def pending_of(self, study_id: str) -> list[sqlite3.Row]:
        """The study's instances still owed to HQ, in arrival order."""
        return self.db.execute(
            "SELECT * FROM instances WHERE study_id = ? AND state = 'pending' "
            "ORDER BY change_seq", (study_id,)).fetchall()

    def mark_previewed(self, study_id: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE studies SET previewed = 1 WHERE orthanc_id = ?", (study_id,))

    def ready(self, limit: int = 100, now: float | None = None,
              include_low: bool = True) -> list[sqlite3.Row]:
        """Pending instances that may go now: of stable studies, or of critical ones at once;
        not those pausing after a refusal; back-fill (low) only if `include_low`."""
        return self.db.execute(
            """SELECT i.*, s.priority, s.due_at, s.previewed FROM instances i
               JOIN studies s ON s.orthanc_id = i.study_id
               WHERE i.state = 'pending' AND (s.stable = 1 OR s.priority = 'critical')
                     AND i.retry_at <= ? AND (? OR s.priority != 'low')
               ORDER BY s.priority != 'critical', s.due_at, s.enqueued_at, i.change_seq
               LIMIT ?""", (time.time() if now is None else now, include_low, limit)).fetchall()

    def is_pending(self, instance_id: str) -> bool:
        row = self.db.execute("SELECT state FROM instances WHERE orthanc_id = ?",
                              (instance_id,)).fetchone()
        return bool(row) and row[0] == "pending"

    def summary(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        by_state = {row[0]: {"instances": row[1], "bytes": row[2]} for row in self.db.execute(
            "SELECT state, COUNT(*), COALESCE(SUM(size), 0) FROM instances GROUP BY state")}
        pending = {row[0]: {"studies": row[1], "instances": row[2], "bytes": row[3]}
                   for row in self.db.execute(
            """SELECT s.priority, COUNT(DISTINCT s.orthanc_id), COUNT(*), SUM(i.size)
               FROM instances i JOIN studies s ON s.orthanc_id = i.study_id
               WHERE i.state = 'pending' GROUP BY s.priority""")}
        oldest = self.db.execute(
            "SELECT MIN(enqueued_at) FROM instances WHERE state = 'pending'").fetchone()[0]
        overdue = self.db.execute(
            """SELECT COUNT(DISTINCT s.orthanc_id) FROM studies s
               JOIN instances i ON i.study_id = s.orthanc_id
               WHERE i.state = 'pending' AND s.due_at < ?""", (now,)).fetchone()[0]
        refused = self.db.execute(
            "SELECT COUNT(*) FROM instances WHERE state = 'pending' AND refusals > 0").fetchone()[0]
        return {
            "cursor": self.cursor,
            "refused_instances": refused,
            "instances": by_state,
            "pending_by_priority": {p: pending.get(p, {"studies": 0, "instances": 0, "bytes": 0})
                                    for p in PRIORITIES},
            "oldest_pending_age_s": round(now - oldest, 1) if oldest else None,
            "overdue_studies": overdue,
        }


def mark_urgent(outbox: Outbox, client: Orthanc, study: str) -> list[str]:
    """Staff marked STUDY (Study Instance UID or Orthanc ID) urgent: every study it names goes
    first, even before it is complete (one UID can name studies of different patients).
    Returns the Orthanc IDs marked; empty when the archive has no such study."""
    found = [item["ID"] for item in client.post("/tools/lookup", data=study.encode()) or []
             if item.get("Type") == "Study"]
    if not found:
        try:
            client.get(f"/studies/{study}")
        except OrthancError:
            return []
        found = [study]
    for orthanc_id in found:
        uid = client.get(f"/studies/{orthanc_id}")["MainDicomTags"].get("StudyInstanceUID", "")
        outbox.prioritize(orthanc_id, uid)
    return found
