"""The orders the worklist answers from, kept on the box (the RIS may be unreachable for days).

One SQLite file (WAL, `synchronous=FULL`): an order is on disk before the sender hears "accepted".
Each message is recorded by sender and control ID in the same transaction as its orders, so a
message sent again (its acknowledgement was lost) is acknowledged again and changes nothing.

An Accession Number names one patient's procedure for good: an order naming a known accession
with another patient is refused, never re-pointed (the images of one would go to the other).
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from dataclasses import asdict
from pathlib import Path

from ..sqlite_tx import immediate, open_store
from .hl7_orders import Order, Received, Rejected

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    accession  TEXT PRIMARY KEY,
    state      TEXT NOT NULL,      -- scheduled, cancelled
    patient_id TEXT NOT NULL,
    issuer     TEXT NOT NULL,
    fields     TEXT NOT NULL,      -- the Order as JSON
    source     TEXT NOT NULL,      -- hl7 (later: the RIS's REST API)
    updated    REAL NOT NULL);
CREATE INDEX IF NOT EXISTS orders_state ON orders (state);
CREATE TABLE IF NOT EXISTS messages (
    sender     TEXT NOT NULL,
    control_id TEXT NOT NULL,
    received   REAL NOT NULL,
    orders     INTEGER NOT NULL,
    PRIMARY KEY (sender, control_id));
"""
STATES = ("scheduled", "cancelled")


def _order(row: sqlite3.Row) -> Order:
    fields = json.loads(row["fields"])
    return Order(**{**fields, "code": tuple(fields["code"])})


class Orders:
    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        self.db = open_store(path, SCHEMA, readonly=readonly)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()

    def __enter__(self) -> Orders:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def apply(self, received: Received, source: str = "hl7") -> list[str]:
        """Keep what the message says, durably; the accessions it changed ([] for a message
        already applied). Rejected when it would re-point an accession to another patient."""
        now = time.time()
        with immediate(self.db) as db:
            if db.execute("SELECT 1 FROM messages WHERE sender = ? AND control_id = ?",
                          (received.sender, received.control_id)).fetchone():
                return []
            changed = []
            for change in received.changes:
                order = change.order
                known = db.execute("SELECT patient_id, issuer FROM orders WHERE accession = ?",
                                   (order.accession,)).fetchone()
                if known and (known["patient_id"], known["issuer"]) != (order.patient_id,
                                                                        order.issuer):
                    raise Rejected(f"accession {order.accession} is already another patient's "
                                   "order: not re-pointed", "Accession Number")
                if change.action == "cancel" and not known:
                    continue  # nothing scheduled here to take off the worklist
                state = "scheduled" if change.action == "schedule" else "cancelled"
                db.execute(
                    "INSERT INTO orders (accession, state, patient_id, issuer, fields, source, "
                    "updated) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (accession) DO UPDATE "
                    "SET state = excluded.state, fields = excluded.fields, "
                    "source = excluded.source, updated = excluded.updated",
                    (order.accession, state, order.patient_id, order.issuer,
                     json.dumps(asdict(order)), source, now))
                changed.append(order.accession)
            db.execute("INSERT INTO messages (sender, control_id, received, orders) "
                       "VALUES (?, ?, ?, ?)",
                       (received.sender, received.control_id, now, len(received.changes)))
        return changed

    def take_from(self, copy: Path) -> int:
        """The orders and messages of `copy` (a backup's) that this store lacks; how many
        orders. This store's own rows win: they are newer than any backup."""
        with closing(sqlite3.connect(f"file:{copy}?mode=ro", uri=True, timeout=30)) as source:
            rows = source.execute("SELECT accession, state, patient_id, issuer, fields, source, "
                                  "updated FROM orders").fetchall()
            messages = source.execute("SELECT sender, control_id, received, orders "
                                      "FROM messages").fetchall()
        with immediate(self.db) as db:
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO orders (accession, state, patient_id, issuer, "
                           "fields, source, updated) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            added = db.total_changes - before
            db.executemany("INSERT OR IGNORE INTO messages (sender, control_id, received, "
                           "orders) VALUES (?, ?, ?, ?)", messages)
        return added

    def get(self, accession: str) -> tuple[str, Order] | None:
        if self.db is None:
            return None
        row = self.db.execute("SELECT * FROM orders WHERE accession = ?",
                              (accession,)).fetchone()
        return None if row is None else (row["state"], _order(row))

    def scheduled(self) -> list[Order]:
        if self.db is None:
            return []
        return [_order(row) for row in self.db.execute(
            "SELECT * FROM orders WHERE state = 'scheduled' ORDER BY accession")]

    def listing(self, limit: int = 200) -> list[dict]:
        if self.db is None:
            return []
        return [{"state": row["state"], "source": row["source"], "updated": row["updated"],
                 **json.loads(row["fields"])} for row in self.db.execute(
            "SELECT * FROM orders ORDER BY updated DESC LIMIT ?", (limit,))]

    def counts(self) -> dict[str, int]:
        if self.db is None:
            return {}
        return {row[0]: row[1] for row in self.db.execute(
            "SELECT state, COUNT(*) FROM orders GROUP BY state")}
