"""Images on disk that Orthanc's index forgot in a power cut, taken back in.

Orthanc fsyncs every image file (`SyncStorageArea`) before it answers a C-STORE, but its SQLite
index runs in WAL mode with `SYNCHRONOUS=NORMAL` (fixed in Orthanc's code): a power cut can roll
back its last committed transactions. Then the modality was told "stored", the file is on disk,
and the index has no trace of it: nothing would ever show it, back it up as an instance or send
it to HQ. That breaks invariant 1, so recovery happens in two steps around every Orthanc start:

1. `collect` (Orthanc stopped: it holds its index exclusively while running) moves storage files
   the index does not reference into an inbox on the same filesystem (an atomic rename, durable
   before anything else happens).
2. `readopt` (Orthanc running) stores each inbox file again through the REST API. A file leaves
   the inbox only once Orthanc holds that instance with the very same MD5; anything else (not
   DICOM, a different version of an instance Orthanc already holds) is kept in `unresolved/`.
   Nothing is ever deleted without a verified copy.

A power cut between the two steps loses nothing: the inbox is read again at the next start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from .config import Settings
from .orthanc import Orthanc, OrthancError, OrthancUnreachable

log = logging.getLogger(__name__)


class IndexBusy(Exception):
    """Orthanc's index is locked: another Orthanc is running on this storage."""


@dataclass
class Readopted:
    """What one recovery did, for the log and the person reading it."""

    stored: list[str] = field(default_factory=list)       # instance IDs stored again
    duplicates: list[str] = field(default_factory=list)   # identical copy already held
    unresolved: list[Path] = field(default_factory=list)  # kept aside, never deleted

    def summary(self) -> str:
        return (f"took back {len(self.stored)} image(s) Orthanc's index had lost, "
                f"{len(self.duplicates)} already held; {len(self.unresolved)} kept aside in "
                f"{self.unresolved[0].parent if self.unresolved else 'nowhere'}")


def inbox(settings: Settings) -> Path:
    return settings.storage_path / "recovered" / "inbox"


def unresolved_dir(settings: Settings) -> Path:
    return settings.storage_path / "recovered" / "unresolved"


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _indexed_uuids(index: Path) -> set[str] | None:
    # A normal (not read-only) open lets SQLite replay a WAL left by a crash, exactly as Orthanc
    # would; only SELECTs run. A zero timeout turns another Orthanc's exclusive lock into an error.
    try:
        with closing(sqlite3.connect(index, timeout=0)) as db:
            db.execute("PRAGMA query_only = ON")
            return {row[0] for row in db.execute("SELECT uuid FROM AttachedFiles")}
    except sqlite3.DatabaseError as exc:
        if "locked" in str(exc):
            raise IndexBusy(f"{index} is in use: is another Orthanc running on this "
                            "storage?") from None
        # Unreadable: Orthanc itself will refuse it and say why; move nothing on a guess.
        log.error("cannot read Orthanc's index %s (%s): power-cut check skipped", index, exc)
        return None


def collect(settings: Settings) -> int:
    """Move unindexed storage files into the inbox (Orthanc must be stopped); how many moved."""
    index = settings.orthanc_index_dir / "index"
    storage = settings.orthanc_storage_dir
    if not index.exists() or not storage.is_dir():
        return 0
    known = _indexed_uuids(index)
    if known is None:
        return 0
    target = inbox(settings)
    moved = 0
    for path in storage.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*"):
        if path.is_file() and path.name not in known:
            target.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.rename(path, target / path.name)  # same filesystem: atomic
            moved += 1
    if moved:
        _fsync_dir(target)
        log.warning("moved %d image file(s) unknown to Orthanc's index into %s", moved, target)
    return moved


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _keep_aside(settings: Settings, path: Path, why: str, report: Readopted) -> None:
    target = unresolved_dir(settings)
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.rename(path, target / path.name)
    _fsync_dir(target)
    report.unresolved.append(target / path.name)
    log.error("kept %s aside in %s: %s", path.name, target, why)


def readopt(settings: Settings, client: Orthanc) -> Readopted:
    """Store the inbox again through Orthanc (running); remove a file only once verified."""
    report = Readopted()
    folder = inbox(settings)
    if not folder.is_dir():
        return report
    # Largest first: a complete file goes in before any partial attachment of the same instance.
    for path in sorted(folder.iterdir(), key=lambda p: p.stat().st_size, reverse=True):
        expected = _md5(path)
        try:
            answer = client.post("/instances", data=path.read_bytes(),
                                 headers={"Content-Type": "application/dicom"})
        except OrthancUnreachable:
            raise  # Orthanc went away: the inbox stays for the next start
        except OrthancError as exc:
            _keep_aside(settings, path, f"Orthanc refused it ({exc})", report)
            continue
        instance = answer.get("ID") if isinstance(answer, dict) else None
        if not instance:
            _keep_aside(settings, path, f"Orthanc did not store it (answered {answer!r})", report)
            continue
        held = client.request("GET", f"/instances/{instance}/attachments/dicom/md5").text.strip()
        if held != expected:
            _keep_aside(settings, path, f"Orthanc holds instance {instance} with other content",
                        report)
            continue
        (report.duplicates if answer.get("Status") == "AlreadyStored"
         else report.stored).append(instance)
        path.unlink()  # Orthanc holds this exact content now
    _fsync_dir(folder)
    if report.stored or report.duplicates or report.unresolved:
        log.warning("%s", report.summary())
    return report
