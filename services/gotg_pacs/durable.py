"""Files that survive a power cut: the appliance's one way to write, replace and name them.

A rename is atomic but reaches the disk only once its folder is fsynced, and data must be on
disk before it is renamed into place, or a power cut can leave the new name on an empty file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the names created, renamed or removed in `path` durable."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def own_like(path: Path | int, like: Path) -> None:
    """Give `path` (or an open descriptor) the owner and group of `like` when root made it: what
    a root command (a restore, a disk move) makes for a service stays the service's."""
    if os.geteuid() != 0:
        return
    reference = like.stat()
    if isinstance(path, int):
        os.fchown(path, reference.st_uid, reference.st_gid)
    else:
        os.chown(path, reference.st_uid, reference.st_gid)


def write_bytes(path: Path, data: bytes, exclusive: bool = False) -> None:
    """Write `data` to `path` and wait until it is on disk (the name is the caller's business).
    `exclusive`: refuse (FileExistsError) rather than overwrite a file already there."""
    with open(path, "xb" if exclusive else "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def append(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Add `data` at the end of `path` (made with `mode` if new) and wait until it is on disk:
    the way to keep a log that is only ever appended to (an audit trail)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        os.write(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_text(path: Path, text: str, mode: int | None = None, like: Path | None = None) -> None:
    """Replace `path` with `text` atomically and durably: readers see the old file or the new
    one, never a half-written one, and the new one survives a power cut once this returns.

    Owner and mode come from `like` when it exists, else the mode is `mode` (None: what the
    file system gives, as on a FAT boot partition). The mode is set before the file gets its
    name, so a secret is never readable under it.
    """
    replace_bytes(path, text.encode("utf-8"), mode, like)


def replace_bytes(path: Path, data: bytes, mode: int | None = None,
                  like: Path | None = None) -> None:
    """`replace_text` for bytes."""
    stat = like.stat() if like is not None and like.exists() else None
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if stat is not None:
            os.chmod(temporary, stat.st_mode & 0o777)
            if os.geteuid() == 0:
                os.chown(temporary, stat.st_uid, stat.st_gid)
        elif mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
