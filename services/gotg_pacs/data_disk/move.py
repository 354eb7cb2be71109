"""Putting the archive on the data disk, and getting it back after a boot that could not unlock
it.

Order, so that nothing is ever lost: every refusal comes before anything is erased; the new
disk is made and tested, and the recovery passphrase shown, before the archive is touched;
Orthanc and the backup jobs stop; the folder is copied and the copy compared byte for byte
after a remount (so from the disk, not from the page cache); /etc/crypttab and /etc/fstab get
their lines before the folder moves aside, so a power cut at any step boots either the old
folder or the checked copy, never an empty one; then the disk's copy is bind-mounted over
STORAGE_PATH (no setting and no unit changes). Any failure until then puts everything back, and
if that fails Orthanc stays stopped rather than start on an empty folder. Orthanc then starts and
must count at least what it counted before; only then is the system disk's copy removed.

Boot: /etc/crypttab unlocks with the key stick (or asks at the console), /etc/fstab mounts the
disk and the bind mount with `nofail`, and Orthanc requires STORAGE_PATH's mount
(RequiresMountsFor): without its disk the box boots, answers SSH and the web pages, and Orthanc's
start waits instead of starting on an empty folder of the SD card (multi-user.target is reached
only once the disk is open). `pacs data-disk unlock` opens it from a shell.
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
from . import DataDiskError, devices, luks, run

log = logging.getLogger(__name__)

MOUNT = Path("/srv/gotg-data")           # the data disk's file system
# Not the base role's GOTG-DATA (a disk made by hand, mounted by label): this one is mounted by
# its mapping or UUID, so a second disk with a label alike can never take its place.
FS_LABEL = "GOTG-ARCHIVE"
UNLOCKS = ("usb-key", "console")
MARK = "# GOTG PACS data disk (pacs data-disk prepare)"
# The disk and its mount wait however long the unlock takes (a passphrase typed in the
# morning): then the disk mounts and Orthanc, whose start waits for it, comes up by itself.
# `nofail` keeps the rest of the boot from waiting.
WAIT_FOREVER = "x-systemd.device-timeout=0"
# How long boot looks for the key stick before asking for the passphrase instead. Coldplug is
# slow on a Pi (and under emulation udev alone took 20 s): 30 s missed a stick plugged in.
KEY_STICK_TIMEOUT = "90s"
LINUX_PARTITION = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
HEADROOM = 512 * 1024**2
TOOLS = ("sfdisk", "mkfs.ext4", "blkid", "findmnt", "mount", "umount", "cp")
SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"
# The recovery passphrase kept on the disk it opens (readable only while it is open), handed to
# HQ after every backup (HQ keeps it once).
RECOVERY_COPY = ".gotg-recovery.json"


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
    old_copy: str               # the system disk's copy, removed once Orthanc counted as much
    old_copy_kept: bool
    problem: str                # what went wrong after the move (the archive is on the disk)
    escrowed: bool = False      # the recovery passphrase reached HQ

    def public(self) -> dict:
        return asdict(self)


# --- /etc/fstab and /etc/crypttab ----------------------------------------------------------------

def fstab_lines(storage_path: Path, source: str, mount: Path = MOUNT) -> list[str]:
    """`source`: /dev/mapper/gotg-data, or UUID=... of a disk that is not encrypted."""
    return [MARK,
            f"{source} {mount} ext4 noatime,nofail,{WAIT_FOREVER} 0 2",
            f"{mount / storage_path.name} {storage_path} none "
            f"bind,nofail,x-systemd.requires-mounts-for={mount} 0 0"]


def crypttab_lines(luks_uuid: str, unlock: str) -> list[str]:
    if unlock == "usb-key":
        # The key file on the stick; without the stick, the passphrase is asked.
        key = f"/{luks.KEY_FILE}:LABEL={luks.KEY_LABEL}"
        options = f",keyfile-timeout={KEY_STICK_TIMEOUT}"
    else:
        key, options = "none", ""
    return [MARK, f"{luks.MAPPING} UUID={luks_uuid} {key} luks,nofail,{WAIT_FOREVER}{options}"]


def _without_ours(lines: list[str]) -> list[str]:
    """`lines` less our block: the mark and the entries right after it (nothing else, not even
    an entry for the same place written by someone else)."""
    kept, in_block = [], False
    for line in lines:
        if line.strip() == MARK:
            in_block = True
            continue
        if in_block and line.strip() and not line.lstrip().startswith("#"):
            fields = line.split()
            if fields[0] == luks.MAPPING or (len(fields) > 2 and fields[2] in ("ext4", "none")):
                continue
        in_block = False
        kept.append(line)
    return kept


def set_lines(path: Path, lines: list[str]) -> None:
    """Our block in `path` replaced by `lines` (none: removed); every other line kept as is;
    the file left alone when that changes nothing."""
    before = path.read_text().splitlines() if path.exists() else []
    after = [*_without_ours(before), *lines]
    if after != before:
        durable.replace_text(path, "\n".join(after) + "\n", mode=0o644, like=path)


def prepared_here(etc: Path) -> bool:
    crypttab, fstab = etc / "crypttab", etc / "fstab"
    return any(MARK in p.read_text().splitlines() for p in (crypttab, fstab) if p.exists())


# --- commands the move runs ----------------------------------------------------------------------

def _daemon_reload() -> None:
    if units.systemd_running():  # fstab and crypttab reach systemd through its generators
        run("systemctl", "daemon-reload")


def mounted_at(path: Path) -> bool:
    return subprocess.run(["findmnt", "-n", "--mountpoint", str(path)],
                          capture_output=True).returncode == 0


def partition_disk(device: Path) -> Path:
    """One GPT partition over the whole disk; its path."""
    script = f"label: gpt\nname=gotg-data, type={LINUX_PARTITION}\n"
    try:
        run("sfdisk", "--quiet", "--wipe", "always", str(device), stdin=script.encode())
    except DataDiskError as exc:
        raise DataDiskError(f"cannot partition {device}: {exc}") from None
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


def _missing_tools(encrypt: bool) -> list[str]:
    wanted = [*TOOLS, *(["cryptsetup"] if encrypt else [])]
    return [tool for tool in wanted if shutil.which(tool, path=SBIN) is None]


# --- prepare -------------------------------------------------------------------------------------

def prepare(settings: Settings, device: Path, encrypt: bool, unlock: str,
            key_stick: Path | None, say: Callable[[str], None] = lambda _line: None,
            etc: Path = Path("/etc"), recovery_iter_ms: int = 2000,
            mount: Path = MOUNT) -> Prepared:
    """Erase `device`, make it the data disk (LUKS2 when `encrypt`) and move the archive there.
    Everything that can refuse does so before anything is erased. `say` hears the steps and
    the recovery passphrase: the person at the terminal's, never a log's."""
    storage = settings.storage_path
    if os.geteuid() != 0:
        raise DataDiskError("only root can prepare a data disk (sudo pacs data-disk prepare)")
    if encrypt and unlock not in UNLOCKS:
        raise DataDiskError(f"--unlock: one of {', '.join(UNLOCKS)}")
    if encrypt and unlock == "usb-key" and key_stick is None:
        raise DataDiskError("--unlock usb-key needs --key-stick DEVICE (a USB stick, erased)")
    if key_stick is not None and not (encrypt and unlock == "usb-key"):
        raise DataDiskError("--key-stick is only for an encrypted disk opened by it "
                            "(--encrypt --unlock usb-key)")
    if prepared_here(etc) or mounted_at(storage):
        raise DataDiskError(f"{storage} is already on a disk of its own (see /etc/fstab): "
                            "`pacs data-disk status`")
    if mounted_at(mount) or mount in storage.parents:
        raise DataDiskError(f"{mount} is in use (a data disk mounted there by hand or by the "
                            f"base role, STORAGE_PATH {storage}): nothing to prepare")
    if (Path("/dev/disk/by-label") / FS_LABEL).exists():
        raise DataDiskError(f"a disk labelled {FS_LABEL} (prepared for another box?) is "
                            "plugged in: unplug it first")
    if not (storage / "index").exists() and not (storage / "storage").exists():
        raise DataDiskError(f"{storage} holds no archive to move (STORAGE_PATH)")
    missing = _missing_tools(encrypt)
    if missing:
        raise DataDiskError(f"missing here: {', '.join(missing)} (apt-get install fdisk "
                            "e2fsprogs cryptsetup-bin systemd-cryptsetup)")
    busy = [unit for unit in units.BACKUP_SERVICES if units.active(unit)]
    if busy:
        raise DataDiskError(f"{', '.join(busy)} is running: prepare the disk once it is done")
    files, size = tree_size(storage)
    system = devices.system_disks()
    data = devices.describe(device)
    devices.usable(data, "data disk", size + size // 10 + HEADROOM, system)
    stick = None
    if key_stick is not None:
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
        # Shown before the archive is touched: whatever happens next, it is not lost.
        say(f"RECOVERY PASSPHRASE {recovery} (write it down now, keep it away from the box)")
        if stick is not None:
            say(f"writing the key to the key stick {stick.describe()}")
            luks.write_key_stick(Path(stick.path), key)
        filesystem = luks.open_mapping(partition, key=key)
    try:
        run("mkfs.ext4", "-q", "-F", "-L", FS_LABEL, "-m", "1", str(filesystem))
        source = (str(filesystem) if encrypt else "UUID=" + run(
            "blkid", "-p", "-o", "value", "-s", "UUID", str(filesystem)).strip())
    except DataDiskError:
        luks.close_mapping()
        raise
    kept = {"luks_uuid": uuid, "passphrase": recovery} if encrypt else None
    counted, problem = _move(settings, filesystem, say, etc, mount,
                             crypttab_lines(uuid, unlock) if encrypt else [],
                             fstab_lines(storage, source, mount), kept)
    old = _old_copy(storage)
    return Prepared(device=data.path, partition=str(partition), encrypted=encrypt,
                    unlock=unlock if encrypt else "", key_stick=stick.path if stick else "",
                    luks_uuid=uuid, recovery_passphrase=recovery, files=files, bytes=size,
                    instances=counted, old_copy=str(old), old_copy_kept=old.exists(),
                    problem=problem)


def _old_copy(storage: Path) -> Path:
    return storage.with_name(storage.name + ".before-data-disk")


def _move(settings: Settings, filesystem: Path, say: Callable[[str], None], etc: Path,
          mount: Path, crypttab: list[str], fstab: list[str],
          recovery: dict | None) -> tuple[int, str]:
    """Orthanc's folder onto `filesystem`, checked, then mounted in its place: the instances
    Orthanc counts afterwards, and what went wrong once the move was made ("": nothing). A
    failure before that point puts everything back and raises."""
    storage = settings.storage_path
    old = _old_copy(storage)
    client = Orthanc.from_settings(settings, timeout=30)
    before = _counts(client)
    held = [*units.BACKUP_TIMERS, units.SYNC, units.ORTHANC]
    with units.stopped(held) as stopped:
        try:
            lock = orphans.lock_storage(settings)
        except orphans.IndexBusy:
            raise DataDiskError("Orthanc is running on this archive outside systemd (`pacs "
                                "run`?): stop it first") from None
        moved = False
        try:
            mount.mkdir(parents=True, exist_ok=True)
            run("mount", "-o", "noatime", str(filesystem), str(mount))
            if recovery:
                durable.replace_text(mount / RECOVERY_COPY, json.dumps(recovery), mode=0o600)
            copy = mount / storage.name
            say(f"copying {storage} to the data disk")
            run("cp", "-a", "--sparse=always", str(storage), str(copy))
            run("umount", str(mount))  # read back from the disk, not from memory
            run("mount", "-o", "noatime", str(filesystem), str(mount))
            differ = same_tree(storage, copy)
            if differ:
                raise DataDiskError(f"the copy on the data disk differs from {storage} "
                                    f"({len(differ)} path(s), first {differ[0]}): nothing moved")
            say("the copy is identical; putting the data disk in its place")
            # Boot's lines first: from here a power cut boots the checked copy.
            if crypttab:
                set_lines(etc / "crypttab", crypttab)
            set_lines(etc / "fstab", fstab)
            _daemon_reload()
            like = storage.stat()
            os.rename(storage, old)
            moved = True
            storage.mkdir(mode=like.st_mode & 0o777)
            durable.own_like(storage, old)
            run("mount", "--bind", str(copy), str(storage))
        except BaseException:
            os.close(lock)
            lock = -1
            try:
                _undo(settings, etc, mount, moved)
            except Exception as undo_failed:  # noqa: BLE001 - said, and Orthanc kept down
                stopped.keep_stopped = True
                raise DataDiskError(
                    f"the move failed and could not be undone ({undo_failed}): Orthanc is left "
                    f"stopped; the archive is in {old if old.exists() else storage}") from None
            raise
        finally:
            if lock >= 0:
                os.close(lock)
    # The archive is on the data disk from here: nothing raises any more, problems are said.
    try:
        return _settle(client, before, stopped, old, say)
    except Exception as exc:  # noqa: BLE001 - the move is done; the old copy stays
        return 0, f"after the move: {exc}; the previous copy stays in {old}"


def _settle(client: Orthanc, before: dict[str, int] | None, stopped: units.Stopped, old: Path,
            say: Callable[[str], None]) -> tuple[int, str]:
    """Orthanc back on the data disk counts at least what it counted before (images may have
    arrived since): then the system disk's copy goes."""
    if stopped.start_error:
        return 0, f"{stopped.start_error}; the previous copy stays in {old}"
    if before is None:  # Orthanc was not running: nothing to compare with, nothing deleted
        return 0, f"Orthanc was not running to count before and after: {old} is kept"
    after: list[dict[str, int] | None] = [None]

    def counted() -> bool:
        after[0] = _counts(client)
        return after[0] is not None
    wait_until(counted, 300, interval=2)
    if after[0] is None or any(after[0][key] < value for key, value in before.items()):
        return 0, (f"Orthanc counts {after[0]} on the data disk, {before} before: the "
                   f"previous copy stays in {old}")
    say(f"Orthanc counts its {after[0]['CountInstances']} instances from the data disk; "
        "removing the copy on the system disk")
    shutil.rmtree(old)
    subprocess.run(["fstrim", "/"], capture_output=True)  # flash forgets the freed blocks
    return after[0]["CountInstances"], ""


def _undo(settings: Settings, etc: Path, mount: Path, moved: bool) -> None:
    """Everything back as before the move: the folder first, then boot's lines, then the disk.
    Raises when the folder could not be put back (Orthanc must then stay stopped)."""
    storage = settings.storage_path
    old = _old_copy(storage)
    if mounted_at(storage):
        run("umount", str(storage))
    if moved and old.exists():
        if storage.exists():
            storage.rmdir()  # the empty mount point made for the bind mount
        os.rename(old, storage)
    for name in ("fstab", "crypttab"):  # stale lines would hide the folder at the next boot
        set_lines(etc / name, [])
    _daemon_reload()
    if mounted_at(mount):
        subprocess.run(["umount", str(mount)], capture_output=True)
    luks.close_mapping()


def hand_over_recovery(hq, mount: Path = MOUNT) -> bool:
    """Give HQ (`hq`: a sync HQClient) the data disk's recovery passphrase, kept on the disk
    itself: True when HQ did not have it yet. Each backup hands it again (HQ keeps it once);
    out of reach, or no data disk, nothing happens."""
    try:
        kept = json.loads((mount / RECOVERY_COPY).read_text())
    except (OSError, ValueError):
        return False
    try:
        return hq.hand_over_disk_passphrase(kept["luks_uuid"], kept["passphrase"])
    except Exception as exc:  # noqa: BLE001 - HQ's answer or silence: try next time
        log.warning("the data disk's recovery passphrase is not at HQ yet: %s", exc)
        return False


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
        try:  # one try, no test first: each costs an argon2id derivation of 256 MiB
            luks.open_mapping(partition, key=key, passphrase=passphrase)
        except luks.WrongKey:
            raise DataDiskError("that does not open the data disk" if key is None else
                                "the key stick plugged in is not this data disk's") from None
        how = "key stick" if key is not None else "recovery passphrase"
    if not units.systemd_running():
        for target in (MOUNT, settings.storage_path):
            if not mounted_at(target):
                run("mount", str(target))  # from /etc/fstab
        return how
    # Boot queued the disk's check and mounts: systemd runs them (fsck first), and starting
    # Orthanc pulls them in; a mount of our own would race its fsck.
    subprocess.run(["udevadm", "settle", "--timeout=60"], capture_output=True)
    started = subprocess.run(["systemctl", "start", str(MOUNT), str(settings.storage_path),
                              units.ORTHANC, units.SYNC], capture_output=True, text=True)
    if started.returncode != 0:
        raise DataDiskError(f"the data disk is open ({how}) but did not come up: "
                            f"{started.stderr.strip()} (journalctl -b -u orthanc)")
    return how


def status(settings: Settings, etc: Path = Path("/etc")) -> dict:
    partition = encrypted_partition(etc)
    return {"data_disk": prepared_here(etc),
            "encrypted": partition is not None,
            "unlocked": partition is None or (Path("/dev/mapper") / luks.MAPPING).exists(),
            "mounted": mounted_at(settings.storage_path),
            "key_stick_present": _key_stick() is not None,
            "storage_path": str(settings.storage_path)}
