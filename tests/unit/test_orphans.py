"""Power-cut recovery on a hand-made storage and index: the parts that need no Orthanc."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from gotg_pacs import orphans
from gotg_pacs.config import Settings
from gotg_pacs.orthanc import Orthanc


@pytest.fixture
def settings(tmp_path) -> Settings:
    settings = Settings(storage_path=tmp_path / "orthanc", state_path=tmp_path / "state",
                        admin_password="long-enough-pw")
    settings.orthanc_index_dir.mkdir(parents=True)
    settings.orthanc_storage_dir.mkdir(parents=True)
    return settings


def _index(settings: Settings, uuids: list[str]) -> None:
    with closing(sqlite3.connect(settings.orthanc_index_dir / "index")) as db:
        db.execute("CREATE TABLE AttachedFiles (id INTEGER, fileType INTEGER, uuid TEXT)")
        db.executemany("INSERT INTO AttachedFiles VALUES (1, 1, ?)", [(u,) for u in uuids])
        db.commit()


def _file(settings: Settings, name: str, content: bytes = b"DICM") -> None:
    path = settings.orthanc_storage_dir / name[:2] / name[2:4] / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def test_only_unindexed_files_move_to_the_inbox(settings):
    _index(settings, ["aaaa-known"])
    _file(settings, "aaaa-known")
    _file(settings, "bbbb-lost", b"lost image")
    assert orphans.collect(settings) == 1
    assert (orphans.inbox(settings) / "bbbb-lost").read_bytes() == b"lost image"
    assert (settings.orthanc_storage_dir / "aa" / "aa" / "aaaa-known").exists()


def test_a_file_that_cannot_be_moved_does_not_keep_orthanc_from_starting(settings, monkeypatch,
                                                                          caplog):
    _index(settings, [])
    _file(settings, "aaaa-stuck", b"stuck image")
    _file(settings, "bbbb-lost", b"lost image")
    link = os.link

    def refuse(source, target):
        if Path(source).name == "aaaa-stuck":
            raise PermissionError(13, "Permission denied")
        link(source, target)

    monkeypatch.setattr(orphans.os, "link", refuse)
    assert orphans.collect(settings) == 1
    assert (orphans.inbox(settings) / "bbbb-lost").read_bytes() == b"lost image"
    assert (settings.orthanc_storage_dir / "aa" / "aa" / "aaaa-stuck").read_bytes() == \
        b"stuck image", "left where it was, never lost"
    assert "could not set aside" in caplog.text


def test_after_a_clean_stop_there_is_no_scan(settings):
    _index(settings, [])
    _file(settings, "bbbb-lost")
    orphans.mark_clean_stop(settings)
    assert orphans.collect(settings) == 0
    assert orphans.collect(settings) == 1, "the marker counts for one start only"


def test_a_whole_archive_unknown_to_the_index_is_not_moved_on_a_guess(settings):
    _index(settings, [])
    for n in range(orphans.MAX_AUTOMATIC + 1):
        _file(settings, f"{n:04x}-image")
    assert orphans.collect(settings) == 0
    assert not orphans.inbox(settings).exists()


def test_an_unreadable_index_moves_nothing(settings):
    (settings.orthanc_index_dir / "index").write_bytes(b"not a database" * 100)
    _file(settings, "bbbb-lost")
    assert orphans.collect(settings) == 0


def test_moving_never_replaces_a_file_with_the_same_name(settings, tmp_path):
    for n in range(2):
        source = tmp_path / f"from-{n}" / "same-name"
        source.parent.mkdir()
        source.write_bytes(f"copy {n}".encode())
        orphans.move_aside(source, tmp_path / "target")
    assert sorted(p.read_text() for p in (tmp_path / "target").iterdir()) == ["copy 0", "copy 1"]


def test_orthanc_gone_during_recovery_leaves_the_inbox_for_next_time(settings):
    _index(settings, [])
    _file(settings, "bbbb-lost", b"image bytes")
    orphans.collect(settings)
    report = orphans.readopt(settings, Orthanc("http://127.0.0.1:9", timeout=2))
    assert report.waiting == 1 and not report.unresolved
    assert (orphans.inbox(settings) / "bbbb-lost").read_bytes() == b"image bytes"


def test_the_storage_lock_admits_one_orthanc(settings):
    first = orphans.lock_storage(settings)
    try:
        with pytest.raises(orphans.IndexBusy, match="another Orthanc"):
            orphans.lock_storage(settings)
    finally:
        os.close(first)
    os.close(orphans.lock_storage(settings))
