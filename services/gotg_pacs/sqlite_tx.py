"""The one way the appliance's small SQLite stores take a write transaction.

`BEGIN IMMEDIATE` takes the write lock up front (no upgrade deadlock between two writers), and
the transaction commits whole or rolls back whole, whatever interrupts it. Used by the sync
outbox, the inbound queue, and HQ's outbound queue and conflicts ledger.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
