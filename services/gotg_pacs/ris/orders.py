"""The orders the worklist answers from, kept on the box (the RIS may be unreachable for days).

One SQLite file (WAL, `synchronous=FULL`): an order is on disk before the sender hears "accepted".
Each message is recorded by sender and control ID in the same transaction as its orders, so a
message sent again (its acknowledgement was lost) is acknowledged again and changes nothing.

An Accession Number names one patient's procedure for good: an order naming a known accession
with another patient is refused, never re-pointed (the images of one would go to the other).

Every change a modality or a study makes to an order is also queued for the RIS (`statuses`,
written in the same transaction): the RIS hears it in order, once, whenever it can be reached.

States: `scheduled` (on the worklist), `in_progress` (a modality reported it started, MPPS; still
listed, so a modality that crashed can pick it again), `completed` and `discontinued` (MPPS:
off the list), `cancelled` (the RIS). The RIS changing an order that is done does not put it back
on the list. One store is shared by the HL7 listener and the MPPS service's threads: every
write holds the store's lock.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict
from pathlib import Path

from ..sqlite_tx import immediate, open_store
from .values import Change, Order, Rejected

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    accession  TEXT PRIMARY KEY,
    state      TEXT NOT NULL,      -- see STATES
    patient_id TEXT NOT NULL,
    issuer     TEXT NOT NULL,
    fields     TEXT NOT NULL,      -- the Order as JSON
    source     TEXT NOT NULL,      -- hl7 (later: the RIS's REST API)
    updated    REAL NOT NULL);
CREATE INDEX IF NOT EXISTS orders_state ON orders (state);
CREATE INDEX IF NOT EXISTS orders_patient ON orders (patient_id);
CREATE TABLE IF NOT EXISTS steps (     -- MPPS: what the modalities said they performed
    uid        TEXT PRIMARY KEY,   -- the MPPS instance (Affected SOP Instance UID)
    state      TEXT NOT NULL,      -- IN PROGRESS, COMPLETED, DISCONTINUED
    accessions TEXT NOT NULL,      -- JSON list: the orders it performs ([] unscheduled)
    attributes TEXT NOT NULL,      -- the step as DICOM JSON, modifications applied
    created    REAL NOT NULL,
    updated    REAL NOT NULL);
CREATE TABLE IF NOT EXISTS studies (   -- stable studies seen in Orthanc, matched or not
    study_uid  TEXT PRIMARY KEY,
    orthanc_id TEXT NOT NULL,
    accession  TEXT NOT NULL,      -- as the images carry it
    matched    TEXT,               -- the order's accession; NULL: on the reconciliation list
    tags       TEXT NOT NULL,      -- PatientID, PatientName, PatientBirthDate, StudyDate (JSON)
    candidates TEXT NOT NULL,      -- JSON: orders that might be it (Patient ID, name+birth date)
    resolution TEXT,               -- JSON: who decided what, when (NULL: open or matched)
    seen       REAL NOT NULL,
    performed  TEXT NOT NULL DEFAULT '{}');  -- JSON: series, images, modalities (billing)
CREATE TABLE IF NOT EXISTS statuses (  -- what the RIS is told, in order (the outbox)
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id   TEXT NOT NULL UNIQUE,  -- the RIS keeps each once, however often it is sent
    accession  TEXT NOT NULL,
    status     TEXT NOT NULL,      -- in_progress, completed, discontinued, images_available
    at         REAL NOT NULL,
    study_uid  TEXT NOT NULL,
    state      TEXT NOT NULL DEFAULT 'waiting',  -- waiting, sent, refused (by the RIS)
    tries      INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    sent_at    REAL,
    performed  TEXT NOT NULL DEFAULT '');  -- JSON with images_available: what to bill
CREATE TABLE IF NOT EXISTS reports (   -- final reports from the RIS until in Orthanc (reports.py)
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    key        TEXT NOT NULL UNIQUE,  -- a digest of what it says: the same report kept once
    accession  TEXT NOT NULL,
    fields     TEXT NOT NULL,      -- the Report as JSON (the PDF's length in place of it)
    pdf        BLOB,               -- until attached (then Orthanc holds it)
    source     TEXT NOT NULL,      -- hl7 or rest
    received   REAL NOT NULL,
    state      TEXT NOT NULL DEFAULT 'waiting',  -- waiting (for its study), attached
    last_error TEXT NOT NULL DEFAULT '',         -- why it still waits
    documents  TEXT NOT NULL DEFAULT '[]',       -- JSON: the DICOM documents it became
    attached   REAL);
CREATE INDEX IF NOT EXISTS reports_state ON reports (state);
CREATE TABLE IF NOT EXISTS demographics (  -- patient updates and merges from the RIS
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT NOT NULL,      -- update, merge, reconcile (a study given its order)
    patient_id TEXT NOT NULL,      -- as it is to be (a merge: the surviving patient)
    prior_id   TEXT NOT NULL,      -- the Patient ID as the images have it now
    study_uid  TEXT NOT NULL DEFAULT '',  -- reconcile: the one study to rewrite
    accession  TEXT NOT NULL DEFAULT '',  -- reconcile: the order's Accession Number
    orthanc_id TEXT NOT NULL DEFAULT '',  -- reconcile: the study's Orthanc ID when decided
    fields     TEXT NOT NULL,      -- JSON: the patient's identity as the RIS now has it
    source     TEXT NOT NULL,      -- hl7 or rest
    received   REAL NOT NULL,
    state      TEXT NOT NULL,      -- waiting, held (a merge: for a person), applied, declined
    decided    TEXT,               -- JSON: who confirmed or declined a merge, when, why
    applied    REAL,
    instances  INTEGER,            -- how many stored instances were rewritten
    last_error TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS arriving (orthanc_id TEXT PRIMARY KEY);  -- new studies, not yet stable
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    sender     TEXT NOT NULL,
    control_id TEXT NOT NULL,
    received   REAL NOT NULL,
    orders     INTEGER NOT NULL,
    PRIMARY KEY (sender, control_id));
"""
REPORT_COLUMNS = ("key, accession, fields, pdf, source, received, state, last_error, documents, "
                  "attached")
STATES = ("scheduled", "in_progress", "completed", "discontinued", "cancelled")
LISTED = ("scheduled", "in_progress")  # on the worklist
DONE = ("completed", "discontinued")
# Columns added after the first stores were made: added to an older store when opened.
ADDED = {"statuses": {"performed": "TEXT NOT NULL DEFAULT ''"},
         "studies": {"performed": "TEXT NOT NULL DEFAULT '{}'"}}
QUEUES = ("statuses", "reports", "demographics")  # tables kept in arrival order (seq)
COUNTED = ("orders", *QUEUES)  # tables with a state column
_CURSORS = {"appointments": "ris", "reports": "ris-reports"}  # meta keys
STEP_STATES = {"IN PROGRESS": "in_progress", "COMPLETED": "completed",
               "DISCONTINUED": "discontinued"}


def _same_person(order: dict, tags: dict[str, str]) -> bool:
    """The same name and birth date (case and spacing aside): a candidate, never a match."""
    def name(value: str) -> str:
        return " ".join(value.replace("^", " ").upper().split())
    return bool(order["birth_date"]) and order["birth_date"] == tags.get("PatientBirthDate") \
        and name(order["patient_name"]) == name(tags.get("PatientName", ""))


def _order(row: sqlite3.Row) -> Order:
    fields = json.loads(row["fields"])
    return Order(**{**fields, "code": tuple(fields["code"])})


def _tell_ris(db: sqlite3.Connection, accession: str, status: str, now: float,
              study_uid: str = "", performed: dict | None = None) -> None:
    db.execute("INSERT INTO statuses (event_id, accession, status, at, study_uid, performed) "
               "VALUES (?, ?, ?, ?, ?, ?)", (str(uuid.uuid4()), accession, status, now,
                                             study_uid, json.dumps(performed) if performed
                                             else ""))


def _procedures(db: sqlite3.Connection, accession: str) -> list[dict]:
    """What was performed for an order, for billing: the procedure codes its completed MPPS
    steps name, else the code it was ordered with."""
    codes = []
    for row in db.execute("SELECT attributes FROM steps WHERE state = 'COMPLETED' AND EXISTS "
                          "(SELECT 1 FROM json_each(steps.accessions) WHERE value = ?) "
                          "ORDER BY created", (accession,)):
        for item in json.loads(row["attributes"]).get("00081032", {}).get("Value", []):
            code = {name: (item.get(tag, {}).get("Value") or [""])[0] for name, tag in (
                ("code", "00080100"), ("scheme", "00080102"), ("meaning", "00080104"))}
            if code["code"] and code not in codes:
                codes.append(code)
    if not codes:
        order = db.execute("SELECT fields FROM orders WHERE accession = ?",
                           (accession,)).fetchone()
        value, scheme, meaning = json.loads(order["fields"])["code"] if order else ("", "", "")
        if value:
            codes.append({"code": value, "scheme": scheme, "meaning": meaning})
    return codes


class Orders:
    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        self.db = open_store(path, SCHEMA, readonly=readonly, added=ADDED)
        self.lock = threading.RLock()

    def close(self) -> None:
        if self.db is not None:
            self.db.close()

    def __enter__(self) -> Orders:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def apply(self, changes: list[Change], source: str,
              message: tuple[str, str] | None = None,
              within: Callable[[sqlite3.Connection], None] | None = None) -> list[str]:
        """Keep what a message (HL7: its sender and control ID) or the RIS's API says, all of
        it or nothing, durably; the accessions it changed ([] for a message already applied).
        Rejected when it would re-point an accession to another patient. `within` writes what
        else the message says (patient edits) in the same transaction."""
        now = time.time()
        with self.lock, immediate(self.db) as db:
            if message and db.execute("SELECT 1 FROM messages WHERE sender = ? AND "
                                      "control_id = ?", message).fetchone():
                return []
            changed = []
            for change in changes:
                order = change.order
                known = db.execute("SELECT patient_id, issuer, state FROM orders "
                                   "WHERE accession = ?", (order.accession,)).fetchone()
                if known and (known["patient_id"], known["issuer"]) != (order.patient_id,
                                                                        order.issuer):
                    raise Rejected(f"accession {order.accession} is already another patient's "
                                   "order: not re-pointed", "Accession Number")
                if change.action in ("cancel", "complete") and not known:
                    continue  # nothing scheduled here to take off the worklist
                if change.action == "complete" and known["state"] in ("cancelled", *DONE):
                    continue  # over already
                state = {"schedule": "scheduled", "cancel": "cancelled",
                         "complete": "completed"}[change.action]
                if known and known["state"] in ("in_progress", *DONE) and state == "scheduled":
                    state = known["state"]  # the RIS's change does not undo what was done
                db.execute(
                    "INSERT INTO orders (accession, state, patient_id, issuer, fields, source, "
                    "updated) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (accession) DO UPDATE "
                    "SET state = excluded.state, fields = excluded.fields, "
                    "source = excluded.source, updated = excluded.updated",
                    (order.accession, state, order.patient_id, order.issuer,
                     json.dumps(asdict(order)), source, now))
                changed.append(order.accession)
            if within is not None:
                within(db)
            if message:
                db.execute("INSERT INTO messages (sender, control_id, received, orders) "
                           "VALUES (?, ?, ?, ?)", (*message, now, len(changes)))
        return changed

    def take_from(self, copy: Path) -> int:
        """The orders, messages and reports of `copy` (a backup's) that this store lacks; how
        many orders. This store's own rows win: they are newer than any backup."""
        with closing(sqlite3.connect(f"file:{copy}?mode=ro", uri=True, timeout=30)) as source:
            rows = source.execute("SELECT accession, state, patient_id, issuer, fields, source, "
                                  "updated FROM orders").fetchall()
            messages = source.execute("SELECT sender, control_id, received, orders "
                                      "FROM messages").fetchall()
            has_reports = source.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                         "AND name = 'reports'").fetchone()
            reports = source.execute(f"SELECT {REPORT_COLUMNS} FROM reports").fetchall() \
                if has_reports else []
        with self.lock, immediate(self.db) as db:
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO orders (accession, state, patient_id, issuer, "
                           "fields, source, updated) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            added = db.total_changes - before
            db.executemany("INSERT OR IGNORE INTO messages (sender, control_id, received, "
                           "orders) VALUES (?, ?, ?, ?)", messages)
            db.executemany(f"INSERT OR IGNORE INTO reports ({REPORT_COLUMNS}) VALUES "
                           f"({', '.join('?' * len(REPORT_COLUMNS.split(',')))})", reports)
        return added

    def step(self, uid: str, state: str, accessions: list[str], attributes: dict,
             create: bool) -> list[str]:
        """Keep an MPPS instance as created or set (`state`: its DICOM status); the orders it
        moves, whose worklist items change. KeyError: no such step to set (or one to create
        exists); ValueError: the step is final and may not change."""
        now = time.time()
        with self.lock, immediate(self.db) as db:
            known = db.execute("SELECT state FROM steps WHERE uid = ?", (uid,)).fetchone()
            if create and known:
                raise KeyError(f"MPPS {uid} exists already")
            if not create and not known:
                raise KeyError(f"no MPPS {uid} here")
            if known and known["state"] != "IN PROGRESS":
                raise ValueError(f"MPPS {uid} is {known['state']}: it may no longer change")
            db.execute("INSERT INTO steps (uid, state, accessions, attributes, created, updated) "
                       "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (uid) DO UPDATE SET "
                       "state = excluded.state, accessions = excluded.accessions, "
                       "attributes = excluded.attributes, updated = excluded.updated",
                       (uid, state, json.dumps(accessions), json.dumps(attributes), now, now))
            moved = []
            for accession in accessions:
                row = db.execute("SELECT state FROM orders WHERE accession = ?",
                                 (accession,)).fetchone()
                if row is None or row["state"] in (*DONE, "cancelled"):
                    continue  # unscheduled, or over: the step is kept all the same
                if row["state"] != STEP_STATES[state]:
                    db.execute("UPDATE orders SET state = ?, updated = ? WHERE accession = ?",
                               (STEP_STATES[state], now, accession))
                    _tell_ris(db, accession, STEP_STATES[state], now)
                moved.append(accession)
        return moved

    def step_attributes(self, uid: str) -> dict | None:
        """An MPPS instance as kept (DICOM JSON), None when there is none."""
        with self.lock:
            row = self.db.execute("SELECT attributes FROM steps WHERE uid = ?",
                                  (uid,)).fetchone()
        return None if row is None else json.loads(row["attributes"])

    # --- studies Orthanc holds (stable), against the orders --------------------------------

    def changes_cursor(self) -> int:
        return int(self._meta("changes") or 0)

    def ris_cursor(self, feed: str = "appointments") -> str:
        """Where reading one of the RIS's feeds goes on from (its own word, opaque)."""
        return self._meta(_CURSORS[feed])

    def set_ris_cursor(self, value: str, feed: str = "appointments") -> None:
        with self.lock, immediate(self.db) as db:
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) "
                       "DO UPDATE SET value = excluded.value", (_CURSORS[feed], value))

    def _meta(self, key: str) -> str:
        with self.lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return "" if row is None else row["value"]

    def follow_changes(self, cursor: int, new: list[str], stable: list[str]) -> None:
        """Where the reading of Orthanc's changes stands, and the studies still arriving."""
        with self.lock, immediate(self.db) as db:
            db.executemany("INSERT OR IGNORE INTO arriving (orthanc_id) VALUES (?)",
                           [(study,) for study in new])
            db.executemany("DELETE FROM arriving WHERE orthanc_id = ?",
                           [(study,) for study in stable])
            db.execute("INSERT INTO meta (key, value) VALUES ('changes', ?) ON CONFLICT (key) "
                       "DO UPDATE SET value = excluded.value", (str(cursor),))

    def arriving(self) -> list[str]:
        with self.lock:
            return [row[0] for row in self.db.execute("SELECT orthanc_id FROM arriving")]

    def study_arrived(self, study_uid: str, orthanc_id: str, tags: dict[str, str],
                      performed: dict | None = None) -> tuple[str | None, list[str]]:
        """A stable study, once: matched to its order by Accession Number (the order then has
        its images; without MPPS it is done and leaves the worklist), else put on the
        reconciliation list with the orders that might be it. Returns (matched accession or
        None, accessions whose worklist items change). `performed`: the study's counts
        (series, images, modalities), told to the RIS for billing."""
        accession = tags.get("AccessionNumber", "")
        performed = performed or {}
        now = time.time()
        with self.lock, immediate(self.db) as db:
            known = db.execute("SELECT matched FROM studies WHERE study_uid = ?",
                               (study_uid,)).fetchone()
            if known is not None:
                return known["matched"], []  # seen before (more images since): as decided
            order = db.execute("SELECT state, patient_id FROM orders WHERE accession = ? AND "
                               "state != 'cancelled'", (accession,)).fetchone() \
                if accession else None
            moved: list[str] = []
            if order is not None and order["patient_id"] == tags.get("PatientID", ""):
                matched, candidates = accession, []
                moved = self._images_arrived(db, accession, order["state"], study_uid, now,
                                             performed)
            else:  # no order, or the order is another patient's: a person decides
                matched = None
                candidates = [row["accession"] for row in db.execute(
                    "SELECT accession, fields FROM orders WHERE state IN (?, ?) AND "
                    "(accession = ? OR patient_id = ?) ORDER BY accession",
                    (*LISTED, accession, tags.get("PatientID", "")))]
                candidates += [
                    row["accession"] for row in db.execute(
                        "SELECT accession, fields FROM orders WHERE state IN (?, ?)", LISTED)
                    if row["accession"] not in candidates
                    and _same_person(json.loads(row["fields"]), tags)]
            db.execute("INSERT INTO studies (study_uid, orthanc_id, accession, matched, tags, "
                       "candidates, seen, performed) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (study_uid, orthanc_id, accession, matched, json.dumps(tags),
                        json.dumps(candidates), now, json.dumps(performed)))
        return matched, moved

    @staticmethod
    def _images_arrived(db: sqlite3.Connection, accession: str, state: str, study_uid: str,
                        now: float, performed: dict) -> list[str]:
        """The order has its images (the RIS hears so, with what to bill: the procedures
        performed and the study's counts); without MPPS that also means done."""
        _tell_ris(db, accession, "images_available", now, study_uid,
                  {"procedures": _procedures(db, accession), **performed})
        if state != "scheduled":
            return []
        db.execute("UPDATE orders SET state = 'completed', updated = ? WHERE accession = ?",
                   (now, accession))
        _tell_ris(db, accession, "completed", now, study_uid)
        return [accession]

    # --- the outbox: statuses for the RIS, in order ----------------------------------------

    def waiting_statuses(self, limit: int = 100) -> list[dict]:
        with self.lock:
            return [dict(row) for row in self.db.execute(
                "SELECT seq, event_id, accession, status, at, study_uid, tries, performed "
                "FROM statuses WHERE state = 'waiting' ORDER BY seq LIMIT ?", (limit,))]

    def status_sent(self, seq: int, refused: str = "") -> None:
        """The RIS took it (or refused it for good: kept with why, and the queue goes on)."""
        with self.lock, immediate(self.db) as db:
            db.execute("UPDATE statuses SET state = ?, sent_at = ?, last_error = ?, "
                       "tries = tries + 1 WHERE seq = ?",
                       ("refused" if refused else "sent", time.time(), refused, seq))

    def status_failed(self, seq: int, error: str) -> None:
        with self.lock, immediate(self.db) as db:
            db.execute("UPDATE statuses SET tries = tries + 1, last_error = ? WHERE seq = ?",
                       (error, seq))

    def retry_refused(self) -> int:
        """Refused statuses back in the queue, in their place (a wrong RIS_URL answers 404 to
        everything: once it is put right, they go again); how many."""
        with self.lock, immediate(self.db) as db:
            return db.execute("UPDATE statuses SET state = 'waiting' WHERE state = 'refused'"
                              ).rowcount

    def statuses(self, limit: int = 200) -> list[dict]:
        return [dict(row) for row in self.newest("statuses", limit)]

    def newest(self, table: str, limit: int) -> list[sqlite3.Row]:
        """The last `limit` rows of a queue (statuses, reports, demographics), newest first;
        [] before the store, or a read-only one before that table, exists."""
        if table not in QUEUES:
            raise ValueError(f"{table} is not a queue")
        if self.db is None:
            return []
        with self.lock:
            try:
                return self.db.execute(f"SELECT * FROM {table} ORDER BY seq DESC LIMIT ?",
                                       (limit,)).fetchall()
            except sqlite3.OperationalError:  # a store from an earlier release, read-only
                return []

    def unmatched(self, include_resolved: bool = False) -> list[dict]:
        """The reconciliation list: stable studies that no order matched."""
        if self.db is None:
            return []
        query = "SELECT * FROM studies WHERE matched IS NULL" + (
            "" if include_resolved else " AND resolution IS NULL") + " ORDER BY seen"
        with self.lock:
            rows = self.db.execute(query).fetchall()
        return [{"study_uid": row["study_uid"], "orthanc_id": row["orthanc_id"],
                 "accession": row["accession"], **json.loads(row["tags"]),
                 "candidates": json.loads(row["candidates"]),
                 "resolution": json.loads(row["resolution"]) if row["resolution"] else None,
                 "seen": row["seen"]} for row in rows]

    def resolve(self, study_uid: str, accession: str | None, who: str, note: str) -> list[str]:
        """A person's decision for a study on the list: it is `accession`'s order (which then
        has its images and, unless a modality reported otherwise, is done), or it has none.
        Returns the accessions whose worklist items change. KeyError: no such open entry;
        ValueError: no such order."""
        now = time.time()
        with self.lock, immediate(self.db) as db:
            row = db.execute("SELECT performed, tags, orthanc_id FROM studies WHERE "
                             "study_uid = ? AND "
                             "matched IS NULL AND resolution IS NULL", (study_uid,)).fetchone()
            if row is None:
                raise KeyError(f"no open entry for study {study_uid}")
            moved = []
            if accession is not None:
                order = db.execute("SELECT state, fields FROM orders WHERE accession = ?",
                                   (accession,)).fetchone()
                if order is None:
                    raise ValueError(f"no order {accession} here")
                moved = self._images_arrived(db, accession, order["state"], study_uid, now,
                                             json.loads(row["performed"]))
                # The images are then given the order's identity (demographics.py), in the
                # same transaction as the decision: one never happens without the other.
                fields = json.loads(order["fields"])
                # What the order leaves empty, the images keep (None: unchanged).
                patient = {name: fields[name] or None for name in (
                    "issuer", "patient_name", "birth_date", "sex")}
                db.execute("INSERT INTO demographics (kind, patient_id, prior_id, study_uid, "
                           "accession, orthanc_id, fields, source, received, state) VALUES "
                           "('reconcile', ?, ?, ?, ?, ?, ?, 'resolve', ?, 'waiting')",
                           (fields["patient_id"], json.loads(row["tags"])["PatientID"],
                            study_uid, accession, row["orthanc_id"],
                            json.dumps({"patient_id": fields["patient_id"], **patient}), now))
            decision = {"order": accession, "by": who, "note": note, "at": now}
            db.execute("UPDATE studies SET resolution = ? WHERE study_uid = ?",
                       (json.dumps(decision), study_uid))
        return moved

    def get(self, accession: str) -> tuple[str, Order] | None:
        if self.db is None:
            return None
        with self.lock:
            row = self.db.execute("SELECT * FROM orders WHERE accession = ?",
                                  (accession,)).fetchone()
        return None if row is None else (row["state"], _order(row))

    def scheduled(self) -> list[Order]:
        """The orders on the worklist: scheduled, or started and not yet done."""
        if self.db is None:
            return []
        with self.lock:
            return [_order(row) for row in self.db.execute(
                "SELECT * FROM orders WHERE state IN (?, ?) ORDER BY accession", LISTED)]

    def listing(self, limit: int = 200) -> list[dict]:
        if self.db is None:
            return []
        with self.lock:
            return [{"state": row["state"], "source": row["source"], "updated": row["updated"],
                     **json.loads(row["fields"])} for row in self.db.execute(
                "SELECT * FROM orders ORDER BY updated DESC LIMIT ?", (limit,))]

    def counts(self, table: str = "orders") -> dict[str, int]:
        """How many rows of `table` (orders, statuses, reports, demographics) are in each
        state; {} before the store, or a read-only one before that table, exists."""
        if table not in COUNTED:
            raise ValueError(f"no states are counted in {table}")
        if self.db is None:
            return {}
        with self.lock:
            try:
                return {row[0]: row[1] for row in self.db.execute(
                    f"SELECT state, COUNT(*) FROM {table} GROUP BY state")}
            except sqlite3.OperationalError:  # a store from an earlier release, read-only
                return {}

    def unmatched_count(self) -> int:
        """How many studies wait on the reconciliation list."""
        if self.db is None:
            return 0
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM studies WHERE matched IS NULL AND "
                                   "resolution IS NULL").fetchone()[0]
