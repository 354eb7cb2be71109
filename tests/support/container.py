"""An appliance tree built the way images are, booted as a container with its own network.

The tree comes from image-build/rootfs.py (mmdebstrap + the clinic playbook through a chroot),
so a test exercises the roles exactly as an image does. `systemd-nspawn --boot` runs its systemd
and the real units (design brief section 5); `--network-veth` gives it a network namespace of its
own, so its firewall rules never touch this machine's, and the tests reach it the way a modality
on the clinic's LAN would: by address, through that firewall.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from gotg_pacs.process import wait_until
from tests.support.netns import unused_third_octet

REPO = Path(__file__).resolve().parents[2]
# One clinic's settings as HQ's inventory would hold them (hostile name included).
CLINIC_SITE = {"pacs_config_admin_password": "container-admin-pw",
               "pacs_config_site_code": "field-7",
               "pacs_config_pacs_name": "Field hospital 7 <b>é</b>",
               "pacs_config_pacs_aet": "FIELD7", "pacs_config_dicom_access": "open",
               "base_ssh_allowed_from": ["10.99.0.0/24"]}
ROOTFS = REPO / "image-build" / "rootfs.py"
WHEELHOUSE = REPO / "image-build" / "wheelhouse.py"


def build_wheelhouse(out: Path, log: Path, arch: str = "amd64") -> Path:
    """This checkout's gotg-pacs and its dependencies as wheels for the tree's Python and CPU."""
    with log.open("a") as sink:
        subprocess.run([sys.executable, str(WHEELHOUSE), "--arch", arch, "--out", str(out)],
                       check=True, stdout=sink, stderr=sink, timeout=600)
    return out


def build_tree(out: Path, variables: dict, log: Path) -> None:
    """The clinic's root filesystem with `variables` as its site settings."""
    vars_file = out.parent / f"{out.name}-vars.json"
    vars_file.write_text(json.dumps(variables))
    with log.open("a") as sink:
        subprocess.run([sys.executable, str(ROOTFS), "--target", "container", "--out", str(out),
                        "--vars", str(vars_file)], check=True, stdout=sink, stderr=sink,
                       timeout=1200)


def apply_again(tree: Path, variables: dict, *extra: str) -> subprocess.CompletedProcess:
    """The clinic playbook once more on a built tree (what a later push does), output kept."""
    vars_file = tree.parent / f"{tree.name}-vars.json"
    vars_file.write_text(json.dumps(variables))
    return subprocess.run([sys.executable, str(ROOTFS), "--apply-to", str(tree), "--vars",
                           str(vars_file), *extra], capture_output=True, text=True, timeout=900)


def push(inventory: Path, playbook: str) -> subprocess.CompletedProcess:
    """ansible-playbook as HQ runs it (ansible/ansible.cfg), output kept for the assertions."""
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg"),
           "ANSIBLE_NOCOLOR": "1"}
    return subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i",
                           str(inventory), str(REPO / "ansible" / playbook)],
                          capture_output=True, text=True, env=env, timeout=900)


def recaps(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP per host: {host: {"ok": .., "changed": .., "failed": .., ...}}."""
    found = {}
    for line in output.splitlines():
        match = re.match(r"^(\S+)\s+: (ok=.*)$", line)
        if match:
            found[match[1]] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match[2])}
    return found


class Overlay:
    """A writable copy of a tree that costs nothing: overlayfs over the tree, left untouched."""

    def __init__(self, lower: Path, where: Path) -> None:
        self.upper, self.work, self.merged = where / "upper", where / "work", where / "merged"
        for folder in (self.upper, self.work, self.merged):
            folder.mkdir(parents=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={lower},upperdir={self.upper},workdir={self.work}",
                        str(self.merged)], check=True, capture_output=True)

    def close(self) -> None:
        subprocess.run(["umount", "--lazy", str(self.merged)], capture_output=True)


class Container:
    """One boot of a tree; `address` is the appliance as the clinic's LAN sees it."""

    def __init__(self, tree: Path, console: Path) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"gotg{tag}"
        third = unused_third_octet(232)
        self.host_ip, self.address = f"10.232.{third}.1", f"10.232.{third}.2"
        self.console = console
        self.process = subprocess.Popen(
            ["systemd-nspawn", "--register=no", "--keep-unit", "-q", "-D", str(tree), "--boot",
             "--network-veth", "-M", self.name, "--console=read-only"],
            stdout=console.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.host_dev = f"ve-{self.name}"[:15]
        if not wait_until(self._init_pid_known, 30):
            self.kill()
            raise RuntimeError(f"container did not start; console: {self.console_text()}")
        for argv in (["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_dev],
                     ["ip", "link", "set", self.host_dev, "up"]):
            subprocess.run(argv, check=True, capture_output=True)
        for argv in (["ip", "addr", "add", f"{self.address}/30", "dev", "host0"],
                     ["ip", "link", "set", "host0", "up"]):
            subprocess.run(["nsenter", "-t", str(self.init_pid), "-n", *argv], check=True,
                           capture_output=True)

    def _init_pid_known(self) -> bool:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            pids = children.read_text().split()
        except OSError:
            return False
        self.init_pid = int(pids[0]) if pids else 0
        return bool(pids) and Path(f"/sys/class/net/{self.host_dev}").exists()

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A command inside the container (all its namespaces)."""
        return subprocess.run(["nsenter", "-t", str(self.init_pid), "-a", *argv],
                              capture_output=True, text=True, timeout=timeout)

    def in_net(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """One of this machine's programs inside the container's network only (its loopback)."""
        return subprocess.run(["nsenter", "-t", str(self.init_pid), "-n", *argv],
                              capture_output=True, text=True, timeout=timeout)

    def active(self, unit: str) -> bool:
        return self.run("systemctl", "is-active", "--quiet", unit).returncode == 0

    def wait_booted(self, timeout: float = 120,
                    states: tuple[str, ...] = ("running", "degraded")) -> bool:
        def settled() -> bool:
            state = self.run("systemctl", "is-system-running").stdout.strip()
            return state in states
        return wait_until(settled, timeout, interval=0.5)

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 90) -> None:
        """An orderly shutdown, as the power button asks for one."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """A power cut: every process of the container dies at once, nothing is shut down."""
        if self.process.poll() is None:
            pid = getattr(self, "init_pid", 0)
            if pid:
                os.kill(pid, signal.SIGKILL)  # the namespace's init: the kernel kills the rest
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        time.sleep(0.5)  # let the veth pair go away with the namespace
