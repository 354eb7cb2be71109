"""HQ to clinic: reports and prior studies HQ queued for this site, fetched on the sync channel.

The pacs-sync loop calls `Inbound.step()` whenever it may reach HQ (same mode, same circuit
breaker as sending). A step asks HQ what waits for this site (at most every SYNC_INTERVAL when
there is nothing to do), then works through it for a bounded time so sending is never starved:

1. already here with exactly HQ's MD5 (a prior this site sent itself, or stored before a crash
   ate our record of it): nothing crosses the link but the acknowledgement;
2. otherwise download it in byte ranges of about fifteen seconds of the link each, appended to a
   partial file under STATE_PATH/sync/inbound: after an outage, a kill -9 or a reboot the next
   range starts where the file ends, so an outage costs at most the bytes in flight;
3. check the MD5 HQ announced, store it in this Orthanc, read it back: only exactly HQ's bytes
   count (another version under the same SOP Instance UID is kept, never overwritten, and shown);
4. record it as stored here (durable) and only then acknowledge to HQ, which marks it delivered.
   A crash between any two steps repeats at most the step it was in: Orthanc deduplicates a
   second store by UID, and an unacknowledged "stored" item is acknowledged on the next turn.

Progress lives in a small SQLite file (WAL, synchronous=FULL) beside the partial files, read by
`pacs sync inbound`. The outbox will owe these instances to HQ like anything stored here; HQ's
holdings answer already counts what it sent this site as held, so that costs one question.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

import requests

from ..checksums import md5_of
from ..config import Settings
from ..orthanc import Orthanc, OrthancError, OrthancUnreachable
from ..sqlite_tx import immediate, open_store
from .transport import HQClient, HQRefused, HQUnreachable, RateCap

log = logging.getLogger(__name__)

BLOCK = 64 * 1024
STEP_SECONDS = 20.0      # a step's work at most, then the loop sends again
SPAN_SECONDS = 4.0       # one range request: about this long on the link (like a chunk up)
FIRST_SPAN, MIN_SPAN, MAX_SPAN = 256 * 1024, 16 * 1024, 16 * 2**20
FAILURE_PAUSE = 60.0     # after a damaged download or a refusal; x4 each time, at most a day
STATES = ("waiting", "stored", "delivered", "conflict", "withdrawn")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    seq          INTEGER PRIMARY KEY,  -- HQ's number for it
    sop_uid      TEXT NOT NULL,
    study_uid    TEXT NOT NULL,
    size         INTEGER NOT NULL,
    md5          TEXT NOT NULL,
    urgent       INTEGER NOT NULL DEFAULT 0,
    -- waiting; stored (here, verified, HQ not told yet); delivered (HQ told); conflict (this
    -- archive holds other content under the UID); withdrawn (HQ no longer lists it)
    state        TEXT NOT NULL DEFAULT 'waiting',
    listed_at    REAL NOT NULL,
    stored_at    REAL,
    delivered_at REAL,
    clinic_id    TEXT,
    received     INTEGER NOT NULL DEFAULT 0,  -- bytes that crossed the link for it, all tries
    failures     INTEGER NOT NULL DEFAULT 0,
    retry_at     REAL NOT NULL DEFAULT 0,
    last_error   TEXT
);
CREATE INDEX IF NOT EXISTS items_state ON items (state, urgent, seq);
"""


class InboxError(Exception):
    """A request the inbox cannot honour, worded for the person who asked."""


class Inbox:
    """What HQ sends this site and how far each item got, durable."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        db = open_store(path, SCHEMA, readonly)
        if db is None:
            raise InboxError(f"nothing from HQ yet ({path} does not exist)")
        self.db = db

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Inbox:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    @contextmanager
    def _transaction(self):
        with immediate(self.db) as db:
            yield db

    def listed(self, items: list[dict], complete: bool, now: float | None = None) -> None:
        """HQ's list of what waits for this site. Known content keeps its progress (a stored
        item still needs its acknowledgement); a number HQ reuses for other content starts over.
        With the `complete` list, what HQ no longer lists is withdrawn."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            for item in items:
                db.execute(
                    "INSERT INTO items (seq, sop_uid, study_uid, size, md5, urgent, listed_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (seq) DO UPDATE SET "
                    "urgent = excluded.urgent, state = CASE WHEN items.md5 = excluded.md5 AND "
                    "items.sop_uid = excluded.sop_uid AND items.state IN ('stored', "
                    "'conflict') THEN items.state ELSE 'waiting' END, "
                    "listed_at = CASE WHEN items.state = 'waiting' THEN items.listed_at "
                    "ELSE excluded.listed_at END, "
                    "sop_uid = excluded.sop_uid, study_uid = excluded.study_uid, "
                    "size = excluded.size, md5 = excluded.md5",
                    (int(item["seq"]), str(item["sop_uid"]), str(item.get("study_uid", "")),
                     int(item["size"]), str(item["md5"]), int(bool(item.get("urgent"))), now))
            if complete:
                seqs = [int(item["seq"]) for item in items]
                db.execute(f"UPDATE items SET state = 'withdrawn' WHERE state = 'waiting' AND "
                           f"seq NOT IN ({','.join('?' * len(seqs))})", seqs)
            db.execute("INSERT INTO meta VALUES ('last_poll', ?) ON CONFLICT (key) DO UPDATE "
                       "SET value = excluded.value", (str(now),))

    def work(self, now: float | None = None) -> list[sqlite3.Row]:
        """Items to act on now: urgent first, then in HQ's order."""
        return self.db.execute(
            "SELECT * FROM items WHERE state IN ('waiting', 'stored') AND retry_at <= ? "
            "ORDER BY urgent DESC, seq", (time.time() if now is None else now,)).fetchall()

    def _update(self, seq: int, **values) -> None:
        with self._transaction() as db:
            db.execute(f"UPDATE items SET {', '.join(f'{k} = ?' for k in values)} "
                       "WHERE seq = ?", (*values.values(), seq))

    def received(self, seq: int, size: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE items SET received = received + ? WHERE seq = ?", (size, seq))

    def stored(self, seq: int, clinic_id: str) -> None:
        self._update(seq, state="stored", clinic_id=clinic_id, stored_at=time.time(),
                     last_error=None, failures=0, retry_at=0)

    def delivered(self, seq: int) -> None:
        self._update(seq, state="delivered", delivered_at=time.time())

    def conflict(self, seq: int, reason: str) -> None:
        self._update(seq, state="conflict", last_error=reason[:500])

    def failed(self, seq: int, reason: str, now: float | None = None) -> float:
        """Try again after a growing pause (1 min, 4, 16, ... at most a day); the pause."""
        now = time.time() if now is None else now
        count = self.db.execute("SELECT failures FROM items WHERE seq = ?",
                                (seq,)).fetchone()[0] + 1
        pause = min(86400.0, FAILURE_PAUSE * 4 ** (count - 1))
        self._update(seq, failures=count, retry_at=now + pause, last_error=reason[:500])
        return pause

    def is_waiting(self, seq: int, md5: str) -> bool:
        row = self.db.execute("SELECT state, md5 FROM items WHERE seq = ?", (seq,)).fetchone()
        return bool(row) and row["state"] == "waiting" and row["md5"] == md5

    def items(self, limit: int = 50) -> list[dict]:
        """Unfinished first (urgent, then HQ's order), then the most recently delivered."""
        return [dict(row) for row in self.db.execute(
            "SELECT * FROM items ORDER BY state NOT IN ('waiting', 'stored', 'conflict'), "
            "urgent DESC, CASE WHEN state = 'delivered' THEN -delivered_at ELSE seq END "
            "LIMIT ?", (limit,))]

    def summary(self) -> dict:
        by_state = {state: {"instances": 0, "bytes": 0} for state in STATES}
        for row in self.db.execute("SELECT state, COUNT(*), COALESCE(SUM(size), 0) FROM items "
                                   "GROUP BY state"):
            by_state[row[0]] = {"instances": row[1], "bytes": row[2]}
        received = self.db.execute("SELECT COALESCE(SUM(received), 0) FROM items").fetchone()[0]
        last = self.db.execute("SELECT value FROM meta WHERE key = 'last_poll'").fetchone()
        return {"instances": by_state, "received_bytes": received,
                "last_poll_age_s": round(time.time() - float(last[0]), 1) if last else None}


def partial_path(directory: Path, seq: int, md5: str) -> Path:
    if not re.fullmatch(r"[0-9a-f]{32}", md5):  # HQ's word goes into a file name: checked
        raise ValueError(f"not an MD5: {md5[:40]!r}")
    return directory / f"{int(seq)}-{md5}.part"


def _well_formed(item: dict) -> bool:
    try:
        return (int(item["seq"]) > 0 and int(item["size"]) > 0 and isinstance(item["sop_uid"], str)
                and re.fullmatch(r"[0-9a-f]{32}", item["md5"]) is not None)
    except (KeyError, TypeError, ValueError):
        return False


class Inbound:
    def __init__(self, settings: Settings, clinic: Orthanc, hq: HQClient,
                 budget: float = STEP_SECONDS) -> None:
        self.clinic = clinic
        self.hq = hq
        self.budget = budget
        self.interval = float(settings.sync_interval)
        self.directory = settings.state_path / "sync" / "inbound"
        self.inbox = Inbox(self.directory / "inbound.sqlite")
        self.cap = RateCap(settings.max_bandwidth_mbps)
        self.rate: float | None = None  # bytes/s of downloads, as measured
        self.next_poll = 0.0
        self._tidy()

    def close(self) -> None:
        self.inbox.close()

    def _tidy(self) -> None:
        """Partial files no waiting item needs (delivered since, withdrawn, other content)."""
        for part in self.directory.glob("*.part"):
            match = re.fullmatch(r"(\d+)-([0-9a-f]{32})\.part", part.name)
            if not match or not self.inbox.is_waiting(int(match[1]), match[2]):
                part.unlink(missing_ok=True)

    # --- one turn of the sync loop -------------------------------------------------------------

    def step(self) -> bool:
        """Ask HQ (when due), then act for at most `budget` seconds. True if anything was
        waiting (the loop comes back at once). Raises HQUnreachable: the breaker's business."""
        if time.monotonic() >= self.next_poll:
            self.poll()
        rows = self.inbox.work()
        if not rows:
            return False
        deadline = time.monotonic() + self.budget
        for row in rows:
            if time.monotonic() >= deadline:
                break
            self._one(row, deadline)
        self._tidy()
        return True

    def poll(self) -> int:
        """HQ's whole list for this site, page by page; how many items wait."""
        items, after, more = [], 0, True
        while more:
            page, more = self.hq.waiting(after)
            if not all(_well_formed(item) for item in page):
                raise HQUnreachable(f"HQ at {self.hq.url} listed items that are not HQ's")
            items += page
            if page:
                after = max(int(item["seq"]) for item in page)
            else:
                more = False
        self.inbox.listed(items, complete=True)
        self.next_poll = time.monotonic() + self.interval
        return len(items)

    def _one(self, row: sqlite3.Row, deadline: float) -> None:
        seq = row["seq"]
        try:
            if row["state"] == "waiting":
                clinic_id, other = self._here(row)
                if clinic_id is None and other:  # known before a byte crosses the link
                    self._conflict(row)
                    return
                if clinic_id is None:
                    part = self._fetch(row, deadline)
                    if part is None:
                        return  # the rest next turn
                    clinic_id = self._store(row, part)
                    if clinic_id is None:
                        return
                self.inbox.stored(seq, clinic_id)  # durable before HQ hears of it
                partial_path(self.directory, seq, row["md5"]).unlink(missing_ok=True)
            else:
                clinic_id = row["clinic_id"]
            self.hq.acknowledge(seq, row["md5"], clinic_id)
            self.inbox.delivered(seq)
            log.info("from HQ: %s stored here as %s and acknowledged", row["sop_uid"], clinic_id)
        except HQRefused as exc:
            if exc.status == 409:  # HQ's content changed: what we have of it is worthless
                partial_path(self.directory, seq, row["md5"]).unlink(missing_ok=True)
            if exc.status in (404, 410):  # no longer for us, or HQ lost it: the next list says
                self.next_poll = 0.0
            pause = self.inbox.failed(seq, str(exc))
            log.error("from HQ: %s: %s (next try in %.0f min)", row["sop_uid"], exc, pause / 60)

    def _here(self, row: sqlite3.Row) -> tuple[str | None, bool]:
        """This archive's instance if it already holds exactly HQ's content; and whether it
        holds another version under the same SOP Instance UID."""
        other = False
        for instance in self.clinic.find_instance(row["sop_uid"]):
            try:
                md5 = self.clinic.request(
                    "GET", f"/instances/{instance}/attachments/dicom/md5").text.strip()
            except OrthancError as exc:
                if exc.status == 404:
                    continue
                raise
            if md5 == row["md5"]:
                return instance, False
            other = True
        return None, other

    def _conflict(self, row: sqlite3.Row) -> None:
        """Another version is here under this UID: never overwritten (OverwriteInstances is
        off), HQ's not stored, shown to staff; HQ keeps it waiting."""
        partial_path(self.directory, row["seq"], row["md5"]).unlink(missing_ok=True)
        reason = ("this archive holds other content under this SOP Instance UID: kept as is, "
                  "HQ's version not stored")
        self.inbox.conflict(row["seq"], reason)
        log.error("from HQ: %s: %s", row["sop_uid"], reason)

    def _span(self) -> int:
        if self.rate is None:
            return FIRST_SPAN
        return max(MIN_SPAN, min(MAX_SPAN, int(self.rate * SPAN_SECONDS)))

    def _fetch(self, row: sqlite3.Row, deadline: float) -> Path | None:
        """The partial file once it holds every byte; None if the step's time ran out first."""
        seq, size = row["seq"], row["size"]
        part = partial_path(self.directory, seq, row["md5"])
        have = part.stat().st_size if part.exists() else 0
        if have > size:  # not what HQ announced: start over
            part.unlink()
            have = 0
        while have < size:
            if time.monotonic() >= deadline:
                return None
            last = min(size, have + self._span()) - 1
            started, got = time.monotonic(), 0
            response = self.hq.download(seq, have, last)
            try:
                if response.headers.get("Gotg-Md5") != row["md5"]:
                    raise HQRefused(409, "HQ's content changed since it was listed")
                whole = response.status_code == 200
                if not whole and not response.headers.get("Content-Range", "").startswith(
                        f"bytes {have}-"):
                    raise HQUnreachable("HQ answered another range than asked")
                with open(part, "wb" if whole else "ab") as out:
                    for block in response.iter_content(BLOCK):
                        self.cap.wait_for(len(block))
                        out.write(block)
                        got += len(block)
                if whole:
                    have = 0
            except requests.RequestException as exc:  # cut off mid-range: keep what arrived
                self.hq.link.failed()
                raise HQUnreachable(f"download from HQ cut off ({exc.__class__.__name__})") \
                    from exc
            finally:
                response.close()
                if got:
                    self.inbox.received(seq, got)
            have += got
            if not got:
                raise HQUnreachable("HQ sent no bytes of a range it answered")
            seconds = max(0.001, time.monotonic() - started)
            sample = got / seconds
            self.rate = sample if self.rate is None else 0.7 * self.rate + 0.3 * sample
        with open(part, "rb+") as handle:  # every byte on disk before we judge or store it
            os.fsync(handle.fileno())
        return part

    def _store(self, row: sqlite3.Row, part: Path) -> str | None:
        """This archive's instance holding exactly HQ's bytes, or None (recorded why)."""
        seq = row["seq"]
        if part.stat().st_size != row["size"] or md5_of(part) != row["md5"]:
            part.unlink()
            self.inbox.failed(seq, "damaged in transit (MD5 differs from HQ's); fetching again")
            log.error("from HQ: %s damaged in transit; fetching it again", row["sop_uid"])
            return None
        try:
            with open(part, "rb") as handle:
                answer = self.clinic.post("/instances", data=handle,
                                          headers={"Content-Type": "application/dicom"})
        except OrthancUnreachable:
            raise
        except OrthancError as exc:
            self.inbox.failed(seq, f"refused by this archive: {exc}")
            log.error("from HQ: %s refused by this archive: %s", row["sop_uid"], exc)
            return None
        instance = answer["ID"]
        served = hashlib.md5()
        with self.clinic.request("GET", f"/instances/{instance}/file", stream=True) as response:
            for block in response.iter_content(BLOCK):
                served.update(block)
        if served.hexdigest() != row["md5"]:  # stored meanwhile by a modality, say
            self._conflict(row)
            return None
        return instance
