"""The data disk: which disks may be erased, the LUKS2 header and its two keys, the key stick,
the lines boot reads, and the comparison that decides whether the system disk's copy may go.

Why it matters: this command erases a disk and then deletes the archive's only other copy. Every
refusal and every check here stands between a typo and the loss of a clinic's images. LUKS2 is
made by the real cryptsetup on a file (opening a mapping needs device-mapper: the NUC image test
does that, booted).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from gotg_pacs.config import Settings
from gotg_pacs.data_disk import DataDiskError, devices, luks, move
from tests.conftest import run_pacs

NUC_CPUINFO = "processor\t: 0\nflags\t\t: fpu vme sse2 ssse3 sse4_1 sse4_2 aes avx avx2\n"
PI4_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU part\t: 0xd08\n"


def test_the_cipher_follows_the_cpu():
    assert luks.has_aes_instructions(NUC_CPUINFO)
    assert luks.cipher_options(NUC_CPUINFO) == []  # cryptsetup's AES-XTS
    assert not luks.has_aes_instructions(PI4_CPUINFO)
    assert "xchacha12,aes-adiantum-plain64" in luks.cipher_options(PI4_CPUINFO)
    assert not luks.has_aes_instructions("flags\t: fpu aesni-less\n")  # a word, not a prefix


def test_the_recovery_passphrase_can_be_read_off_paper_and_typed():
    seen = {luks.new_recovery_passphrase() for _ in range(50)}
    assert len(seen) == 50
    for passphrase in seen:
        assert re.fullmatch(r"([A-HJ-NP-Z2-9]{5}-){5}[A-HJ-NP-Z2-9]{5}", passphrase)


def test_luks2_opens_with_the_key_and_with_the_typed_recovery_passphrase(tmp_path):
    partition = tmp_path / "partition.img"
    with partition.open("wb") as out:
        out.truncate(32 * 1024**2)
    key, recovery = luks.new_key(), luks.new_recovery_passphrase()
    uuid = luks.format_partition(partition, key, recovery, NUC_CPUINFO, recovery_iter_ms=200)
    assert re.fullmatch(r"[0-9a-f-]{36}", uuid) and luks.is_luks(partition)
    assert luks.opens(partition, key=key)
    assert luks.opens(partition, passphrase=recovery)
    assert not luks.opens(partition, key=luks.new_key())
    assert not luks.opens(partition, passphrase=recovery.lower())
    dump = subprocess.run(["cryptsetup", "luksDump", "--dump-json-metadata", str(partition)],
                          capture_output=True, text=True, check=True).stdout
    slots = json.loads(dump)["keyslots"]
    assert {n: s["kdf"]["type"] for n, s in slots.items()} == {"0": "pbkdf2", "1": "argon2id"}
    assert slots["1"]["kdf"]["memory"] <= luks.RECOVERY_MEMORY_KIB, "a Pi 4 must open it"
    header = subprocess.run(["cryptsetup", "luksDump", str(partition)], capture_output=True,
                            text=True, check=True).stdout
    assert "Version:       \t2" in header and luks.LUKS_LABEL in header
    leftovers = [p for p in Path("/run").glob("gotg-data-disk-*")]
    assert leftovers == [], "the key files are removed"


def test_the_key_stick_holds_only_the_key_readable_by_root(tmp_path):
    stick = tmp_path / "stick.img"
    with stick.open("wb") as out:
        out.truncate(8 * 1024**2)
    key = luks.new_key()
    luks.write_key_stick(stick, key)
    label = subprocess.run(["blkid", "-p", "-o", "value", "-s", "LABEL", str(stick)],
                           capture_output=True, text=True).stdout.strip()
    assert label == luks.KEY_LABEL
    read = subprocess.run(["debugfs", "-R", f"cat /{luks.KEY_FILE}", str(stick)],
                          capture_output=True, check=True).stdout
    assert read == key
    mode = subprocess.run(["debugfs", "-R", f"stat /{luks.KEY_FILE}", str(stick)],
                          capture_output=True, text=True, check=True).stdout
    assert re.search(r"Mode:\s+0400", mode) and re.search(r"User:\s+0\s", mode)


def _node(**changes) -> dict:
    node = {"name": "sdb", "path": "/dev/sdb", "type": "disk", "size": 500 * 10**9,
            "mountpoints": [None], "label": None, "model": "Portable SSD", "tran": "usb",
            "rm": False, "children": [{"name": "sdb1", "path": "/dev/sdb1", "type": "part",
                                       "size": 500 * 10**9, "mountpoints": [None],
                                       "label": "NAS"}]}
    node.update(changes)
    return node


def test_only_a_whole_unused_big_enough_disk_that_is_not_the_systems_is_erased():
    devices.usable(devices.from_lsblk(_node()), "data disk", 10**9, {"/dev/sda"})
    refusals = {
        "not a whole disk": (dict(type="part", path="/dev/sdb1"), "not a whole disk"),
        "system disk": ({}, "holds this box's system"),
        "mounted partition": (dict(children=[{"path": "/dev/sdb1", "type": "part", "size": 1,
                                              "mountpoints": ["/media/usb"]}]),
                              "mounted at /media/usb"),
        "swap": (dict(mountpoints=["[SWAP]"]), "in use"),
        "open mapping": (dict(children=[{"path": "/dev/sdb1", "type": "part", "size": 1,
                                         "children": [{"path": "/dev/mapper/x",
                                                       "type": "crypt", "size": 1}]}]),
                         "/dev/mapper/x open on it"),
        "too small": (dict(size=8 * 10**9), "too small"),
    }
    for case, (changes, words) in refusals.items():
        system = {"/dev/sdb"} if case == "system disk" else {"/dev/sda"}
        with pytest.raises(DataDiskError, match=re.escape(words)):
            devices.usable(devices.from_lsblk(_node(**changes)), "data disk", 10 * 10**9,
                           system)


def test_this_machines_own_system_disk_is_found_and_refused(tmp_path, monkeypatch):
    system = devices.system_disks()
    root = subprocess.run(["findmnt", "-n", "-e", "-o", "SOURCE", "/"], capture_output=True,
                          text=True).stdout.strip()
    if not root.startswith("/dev/"):
        pytest.fail(f"this machine's root is not a block device ({root})")
    disk = next(iter(system))
    with pytest.raises(DataDiskError, match="holds this box's system|is in use"):
        devices.usable(devices.describe(Path(disk)), "data disk", 1, system)
    # In this process, with every step that writes to a disk made to fail the test: should
    # the refusal ever break, this machine's disk is still never touched.
    def never(*_args, **_kwargs):
        pytest.fail("prepare went on to write to this machine's system disk")
    monkeypatch.setattr(move, "partition_disk", never)
    monkeypatch.setattr(luks, "format_partition", never)
    settings = _settings(tmp_path)
    (settings.storage_path / "index").mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    with pytest.raises(DataDiskError, match="holds this box's system"):
        move.prepare(settings, Path(disk), False, "", None, etc=tmp_path / "etc",
                     mount=tmp_path / "data")


def test_boot_lines_replace_only_their_own(tmp_path):
    storage = Path("/var/lib/gotg-pacs/orthanc")
    fstab = tmp_path / "fstab"
    theirs = ["# /etc/fstab: static file system information.",
              "LABEL=gotg-root / ext4 noatime,errors=remount-ro 0 1",
              "LABEL=GOTG-DATA /srv/gotg-data ext4 noatime,nofail 0 2",  # the base role's
              "tmpfs /tmp tmpfs mode=1777,nosuid,nodev,size=256M 0 0"]
    fstab.write_text("\n".join(theirs) + "\n")
    ours = move.fstab_lines(storage, "/dev/mapper/gotg-data")
    move.set_lines(fstab, ours)
    written = fstab.stat().st_mtime_ns
    move.set_lines(fstab, ours)  # again: still once, the file not even rewritten
    assert fstab.stat().st_mtime_ns == written
    lines = fstab.read_text().splitlines()
    assert lines[:4] == theirs and lines.count(move.MARK) == 1
    disk, bind = lines[5].split(), lines[6].split()
    assert disk[:3] == ["/dev/mapper/gotg-data", "/srv/gotg-data", "ext4"]
    assert "nofail" in disk[3] and "x-systemd.device-timeout=0" in disk[3], \
        "waits for a passphrase typed late"
    assert bind[:3] == ["/srv/gotg-data/orthanc", str(storage), "none"]
    assert "bind" in bind[3] and "x-systemd.requires-mounts-for=/srv/gotg-data" in bind[3]
    move.set_lines(fstab, [])
    assert fstab.read_text().splitlines() == theirs, "someone else's line for the place stays"

    stick = move.crypttab_lines("1234-abcd", "usb-key")[1].split()
    assert stick[:3] == ["gotg-data", "UUID=1234-abcd", "/gotg-pacs-data.key:LABEL=GOTG-KEY"]
    assert {"keyfile-timeout=90s", "nofail", "x-systemd.device-timeout=0"} <= \
        set(stick[3].split(","))
    console = move.crypttab_lines("1234-abcd", "console")[1].split()
    assert console[2] == "none" and "keyfile-timeout" not in console[3]
    crypttab = tmp_path / "crypttab"
    move.set_lines(crypttab, move.crypttab_lines("1234-abcd", "console"))
    assert move.encrypted_partition(tmp_path) == Path("/dev/disk/by-uuid/1234-abcd")
    assert move.prepared_here(tmp_path)


def test_the_copy_is_compared_byte_for_byte_and_by_owner_and_mode(tmp_path):
    source, copy = tmp_path / "orthanc", tmp_path / "copy"
    (source / "storage" / "0a" / "1b").mkdir(parents=True)
    (source / "index").mkdir()
    (source / "storage" / "0a" / "1b" / "instance").write_bytes(os.urandom(3 << 20))
    (source / "index" / "index").write_bytes(b"SQLite format 3\x00" + bytes(4096))
    subprocess.run(["cp", "-a", str(source), str(copy)], check=True)
    assert move.same_tree(source, copy) == []
    assert move.tree_size(source) == (2, (3 << 20) + 4112)

    changed = copy / "storage" / "0a" / "1b" / "instance"
    data = bytearray(changed.read_bytes())
    data[2 << 20] ^= 1  # one bit, deep inside
    changed.write_bytes(bytes(data))
    (copy / "index" / "index").chmod(0o644)
    (source / "index" / "index").chmod(0o600)
    assert sorted(move.same_tree(source, copy)) == ["index/index", "storage/0a/1b/instance"]
    (copy / "index" / "index").unlink()
    assert "index/index" in move.same_tree(source, copy)


def _env(tmp_path) -> Path:
    env = tmp_path / "pacs.env"
    env.write_text(f"STORAGE_PATH={tmp_path / 'orthanc'}\nSTATE_PATH={tmp_path / 'state'}\n"
                   "ADMIN_PASSWORD=correct-horse-battery\n")
    return env


def _settings(tmp_path) -> Settings:
    return Settings(storage_path=tmp_path / "orthanc", state_path=tmp_path / "state",
                    site_code="field-7", admin_password="correct horse battery")


def test_prepare_refuses_before_erasing_anything(tmp_path):
    settings = _settings(tmp_path)
    etc = tmp_path / "etc"
    etc.mkdir()
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(1024))
    with pytest.raises(DataDiskError, match="holds no archive"):
        move.prepare(settings, blank, True, "console", None, etc=etc)
    (settings.storage_path / "index").mkdir(parents=True)
    with pytest.raises(DataDiskError, match="--key-stick"):
        move.prepare(settings, blank, True, "usb-key", None, etc=etc)
    with pytest.raises(DataDiskError, match="--unlock"):
        move.prepare(settings, blank, True, "tang", None, etc=etc)
    with pytest.raises(DataDiskError, match="not a disk"):
        move.prepare(settings, blank, True, "console", None, etc=etc)
    with pytest.raises(DataDiskError, match="--key-stick is only for"):
        move.prepare(settings, blank, True, "console", blank, etc=etc)
    with pytest.raises(DataDiskError, match="is in use"):  # STORAGE_PATH already on a disk
        move.prepare(settings, blank, True, "console", None, etc=etc, mount=tmp_path)
    move.set_lines(etc / "fstab", move.fstab_lines(settings.storage_path, "UUID=x"))
    with pytest.raises(DataDiskError, match="already on a disk of its own"):
        move.prepare(settings, blank, True, "console", None, etc=etc)
    assert blank.read_bytes() == bytes(1024)


def test_unlock_without_a_data_disk_says_so(tmp_path):
    with pytest.raises(DataDiskError, match="no data disk of its own"):
        move.unlock(_settings(tmp_path), etc=tmp_path)
    shown = move.status(_settings(tmp_path), etc=tmp_path)
    assert shown["data_disk"] is False and shown["mounted"] is False


def test_the_command_erases_nothing_without_yes(tmp_path):
    env = _env(tmp_path)
    asked = run_pacs("data-disk", "prepare", "/dev/null", "--no-encrypt", env_file=env)
    assert asked.returncode != 0 and "say --yes" in asked.stderr
    shown = run_pacs("data-disk", "status", "--json", env_file=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["storage_path"] == str(tmp_path / "orthanc")
