"""Orthanc's storage area as files: where an attachment lives, and folders made as Orthanc's own.

Orthanc files an attachment of UUID `abcd...` under `ab/cd/abcd...` in its StorageDirectory.
Whoever puts a file back there (a repair, a restore, run as root) must leave folders Orthanc's
own user can go on writing to.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import durable
from .config import Settings


def file_path(settings: Settings, uuid: str) -> Path:
    """Where Orthanc keeps the attachment `uuid`."""
    return settings.orthanc_storage_dir / uuid[:2] / uuid[2:4] / uuid


def make_folders(settings: Settings, folder: Path) -> None:
    """Make the missing folders down to `folder` (inside the storage area) with the storage
    area's owner and mode."""
    root = settings.orthanc_storage_dir
    like = root.stat()
    missing = []
    while not folder.exists() and folder != root:
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir()
        durable.own_like(made, root)
        os.chmod(made, like.st_mode & 0o7777)
