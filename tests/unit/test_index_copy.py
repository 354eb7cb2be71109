"""Orthanc's index copied for a backup: the write-ahead log folded in, damage refused, and a
frozen process always thawed."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing

import psutil
import pytest

from gotg_pacs import orphans
from gotg_pacs.backup import index_copy
from gotg_pacs.backup.index_copy import IndexCopyError, copy_index
from gotg_pacs.config import Settings
from gotg_pacs.process import wait_until

# Holds the index open as Orthanc does (WAL, exclusive locking), commits rows that stay in the
# log (no checkpoint), then waits to be killed.
WRITER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA locking_mode=EXCLUSIVE")
db.execute("PRAGMA wal_autocheckpoint=0")
db.execute("CREATE TABLE AttachedFiles(uuid TEXT)")
for n in range(200):
    db.execute("INSERT INTO AttachedFiles VALUES (?)", (f"file-{n}",))
print("committed", flush=True)
time.sleep(600)
"""


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(storage_path=tmp_path / "orthanc", state_path=tmp_path / "state",
                    site_code="field-7", admin_password="correct horse battery")


def test_the_copy_holds_every_commit_still_in_the_log_as_one_checked_file(settings, tmp_path):
    settings.orthanc_index_dir.mkdir(parents=True)
    index = settings.orthanc_index_dir / "index"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(index)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline().strip() == "committed"
        assert index.with_name("index-wal").stat().st_size > 0, "the rows wait in the log"
        copy = tmp_path / "copy.sqlite"
        assert copy_index(settings, copy) is None  # no Orthanc here: nothing was paused
        with sqlite3.connect(copy) as db:
            assert db.execute("SELECT COUNT(*) FROM AttachedFiles").fetchone() == (200,)
        assert sorted(path.name for path in tmp_path.iterdir() if "copy" in path.name) == \
            ["copy.sqlite"], "one file, no log, no scratch left"
    finally:
        writer.kill()
        writer.wait()


def test_a_damaged_or_absent_index_is_refused_and_nothing_is_left_as_a_copy(settings, tmp_path):
    copy = tmp_path / "copy.sqlite"
    with pytest.raises(IndexCopyError, match="does not exist"):
        copy_index(settings, copy)
    settings.orthanc_index_dir.mkdir(parents=True)
    (settings.orthanc_index_dir / "index").write_bytes(b"SQLite format 3\0" + b"\xff" * 4096)
    with pytest.raises(IndexCopyError, match="not readable"):
        copy_index(settings, copy)
    assert not copy.exists()
    assert [path.name for path in tmp_path.iterdir()] == ["orthanc"]


def test_an_orthanc_holding_its_storage_unseen_gets_no_unfrozen_copy(settings, tmp_path):
    settings.orthanc_index_dir.mkdir(parents=True)
    with closing(sqlite3.connect(settings.orthanc_index_dir / "index")) as db:
        db.execute("CREATE TABLE AttachedFiles(uuid TEXT)")
    lock = orphans.lock_storage(settings)  # as an Orthanc this box cannot see would hold it
    try:
        with pytest.raises(IndexCopyError, match="process was not found"):
            copy_index(settings, tmp_path / "copy.sqlite")
    finally:
        os.close(lock)
    assert copy_index(settings, tmp_path / "copy.sqlite") is None


@pytest.fixture
def frozen_orthanc(settings, monkeypatch):
    """A real process standing in for Orthanc (found as this box's), and its index."""
    settings.orthanc_index_dir.mkdir(parents=True)
    with closing(sqlite3.connect(settings.orthanc_index_dir / "index")) as db:
        db.execute("CREATE TABLE AttachedFiles(uuid TEXT)")
    stand_in = subprocess.Popen(["sleep", "60"])
    process = psutil.Process(stand_in.pid)
    monkeypatch.setattr(index_copy, "orthanc_process", lambda _settings: process)
    yield process
    stand_in.kill()
    stand_in.wait()


def test_orthanc_is_thawed_when_the_copy_fails(settings, tmp_path, frozen_orthanc, monkeypatch):
    seen = []

    def failing(index, copy):
        seen.append(frozen_orthanc.status())
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_copy, "_copy_files", failing)
    with pytest.raises(IndexCopyError, match="No space left"):
        copy_index(settings, tmp_path / "copy.sqlite")
    assert seen == [psutil.STATUS_STOPPED], "frozen while copying"
    assert frozen_orthanc.status() != psutil.STATUS_STOPPED
    assert not (tmp_path / "copy.sqlite").exists()


def test_a_copy_the_watchdog_interrupted_is_refused(settings, tmp_path, frozen_orthanc,
                                                     monkeypatch):
    monkeypatch.setattr(index_copy, "THAW_AFTER", 0.2)
    slow = index_copy._copy_files

    def overrunning(index, copy):
        assert wait_until(lambda: frozen_orthanc.status() != psutil.STATUS_STOPPED, 5), \
            "the watchdog thaws Orthanc during a copy that takes too long"
        slow(index, copy)

    monkeypatch.setattr(index_copy, "_copy_files", overrunning)
    with pytest.raises(IndexCopyError, match="not consistent"):
        copy_index(settings, tmp_path / "copy.sqlite")
    assert not (tmp_path / "copy.sqlite").exists()


def test_a_normal_copy_freezes_and_thaws_orthanc(settings, tmp_path, frozen_orthanc):
    paused = copy_index(settings, tmp_path / "copy.sqlite")
    assert paused is not None and 0 < paused < 5
    assert frozen_orthanc.status() != psutil.STATUS_STOPPED
    assert (tmp_path / "copy.sqlite").exists()


def test_a_paused_process_is_thawed_even_when_the_one_that_paused_it_is_killed():
    paused = subprocess.Popen(["sleep", "60"])
    pauser = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, sys, time\n"
        "from gotg_pacs.backup.index_copy import watchdog\n"
        f"watchdog({paused.pid}, after=1)\n"
        f"os.kill({paused.pid}, signal.SIGSTOP)\n"
        "print('paused', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert pauser.stdout.readline().strip() == "paused"
        assert wait_until(
            lambda: psutil.Process(paused.pid).status() == psutil.STATUS_STOPPED, 5)
        pauser.send_signal(signal.SIGKILL)
        pauser.wait()
        started = time.monotonic()
        assert wait_until(lambda: psutil.Process(paused.pid).status() != psutil.STATUS_STOPPED,
                          10)
        assert time.monotonic() - started < 5
    finally:
        paused.kill()
        pauser.kill()
