"""Flashable disk images: the appliance's tree (rootfs.py) laid out for a NUC or a Raspberry Pi 4.

No loop devices are needed (design brief section 5): the root filesystem is made from the tree
with `mkfs.ext4 -d`, the FAT partition with mkfs.vfat and mtools, the partition table with
sfdisk, and the partitions are copied into the disk file with dd.

- nuc: GPT, an EFI system partition with systemd-boot (kernel and initrd beside it), ext4 root.
- pi4: MBR, a FAT firmware partition as Debian's own Raspberry Pi images have it, ext4 root.

    python image-build/image.py --target nuc|pi4 [--vars FILE] [--out build/images]

Writes NAME.img, NAME.img.zst and NAME.img.sha256 (sha256sum format, for the .img and the .zst).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rootfs  # noqa: E402  (this folder is scripts, not a package)

ROOT = Path(__file__).resolve().parent.parent
ROOT_LABEL, BOOT_LABEL = rootfs.ROOT_LABEL, rootfs.BOOT_LABEL
MIB = 1024 * 1024
SECTOR = 512
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_TYPE_AMD64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
KERNEL_CMDLINE = f"root=LABEL={ROOT_LABEL} rw console=tty0 console=ttyS0,115200 quiet"


def _run(*argv: str, env: dict[str, str] | None = None) -> None:
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)


def _tree_bytes(tree: Path) -> int:
    out = subprocess.run(["du", "-sb", "--one-file-system", str(tree)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[0])


def _newest(tree: Path, pattern: str) -> Path:
    found = sorted((tree / "boot").glob(pattern))
    if not found:
        raise SystemExit(f"no {pattern} in {tree / 'boot'}: the kernel package did not install")
    return found[-1]


def make_fat(path: Path, size_mib: int, files: dict[str, Path | str]) -> None:
    """A FAT32 file system image holding `files` (target path -> source file or text)."""
    with path.open("wb") as handle:
        handle.truncate(size_mib * MIB)
    _run("mkfs.vfat", "-F", "32", "-n", BOOT_LABEL, "-i", "60770000", str(path))
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    made: set[str] = set()
    with tempfile.TemporaryDirectory() as scratch:
        for target, source in sorted(files.items()):
            parts = target.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                folder = "/".join(parts[:depth])
                if folder not in made:
                    _run("mmd", "-i", str(path), f"::/{folder}", env=env)
                    made.add(folder)
            if isinstance(source, str):
                text = Path(scratch) / "text"
                text.write_text(source)
                source = text
            _run("mcopy", "-i", str(path), str(source), f"::/{target}", env=env)


def make_ext4(path: Path, tree: Path) -> None:
    size = int(_tree_bytes(tree) * 1.25) + 768 * MIB  # room for the first studies before growing
    size = (size // MIB + 1) * MIB
    with path.open("wb") as handle:
        handle.truncate(size)
    env = {**os.environ}
    env.setdefault("E2FSPROGS_FAKE_TIME", os.environ.get("SOURCE_DATE_EPOCH", ""))
    _run("mkfs.ext4", "-q", "-L", ROOT_LABEL, "-d", str(tree), "-E",
         "root_owner=0:0", str(path), env={k: v for k, v in env.items() if v})


def assemble(disk: Path, boot: Path, root: Path, gpt: bool) -> None:
    """Partition table plus the two file systems, without loop devices."""
    start = 1 * MIB
    boot_size, root_size = boot.stat().st_size, root.stat().st_size
    total = start + boot_size + root_size + 1 * MIB
    with disk.open("wb") as handle:
        handle.truncate(total)
    boot_start, root_start = start // SECTOR, (start + boot_size) // SECTOR
    if gpt:
        table = ["label: gpt",
                 f"start={boot_start}, size={boot_size // SECTOR}, type={ESP_TYPE}, name=ESP",
                 f"start={root_start}, size={root_size // SECTOR}, type={ROOT_TYPE_AMD64}, "
                 "name=root"]
    else:
        table = ["label: dos",
                 f"start={boot_start}, size={boot_size // SECTOR}, type=c, bootable",
                 f"start={root_start}, size={root_size // SECTOR}, type=83"]
    subprocess.run(["sfdisk", "--quiet", str(disk)], input="\n".join(table) + "\n", text=True,
                   check=True, capture_output=True)
    for part, offset in ((boot, start), (root, start + boot_size)):
        _run("dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={offset // MIB}",
             "conv=notrunc,sparse", "status=none")


def boot_files_nuc(tree: Path) -> dict[str, Path | str]:
    efi = tree / "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
    if not efi.exists():
        raise SystemExit(f"{efi} is missing: systemd-boot did not install into the tree")
    return {"EFI/BOOT/BOOTX64.EFI": efi,
            "vmlinuz": _newest(tree, "vmlinuz-*"),
            "initrd.img": _newest(tree, "initrd.img-*"),
            "loader/loader.conf": "default gotg.conf\ntimeout 0\n",
            "loader/entries/gotg.conf": ("title GOTG PACS\nlinux /vmlinuz\ninitrd /initrd.img\n"
                                         f"options {KERNEL_CMDLINE}\n")}


def boot_files_pi4(tree: Path) -> dict[str, Path | str]:
    """The firmware partition exactly as raspi-firmware's hooks lay out /boot/firmware, so a
    kernel update on the box rewrites the same files (rootfs.pin_pi_boot_settings)."""
    firmware = tree / "boot/firmware"
    files: dict[str, Path | str] = {str(path.relative_to(firmware)): path
                                    for path in sorted(firmware.rglob("*")) if path.is_file()}
    cmdline = (firmware / "cmdline.txt").read_text() if "cmdline.txt" in files else ""
    if f"root=LABEL={ROOT_LABEL}" not in cmdline.split():
        raise SystemExit(f"cmdline.txt does not boot the image's root: {cmdline!r}")
    return files


def build(target: str, out_dir: Path, vars_file: Path | None, log=sys.stderr,
          bare: bool = False) -> dict:
    """`bare`: plain Debian laid out the same way (the benchmark's baseline), no appliance."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"debian-bare-{target}" if bare else f"gotg-pacs-{target}"
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as scratch:
        work = Path(scratch)
        begun = time.monotonic()
        rootfs.build(target, work / "tree", vars_file, log=log, bare=bare)
        timings["rootfs_seconds"] = round(time.monotonic() - begun, 1)
        begun = time.monotonic()
        tree = work / "tree"
        files = boot_files_nuc(tree) if target == "nuc" else boot_files_pi4(tree)
        make_fat(work / "boot.img", 256, files)
        make_ext4(work / "root.img", tree)
        assemble(work / f"{name}.img", work / "boot.img", work / "root.img", gpt=target == "nuc")
        image = out_dir / f"{name}.img"
        (work / f"{name}.img").replace(image)
        _run("zstd", "-q", "-f", "-T0", "-10", str(image), "-o", str(image) + ".zst")
        timings["image_seconds"] = round(time.monotonic() - begun, 1)
    sums = []
    for path in (image, Path(str(image) + ".zst")):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda handle=handle: handle.read(MIB), b""):
                digest.update(block)
        sums.append(f"{digest.hexdigest()}  {path.name}")
    Path(str(image) + ".sha256").write_text("\n".join(sums) + "\n")
    return {"target": target, "image": str(image), "bytes": image.stat().st_size,
            "zst_bytes": Path(str(image) + ".zst").stat().st_size, **timings}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=("nuc", "pi4"), required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "images")
    parser.add_argument("--vars", type=Path, default=None)
    parser.add_argument("--bare", action="store_true",
                        help="Plain Debian laid out the same way, without the appliance "
                             "(the baseline make bench-image boots beside it).")
    args = parser.parse_args()
    for tool in ("mmdebstrap", "mkfs.ext4", "mkfs.vfat", "mcopy", "sfdisk", "zstd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: make image installs what it needs")
    print(json.dumps(build(args.target, args.out, args.vars, bare=args.bare)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
