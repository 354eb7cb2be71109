"""The data disk: Orthanc's images and index on a disk of their own (a USB SSD beside an SD card),
LUKS2-encrypted when asked, so a box carried off with its disk gives nobody the patients.

`devices` says which disk may become the data disk or its key stick, `luks` makes and opens the
encryption, `move` puts the archive there without losing an image, `commands` is `pacs
data-disk`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


class DataDiskError(Exception):
    """Why a data disk cannot be prepared, unlocked or used, in words for site IT."""


class ToolFailed(DataDiskError):
    """A tool the disk work runs said no; `returncode` tells a wrong key from a broken disk."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def run(*argv: str, stdin: bytes | None = None) -> str:
    """Run one of the tools the disk work needs; its output, or ToolFailed with what it said."""
    done = subprocess.run(list(argv), input=stdin, capture_output=True)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).decode(errors="replace").strip()
        raise ToolFailed(f"{Path(argv[0]).name} {' '.join(argv[1:3])} failed: "
                         f"{said or done.returncode}", done.returncode)
    return done.stdout.decode(errors="replace")
