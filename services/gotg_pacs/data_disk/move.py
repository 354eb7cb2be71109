"""Putting the archive on the data disk, and getting it back after a boot that could not unlock
it.

Order, so that nothing is ever lost: the new disk is made and tested first; Orthanc stops; its
folder is copied and the copy is compared byte for byte after a remount (so from the disk, not
from the page cache); only then is the data disk mounted in its place (a bind mount of
/srv/gotg-data/orthanc over STORAGE_PATH, so no setting and no unit changes); Orthanc starts
and must count what it counted before. The copy left on the system disk is removed only then:
until that moment any failure puts everything back as it was.

Boot: /etc/crypttab unlocks with the key stick (or asks at the console), /etc/fstab mounts the
disk and the bind mount with `nofail`, and Orthanc requires STORAGE_PATH's mount
(RequiresMountsFor): without its disk the box boots, answers SSH and the web pages, and Orthanc
stays down instead of starting on an empty folder of the SD card. `pacs data-disk unlock` brings
it up later (the stick plugged in, or the recovery passphrase typed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import durable, orphans, units
from ..config import Settings
from ..orthanc import Orthanc, OrthancError
from ..process import wait_until
from . import devices, luks
from .devices import DataDiskError

log = logging.getLogger(__name__)

MOUNT = Path("/srv/gotg-data")           # the data disk's file system
DATA_LABEL = "GOTG-DATA"
UNLOCKS = ("usb-key", "console")
MARK = "# GOTG PACS data disk (pacs data-disk prepare)"
# The disk's mount waits however long the unlock takes (a passphrase typed in the morning):
# then the disk mounts and Orthanc, whose start waits for it, comes up by itself. `nofail`
# keeps the rest of the boot from waiting.
DEVICE_TIMEOUT = "0"
# How long boot looks for the key stick before asking for the passphrase instead. Coldplug is
# slow on a Pi (and under emulation udev alone took 20 s): 30 s missed a stick plugged in.
KEY_STICK_TIMEOUT = "90s"
BACKUP_JOB = "pacs-backup-job.service"
LINUX_PARTITION = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
HEADROOM = 512 * 1024**2
# The recovery passphrase waiting to go to HQ: on the encrypted disk itself (readable only while
# it is open), removed once HQ has it.
FOR_HQ = MOUNT / ".gotg-recovery-for-hq.json"


@dataclass
class Prepared:
    device: str
    partition: str
    encrypted: bool
    unlock: str                 # usb-key, console, or "" (not encrypted)
    key_stick: str
    luks_uuid: str
    recovery_passphrase: str    # shown once; HQ keeps it too when the box can reach HQ
    files: int
    bytes: int
    instances: int
    old_copy: str               # the system disk's copy, removed once Orthanc counted the same
    old_copy_kept: bool
    problem: str                # what went wrong after the move (the archive is on the disk)
    escrowed: bool = False      # the recovery passphrase reached HQ

    def public(self) -> dict:
        return asdict(self)


# --- /etc/fstab and /etc/crypttab ----------------------------------------------------------------

def fstab_lines(storage_path: Path) -> list[str]:
    data = MOUNT / storage_path.name
    return [MARK,
            f"LABEL={DATA_LABEL} {MOUNT} ext4 noatime,nofail,"
            f"x-systemd.device-timeout={DEVICE_TIMEOUT} 0 2",
            f"{data} {storage_path} none bind,nofail,x-systemd.requires-mounts-for={MOUNT} 0 0"]


def crypttab_lines(luks_uuid: str, unlock: str) -> list[str]:
    if unlock == "usb-key":
        # The key file on the stick; without the stick, the passphrase is asked.
        key = f"/{luks.KEY_FILE}:LABEL={luks.KEY_LABEL}"
        options = f"keyfile-timeout={KEY_STICK_TIMEOUT},"
    else:
        key, options = "none", ""
    return [MARK, f"{luks.MAPPING} UUID={luks_uuid} {key} luks,{options}nofail"]


def _ours(line: str, storage_path: Path) -> bool:
    fields = line.split()
    return line.strip() == MARK or (len(fields) >= 2 and (
        fields[0] == luks.MAPPING or fields[1] in (str(MOUNT), str(storage_path))))


def set_lines(path: Path, lines: list[str], storage_path: Path) -> None:
    """Our lines in `path` replaced by `lines` (none: removed); every other line kept as is."""
    kept = [line for line in (path.read_text().splitlines() if path.exists() else [])
            if not _ours(line, storage_path)]
    durable.replace_text(path, "\n".join([*kept, *lines]) + "\n", mode=0o644, like=path)


def prepared_here(etc: Path) -> bool:
    crypttab, fstab = etc / "crypttab", etc / "fstab"
    return any(MARK in p.read_text() for p in (crypttab, fstab) if p.exists())


# --- commands the move runs ----------------------------------------------------------------------

def _sh(*argv: str) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if done.returncode != 0:
        raise DataDiskError(f"{argv[0]} {' '.join(argv[1:3])} failed: "
                            f"{(done.stderr or done.stdout).strip() or done.returncode}")
    return done.stdout


def _systemd() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def _daemon_reload() -> None:
    if _systemd():  # fstab and crypttab reach systemd through its generators
        _sh("systemctl", "daemon-reload")


def mounted_at(path: Path) -> bool:
    return subprocess.run(["findmnt", "-n", "--mountpoint", str(path)],
                          capture_output=True).returncode == 0


def partition_disk(device: Path) -> Path:
    """One GPT partition over the whole disk; its path."""
    script = f"label: gpt\nname=gotg-data, type={LINUX_PARTITION}\n"
    done = subprocess.run(["sfdisk", "--quiet", "--wipe", "always", str(device)], input=script,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise DataDiskError(f"cannot partition {device}: {done.stderr.strip()}")
    subprocess.run(["udevadm", "settle", "--timeout=30"], capture_output=True)
    found: list[Path] = []

    def appeared() -> bool:
        found[:] = [Path(path) for path, kind, _ in devices.describe(device).inner
                    if kind == "part"]
        return bool(found) and found[0].is_block_device()
    if not wait_until(appeared, 30):
        raise DataDiskError(f"the new partition of {device} did not appear")
    return found[0]


def tree_size(folder: Path) -> tuple[int, int]:
    """(files, bytes) under `folder`."""
    files = size = 0
    for root, _, names in os.walk(folder):
        for name in names:
            stat = (Path(root) / name).lstat()
            files, size = files + 1, size + stat.st_size
    return files, size


def same_tree(source: Path, copy: Path) -> list[str]:
    """What differs between `source` and `copy` (relative paths), content compared."""
    differ = []
    for root, folders, names in os.walk(source):
        here = Path(root)
        there = copy / here.relative_to(source)
        for name in [*folders, *names]:
            a, b = here / name, there / name
            if not os.path.lexists(b):
                differ.append(str(a.relative_to(source)))
                continue
            sa, sb = a.lstat(), b.lstat()
            if (sa.st_mode, sa.st_uid, sa.st_gid) != (sb.st_mode, sb.st_uid, sb.st_gid) \
                    or (a.is_file() and not a.is_symlink() and not _same_bytes(a, b)):
                differ.append(str(a.relative_to(source)))
    return differ


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as one, b.open("rb") as other:
        while True:
            x, y = one.read(1 << 20), other.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def _counts(client: Orthanc) -> dict[str, int] | None:
    try:
        stats = client.statistics()
    except OrthancError:
        return None
    return {key: int(stats[key]) for key in ("CountPatients", "CountStudies", "CountSeries",
                                             "CountInstances")}


# --- prepare -------------------------------------------------------------------------------------

def prepare(settings: Settings, device: Path, encrypt: bool, unlock: str,
            key_stick: Path | None, say: Callable[[str], None] = log.info,
            etc: Path = Path("/etc"), recovery_iter_ms: int = 2000) -> Prepared:
    """Erase `device`, make it the data disk (LUKS2 when `encrypt`) and move the archive there."""
    storage = settings.storage_path
    if os.geteuid() != 0:
        raise DataDiskError("only root can prepare a data disk (sudo pacs data-disk prepare)")
    if encrypt and unlock not in UNLOCKS:
        raise DataDiskError(f"--unlock: one of {', '.join(UNLOCKS)}")
    if encrypt and unlock == "usb-key" and key_stick is None:
        raise DataDiskError("--unlock usb-key needs --key-stick DEVICE (a USB stick, erased)")
    if prepared_here(etc) or mounted_at(storage):
        raise DataDiskError(f"{storage} is already on a disk of its own (see /etc/fstab): "
                            "`pacs data-disk status`")
    if not (storage / "index").exists() and not (storage / "storage").exists():
        raise DataDiskError(f"{storage} holds no archive to move (STORAGE_PATH)")
    if units.active(BACKUP_JOB):
        raise DataDiskError("a backup is running: prepare the disk once it is done")
    files, size = tree_size(storage)
    system = devices.system_disks()
    data = devices.describe(device)
    devices.usable(data, "data disk", size + size // 10 + HEADROOM, system)
    stick = None
    if encrypt and unlock == "usb-key":
        stick = devices.describe(key_stick)
        if stick.path == data.path:
            raise DataDiskError("the key stick must be another device than the data disk")
        devices.usable(stick, "key stick", 4 * 1024**2, system)

    say(f"erasing {data.describe()}: it becomes the data disk")
    partition = partition_disk(device)
    key, recovery, uuid, filesystem = b"", "", "", partition
    if encrypt:
        key, recovery = luks.new_key(), luks.new_recovery_passphrase()
        say("encrypting it (LUKS2)")
        uuid = luks.format_partition(partition, key, recovery, Path("/proc/cpuinfo").read_text(),
                                     recovery_iter_ms)
        if not (luks.opens(partition, key=key) and luks.opens(partition, passphrase=recovery)):
            raise DataDiskError("the new encryption does not open with its own keys: nothing "
                                "was moved")
        if stick is not None:
            say(f"writing the key to the key stick {stick.describe()}")
            luks.write_key_stick(Path(stick.path), key)
        filesystem = luks.open_mapping(partition, key=key)
    try:
        _sh("mkfs.ext4", "-q", "-F", "-L", DATA_LABEL, "-m", "1", str(filesystem))
    except DataDiskError:
        luks.close_mapping()
        raise
    counted, problem = _move(settings, filesystem, say, etc,
                             crypttab_lines(uuid, unlock) if encrypt else [])
    if encrypt:
        durable.replace_text(FOR_HQ, json.dumps({"luks_uuid": uuid, "passphrase": recovery}),
                             mode=0o600)
    old = _old_copy(storage)
    return Prepared(device=data.path, partition=str(partition), encrypted=encrypt,
                    unlock=unlock if encrypt else "", key_stick=stick.path if stick else "",
                    luks_uuid=uuid, recovery_passphrase=recovery, files=files, bytes=size,
                    instances=counted, old_copy=str(old), old_copy_kept=old.exists(),
                    problem=problem)


def _old_copy(storage: Path) -> Path:
    return storage.with_name(storage.name + ".before-data-disk")


def _move(settings: Settings, filesystem: Path, say: Callable[[str], None], etc: Path,
          crypttab: list[str]) -> tuple[int, str]:
    """Orthanc's folder onto `filesystem`, checked, then mounted in its place: the instances
    Orthanc counts afterwards, and what went wrong once the move was made ("": nothing). A
    failure before that point puts everything back and raises."""
    storage = settings.storage_path
    old = _old_copy(storage)
    client = Orthanc.from_settings(settings, timeout=30)
    before = _counts(client)
    with units.stopped([units.SYNC, units.ORTHANC]) as stopped:
        try:
            lock = orphans.lock_storage(settings)
        except orphans.IndexBusy:
            raise DataDiskError("Orthanc is running on this archive outside systemd (`pacs "
                                "run`?): stop it first") from None
        moved = False
        try:
            MOUNT.mkdir(parents=True, exist_ok=True)
            _sh("mount", "-o", "noatime", str(filesystem), str(MOUNT))
            copy = MOUNT / storage.name
            say(f"copying {storage} to the data disk")
            _sh("cp", "-a", "--sparse=always", str(storage), str(copy))
            _sh("umount", str(MOUNT))  # read back from the disk, not from memory
            _sh("mount", "-o", "noatime", str(filesystem), str(MOUNT))
            differ = same_tree(storage, copy)
            if differ:
                raise DataDiskError(f"the copy on the data disk differs from {storage} "
                                    f"({len(differ)} path(s), first {differ[0]}): nothing moved")
            say("the copy is identical; putting the data disk in its place")
            like = storage.stat()
            os.rename(storage, old)
            moved = True
            storage.mkdir(mode=like.st_mode & 0o777)
            durable.own_like(storage, old)
            if crypttab:
                set_lines(etc / "crypttab", crypttab, storage)
            set_lines(etc / "fstab", fstab_lines(storage), storage)
            _daemon_reload()
            _sh("mount", "--bind", str(copy), str(storage))
        except BaseException:
            os.close(lock)
            lock = -1
            _undo(settings, etc, moved)
            raise
        finally:
            if lock >= 0:
                os.close(lock)
    if stopped.start_error:
        return 0, f"{stopped.start_error}; the previous copy stays in {old}"
    if before is None:  # Orthanc was not running: nothing to compare with, nothing deleted
        return 0, f"Orthanc was not running to count before and after: {old} is kept"
    after: list[dict[str, int] | None] = [None]

    def counted() -> bool:
        after[0] = _counts(client)
        return after[0] is not None
    wait_until(counted, 300, interval=2)
    if after[0] != before:
        return 0, (f"Orthanc counts {after[0]} on the data disk, {before} before: the "
                   f"previous copy stays in {old}")
    say(f"Orthanc counts the same {before['CountInstances']} instances; removing the copy on "
        "the system disk")
    shutil.rmtree(old)
    subprocess.run(["fstrim", "/"], capture_output=True)  # flash forgets the freed blocks
    return before["CountInstances"], ""


def _undo(settings: Settings, etc: Path, moved: bool) -> None:
    """Everything back as before the move (Orthanc's folder on the system disk)."""
    storage = settings.storage_path
    old = _old_copy(storage)
    if mounted_at(storage):
        subprocess.run(["umount", str(storage)], capture_output=True)
    for name in ("fstab", "crypttab"):
        if (etc / name).exists() and prepared_here(etc):
            set_lines(etc / name, [], storage)
    if moved and old.exists():
        if storage.exists():
            storage.rmdir()
        os.rename(old, storage)
    _daemon_reload()
    if mounted_at(MOUNT):
        subprocess.run(["umount", str(MOUNT)], capture_output=True)
    luks.close_mapping()


def hand_over_recovery(hq) -> bool:
    """Give HQ (`hq`: a sync HQClient) the recovery passphrase waiting on the data disk: True
    when handed over now. Out of reach, it waits for the next try (each backup)."""
    try:
        waiting = json.loads(FOR_HQ.read_text())
    except (OSError, ValueError):
        return False
    try:
        hq.hand_over_disk_passphrase(waiting["luks_uuid"], waiting["passphrase"])
    except Exception as exc:  # noqa: BLE001 - HQ's answer or silence: try next time
        log.warning("the data disk's recovery passphrase is not at HQ yet: %s", exc)
        return False
    FOR_HQ.unlink()
    return True


# --- after a boot that did not unlock ------------------------------------------------------------

def _key_stick() -> Path | None:
    """The plugged-in key stick, as udev sees it now (blkid's cache may remember one pulled
    out)."""
    link = Path("/dev/disk/by-label") / luks.KEY_LABEL
    return link.resolve() if link.exists() else None


def _key_from_stick() -> bytes | None:
    """The key read off a plugged-in key stick, without mounting it (debugfs, read-only)."""
    stick = _key_stick()
    if stick is None:
        return None
    done = subprocess.run(["debugfs", "-R", f"cat /{luks.KEY_FILE}", str(stick)],
                          capture_output=True)
    return done.stdout if done.returncode == 0 and len(done.stdout) == luks.KEY_BYTES else None


def encrypted_partition(etc: Path = Path("/etc")) -> Path | None:
    """The LUKS partition /etc/crypttab names for the data disk, None when not encrypted."""
    path = etc / "crypttab"
    for line in (path.read_text().splitlines() if path.exists() else []):
        fields = line.split()
        if len(fields) >= 2 and fields[0] == luks.MAPPING and fields[1].startswith("UUID="):
            return Path("/dev/disk/by-uuid") / fields[1].removeprefix("UUID=")
    return None


def unlock(settings: Settings, passphrase: str | None = None,
           etc: Path = Path("/etc")) -> str:
    """Open the data disk (the key stick, else `passphrase`), mount it in its place and start
    Orthanc and the sync. Returns how it was opened."""
    if os.geteuid() != 0:
        raise DataDiskError("only root can unlock the data disk (sudo pacs data-disk unlock)")
    if not prepared_here(etc):
        raise DataDiskError("this box has no data disk of its own (`pacs data-disk prepare`)")
    how = "already open"
    partition = encrypted_partition(etc)
    if partition is not None and not (Path("/dev/mapper") / luks.MAPPING).exists():
        if not partition.exists():
            raise DataDiskError("the data disk is not plugged in (no LUKS partition "
                                f"{partition.name})")
        key = None if passphrase is not None else _key_from_stick()
        if key is None and passphrase is None:
            raise DataDiskError("no key stick (label GOTG-KEY) is plugged in: give the "
                                "recovery passphrase (--passphrase)")
        if not luks.opens(partition, key=key, passphrase=passphrase):
            raise DataDiskError("that does not open the data disk" if key is None else
                                "the key stick plugged in is not this data disk's")
        luks.open_mapping(partition, key=key, passphrase=passphrase)
        how = "key stick" if key is not None else "recovery passphrase"
    for target in (MOUNT, settings.storage_path):
        if not mounted_at(target):
            _sh("mount", str(target))  # from /etc/fstab
    if _systemd():
        subprocess.run(["systemctl", "start", units.ORTHANC, units.SYNC], capture_output=True)
    return how


def status(settings: Settings, etc: Path = Path("/etc")) -> dict:
    partition = encrypted_partition(etc)
    return {"data_disk": prepared_here(etc),
            "encrypted": partition is not None,
            "unlocked": partition is None or (Path("/dev/mapper") / luks.MAPPING).exists(),
            "mounted": mounted_at(settings.storage_path),
            "key_stick_present": _key_stick() is not None,
            "storage_path": str(settings.storage_path)}
