"""The Raspberry Pi 4 image: built for arm64, laid out as the Pi's boot ROM expects, and booted.

Why it matters: most clinics get an SD card. The Pi's firmware reads only an MBR disk's first
FAT partition; config.txt must name a kernel and initramfs that are really there, cmdline.txt
must point at the root file system by a name that survives an SD card or a USB disk, and the
root file system must be built for the Pi's CPU. No Pi 4 board model exists in qemu, so the
image's own kernel, initramfs and root file system are booted on the generic arm64 machine.

The image here is the Pi image without the appliance layer (`image.py --bare`): the same
mmdebstrap tree through qemu-user, raspi-firmware settings, initramfs and disk layout. The
appliance layer is the clinic playbook the NUC image test boots; applying it under qemu-user
costs about twelve more minutes of emulated Python (`make image TARGET=pi4`), more than the
suite can spare.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gotg_pacs.process import wait_until
from tests.support.container import REPO
from tests.support.site import free_port
from tests.support.vm import MTOOLS, PiVM, fat_read, pi_boot_files

pytestmark = [pytest.mark.timeout(2400), pytest.mark.started_first]

AARCH64 = b"\xb7\x00"  # ELF e_machine, little-endian, at offset 18


@pytest.fixture(scope="module")
def pi_image(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("pi-image")
    with (where / "build.log").open("w") as log:
        built = subprocess.run([sys.executable, str(REPO / "image-build" / "image.py"),
                                "--target", "pi4", "--bare", "--out", str(where)],
                               stdout=subprocess.PIPE, stderr=log, text=True, timeout=2000)
    assert built.returncode == 0, (where / "build.log").read_text()[-3000:]
    return Path(json.loads(built.stdout.splitlines()[-1])["image"])


def _partitions(image: Path) -> list[dict]:
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], check=True,
                                      capture_output=True, text=True).stdout)["partitiontable"]
    assert table["label"] == "dos", "the Pi's boot ROM reads MBR only"
    return table["partitions"]


def _fat(image: Path) -> str:
    return f"{image}@@{_partitions(image)[0]['start'] * 512}"


def _root_read(image: Path, path: str) -> bytes:
    """A file of the image's root file system, read without mounting it."""
    offset = _partitions(image)[1]["start"] * 512
    done = subprocess.run(["debugfs", "-R", f"cat {path}", f"{image}?offset={offset}"],
                          capture_output=True)
    assert done.returncode == 0 and b"not found" not in done.stderr, (path, done.stderr)
    return done.stdout


def test_the_firmware_partition_boots_a_pi_4_and_points_at_the_root(pi_image):
    sums = subprocess.run(["sha256sum", "-c", pi_image.name + ".sha256"], cwd=pi_image.parent,
                          capture_output=True, text=True)
    assert sums.returncode == 0, sums.stdout + sums.stderr
    firmware, root = _partitions(pi_image)
    assert firmware["type"] == "c" and firmware.get("bootable"), firmware
    assert root["type"] == "83"
    probe = subprocess.run(["blkid", "-p", "-O", str(root["start"] * 512), "-o", "export",
                            str(pi_image)], capture_output=True, text=True).stdout
    assert "LABEL=gotg-root" in probe and "TYPE=ext4" in probe

    listing = subprocess.run(["mdir", "-i", _fat(pi_image), "-b", "::/"], env=MTOOLS,
                             capture_output=True, text=True).stdout
    names = {line.rsplit("/", 1)[-1] for line in listing.split()}
    kernel, initramfs = pi_boot_files(pi_image)
    assert {"start4.elf", "fixup4.dat", "bcm2711-rpi-4-b.dtb", kernel, initramfs} <= names, names
    assert "arm_64bit=1" in fat_read(pi_image, "config.txt").decode()
    cmdline = fat_read(pi_image, "cmdline.txt").decode()
    assert len(cmdline.splitlines()) == 1, "the firmware reads cmdline.txt's first line only"
    assert "root=LABEL=gotg-root" in cmdline.split() and "rootwait" in cmdline.split()

    fstab = _root_read(pi_image, "/etc/fstab").decode()
    assert re.search(r"^LABEL=gotg-root\s+/\s+ext4", fstab, re.M), fstab
    assert re.search(r"^LABEL=GOTG-BOOT\s+/boot/firmware\s+vfat", fstab, re.M), fstab
    # Built for the Pi's CPU, pinned so a kernel update on the box writes the same cmdline.txt,
    # and nothing in it that must be unique per box.
    assert _root_read(pi_image, "/usr/lib/systemd/systemd")[18:20] == AARCH64
    pinned = _root_read(pi_image, "/etc/default/raspi-firmware").decode()
    assert re.search(r"^ROOTPART=LABEL=gotg-root$", pinned, re.M), pinned[-300:]
    assert _root_read(pi_image, "/etc/machine-id") == b""
    # What the firmware loads is the root's own kernel and the initramfs made last, after the
    # roles: not a copy left from an earlier step of the build.
    for name in (kernel, initramfs):
        assert fat_read(pi_image, name) == _root_read(pi_image, f"/boot/{name}"), name


def test_the_pi_image_boots_its_own_kernel_and_root_on_arm64(pi_image, tmp_path):
    disk = tmp_path / "sd.img"
    subprocess.run(["cp", "--sparse=always", str(pi_image), str(disk)], check=True)
    # The image's own kernel, initramfs and command line (console on the virt serial port).
    vm = PiVM.from_image(disk, tmp_path, {22: free_port()})
    # systemd prints unit status on the console only until the boot is finished; its log, sent
    # to the kernel's, says when a mount that ends later is done too.
    vm.cmdline += " systemd.log_target=kmsg"
    try:
        vm.start()

        def console() -> str:
            return re.sub(r"\x1b\[[0-9;]*m", "", vm.console_text())  # systemd's colours

        # The firmware partition is mounted where raspi-firmware's hooks write at a kernel
        # update; on a busy machine that can finish after the login prompt, so wait for both.
        assert wait_until(lambda: "login:" in console() and
                          "Mounted boot-firmware.mount - /boot/firmware." in console(),
                          1200, interval=5), console()[-3000:]
        # The root by its label is the image's second partition.
        assert re.search(r"EXT4-fs \(vda2\): mounted filesystem .* r/w", console()), \
            console()[-3000:]
        assert "Debian GNU/Linux 13 gotg-pacs ttyAMA0" in console()
    finally:
        vm.power_off()
