"""A flashed disk image booted for real: qemu-system-x86_64 (TCG, UEFI firmware from OVMF), or a
Raspberry Pi image's own kernel and root file system on qemu-system-aarch64's `virt` machine.

KVM is not usable on these machines (design brief section 5), so the whole machine is emulated;
slow but real: its own kernel, firmware, disk and page cache. Port forwards on 127.0.0.1 stand in
for the clinic's LAN. `power_off` kills qemu outright: the guest loses whatever it had not
written to its disk, exactly as when the power goes.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
from pathlib import Path

MTOOLS = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


class VM:
    def __init__(self, disk: Path, workdir: Path, forwards: dict[int, int],
                 memory_mb: int = 1024, disks: tuple[Path, ...] = (),
                 usb_sticks: tuple[Path, ...] = ()) -> None:
        """forwards: guest port -> host port on 127.0.0.1. `disks`: more internal disks (the
        guest's vdb, vdc, ...); `usb_sticks`: USB mass storage (sda, ...), removable."""
        self.disk, self.workdir, self.forwards = disk, workdir, forwards
        self.memory_mb = memory_mb
        self.disks, self.usb_sticks = disks, usb_sticks
        self.boots = 0
        self.process: subprocess.Popen | None = None

    @property
    def console(self) -> Path:
        return self.workdir / f"console-{self.boots}.log"

    def start(self) -> None:
        self.boots += 1
        hostfwd = ",".join(f"hostfwd=tcp:127.0.0.1:{host}-:{guest}"
                           for guest, host in self.forwards.items())
        self.process = subprocess.Popen(
            [*self.machine(), "-accel", "tcg", "-m", str(self.memory_mb), "-smp", "2",
             "-nographic", "-no-reboot",
             "-drive", f"file={self.disk},format=raw,if=virtio",
             *[arg for extra in self.disks
               for arg in ("-drive", f"file={extra},format=raw,if=virtio")],
             *self._usb(),
             "-netdev", f"user,id=lan,{hostfwd}", "-device", "virtio-net-pci,netdev=lan",
             "-serial", f"file:{self.console}",
             "-monitor", f"unix:{self.monitor},server,nowait"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _usb(self) -> list[str]:
        if not self.usb_sticks:
            return []
        argv = ["-device", "qemu-xhci,id=xhci"]
        for number, stick in enumerate(self.usb_sticks):
            argv += ["-drive", f"if=none,id=stick{number},format=raw,file={stick}",
                     "-device", f"usb-storage,bus=xhci.0,drive=stick{number},removable=on"]
        return argv

    def machine(self) -> list[str]:
        """A NUC: UEFI firmware with its variables kept beside the disk across boots."""
        variables = self.workdir / "OVMF_VARS.fd"
        if not variables.exists():
            shutil.copyfile(OVMF_VARS, variables)
        # -cpu max: the wheels' numpy needs x86-64-v2 (SSE4.2, POPCNT), which every NUC has and
        # qemu's default CPU model lacks.
        return ["qemu-system-x86_64", "-cpu", "max",
                "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,file={variables}"]

    @property
    def monitor(self) -> Path:
        return self.workdir / "monitor.sock"

    def shut_down(self, timeout: float = 300) -> bool:
        """Press the power button (ACPI) and wait for the guest to power off by itself."""
        if not self.running():
            return True
        with socket.socket(socket.AF_UNIX) as monitor:
            monitor.settimeout(30)
            monitor.connect(str(self.monitor))
            self._until_prompt(monitor)  # the monitor drops what comes before its greeting
            monitor.sendall(b"system_powerdown\n")
            self._until_prompt(monitor)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    @staticmethod
    def _until_prompt(monitor: socket.socket) -> None:
        seen = b""
        while not seen.rstrip().endswith(b"(qemu)"):
            block = monitor.recv(4096)
            if not block:
                return
            seen += block

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except OSError:
            return ""

    def power_off(self) -> None:
        """Pull the plug: no shutdown, no flush of the guest's caches."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def running(self) -> bool:
        return bool(self.process) and self.process.poll() is None

    def ssh(self, key: Path, user: str, *argv: str, timeout: float = 120,
            options: tuple[str, ...] = (), send: Path | None = None) -> subprocess.CompletedProcess:
        """Run a command on the guest as HQ's administrator would (guest port 22 forwarded);
        `send` is a local file fed to the command's standard input."""
        with open(send or "/dev/null", "rb") as stdin:
            done = subprocess.run(
                ["ssh", "-i", str(key), "-p", str(self.forwards[22]), *options,
                 "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                 "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=30",
                 f"{user}@127.0.0.1", shlex.join(argv)],  # one word per argument, as given
                capture_output=True, timeout=timeout, stdin=stdin)
        return subprocess.CompletedProcess(done.args, done.returncode,
                                           done.stdout.decode(errors="replace"),
                                           done.stderr.decode(errors="replace"))


class PiVM(VM):
    """A Pi 4 image on qemu's generic arm64 machine: there is no Pi 4 board model, so the
    firmware partition's kernel and initramfs are started directly with the image's own command
    line (console on the virt board's serial port), and the disk is the whole flashed image."""

    def __init__(self, disk: Path, workdir: Path, forwards: dict[int, int], kernel: Path,
                 initrd: Path, cmdline: str, memory_mb: int = 1024) -> None:
        super().__init__(disk, workdir, forwards, memory_mb)
        self.kernel, self.initrd, self.cmdline = kernel, initrd, cmdline

    @classmethod
    def from_image(cls, disk: Path, workdir: Path, forwards: dict[int, int],
                   memory_mb: int = 1024) -> PiVM:
        """Start what the Pi's firmware would: config.txt's kernel and initramfs with
        cmdline.txt's line, its console moved to the virt board's serial port."""
        kernel, initramfs = pi_boot_files(disk)
        for name in (kernel, initramfs):
            (workdir / name).write_bytes(fat_read(disk, name))
        cmdline = " ".join([word for word in fat_read(disk, "cmdline.txt").decode().split()
                            if not word.startswith("console=")] + ["console=ttyAMA0"])
        return cls(disk, workdir, forwards, workdir / kernel, workdir / initramfs, cmdline,
                   memory_mb)

    def machine(self) -> list[str]:
        # cortex-a72 is the Pi 4's CPU; qemu's "max" emulates pointer authentication slowly.
        return ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72",
                "-kernel", str(self.kernel), "-initrd", str(self.initrd),
                "-append", self.cmdline]


def fat_read(image: Path, name: str) -> bytes:
    """A file of a disk image's first partition (FAT: the Pi's firmware partition)."""
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], check=True,
                                      capture_output=True, text=True).stdout)["partitiontable"]
    fat = f"{image}@@{table['partitions'][0]['start'] * 512}"
    done = subprocess.run(["mcopy", "-n", "-i", fat, f"::/{name}", "-"], env=MTOOLS,
                          capture_output=True)
    if done.returncode != 0:
        raise FileNotFoundError(f"{name} is not on the firmware partition: "
                                f"{done.stderr.decode(errors='replace')}")
    return done.stdout


def pi_boot_files(image: Path) -> tuple[str, str]:
    """The kernel and initramfs config.txt tells the Pi's firmware to load."""
    config = fat_read(image, "config.txt").decode()
    kernel = re.search(r"^kernel=(\S+)", config, re.M)
    initramfs = re.search(r"^initramfs (\S+)", config, re.M)
    if not (kernel and initramfs):
        raise ValueError(f"config.txt names no kernel and initramfs:\n{config}")
    return kernel.group(1), initramfs.group(1)
