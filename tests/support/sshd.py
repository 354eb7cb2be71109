"""HQ's backup server for tests: the real OpenSSH sshd on a loopback port, with its own host key
and its own authorized_keys file, so a clinic's append-only key is enforced as it is at HQ."""

from __future__ import annotations

import getpass
import os
import subprocess
from pathlib import Path

from gotg_pacs.process import wait_until
from tests.support.site import free_port

SSHD = Path("/usr/sbin/sshd")


class BackupServer:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.repos = home / "repos"  # one repository per site, as at HQ
        self.repos.mkdir(parents=True)
        self.port = free_port()
        self.authorized_keys = home / "authorized_keys"
        self.authorized_keys.write_text("")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """REMOTE_BACKUP_URL for a clinic backing up here."""
        return f"ssh://{getpass.getuser()}@127.0.0.1:{self.port}{self.repos}"

    def start(self) -> BackupServer:
        host_key = self.home / "host_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)],
                       check=True)
        config = self.home / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
            f"AuthorizedKeysFile {self.authorized_keys}", f"PidFile {self.home / 'sshd.pid'}",
            "StrictModes no", "UsePAM no", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
            "LogLevel VERBOSE", ""]))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation
        self.process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)],
                                        stderr=open(self.home / "sshd.log", "w"))  # noqa: SIM115
        assert wait_until(self._listening, 15), (self.home / "sshd.log").read_text()
        return self

    def _listening(self) -> bool:
        import socket

        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def authorize(self, line: str) -> None:
        with open(self.authorized_keys, "a") as keys:
            keys.write(line.strip() + "\n")

    def stop(self) -> None:
        if self.process:
            self.process.terminate()
            self.process.wait(10)

    def repository(self, site: str) -> Path:
        return self.repos / f"{site}.borg"


def borg_as_clinic(clinic_key: Path, known_hosts: Path, *args: str,
                   passphrase: str) -> subprocess.CompletedProcess:
    """borg run by hand with the clinic's own key (what a thief holding the box could do)."""
    env = {**os.environ, "BORG_PASSPHRASE": passphrase,
           "BORG_RSH": f"ssh -i {clinic_key} -o BatchMode=yes -o UserKnownHostsFile="
                       f"{known_hosts} -o StrictHostKeyChecking=accept-new"}
    return subprocess.run(["borg", *args], capture_output=True, text=True, env=env, timeout=120)
