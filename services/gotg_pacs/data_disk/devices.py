"""Which block devices may be used: never the system disk, never one in use, never too small.

lsblk is the one tool that sees a disk, its partitions, the mappings on them and their mounts
together; everything here is read from its JSON.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import DataDiskError, run

# Where the system lives: a disk holding any of these is never offered.
SYSTEM_MOUNTS = ("/", "/boot", "/boot/efi", "/boot/firmware", "/usr", "/var")
COLUMNS = "NAME,PATH,TYPE,SIZE,MOUNTPOINTS,LABEL,MODEL,TRAN,RM"


@dataclass(frozen=True)
class BlockDevice:
    path: str
    kind: str                   # disk, part, crypt, ...
    size: int                   # bytes
    model: str
    transport: str              # usb, sata, nvme, ... ("" when the kernel does not say)
    removable: bool
    mounted: tuple[str, ...]    # mount points of it and of everything on it ([SWAP] included)
    inner: tuple[tuple[str, str, str], ...]  # (path, kind, label) of everything on it

    def describe(self) -> str:
        words = " ".join(w for w in (self.model.strip(), self.transport.upper()) if w)
        return f"{self.path} ({size_text(self.size)}{', ' + words if words else ''})"


def size_text(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def _lsblk(*argv: str) -> dict[str, Any]:
    return json.loads(run("lsblk", "-J", "-b", "-o", COLUMNS, *argv))


def _walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = [node]
    for child in node.get("children") or []:
        found.extend(_walk(child))
    return found


def from_lsblk(node: dict[str, Any]) -> BlockDevice:
    """One device of `lsblk -J -b` output, with what sits on it."""
    below = _walk(node)
    mounted = tuple(m for n in below for m in (n.get("mountpoints") or []) if m)
    inner = tuple((n["path"], n["type"], n.get("label") or "") for n in below[1:])
    return BlockDevice(path=node["path"], kind=node["type"], size=int(node["size"] or 0),
                       model=node.get("model") or "", transport=node.get("tran") or "",
                       removable=bool(node.get("rm")), mounted=mounted, inner=inner)


def describe(device: Path) -> BlockDevice:
    if not device.is_block_device():
        raise DataDiskError(f"{device} is not a disk (see `lsblk` for the disks of this box)")
    return from_lsblk(_lsblk(str(device))["blockdevices"][0])


def system_disks() -> set[str]:
    """The disks (not partitions) that hold the running system."""
    disks = set()
    for target in SYSTEM_MOUNTS:
        source = subprocess.run(["findmnt", "-n", "-e", "-o", "SOURCE", target],
                                capture_output=True, text=True).stdout.strip()
        if not source.startswith("/dev/"):
            continue
        # -s: the device and what it sits on, up to the disk.
        for node in _lsblk("-s", source)["blockdevices"]:
            disks.update(n["path"] for n in _walk(node) if n["type"] == "disk")
    return disks


def usable(found: BlockDevice, purpose: str, need: int, system: set[str]) -> None:
    """Raise DataDiskError unless `found` may be erased and used for `purpose`."""
    if found.kind != "disk":
        raise DataDiskError(f"{found.path} is a {found.kind}, not a whole disk: give the disk "
                            "itself (for example /dev/sda, not /dev/sda1)")
    if found.path in system:
        raise DataDiskError(f"{found.path} holds this box's system: it can never be the "
                            f"{purpose}")
    if found.mounted:
        raise DataDiskError(f"{found.describe()} is in use (mounted at "
                            f"{', '.join(found.mounted)}): unmount it first, or choose "
                            "another disk")
    busy = [path for path, kind, _ in found.inner if kind not in ("part",)]
    if busy:
        raise DataDiskError(f"{found.describe()} is in use ({', '.join(busy)} open on it): "
                            "close that first, or choose another disk")
    if found.size < need:
        raise DataDiskError(f"{found.describe()} is too small for the {purpose}: "
                            f"{size_text(need)} needed")
