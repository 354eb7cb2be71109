"""The appliance's small SQLite stores: how one is opened and how it takes a write transaction.

Opened for writing: WAL and `synchronous=FULL` (a commit is on disk when it returns), the schema
created if missing. Opened read-only (status commands): never created, never locked for writing.
`BEGIN IMMEDIATE` takes the write lock up front (no upgrade deadlock between two writers), and
the transaction commits whole or rolls back whole, whatever interrupts it. Used by the sync
outbox, the inbound queue, and HQ's outbound queue and conflicts ledger.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def open_store(path: Path, schema: str, readonly: bool = False,
               added: dict[str, dict[str, str]] | None = None) -> sqlite3.Connection | None:
    """The store at `path` with rows by name; None when a read-only one does not exist yet.
    `added`: columns a later release added ({table: {column: definition}}), added to an
    older store when it is opened for writing.

    A connection may be closed by another thread than the one that used it (a parallel upload's
    worker), never used by two at once.
    """
    if readonly:
        if not path.exists():
            return None
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30,
                             isolation_level=None, check_same_thread=False)
    else:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(schema)
        for table, columns in (added or {}).items():
            present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            for column, definition in columns.items():
                if column not in present:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
    db.row_factory = sqlite3.Row
    return db


@contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
