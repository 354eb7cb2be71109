"""MD5 of a file on disk, read in blocks: what Orthanc records for every attachment, so what
restores, repairs, orphan recovery and downloads compare against."""

from __future__ import annotations

import hashlib
from pathlib import Path


def md5_of(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()
