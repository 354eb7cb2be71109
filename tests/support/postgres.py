"""A throw-away PostgreSQL server for the test session, as HQ's Orthanc uses one.

Debian's PostgreSQL server programs (`initdb`, `postgres`; version 15 on Debian 12) run straight
from their folder on a free loopback port, with their data and unix socket in a private temporary
folder; nothing touches the system's own cluster or service. PostgreSQL refuses to run as root,
and the suite runs as root in CI: the server then runs as the `postgres` system user (created by
the Debian package), which owns the folder. On a developer's box it runs as the developer.

The server is our own child: it gets SIGQUIT if the test run dies, even by kill -9, so no stray
PostgreSQL outlives a run. Clients (psql) connect over the private socket as the
superuser without a password; Orthanc connects like HQ's does, over TCP to 127.0.0.1 as an
ordinary role with a password (scram-sha-256), so a wrong password is really refused.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.site import free_port


def _newest_bin() -> Path:
    """Debian keeps each major version's server programs in its own folder (15 on Debian 12)."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                      key=lambda path: int(path.parent.parent.name)
                      if path.parent.parent.name.isdigit() else 0)
    return versions[-1].parent if versions else Path("/usr/lib/postgresql/15/bin")


BIN = _newest_bin()
SUPERUSER = "postgres"
ORTHANC_ROLE = "orthanc"

_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl


class PostgresError(Exception):
    """The test server could not be set up; the message carries PostgreSQL's own words."""


def available() -> bool:
    return (BIN / "postgres").is_file() and (BIN / "initdb").is_file()


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) to run the server as: the `postgres` user when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise PostgresError("running as root needs the `postgres` system user "
                            "(apt-get install postgresql)") from None
    return user.pw_uid, user.pw_gid


def _become(ids: tuple[int, int] | None, parent: int | None):
    """What the server's process does between fork and exec: drop root, die with the run."""

    def setup() -> None:
        if ids:
            os.setgroups([])
            os.setgid(ids[1])
            os.setuid(ids[0])
        if parent is not None:  # set after setuid: changing credentials clears it
            _prctl(_PR_SET_PDEATHSIG, signal.SIGQUIT)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGQUIT)

    return setup


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder; `start`, then `create_database` per use."""

    def __init__(self) -> None:
        self.ids = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="gotg-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log = self.root / "postgres.log"
        self.host = "127.0.0.1"
        self.port = free_port()
        self.role = ORTHANC_ROLE
        self.password = secrets.token_urlsafe(16)
        self.process: subprocess.Popen[bytes] | None = None
        self._databases = 0

    # --- life ------------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> PostgresServer:
        for folder in (self.root, self.socket_dir):
            folder.mkdir(mode=0o700, exist_ok=True)
            if self.ids:
                os.chown(folder, *self.ids)
        password_file = self.root / "superuser-password"
        password_file.write_text(secrets.token_urlsafe(16) + "\n")
        if self.ids:
            os.chown(password_file, *self.ids)
        initdb = subprocess.run(
            [str(BIN / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "-E", "UTF8",
             "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=scram-sha-256",
             f"--pwfile={password_file}"],
            capture_output=True, text=True, preexec_fn=_become(self.ids, None), cwd=self.root)
        password_file.unlink()
        if initdb.returncode:
            raise PostgresError(f"initdb failed: {initdb.stderr.strip()[-800:]}")
        log = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if self.ids:
            os.fchown(log, *self.ids)
        with open(log, "ab") as handle:
            # Loopback and the private socket only; durability settings stay at PostgreSQL's
            # defaults (fsync, synchronous_commit), as on HQ's server.
            self.process = subprocess.Popen(
                [str(BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-c", f"listen_addresses={self.host}",
                 "-c", f"unix_socket_directories={self.socket_dir}",
                 "-c", "max_connections=200"],
                stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.root,
                preexec_fn=_become(self.ids, os.getpid()))
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise PostgresError(f"PostgreSQL did not start; log:\n{self.log_tail()}")
            time.sleep(0.1)
        self.sql("postgres", f"CREATE ROLE {self.role} LOGIN PASSWORD '{self.password}'")
        return self

    def ready(self) -> bool:
        check = subprocess.run([str(BIN / "pg_isready"), "-q", "-h", str(self.socket_dir),
                                "-p", str(self.port), "-U", SUPERUSER],
                               capture_output=True)
        return check.returncode == 0

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then the folder goes; nothing of the run is left behind."""
        try:
            if self.process and self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
                try:
                    self.process.wait(60)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # --- use -------------------------------------------------------------------------------------

    def sql(self, database: str, statement: str) -> str:
        """Run one statement as the superuser; rows come back as `a|b` lines."""
        done = subprocess.run(
            [str(BIN / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.socket_dir), "-p", str(self.port), "-U", SUPERUSER, "-d", database,
             "-c", statement],
            capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise PostgresError(f"psql on {database}: {done.stderr.strip()}")
        return done.stdout.strip()

    def create_database(self, prefix: str = "hq") -> str:
        """A new empty database owned by the Orthanc role; its name."""
        self._databases += 1
        name = f"{prefix}_{os.getpid()}_{self._databases}"
        self.sql("postgres", f"CREATE DATABASE {name} OWNER {self.role} ENCODING 'UTF8'")
        return name

    def env(self, database: str) -> dict[str, str]:
        """The env-file settings that point an appliance's Orthanc at one database here."""
        return {"ORTHANC_INDEX": "postgresql", "POSTGRESQL_HOST": self.host,
                "POSTGRESQL_PORT": str(self.port), "POSTGRESQL_DATABASE": database,
                "POSTGRESQL_USER": self.role, "POSTGRESQL_PASSWORD": self.password}
