"""LUKS2 on the data partition, through cryptsetup: two ways in, one for the box and one for
people.

- Key slot 0: 64 random bytes, kept only on the key stick (label GOTG-KEY). They need no key
  stretching (512 bits cannot be guessed), so the box unlocks in a moment at every boot.
- Key slot 1: a recovery passphrase of 30 letters and digits, shown once, typed at the console
  or over SSH when the stick is lost. Stretched with argon2id, its memory kept at 256 MiB so a
  Pi 4 with 2 GB can still open it.

The cipher is the kernel's AES-XTS where the CPU has AES instructions (every NUC); a Pi 4 has
none, and there Adiantum, designed for exactly such CPUs, is used instead.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import DataDiskError, ToolFailed, run

MAPPING = "gotg-data"                 # /dev/mapper/gotg-data
LUKS_LABEL = "GOTG-DATA-LUKS"
KEY_LABEL = "GOTG-KEY"                # the key stick's file system
KEY_FILE = "gotg-pacs-data.key"       # on the key stick
KEY_BYTES = 64
RECOVERY_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: read off paper, typed
RECOVERY_GROUPS, RECOVERY_GROUP = 6, 5                 # 30 characters, 150 bits
RECOVERY_MEMORY_KIB = 256 * 1024
ADIANTUM = ["--cipher", "xchacha12,aes-adiantum-plain64", "--key-size", "256"]


def cryptsetup() -> str:
    found = shutil.which("cryptsetup", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not found:
        raise DataDiskError("cryptsetup is not installed: apt-get install cryptsetup-bin "
                            "systemd-cryptsetup")
    return found


class WrongKey(DataDiskError):
    """The key or passphrase given does not open the partition."""


def _run(*argv: str, stdin: bytes | None = None) -> str:
    return run(cryptsetup(), *argv, stdin=stdin)


def has_aes_instructions(cpuinfo: str) -> bool:
    """From /proc/cpuinfo: x86 lists `aes` under flags, arm64 under Features."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features") and "aes" in value.split():
            return True
    return False


def cipher_options(cpuinfo: str) -> list[str]:
    return [] if has_aes_instructions(cpuinfo) else list(ADIANTUM)


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def new_recovery_passphrase() -> str:
    letters = "".join(secrets.choice(RECOVERY_ALPHABET)
                      for _ in range(RECOVERY_GROUPS * RECOVERY_GROUP))
    return "-".join(letters[i:i + RECOVERY_GROUP] for i in range(0, len(letters),
                                                                  RECOVERY_GROUP))


@contextmanager
def secret_files(**secrets_: bytes) -> Iterator[dict[str, Path]]:
    """Each secret in a 0600 file of a private folder in RAM (/run when it is there), for
    cryptsetup's --key-file; removed, whatever happens."""
    base = "/run" if os.access("/run", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="gotg-data-disk-", dir=base) as folder:
        paths = {}
        for name, value in secrets_.items():
            path = Path(folder) / name
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as out:
                out.write(value)
            paths[name] = path
        yield paths


def format_partition(partition: Path, key: bytes, recovery: str, cpuinfo: str,
                     recovery_iter_ms: int = 2000) -> str:
    """LUKS2 on `partition` (everything on it is gone), opened by `key` or by `recovery`.
    Returns the LUKS UUID, the name /etc/crypttab knows it by."""
    with secret_files(key=key, recovery=recovery.encode()) as files:
        _run("luksFormat", "--batch-mode", "--type", "luks2", "--label", LUKS_LABEL,
             "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
             *cipher_options(cpuinfo), "--key-file", str(files["key"]), str(partition))
        _run("luksAddKey", "--batch-mode", "--key-file", str(files["key"]),
             "--pbkdf", "argon2id", "--pbkdf-memory", str(RECOVERY_MEMORY_KIB),
             "--iter-time", str(recovery_iter_ms), str(partition), str(files["recovery"]))
    return luks_uuid(partition)


def luks_uuid(partition: Path) -> str:
    return _run("luksUUID", str(partition)).strip()


def is_luks(partition: Path) -> bool:
    return subprocess.run([cryptsetup(), "isLuks", str(partition)]).returncode == 0


def opens(partition: Path, key: bytes | None = None, passphrase: str | None = None) -> bool:
    """Whether `key` (or `passphrase`, as typed) opens `partition`, without opening it."""
    try:
        _open(partition, key, passphrase, "--test-passphrase")
    except WrongKey:
        return False
    return True


def open_mapping(partition: Path, key: bytes | None = None,
                 passphrase: str | None = None) -> Path:
    """Unlock `partition` as /dev/mapper/gotg-data (WrongKey when that is not its key)."""
    _open(partition, key, passphrase, MAPPING)
    return Path("/dev/mapper") / MAPPING


def _open(partition: Path, key: bytes | None, passphrase: str | None, *tail: str) -> None:
    try:
        if key is not None:
            with secret_files(key=key) as files:
                _run("open", "--key-file", str(files["key"]), str(partition), *tail)
        elif passphrase is not None:
            # Without --key-file cryptsetup reads one line from stdin, as the console gives it.
            _run("open", str(partition), *tail, stdin=passphrase.encode() + b"\n")
        else:
            raise DataDiskError("neither the key nor a passphrase was given")
    except ToolFailed as exc:
        if exc.returncode == 2:  # cryptsetup(8): "no permission (bad passphrase)"
            raise WrongKey(str(exc)) from None
        raise


def close_mapping() -> None:
    if (Path("/dev/mapper") / MAPPING).exists():
        _run("close", MAPPING)


def write_key_stick(stick: Path, key: bytes) -> None:
    """A new ext4 file system labelled GOTG-KEY on `stick` holding only the key (root, 0400),
    written at mkfs time: nothing is mounted."""
    with secret_files(**{KEY_FILE: key}) as files:
        os.chmod(files[KEY_FILE], 0o400)
        try:
            run("mkfs.ext4", "-q", "-F", "-L", KEY_LABEL, "-m", "0", "-d",
                str(files[KEY_FILE].parent), str(stick))
        except DataDiskError as exc:
            raise DataDiskError(f"cannot make the key stick on {stick}: {exc}") from None
