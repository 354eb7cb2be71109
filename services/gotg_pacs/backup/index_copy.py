"""Orthanc's SQLite index copied while Orthanc runs, so a backup holds index and files as a pair.

Orthanc opens its index in SQLite's EXCLUSIVE locking mode: no other process can read it while
Orthanc runs, so SQLite's online backup is out of reach, and stopping Orthanc would close the
DICOM port. Instead Orthanc is frozen (SIGSTOP) for the moment it takes to copy the index file
and its write-ahead log, then thawed (SIGCONT). A frozen process has finished every write it
issued, so the copy is what a power cut at that instant would leave on disk, without even the
reordering a disk may add: exactly what SQLite's recovery is made for (the filesystem snapshot
Orthanc's own guidance allows, taken by hand). The copy is then opened, its log folded in, and
checked (`PRAGMA quick_check`) before it goes into the archive.

While Orthanc is frozen its ports stay open: a modality's association waits in the kernel's
queue and goes on after; it is delayed, never refused. The pause is measured and kept with the
backup's outcome.

Copied before the storage files are read, the pair is consistent: Orthanc writes and fsyncs an
image file before it commits the index entry, so every entry in the copy has its file in the
archive (unless deleted in between: a restore reports those), and a file stored after the copy
is in the archive without an entry (a restore stores it again through Orthanc).

A watchdog thaws Orthanc after THAW_AFTER seconds whatever becomes of this process: a frozen
archive is an outage. (Under systemd the backup unit also thaws Orthanc when it stops, since
stopping a unit kills the watchdog with it.) A copy the watchdog interrupted is not a copy:
refused, like any other failure here, and the backup goes on without the index.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path

import psutil

from .. import orphans
from ..config import Settings

log = logging.getLogger(__name__)

INDEX_FILE = "index"  # Orthanc's SQLite index in its IndexDirectory
THAW_AFTER = 60  # seconds: the watchdog's deadline, far above any copy
FREEZE_WAIT = 10  # seconds for every thread of Orthanc to stop before giving up


class IndexCopyError(Exception):
    """No consistent copy of the index could be taken; the reason, worded for site IT."""


def orthanc_process(settings: Settings) -> psutil.Process | None:
    """The Orthanc running on this box's configuration (by its command line), if one is."""
    config = str(settings.orthanc_config_file)
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if process.info["name"] == "Orthanc" and cmdline and cmdline[-1] == config:
            found.append(process)
    if len(found) > 1:
        raise IndexCopyError(f"{len(found)} Orthanc processes run on {config}")
    return found[0] if found else None


def watchdog(pid: int, after: float = THAW_AFTER) -> subprocess.Popen:
    """A process of its own session that thaws `pid` `after` seconds from now, even if this
    one is killed meanwhile (SIGCONT to a process that runs does nothing)."""
    return subprocess.Popen(["sh", "-c", f"sleep {after}; kill -CONT {pid}"],
                            start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def copy_index(settings: Settings, target: Path) -> float | None:
    """Copy Orthanc's index to `target` (one self-contained SQLite file), consistent as of one
    instant. Returns how long Orthanc was frozen, in seconds (None: it was not running)."""
    if settings.orthanc_index != "sqlite":
        raise IndexCopyError("Orthanc's index is in PostgreSQL: it is not part of the archive")
    index = settings.orthanc_index_dir / INDEX_FILE
    if not index.exists():
        raise IndexCopyError(f"Orthanc's index {index} does not exist yet")
    work = target.parent / f".{target.name}.work"
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir(mode=0o700)
        paused = _copy_frozen(settings, index, work / INDEX_FILE)
        _fold_and_check(work / INDEX_FILE)
        os.replace(work / INDEX_FILE, target)
    except OSError as exc:  # a full state disk, a vanished file: no copy, the backup goes on
        raise IndexCopyError(f"Orthanc's index could not be copied: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return paused


def _copy_frozen(settings: Settings, index: Path, copy: Path) -> float | None:
    """The index and its log, copied with Orthanc frozen (or stopped: then nothing to freeze)."""
    process = orthanc_process(settings)
    if process is None:
        try:  # not found running: proven by its storage lock, held while copying
            with orphans.storage_idle(settings):
                _copy_files(index, copy)
        except orphans.IndexBusy:
            raise IndexCopyError("Orthanc holds its storage but its process was not found: "
                                 "no copy of its index taken unfrozen") from None
        return None
    armed = time.monotonic()  # the watchdog fires THAW_AFTER after this, never before
    thawer = watchdog(process.pid, THAW_AFTER)
    started = time.monotonic()
    try:
        process.suspend()
        try:
            _wait_frozen(process.pid)
            _copy_files(index, copy)
        finally:
            process.resume()
            paused = time.monotonic() - started
        if time.monotonic() - armed >= THAW_AFTER or thawer.poll() is not None:
            # The watchdog may have fired: Orthanc may have run during part of the copy.
            raise IndexCopyError(f"copying Orthanc's index took over {THAW_AFTER} s; Orthanc "
                                 "was thawed meanwhile, so the copy is not consistent")
    except psutil.Error as exc:
        raise IndexCopyError(f"Orthanc (pid {process.pid}) could not be paused: {exc}") from exc
    finally:
        thawer.kill()
        thawer.wait()
        try:
            if process.status() == psutil.STATUS_STOPPED:  # resume() went unheard
                os.kill(process.pid, signal.SIGCONT)
        except (psutil.Error, ProcessLookupError):
            pass  # Orthanc exited meanwhile: nothing left frozen
    return paused


def _wait_frozen(pid: int, timeout: float = FREEZE_WAIT) -> None:
    """Until every thread of `pid` has stopped: SIGSTOP takes effect for a thread only once
    it leaves the system call it is in (a write, an fsync), and the copy must not start
    before that."""
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for stat_file in Path(f"/proc/{pid}/task").glob("*/stat"):
            try:
                states.append(stat_file.read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):
                continue  # a thread that just ended
        if states and all(state in "tT" for state in states):
            return
        if time.monotonic() > deadline:
            raise IndexCopyError(f"Orthanc did not pause within {timeout:.0f} s (a thread "
                                 "stuck in a system call): no copy of its index this time")
        time.sleep(0.001)


def _copy_files(index: Path, copy: Path) -> None:
    shutil.copyfile(index, copy)
    for suffix in ("-wal",):  # the log holds the newest commits; -shm is rebuilt from it
        log_file = index.with_name(index.name + suffix)
        if log_file.exists():
            shutil.copyfile(log_file, copy.with_name(copy.name + suffix))


def _fold_and_check(copy: Path) -> None:
    """Fold the copied log into the copy (SQLite's crash recovery), leave one file, check it."""
    try:
        with closing(sqlite3.connect(copy)) as db:
            db.execute("PRAGMA journal_mode=DELETE").fetchall()  # checkpoints, drops the log
            verdict = db.execute("PRAGMA quick_check").fetchall()
            db.execute("SELECT COUNT(*) FROM AttachedFiles").fetchone()
    except sqlite3.DatabaseError as exc:
        raise IndexCopyError(f"the copy of Orthanc's index is not readable: {exc}") from exc
    if verdict != [("ok",)]:
        raise IndexCopyError("the copy of Orthanc's index failed SQLite's check: "
                             + "; ".join(row[0] for row in verdict[:5]))
    if copy.with_name(copy.name + "-wal").exists():
        raise IndexCopyError("the copy of Orthanc's index kept its log after folding it in")
