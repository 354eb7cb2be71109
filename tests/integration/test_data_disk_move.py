"""The archive's move onto a data disk, on a real file system (a loop device here; the NUC image
test does the whole command, LUKS2 and boot included, under qemu).

Why it matters: the move ends by deleting the system disk's copy. Until the copy has been read
back from the disk and compared, a failure at any step must leave the archive exactly where and
as it was, with /etc/fstab as it was: otherwise the next boot hides the archive, or Orthanc
starts on an empty folder.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from gotg_pacs.config import Settings
from gotg_pacs.data_disk import DataDiskError, move
from gotg_pacs.orphans import LOCK_FILE

FSTAB = "LABEL=gotg-root / ext4 noatime 0 1\n"


@pytest.fixture
def disk(tmp_path):
    """A 64 MB ext4 file system on a loop device, as `prepare` leaves the new disk."""
    image = tmp_path / "disk.img"
    with image.open("wb") as out:
        out.truncate(64 * 1024**2)
    device = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True,
                            text=True, check=True).stdout.strip()
    subprocess.run(["mkfs.ext4", "-q", "-L", move.FS_LABEL, device], check=True)
    yield Path(device)
    for place in (tmp_path / "orthanc", tmp_path / "data"):
        while move.mounted_at(place):
            subprocess.run(["umount", str(place)], check=True)
    subprocess.run(["losetup", "-d", device], check=True)


@pytest.fixture
def archive(tmp_path) -> Settings:
    settings = Settings(storage_path=tmp_path / "orthanc", state_path=tmp_path / "state",
                        site_code="field-7", admin_password="correct horse battery",
                        http_port=1)  # no Orthanc answers: nothing to count
    (settings.orthanc_storage_dir / "0a" / "1b").mkdir(parents=True)
    settings.orthanc_index_dir.mkdir()
    (settings.orthanc_storage_dir / "0a" / "1b" / "0a1b-instance").write_bytes(os.urandom(1 << 20))
    (settings.orthanc_index_dir / "index").write_bytes(b"SQLite format 3\x00" + bytes(8192))
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "fstab").write_text(FSTAB)
    return settings


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != LOCK_FILE}  # made by the move's lock


def _move(settings: Settings, disk: Path, tmp_path: Path) -> tuple[int, str]:
    storage = settings.storage_path
    return move._move(settings, disk, lambda _: None, tmp_path / "etc", tmp_path / "data", [],
                      move.fstab_lines(storage, f"{disk}", tmp_path / "data"), None)


def test_the_checked_copy_is_mounted_in_the_archives_place(archive, disk, tmp_path):
    before = _tree(archive.storage_path)
    counted, problem = _move(archive, disk, tmp_path)
    assert "Orthanc was not running" in problem, "nothing counted, so nothing deleted"
    source = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(archive.storage_path)],
                            capture_output=True, text=True).stdout.strip()
    assert source == f"{disk}[/orthanc]", "the disk's copy, bind-mounted over STORAGE_PATH"
    assert _tree(archive.storage_path) == before
    old = tmp_path / "orthanc.before-data-disk"
    assert _tree(old) == before, "the system disk's copy stays until Orthanc counted"
    fstab = (tmp_path / "etc" / "fstab").read_text()
    assert fstab.startswith(FSTAB) and move.MARK in fstab


@pytest.mark.parametrize("failing", ["compare", "bind mount"])
def test_a_failure_before_the_archive_is_in_place_puts_everything_back(
        archive, disk, tmp_path, monkeypatch, failing):
    before = _tree(archive.storage_path)
    if failing == "compare":
        monkeypatch.setattr(move, "same_tree", lambda *_: ["index/index"])
    else:
        real = move.run

        def no_bind(*argv: str, **kwargs) -> str:
            if "--bind" in argv:
                raise DataDiskError("mount --bind failed: (made to fail)")
            return real(*argv, **kwargs)
        monkeypatch.setattr(move, "run", no_bind)
    with pytest.raises(DataDiskError, match="differs" if failing == "compare" else "--bind"):
        _move(archive, disk, tmp_path)
    assert not move.mounted_at(archive.storage_path)
    assert not move.mounted_at(tmp_path / "data")
    assert _tree(archive.storage_path) == before
    assert not (tmp_path / "orthanc.before-data-disk").exists()
    assert (tmp_path / "etc" / "fstab").read_text() == FSTAB, "no line left to hide it at boot"
