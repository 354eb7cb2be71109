"""Images on disk that Orthanc's index forgot in a power cut, taken back in.

Orthanc fsyncs every image file (`SyncStorageArea`) before it answers a C-STORE, but its SQLite
index runs in WAL mode with `SYNCHRONOUS=NORMAL` (fixed in Orthanc's code): a power cut can roll
back its last committed transactions. Then the modality was told "stored", the file is on disk,
and the index has no trace of it: nothing would ever show it, back it up as an instance or send
it to HQ. That breaks invariant 1, so recovery happens in two steps around an Orthanc start that
follows an unclean stop:

1. `collect` (Orthanc stopped: it holds its index exclusively while running) moves storage files
   the index does not reference into an inbox inside the storage folder (same filesystem: an
   atomic link-and-unlink that never overwrites), durable before anything else happens.
2. `readopt` (Orthanc running) stores each inbox file again through the REST API. A file leaves
   the inbox only once the bytes Orthanc now serves for that instance hash to the file's own
   MD5; anything else (not DICOM, a partial attachment, a different version of an instance
   Orthanc already holds, any error) is kept in `unresolved/`. Nothing is deleted without a
   verified copy, and no single file can stop the archive from starting.

A power cut between the two steps loses nothing: the inbox is read again at the next start.
A clean stop leaves a marker so the next start skips the scan (on a Pi with 200,000 images the
walk costs real time while the DICOM port is still closed).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import durable
from .checksums import md5_of
from .config import Settings
from .orthanc import Orthanc, OrthancError, OrthancUnreachable

log = logging.getLogger(__name__)

RECOVERED = "recovered"  # not two hex digits: Orthanc never uses it, the scan never enters it
CLEAN_MARKER = ".pacs-clean-stop"
LOCK_FILE = ".pacs-lock"
# More unknown files than this (and more than 1 % of the known ones) is not a power cut but a
# foreign or replaced index: moving the whole archive on a guess is refused.
MAX_AUTOMATIC = 1000


class IndexBusy(Exception):
    """Orthanc's index or storage is in use: another Orthanc is running on this storage."""


@dataclass
class Readopted:
    """What one recovery did, for the log and the person reading it."""

    stored: list[str] = field(default_factory=list)       # instance IDs stored again
    duplicates: list[str] = field(default_factory=list)   # identical copy already held
    unresolved: list[Path] = field(default_factory=list)  # kept aside, never deleted
    waiting: int = 0                                      # left in the inbox for next start

    def summary(self) -> str:
        return (f"took back {len(self.stored)} image(s) Orthanc's index had lost, "
                f"{len(self.duplicates)} already held, {len(self.unresolved)} kept aside, "
                f"{self.waiting} left for the next start")


def recovered_dir(settings: Settings) -> Path:
    return settings.orthanc_storage_dir / RECOVERED


def inbox(settings: Settings) -> Path:
    return recovered_dir(settings) / "inbox"


def unresolved_dir(settings: Settings) -> Path:
    return recovered_dir(settings) / "unresolved"


def move_aside(path: Path, folder: Path) -> Path:
    """Move without ever replacing a file already there (a name taken gets a suffix)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    target, n = folder / path.name, 0
    while True:
        try:
            os.link(path, target)
            break
        except FileExistsError:
            n += 1
            target = folder / f"{path.name}.{n}"
    durable.fsync_dir(folder)
    path.unlink()
    return target


def lock_storage(settings: Settings) -> int:
    """An exclusive lock on the storage for as long as the returned descriptor stays open.

    The Orthanc child inherits it, so the lock lives exactly as long as Orthanc: no second
    Orthanc, and no recovery scan, can touch a storage another Orthanc is writing to.
    """
    if not settings.orthanc_storage_dir.exists():
        settings.orthanc_storage_dir.mkdir(parents=True, mode=0o700)
        # Made by root (a restore on a new disk): Orthanc's, like its parent.
        durable.own_like(settings.orthanc_storage_dir, settings.storage_path)
    descriptor = os.open(settings.orthanc_storage_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    # Taken by root (a restore, a disk move): the file stays Orthanc's to lock later.
    durable.own_like(descriptor, settings.orthanc_storage_dir)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise IndexBusy(f"{settings.orthanc_storage_dir} is in use: is another Orthanc running "
                        "on this storage?") from None
    return descriptor


@contextmanager
def storage_idle(settings: Settings) -> Iterator[None]:
    """Work that needs Orthanc not running on this storage, with the storage lock held so none
    starts meanwhile; IndexBusy when one runs. Opened read-only: this works where the storage
    is mounted read-only (a sandboxed backup), and never creates the lock file."""
    try:
        descriptor = os.open(settings.orthanc_storage_dir / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:  # no Orthanc has ever run on this storage
        yield
        return
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexBusy(f"an Orthanc runs on {settings.orthanc_storage_dir}") from None
        yield
    finally:
        os.close(descriptor)


def mark_clean_stop(settings: Settings) -> None:
    """Orthanc exited by itself after SIGTERM: its index is complete, no scan next time."""
    marker = settings.orthanc_storage_dir / CLEAN_MARKER
    descriptor = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(descriptor)
    durable.fsync_dir(marker.parent)


def _consume_clean_marker(settings: Settings) -> bool:
    marker = settings.orthanc_storage_dir / CLEAN_MARKER
    if not marker.exists():
        return False
    marker.unlink()
    durable.fsync_dir(marker.parent)  # a crash from here on must lead to a scan
    return True


def _indexed_uuids(index: Path) -> set[str] | None:
    # A normal (not read-only) open lets SQLite replay a WAL left by a crash, exactly as Orthanc
    # does when it opens the index; only SELECTs run. It needs the same rights as Orthanc.
    try:
        # Orthanc is stopped (the storage lock says so), but SQLite may still be replaying a
        # WAL: wait a little for a lock rather than skip the check on "database is locked".
        with closing(sqlite3.connect(index, timeout=15)) as db:
            db.execute("PRAGMA query_only = ON")
            return {row[0] for row in db.execute("SELECT uuid FROM AttachedFiles")}
    except sqlite3.DatabaseError as exc:
        # Unreadable or foreign: Orthanc itself will refuse it and say why; move nothing.
        log.error("cannot read Orthanc's index %s (%s): power-cut check skipped", index, exc)
        return None


def _stored_files(storage: Path):
    """Every file in Orthanc's two-level hex layout (os.scandir: one stat per folder, not file)."""
    for first in os.scandir(storage):
        if len(first.name) != 2 or not first.is_dir(follow_symlinks=False):
            continue
        for second in os.scandir(first.path):
            if len(second.name) != 2 or not second.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(second.path):
                if entry.is_file(follow_symlinks=False):
                    yield entry


def collect(settings: Settings) -> int:
    """Move unindexed storage files into the inbox (Orthanc stopped, storage locked)."""
    index = settings.orthanc_index_dir / "index"
    storage = settings.orthanc_storage_dir
    if _consume_clean_marker(settings) or not index.exists() or not storage.is_dir():
        return 0
    known = _indexed_uuids(index)
    if known is None:
        return 0
    unknown = [Path(entry.path) for entry in _stored_files(storage) if entry.name not in known]
    if len(unknown) > max(MAX_AUTOMATIC, len(known) // 100):
        log.error("%d files in %s are unknown to Orthanc's index (which knows %d): that is not a "
                  "power cut but a replaced or foreign index; nothing moved, repair by hand",
                  len(unknown), storage, len(known))
        return 0
    moved = 0
    for path in unknown:
        try:
            move_aside(path, inbox(settings))
            moved += 1
        except OSError as exc:  # one file must never keep the archive from starting
            log.error("could not set aside %s (%s): it stays on disk, Orthanc starts without "
                      "it, and the next unclean start tries again", path, exc)
    if moved:
        log.warning("moved %d image file(s) unknown to Orthanc's index into %s", moved,
                    inbox(settings))
    return moved


def _served_md5(client: Orthanc, instance: str) -> str:
    """MD5 of the bytes Orthanc serves for the instance now (the file as it is on disk)."""
    digest = hashlib.md5()
    response = client.request("GET", f"/instances/{instance}/attachments/dicom/data",
                              stream=True)
    for block in response.iter_content(1 << 20):
        digest.update(block)
    return digest.hexdigest()


def is_fragment(path: Path) -> bool:
    """Orthanc's partial 'until pixel data' attachments: image attributes but no pixels."""
    import pydicom  # here: Orthanc's start path (collect) must not pay for it on a Pi

    try:
        header = pydicom.dcmread(path, stop_before_pixels=False, defer_size=1024)
    except Exception:  # noqa: BLE001 - whatever it is, Orthanc will judge it
        return False
    return "Rows" in header and "PixelData" not in header and "FloatPixelData" not in header \
        and "DoubleFloatPixelData" not in header


def _readopt_one(settings: Settings, client: Orthanc, path: Path, report: Readopted) -> None:
    if is_fragment(path):
        report.unresolved.append(move_aside(path, unresolved_dir(settings)))
        log.error("kept %s aside: a partial attachment (no pixel data), never stored as an "
                  "instance", path.name)
        return
    expected = md5_of(path)
    with open(path, "rb") as body:  # streamed: a 1 GB multi-frame must not sit in memory
        answer = client.post("/instances", data=body,
                             headers={"Content-Type": "application/dicom"})
    instance = answer.get("ID") if isinstance(answer, dict) else None
    if not instance:
        raise OrthancError(f"Orthanc did not store it (answered {answer!r})")
    if _served_md5(client, instance) != expected:
        raise OrthancError(f"Orthanc holds instance {instance} with other content")
    (report.duplicates if answer.get("Status") == "AlreadyStored"
     else report.stored).append(instance)
    path.unlink()  # Orthanc now serves these very bytes


def readopt(settings: Settings, client: Orthanc) -> Readopted:
    """Store the inbox again through Orthanc (running); never raises for one bad file."""
    report = Readopted()
    folder = inbox(settings)
    if not folder.is_dir():
        return report
    files = sorted((p for p in folder.iterdir() if p.is_file()),
                   key=lambda p: p.stat().st_size, reverse=True)
    for done, path in enumerate(files):
        try:
            _readopt_one(settings, client, path, report)
        except OrthancUnreachable as exc:
            report.waiting = len(files) - done
            log.error("Orthanc stopped answering during recovery (%s): %d file(s) stay in %s "
                      "for the next start", exc, report.waiting, folder)
            break
        except (OrthancError, OSError, ValueError) as exc:
            report.unresolved.append(move_aside(path, unresolved_dir(settings)))
            log.error("kept %s aside in %s: %s", path.name, unresolved_dir(settings), exc)
    durable.fsync_dir(folder)
    if files:
        log.warning("%s", report.summary())
    return report
